"""Reward playground: score answers with a run's trained critique reward model; browse its reward cache.

A hybrid reward model (`reward.response_logp_weight` > 0) shows on each card how its score adds up: the
head's part + w x the answer's mean log-prob (`hybrid_line`).

Scoring goes through `RewardScorer.from_run(...).score_answers(...)`, the same API notebooks use, with
the model settings of the run's own recipe (so `trust_remote_code` is on only when that recipe asked).
The loaded model is kept for the next request (one at a time). The cache browser reads
`<run>/score/margins.jsonl` and gives each pair the dynamic beta of the run's DPO settings,
`dpo.loss.dynamic_beta` (REFERENCE.md, "Dynamic Reward Scaling").

    python app.py            # Reward playground tab
"""
from __future__ import annotations

import html
import os
import threading
from pathlib import Path

import pandas as pd

from .jobs import RECIPE_FILE, list_runs, run_path
from .safety import Refused

MAX_ANSWERS = 5
_scorer: dict = {}
_scorer_lock = threading.Lock()


def reward_runs(runs_root: str | os.PathLike) -> list[str]:
    """Runs with a trained critique reward model (stage `reward` finished)."""
    return [n for n in list_runs(runs_root) if (Path(runs_root) / n / "reward" / "final" / "adapter_config.json").exists()]


def cache_runs(runs_root: str | os.PathLike) -> list[str]:
    """Runs whose `score` stage wrote reward margins."""
    return [n for n in list_runs(runs_root) if (Path(runs_root) / n / "score" / "margins.jsonl").exists()]


def _recipe(run: Path):
    from ..recipe import load_recipe

    if not (run / RECIPE_FILE).exists():
        raise Refused(f"run '{run.name}' has no recipe.yaml")
    return load_recipe(run / RECIPE_FILE, check_paths=False)


def _load_scorer(run: Path):
    from ..reward.scorer import RewardScorer

    adapter = run / "reward" / "final" / "adapter_model.safetensors"
    if not adapter.exists():
        raise Refused(f"run '{run.name}' has no trained reward model yet (its `reward` stage has not finished)")
    key = (str(run), adapter.stat().st_mtime_ns)
    with _scorer_lock:
        if _scorer.get("key") != key:
            _scorer.clear()
            recipe = _recipe(run)
            scorer = RewardScorer.from_run(run, recipe.model, max_length=recipe.reward.train.max_length,
                                           max_frames=recipe.data.max_frames)
            _scorer.update(key=key, scorer=scorer)
        return _scorer["scorer"]


def warm(runs_root, run_name: str | None) -> None:
    """Start loading a run's reward model in the background (the page calls this when a run is picked),
    so the first Score does not wait for it. Errors surface at Score time instead."""
    try:
        run = run_path(runs_root, run_name) if run_name else None
    except Refused:
        return
    if run is None or not (run / "reward" / "final" / "adapter_model.safetensors").exists():
        return

    def load():
        try:
            _load_scorer(run)
        except Exception:  # noqa: BLE001 - reported by the Score that needs it
            pass
    threading.Thread(target=load, daemon=True).start()


def score(runs_root, run_name: str, image: bytes | None, question: str, answers: list[str], mode: str = "generate",
          max_new_tokens: int = 64) -> list[dict]:
    """Score 1-5 answers; returns one dict per answer (in input order) with its rank among them."""
    answers = [a.strip() for a in answers if a and a.strip()]
    if not answers:
        raise Refused("give at least one answer")
    if len(answers) > MAX_ANSWERS:
        raise Refused(f"at most {MAX_ANSWERS} answers")
    if not (question or "").strip():
        raise Refused("give a question")
    if mode not in ("generate", "none"):
        raise Refused("mode must be 'generate' (the model writes a critique) or 'none'")
    max_new_tokens = int(max_new_tokens or 64)
    if not 1 <= max_new_tokens <= 1024:
        raise Refused("critique length must be between 1 and 1024 tokens")
    scorer = _load_scorer(run_path(runs_root, run_name))
    with _scorer_lock:  # one generation at a time on the shared model
        scored = scorer.score_answers(image, question.strip(), answers, mode=mode, max_new_tokens=max_new_tokens)
    order = sorted(range(len(scored)), key=lambda i: -scored[i].score)
    ranks = {i: r + 1 for r, i in enumerate(order)}
    weight = scorer.response_logp_weight
    return [{"answer": a, "score": s.score, "rank": ranks[i], "critique": " | ".join(s.critiques), "head": s.head,
             "response_logp": s.response_logp, "response_logp_weight": weight}
            for i, (a, s) in enumerate(zip(answers, scored))]


