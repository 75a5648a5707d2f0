"""Do the reward model's margins carry signal? Spearman correlation between each ranked pair's reward
delta = r(better) - r(worse) and its human rank gap = rank(worse) - rank(better), and the spread of the
dynamic beta_i that MM-DPO would use (a histogram PNG next to the margins).

Spearman's rho is the Pearson correlation of the two variables' ranks, tied values taking their average
rank (so it is defined on the demo, whose rank gaps are 1, 2 or 3). rho > 0: the reward model's margin
grows with the human gap; 0: the margins carry no ranking signal, so beta_i is noise.

    python -m pytest tests/test_margins.py -q
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence


def average_ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for t in range(i, j + 1):
            ranks[order[t]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rho of paired samples; None with fewer than 2 pairs or when either side is constant."""
    if len(x) != len(y):
        raise ValueError("spearman: x and y differ in length")
    if len(x) < 2:
        return None
    rx, ry = average_ranks(x), average_ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def rank_gaps(group) -> list[float] | None:
    """Human rank gap of each of `group.pairs()` (None when the group has explicit pairs without ranks)."""
    try:
        ranks = group.ranks()
    except ValueError:
        return None
    return [float(ranks[w] - ranks[b]) for b, w in group.pairs()]


def delta_rank_correlation(groups, scores: Sequence[Sequence[float]]) -> dict:
    """{"spearman", "pairs"} over every ranked pair of `groups` with per-response `scores`."""
    deltas, gaps = [], []
    for g, s in zip(groups, scores):
        gap = rank_gaps(g)
        if gap is None:
            continue
        for (b, w), d in zip(g.pairs(), gap):
            deltas.append(s[b] - s[w])
            gaps.append(d)
    return {"spearman": spearman(deltas, gaps), "pairs": len(deltas)}


def beta_spread(deltas: Sequence[float], beta: float, w: float, k: float, floor: float) -> dict:
    """Summary of beta_i = max(floor, beta * (1 + w * (1 - exp(-k * delta_i)))) over `deltas`."""
    betas = sorted(max(floor, beta * (1 + w * (1 - math.exp(-k * d)))) for d in deltas)
    if not betas:
        return {"n": 0}
    q = lambda p: betas[min(len(betas) - 1, int(p * (len(betas) - 1) + 0.5))]  # noqa: E731
    return {"n": len(betas), "min": betas[0], "p10": q(0.1), "median": q(0.5), "p90": q(0.9), "max": betas[-1],
            "mean": sum(betas) / len(betas)}


def write_beta_histogram(path: Path, deltas: Sequence[float], beta: float, w: float, k: float, floor: float,
                         title: str = "") -> Path:
    """PNG histogram of the pairs' dynamic beta_i (and of their deltas), for the run folder and the UI."""
    # a Figure of its own, without pyplot: the caller's backend and open figures (a notebook's inline
    # plots) are left alone
    from matplotlib.figure import Figure

    betas = [max(floor, beta * (1 + w * (1 - math.exp(-k * d)))) for d in deltas]
    fig = Figure(figsize=(8, 3))
    axes = fig.subplots(1, 2)
    axes[0].hist(deltas, bins=40, color="#4a6fa5")
    axes[0].set_xlabel("reward margin delta_i = r(better) - r(worse)")
    axes[0].set_ylabel("pairs")
    axes[1].hist(betas, bins=40, color="#c0504d")
    axes[1].axvline(beta, color="k", lw=1, ls="--")
    axes[1].set_xlabel(f"beta_i (beta={beta}, w={w}, k={k}; dashed: beta)")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=90)
    tmp.replace(path)
    return path
