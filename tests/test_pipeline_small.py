"""All five stages on the xs tiny model in about a minute: the files each stage leaves, the report's
sections, the event stream, and a re-run that skips everything (fast coverage; the learning claims are
in test_demo_e2e.py)."""
import gc
import json
import weakref

from mmrlhf_lite.events import read_events
from mmrlhf_lite.recipe import load_recipe
from mmrlhf_lite.train import run_pipeline

SMALL = ["model.path=tiny:qwen2_vl:xs", "model.device=cpu", "data.demo.groups=12", "data.demo.image_size=56",
         "data.eval_fraction=0.34", "reward.train.max_steps=3", "reward.train.groups_per_step=2",
         "reward.train.grad_accum=1", "reward.max_new_tokens=6", "dpo.train.max_steps=3",
         "dpo.train.groups_per_step=2", "dpo.train.grad_accum=1", "eval.max_new_tokens=6", "run.seed=0"]


def test_all_stages_small(tmp_path, monkeypatch):
    from mmrlhf_lite.models import loading

    # one model in memory at a time, the pre-flight's assumption (docs/memory.md): every load finds the models
    # loaded before it gone. The eval stage once kept the untrained reward model while the trained one scored,
    # and the policy while the reward model scored its answers (13.9 GiB measured on the GPU smoke, 8.8 planned)
    loaded, overlaps = [], []
    real_load = loading._load_transformers

    def load_alone(path, cfg, family, device, dtype, adapter, *args, **kw):
        gc.collect()
        alive = [what for what, ref in loaded if ref() is not None]
        if alive:
            overlaps.append((str(adapter), alive))
        model = real_load(path, cfg, family, device, dtype, adapter, *args, **kw)
        loaded.append((str(adapter), weakref.ref(model)))
        return model

    monkeypatch.setattr(loading, "_load_transformers", load_alone)
    recipe = load_recipe(None, SMALL + [f"run.dir={tmp_path / 'run'}", "reward.critique_mode=given"])
    ctx = run_pipeline(recipe, echo=False)
    assert len(loaded) >= 8 and overlaps == [], overlaps
    run = tmp_path / "run"
    for stage in ("reward", "score", "reference", "dpo", "eval"):
        assert ctx.run.is_done(stage), stage
    assert (run / "reward" / "final" / "adapter_config.json").exists()
    assert (run / "dpo" / "final" / "adapter_config.json").exists()
    margins = [json.loads(x) for x in (run / "score" / "margins.jsonl").read_text().splitlines()]
    assert len(margins) == 12 and all(len(m["scores"]) == 4 for m in margins)
    for m in margins:
        for p in m["pairs"]:
            assert p["delta"] == m["scores"][p["better"]] - m["scores"][p["worse"]]
    report = json.loads((run / "eval" / "report.json").read_text())
    assert set(report["reward_model"]["modes"]) == {"given", "none", "generate"}
    assert set(report["reward_model"]["before"]) == {"given", "none", "generate"}
    pol = report["policy"]
    assert 0.0 <= pol["implicit_accuracy"] <= 1.0 and pol["pairs"] == report["pairs"]
    assert pol["win_rate"]["critique_mode"] == "generate" and pol["win_rate"]["n"] == report["groups"]
    md = (run / "eval" / "report.md").read_text()
    assert "| given |" in md and "implicit reward accuracy" in md
    assert f"gamma={recipe.dpo.gamma} sft_target=chosen" in md   # the SFT term's response, default the paper's
    events, _ = read_events(run)
    kinds = {e["type"] for e in events}
    assert {"run_start", "stage_start", "progress", "metrics", "stage_end", "run_end"} <= kinds
    assert [e["stage"] for e in events if e["type"] == "stage_end"] == ["reward", "score", "reference", "dpo",
                                                                         "eval"]
    # a second invocation with the same recipe does nothing but skip
    ctx2 = run_pipeline(recipe, echo=False)
    events2, _ = read_events(run)
    assert [e for e in events2[len(events):] if e["type"] == "stage_start"] == []
    assert ctx2.run.is_done("eval")


def test_policy_metrics_with_several_samples(tmp_path, monkeypatch):
    """policy_samples = 2: every sample stays with its own group (the samples listed per group, the rank
    metric over all of them), and the reward bench before training samples as many critiques as after."""
    from mmrlhf_lite.reward.scorer import RewardScorer

    calls = []
    real = RewardScorer.score_groups

    def recording(self, groups, mode="generate", **kw):  # the real scorer, its arguments recorded
        calls.append((mode, kw.get("n_samples", 1)))
        return real(self, groups, mode, **kw)

    monkeypatch.setattr(RewardScorer, "score_groups", recording)
    recipe = load_recipe(None, SMALL + [f"run.dir={tmp_path / 'run'}", "reward.critique_mode=given",
                                        "eval.policy_samples=2", "reward.n_samples=2", "reward.max_new_tokens=4"])
    run_pipeline(recipe, echo=False)
    report = json.loads((tmp_path / "run" / "eval" / "report.json").read_text())
    pol = report["policy"]
    assert all(len(s["after"]) == 2 and len(s["before"]) == 2 for s in pol["samples"])
    assert len({s["group"] for s in pol["samples"]}) == len(pol["samples"])
    assert pol["reward_rank"]["n"] == 2 * report["groups"]
    assert 1 <= pol["reward_rank"]["after"] <= 1 + pol["reward_rank"]["k"]
    assert 0 <= pol["well_formed"]["before"] <= 1 and pol["right_answers"]["n"] > 0
    # the xs model writes byte soup before training: no win rate against it, and the report says why
    assert pol["win_rate"]["win_rate"] is None and "well-formed" in pol["win_rate"]["withheld"]
    assert "not reported" in (tmp_path / "run" / "eval" / "report.md").read_text()
    bench = [n for mode, n in calls if mode in ("given", "none", "generate")]
    assert bench and set(bench) == {2}, calls
    assert report["margins"]["beta"]["n"] > 0 and (tmp_path / "run" / "score" / "beta_hist.png").exists()
