"""MM-DPO loss against hand-worked values and an independent float64 formulation."""
import itertools
import math

import pytest
import torch

from mmrlhf_lite.dpo.loss import dynamic_beta, mm_dpo_loss, pair_losses


def _dpo_reference(pi_w, ref_w, pi_l, ref_l, beta):
    """Standard DPO (Rafailov et al.) written out with math, float64."""
    z = beta * ((pi_w - ref_w) - (pi_l - ref_l))
    return math.log1p(math.exp(-z)) if z > -30 else -z


def test_dynamic_beta_hand_values():
    # beta0=0.1, w=0.1, k=0.5: delta=2 -> 0.1*(1+0.1*(1-e^-1)) = 0.10632120558828557
    d = torch.tensor([2.0, 0.0, -1.0, 100.0], dtype=torch.float64)
    got = dynamic_beta(d, beta=0.1, w=0.1, k=0.5, floor=1e-3)
    assert got[0].item() == pytest.approx(0.10632120558828557, abs=1e-15)
    assert got[1].item() == pytest.approx(0.1, abs=1e-15)                      # delta = 0 -> beta0
    assert got[2].item() == pytest.approx(0.1 * (1 + 0.1 * (1 - math.exp(0.5))), abs=1e-15)  # shrinks
    assert got[3].item() == pytest.approx(0.11, abs=1e-12)                     # saturates at beta0*(1+w)


def test_dynamic_beta_floor():
    d = torch.tensor([-50.0], dtype=torch.float64)  # exp(25) makes the raw beta hugely negative
    assert dynamic_beta(d, beta=0.1, w=0.1, k=0.5, floor=1e-3).item() == 1e-3


def test_worked_example_from_docstring():
    policy = torch.tensor([-10.0, -14.0], dtype=torch.float64)
    ref = torch.tensor([-11.0, -12.0], dtype=torch.float64)       # h = (1) - (-2) = 3
    loss, m = mm_dpo_loss(policy, ref, torch.tensor([[0, 1]]), torch.tensor([2.0], dtype=torch.float64),
                          beta=0.1, w=0.1, k=0.5, gamma=0.0)
    assert loss.item() == pytest.approx(0.546329049361755, abs=1e-12)
    assert m["beta_mean"] == pytest.approx(0.10632120558828557)
    assert m["implicit_accuracy"] == 1.0


def test_w_zero_is_standard_dpo():
    g = torch.Generator().manual_seed(0)
    pol = torch.randn(6, generator=g, dtype=torch.float64) * 5
    ref = torch.randn(6, generator=g, dtype=torch.float64) * 5
    pairs = torch.tensor([[0, 1], [2, 3], [4, 5], [1, 4]])
    deltas = torch.randn(4, generator=g, dtype=torch.float64) * 3   # ignored when w = 0
    loss, _ = mm_dpo_loss(pol, ref, pairs, deltas, beta=0.2, w=0.0, k=0.7, gamma=0.0)
    want = sum(_dpo_reference(pol[b].item(), ref[b].item(), pol[w].item(), ref[w].item(), 0.2)
               for b, w in pairs.tolist()) / 4
    assert loss.item() == pytest.approx(want, abs=1e-12)


def test_all_pairs_equals_mean_of_one_by_one():
    """K = 4 responses -> 6 pairs from 4 log-probs == the 6 pair losses computed separately."""
    g = torch.Generator().manual_seed(1)
    pol = torch.randn(4, generator=g, dtype=torch.float64) * 3
    ref = torch.randn(4, generator=g, dtype=torch.float64) * 3
    pairs = list(itertools.combinations(range(4), 2))               # rank order 0 < 1 < 2 < 3
    deltas = torch.tensor([0.5 * (j - i) for i, j in pairs], dtype=torch.float64)
    loss, _ = mm_dpo_loss(pol, ref, torch.tensor(pairs), deltas, beta=0.1, w=0.5, k=0.5, gamma=0.0)
    one_by_one = []
    for (i, j), d in zip(pairs, deltas.tolist()):
        b = 0.1 * (1 + 0.5 * (1 - math.exp(-0.5 * d)))
        one_by_one.append(_dpo_reference(pol[i].item(), ref[i].item(), pol[j].item(), ref[j].item(), b))
    assert loss.item() == pytest.approx(sum(one_by_one) / 6, abs=1e-12)


def test_sft_term_and_weights():
    pol = torch.tensor([-3.0, -5.0], dtype=torch.float64)
    ref = torch.tensor([-3.0, -5.0], dtype=torch.float64)           # h = 0 -> DPO term = log 2
    loss, m = mm_dpo_loss(pol, ref, torch.tensor([[0, 1]]), torch.zeros(1, dtype=torch.float64),
                          sft_nll=torch.tensor(2.0, dtype=torch.float64), alpha=1.0, gamma=0.25)
    assert loss.item() == pytest.approx(math.log(2) + 0.5, abs=1e-12)
    assert m["sft_nll"] == 2.0
    pol = torch.tensor([0.0, -1.0, -2.0], dtype=torch.float64)
    ref = torch.zeros(3, dtype=torch.float64)
    pairs = torch.tensor([[0, 1], [0, 2]])
    w = torch.tensor([3.0, 1.0], dtype=torch.float64)
    loss, _ = mm_dpo_loss(pol, ref, pairs, torch.zeros(2, dtype=torch.float64), pair_weights=w, gamma=0.0, w=0.0)
    l1, l2 = _dpo_reference(0, 0, -1, 0, 0.1), _dpo_reference(0, 0, -2, 0, 0.1)
    assert loss.item() == pytest.approx((3 * l1 + l2) / 4, abs=1e-12)


