"""Evaluate a trained critique reward model on any preference/bench file.

    python -m mmrlhf_lite.evaluate reward runs/demo --data runs/demo/data/demo/demo.jsonl --critique given
    python -m mmrlhf_lite.evaluate reward runs/demo --data mm_reward_bench.jsonl --media-root MM-RLHF/ \
        --critique generate --out bench_report

Public reward-model benchmarks in the layouts they ship, with their own metrics (docs/benchmarks-rm.md):

    python -m mmrlhf_lite.evaluate bench runs/demo --bench vl-rewardbench --data vl_rewardbench.parquet
    python -m mmrlhf_lite.evaluate bench runs/demo --bench mm-rewardbench --data multimodal_rewardbench/data/all_data.json

Acc and Acc+ overall and per category (REFERENCE.md): pairs sharing an id (bench files list several pairs
per id) form one group for Acc+. The model settings come from the run folder's recipe.yaml. A hybrid
reward model (`reward.response_logp_weight` > 0: head + w x mean log-prob) gets, per critique mode, the
accuracy of the head alone and of the log-prob term alone beside that of the sum. `reward` also writes
`reward_scores.jsonl`: per group and mode, each response's score, its two parts and its critiques.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..data.formats import FORMATS


def _reward(args) -> int:
    from ..data.readers import load_groups
    from ..recipe import load_recipe
    from ..reward.scorer import RewardScorer
    from .pipeline import reward_results
    from .report import bench_table

    run = Path(args.run_dir)
    recipe_path = run / "recipe.yaml"
    if not recipe_path.exists():
        print(f"error: {recipe_path} not found: is {run} a run folder?", file=sys.stderr)
        return 2
    recipe = load_recipe(recipe_path, check_paths=False)
    from ..data.media import set_max_image_pixels

    set_max_image_pixels(recipe.data.max_image_pixels)
    groups = load_groups(args.data, fmt=args.format, media_root=args.media_root, on_error=args.on_error,
                         max_frames=recipe.data.max_frames).groups
    if args.max_groups:
        groups = groups[: args.max_groups]
    rc = recipe.reward
    scorer = RewardScorer.from_run(run, recipe.model, max_length=rc.train.max_length,
                                   max_frames=recipe.data.max_frames)
    results, lines = {}, []
    weight = scorer.response_logp_weight
    for mode in args.critique.split(","):
        start = time.time()
        scored = scorer.score_groups(groups, mode, n_samples=args.n_samples or rc.n_samples,
                                     temperature=rc.temperature, max_new_tokens=rc.max_new_tokens,
                                     batch_size=rc.generation_batch_size, seed=recipe.run.seed)
        res = reward_results(groups, scored, weight)
        res["seconds"] = round(time.time() - start, 1)
        results[mode] = res
        lines += [json.dumps({"id": g.id, "source": g.source, "mode": mode, "scores": [s.score for s in sc],
                              "head": [s.head for s in sc], "response_logp": [s.response_logp for s in sc],
                              "critiques": [s.critiques for s in sc]}) + "\n" for g, sc in zip(groups, scored)]
    out = Path(args.out) if args.out else run / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "reward_bench.json").write_text(json.dumps({"data": str(args.data), "response_logp_weight": weight,
                                                      "results": results}, indent=2))
    (out / SCORES_FILE).write_text("".join(lines))
    table = "\n".join(bench_table(f"Reward bench: {args.data}", results))
    (out / "reward_bench.md").write_text(table + "\n")
    print(table)
    print(f"written: {out / 'reward_bench.json'}, {out / 'reward_bench.md'}, {out / SCORES_FILE}")
    return 0


SCORES_FILE = "reward_scores.jsonl"  # per group and mode: each response's score, its parts and critiques


def _bench(args) -> int:
    from .bench_run import run_benchmark

    report = run_benchmark(args.run_dir, args.bench, args.data, critique=tuple(args.critique.split(",")),
                           media_root=args.media_root, out=args.out, max_pairs=args.max_pairs,
                           on_error=args.on_error, n_samples=args.n_samples)
    md = Path(report["out"]) / "report.md"
    print(md.read_text(encoding="utf-8"))
    print(f"written: {Path(report['out']) / 'report.json'}, {md}, {Path(report['out']) / 'predictions.jsonl'}")
    return 0


def _add_bench(sub) -> None:
    from .benchmarks import BENCHMARKS

    b = sub.add_parser("bench", help="a public reward-model benchmark, in its own layout and with its own metrics",
                       description="Score VL-RewardBench, Multimodal RewardBench or MM-RLHF-RewardBench with a "
                                   "run's critique reward model (docs/benchmarks-rm.md).")
    b.add_argument("run_dir", help="a run folder with a trained reward model (RUN/reward/final)")
    b.add_argument("--bench", required=True, choices=tuple(BENCHMARKS),
                   help="vl-rewardbench: its Parquet (image bytes); mm-rewardbench: its all_data.json beside the "
                        "image folder; mmrlhf-rewardbench: mm_reward_bench.jsonl")
    b.add_argument("--data", required=True, help="the benchmark file (or a folder holding only it)")
    b.add_argument("--media-root", default=None, help="folder the image paths are relative to (default: the file's "
                                                      "folder)")
    b.add_argument("--critique", default="generate", help="comma-separated modes: generate, given, none "
                                                          "(default: generate, the mode that feeds MM-DPO)")
    b.add_argument("--n-samples", type=int, default=0, help="critiques sampled per answer (default: recipe)")
    b.add_argument("--max-pairs", type=_count, default=0, help="score only the first N rows (ids for mmrlhf-rewardbench): a quick look")
    b.add_argument("--on-error", default="raise", choices=("raise", "skip"))
    b.add_argument("--out", default=None, help="output folder (default: RUN_DIR/bench/BENCH)")


def _count(text: str) -> int:
    """argparse type: an integer >= 0 (a usage error otherwise, exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0 = all groups), got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmrlhf_lite.evaluate", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("reward", help="Acc / Acc+ of a run's critique reward model on a data file")
    r.add_argument("run_dir")
    r.add_argument("--data", required=True, help="preference or bench file/folder (any supported format)")
    r.add_argument("--format", default="auto", choices=FORMATS, help="row format (default: detect)")
    r.add_argument("--media-root", default=None)
    r.add_argument("--critique", default="given", help="comma-separated modes: generate, given, none")
    r.add_argument("--n-samples", type=int, default=0, help="critiques sampled per response (default: recipe)")
    r.add_argument("--max-groups", type=_count, default=0, help="use at most this many groups (0 = all)")
    r.add_argument("--on-error", default="raise", choices=("raise", "skip"))
    r.add_argument("--out", default=None, help="output folder (default: RUN_DIR/eval)")
    _add_bench(sub)
    args = p.parse_args(argv)
    for mode in args.critique.split(","):
        if mode not in ("generate", "given", "none"):
            print(f"error: unknown critique mode {mode!r}; use generate, given or none", file=sys.stderr)
            return 2
    from ..recipe import RecipeError

    try:
        return _bench(args) if args.command == "bench" else _reward(args)
    except RecipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - a readable line, never a library traceback
        from ..train import report_error

        return report_error(exc, args.out or args.run_dir, resume="the evaluation starts again")


if __name__ == "__main__":
    sys.exit(main())