def hybrid_line(r: dict) -> str:
    """How a hybrid score (reward.response_logp_weight > 0) adds up, in words; '' for the head alone."""
    w = r.get("response_logp_weight")
    if not w or r.get("response_logp") is None:
        return ""
    return (f"hybrid score = head {r['head']:.4f} + {w:g} × mean log-prob of the answer {r['response_logp']:.4f} "
            f"(reward.response_logp_weight = {w:g})")


def _printable(text: str) -> str:
    return "".join(ch if ch.isprintable() or ch in "\n\t" else "\ufffd" for ch in text)


def cards_html(results: list[dict]) -> str:
    """Answers side by side: rank, score and the generated critique (all text escaped)."""
    if not results:
        return ""
    cards = []
    for i, r in enumerate(results):
        crit = html.escape(_printable(r["critique"])) if r["critique"] else "<em>(no critique: mode none)</em>"
        cards.append(
            f"<div class='mm-card' data-rank='{r['rank']}'>"
            f"<div class='mm-card-head'><b>Answer {i + 1}</b> · rank <b>{r['rank']}</b> · "
            f"score <b>{r['score']:.4f}</b></div>"
            f"<div class='mm-card-answer'>{html.escape(r['answer'])}</div>"
            + (f"<div class='mm-card-hybrid'>{hybrid_line(r)}</div>" if hybrid_line(r) else "")
            + f"<div class='mm-card-critique'><b>Critique:</b> {crit}</div></div>")
    return "<div class='mm-cards'>" + "".join(cards) + "</div>"


def results_frame(results: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([{"answer #": i + 1, "rank": r["rank"], "score": round(r["score"], 4), "answer": r["answer"],
                          "critique": _printable(r["critique"])} for i, r in enumerate(results)],
                        columns=["answer #", "rank", "score", "answer", "critique"])


# --------------------------------------------------------------------------------------------------
# reward cache browser

def cache_pairs(runs_root, run_name: str, limit: int = 2000) -> tuple[pd.DataFrame, str]:
    """Every pair in the run's reward margins with its delta and the beta its DPO settings give it."""
    run = run_path(runs_root, run_name)
    import torch

    from ..dpo.loss import dynamic_beta
    from ..reward.scorer import load_margins

    try:
        margins = load_margins(run)
    except FileNotFoundError:
        raise Refused(f"run '{run_name}' has no reward cache yet (its `score` stage has not finished)") from None
    except ValueError as exc:
        raise Refused(f"run '{run_name}': its margins file cannot be read ({exc})") from None
    d = _recipe(run).dpo
    rows = []
    for gid, rec in margins.items():
        scores = rec.get("scores") or []
        for p in rec.get("pairs", []):
            rows.append({"group": gid, "split": rec.get("split"), "category": rec.get("category"),
                         "better #": p["better"] + 1, "worse #": p["worse"] + 1,
                         "score better": scores[p["better"]], "score worse": scores[p["worse"]],
                         "delta": p["delta"]})
    frame = pd.DataFrame(rows, columns=["group", "split", "category", "better #", "worse #", "score better",
                                        "score worse", "delta", "beta"])
    if rows:
        deltas = torch.tensor(frame["delta"].to_numpy(), dtype=torch.float64)
        if d.margin_source == "none":
            deltas = torch.zeros_like(deltas)
        frame["beta"] = dynamic_beta(deltas, d.beta, d.w, d.k, d.beta_floor).numpy()
    note = {"reward": "", "none": " This run's DPO used margin_source=none: every pair got beta_0.",
            "scores": " This run's DPO took deltas from the dataset's scores (margin_source=scores); the beta "
                      "column shows what these reward margins would give."}[d.margin_source]
    summary = "No pairs." if not rows else (
        f"**{len(frame)} pairs** in {len(margins)} groups. delta mean {frame['delta'].mean():.4f}, "
        f"{(frame['delta'] < 0).mean():.1%} negative (the reward model disagrees with the ranking). "
        f"beta = max({d.beta_floor:g}, {d.beta:g}·(1 + {d.w:g}·(1 − exp(−{d.k:g}·delta)))): "
        f"min {frame['beta'].min():.5f}, mean {frame['beta'].mean():.5f}, max {frame['beta'].max():.5f}.{note}")
    return frame.head(limit).round(5), summary
