"""MM-DPO against plain DPO, side by side: seeds x {MM-DPO, DPO} (and optional w/k settings) on the same
data, reward model, margins and reference log-probs, with and without label noise; one markdown table.

Per noise level, one base run trains the reward model and computes the margins (stage score) and the
reference log-probs once (on the noisy training pairs: the reward model learns from the same noisy labels
the policy gets; `--reward-from RUN` uses one already trained reward model for every level instead). Every DPO run then reuses them: `reward.model_from` = the base, one shared `cache.dir`,
and the base's `score/margins.jsonl`; it runs `dpo` and a light `eval` (held-out implicit reward accuracy
and log-prob ranking accuracy on the clean held-out labels, no generation). Not part of the test suite:
it takes tens of minutes on CPU.

    python -m mmrlhf_lite.compare_dpo recipes/demo.yaml --out runs/compare --seeds 0,1,2 --noise 0,0.25
    python -m mmrlhf_lite.compare_dpo recipes/demo.yaml --out runs/compare --seeds 0 --methods "w0.5k1:0.5:1"
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

DEFAULT_METHODS = "MM-DPO:0.1:0.5,DPO:0:0.5"


def _methods(text: str) -> list[tuple[str, float, float]]:
    out = []
    for part in text.split(","):
        try:
            name, w, k = part.split(":")
            out.append((name.strip(), float(w), float(k)))
        except ValueError:
            raise SystemExit(f"error: --methods entry {part!r} is not NAME:W:K (e.g. MM-DPO:0.1:0.5)") from None
    return out


def _run(recipe_path: str, overrides: list[str], stages: list[str]) -> None:
    from .recipe import load_recipe
    from .train import run_pipeline

    run_pipeline(load_recipe(recipe_path, overrides), stages, echo=False)


def _mean_sd(xs: list[float]) -> str:
    if not xs:
        return "-"
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return f"{m:.3f} ± {sd:.3f}"


def compare(recipe_path: str, out: Path, seeds: list[int], noises: list[float],
            methods: list[tuple[str, float, float]], overrides: list[str], reward_from: str | None = None) -> dict:
    results: dict = {}
    for noise in noises:
        root = out / f"noise{noise:g}"
        base = root / "base"
        cache = root / "cache"
        common = overrides + [f"data.label_noise={noise}", f"cache.dir={cache}"]
        t = time.time()
        if reward_from:  # one reward model (trained on clean labels) for every noise level
            _run(recipe_path, common + [f"run.dir={base}", "run.seed=0", f"reward.model_from={reward_from}"],
                 ["score", "reference"])
        else:
            _run(recipe_path, common + [f"run.dir={base}", "run.seed=0"], ["reward", "score", "reference"])
        print(f"[noise {noise:g}] base (reward, score, reference): {time.time() - t:.0f} s", flush=True)
        score = json.loads((base / "stages" / "score.json").read_text())
        for name, w, k in methods:
            for seed in seeds:
                run = root / f"{name}-s{seed}"
                (run / "score").mkdir(parents=True, exist_ok=True)
                shutil.copyfile(base / "score" / "margins.jsonl", run / "score" / "margins.jsonl")
                t = time.time()
                _run(recipe_path, common + [f"run.dir={run}", f"run.seed={seed}",
                                            f"reward.model_from={reward_from or base}",
                                            f"dpo.w={w}", f"dpo.k={k}", "eval.critique_modes=[]",
                                            "eval.policy_samples=0"], ["dpo", "eval"])
                pol = json.loads((run / "eval" / "report.json").read_text())["policy"]
                results.setdefault(str(noise), {}).setdefault(name, []).append(
                    {"seed": seed, "w": w, "k": k, "implicit_accuracy": pol["implicit_accuracy"],
                     "logp_accuracy": pol["logp_accuracy"], "seconds": round(time.time() - t, 1)})
                print(f"[noise {noise:g}] {name} seed {seed}: implicit acc {pol['implicit_accuracy']:.3f}, "
                      f"log-prob acc {pol['logp_accuracy']:.3f} ({time.time() - t:.0f} s)", flush=True)
        results[str(noise)]["_margins"] = {"mode": score.get("mode"),
                                           "eval_delta_rank_spearman": score.get("eval_delta_rank_spearman"),
                                           "beta": score.get("beta")}
    return results


def table(results: dict, methods: list[tuple[str, float, float]]) -> str:
    lines = ["| label noise | method (w, k) | held-out implicit reward acc | held-out log-prob acc | seeds |",
             "|---|---|---|---|---|"]
    for noise, per in results.items():
        for name, w, k in methods:
            rows = per.get(name, [])
            lines.append(f"| {float(noise):.0%} | {name} ({w:g}, {k:g}) | "
                         f"{_mean_sd([r['implicit_accuracy'] for r in rows])} | "
                         f"{_mean_sd([r['logp_accuracy'] for r in rows])} | {len(rows)} |")
    lines.append("")
    for noise, per in results.items():
        m = per.get("_margins") or {}
        b = m.get("beta") or {}
        sp = m.get("eval_delta_rank_spearman")
        if b.get("n"):
            lines.append(f"- noise {float(noise):.0%}: margins from critique mode {m.get('mode')}, held-out "
                         f"Spearman(delta, rank gap) {'-' if sp is None else f'{sp:.3f}'}; MM-DPO beta_i (w=0.1, "
                         f"k=0.5) over {b['n']} training pairs: p10 {b['p10']:.4f}, median {b['median']:.4f}, "
                         f"p90 {b['p90']:.4f}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmrlhf_lite.compare_dpo", description=__doc__.split("\n")[0])
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key.path=value recipe overrides for every run")
    p.add_argument("--out", required=True, help="folder for the runs, results.json and table.md")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--noise", default="0,0.25", help="comma-separated label-noise shares (data.label_noise)")
    p.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated NAME:W:K (w = 0 is plain DPO)")
    p.add_argument("--reward-from", default=None, help="a run folder whose trained reward model every noise level "
                   "uses (default: each noise level trains its own on its noisy pairs)")
    a = p.parse_intermixed_args(argv)
    methods = _methods(a.methods)
    try:
        seeds = [int(s) for s in a.seeds.split(",")]
        noises = [float(x) for x in a.noise.split(",")]
    except ValueError:
        print("error: --seeds takes integers and --noise numbers, comma-separated", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from .recipe import RecipeError, load_recipe
    try:  # every run reads this resolved copy: editing the recipe while the comparison runs changes none
        frozen = out / "recipe.yaml"
        load_recipe(a.recipe).save(frozen)
    except RecipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    results = compare(str(frozen), out, seeds, noises, methods, a.overrides, a.reward_from)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    md = table(results, methods)
    (out / "table.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