def test_ipo_and_label_smoothing():
    h = torch.tensor([1.0, -2.0], dtype=torch.float64)
    b = torch.tensor([0.1, 0.5], dtype=torch.float64)
    ipo = pair_losses(h, b, "ipo")
    assert ipo.tolist() == pytest.approx([(1 - 5.0) ** 2, (-2 - 1.0) ** 2])
    ls = pair_losses(h, b, "sigmoid", 0.1)
    z = (h * b).tolist()
    want = [0.9 * math.log1p(math.exp(-x)) + 0.1 * math.log1p(math.exp(x)) for x in z]
    assert ls.tolist() == pytest.approx(want, abs=1e-12)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(2)
    pol = (torch.randn(5, generator=g, dtype=torch.float64) * 2).requires_grad_()
    ref = torch.randn(5, generator=g, dtype=torch.float64)
    pairs = torch.tensor([[0, 1], [0, 2], [1, 3], [2, 4], [3, 4]])
    deltas = torch.randn(5, generator=g, dtype=torch.float64)
    sft = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)

    def f(p, s):
        return mm_dpo_loss(p, ref, pairs, deltas, beta=0.3, w=0.4, k=0.9, sft_nll=s, gamma=0.25)[0]
    assert torch.autograd.gradcheck(f, (pol, sft))
    for lt in ("ipo",):
        assert torch.autograd.gradcheck(
            lambda p: mm_dpo_loss(p, ref, pairs, deltas, loss_type=lt, gamma=0.0,
                                  n_tokens=torch.tensor([3, 1, 4, 1, 5]))[0], (pol,))


def test_ipo_uses_length_normalised_log_probs():
    """IPO (Azar et al.; TRL's `ipo`): h on mean per-token log-probs. Chosen 4 tokens, rejected 2:
    policy sums -4, -6; reference sums -6, -5 -> per token (-4+6)/4 = 0.5 and (-6+5)/2 = -0.5, h = 1;
    beta 0.1 -> target 1/(2*0.1) = 5, loss (1 - 5)^2 = 16 (on sums h = 2 + 1 = 3 would give 4)."""
    pol = torch.tensor([-4.0, -6.0], dtype=torch.float64)
    ref = torch.tensor([-6.0, -5.0], dtype=torch.float64)
    loss, m = mm_dpo_loss(pol, ref, torch.tensor([[0, 1]]), torch.zeros(1, dtype=torch.float64), beta=0.1, w=0.0,
                          loss_type="ipo", gamma=0.0, n_tokens=torch.tensor([4, 2]))
    assert loss.item() == pytest.approx(16.0, abs=1e-12)
    with pytest.raises(ValueError, match="n_tokens"):
        mm_dpo_loss(pol, ref, torch.tensor([[0, 1]]), torch.zeros(1, dtype=torch.float64), loss_type="ipo")


@pytest.mark.parametrize("target", ["chosen", "best"])
def test_sft_term_of_each_pair_by_hand(target):
    """One group ranked 1, 2, 3: pairs (0, 1), (0, 2), (1, 2). Token log-probs r0 [-1, -3] (NLL 2),
    r1 [-4] (NLL 4), r2 [-5, -7, -6] (NLL 6); sums -4, -4, -18 against reference -3, -5, -20: ratios -1, 1, 2,
    h = -2, -3, -1. beta 0.1, w 0, alpha 1, gamma 0.5:
    chosen (the paper's): L = mean(log(1 + e^0.2), log(1 + e^0.3), log(1 + e^0.1)) + 0.5 * (2 + 2 + 4) / 3
                            = mean(0.7981389, 0.8543552, 0.7443967) + 1.3333333 = 0.7989636 + 1.3333333
                            = 2.1322969;
    best:                 L = 0.7989636 + 0.5 * (2 + 2 + 2) / 3 = 1.7989636."""
    from mmrlhf_lite.data.groups import PreferenceGroup, Response
    from mmrlhf_lite.dpo.trainer import sft_response

    group = PreferenceGroup(id="g", prompt=[{"role": "user", "content": [{"type": "text", "text": "q"}]}],
                            responses=[Response("a", rank=1), Response("b", rank=2), Response("c", rank=3)])
    tokens = [torch.tensor(t, dtype=torch.float64) for t in ([-1.0, -3.0], [-4.0], [-5.0, -7.0, -6.0])]
    pairs = group.pairs()
    assert pairs == [(0, 1), (0, 2), (1, 2)]
    sft = torch.stack([-tokens[sft_response(group, p, target)].mean() for p in pairs])
    loss, metrics = mm_dpo_loss(torch.stack([t.sum() for t in tokens]),
                                torch.tensor([-3.0, -5.0, -20.0], dtype=torch.float64), torch.tensor(pairs),
                                torch.zeros(3, dtype=torch.float64), beta=0.1, w=0.0, alpha=1.0, gamma=0.5,
                                sft_nll=sft)
    dpo = (math.log1p(math.exp(0.2)) + math.log1p(math.exp(0.3)) + math.log1p(math.exp(0.1))) / 3
    assert dpo == pytest.approx(0.7989636, abs=1e-7)
    expected = {"chosen": 2.1322969, "best": 1.7989636}[target]
    assert loss.item() == pytest.approx(dpo + 0.5 * {"chosen": 8 / 3, "best": 2.0}[target], abs=1e-12)
    assert loss.item() == pytest.approx(expected, abs=1e-7)
    assert metrics["sft_nll"] == pytest.approx({"chosen": 8 / 3, "best": 2.0}[target], abs=1e-12)
