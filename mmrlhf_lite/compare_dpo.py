"""MM-DPO against plain DPO, side by side: seeds x {MM-DPO, DPO} (and optional w/k settings) on the same
data, reward model, margins and reference log-probs, with and without label noise; one markdown table.

Per noise level, one base run trains the reward model and computes the margins (stage score) and the
reference log-probs once (on the noisy training pairs: the reward model learns from the same noisy labels
the policy gets; `--reward-from RUN` uses one already trained reward model for every level instead).
Every DPO run then reuses them: `reward.model_from` = the base, one shared `cache.dir` (per level unless
given) and the base's `score/margins.jsonl`; it runs `dpo` and a light `eval` (held-out implicit reward accuracy
and log-prob ranking accuracy on the clean held-out labels, no generation unless `--policy-samples`
asks for the policy's own answers: then the table adds the share of right answers and the reward model's
rank of them). Every row also gives the mean beta_i the runs trained with (the `beta_mean` training
metric averaged over the logged steps). Not part of the test suite: it takes tens of minutes on CPU.

Any recipe key can differ between methods (`--set NAME:key=value`, repeatable), and `--beta-from
NAME=REF` runs method NAME at dpo.beta = the mean beta_i of method REF's runs at the same noise level:
plain DPO (w = 0) at the beta MM-DPO used on average separates the per-pair scaling from a larger beta.

    python -m mmrlhf_lite.compare_dpo recipes/demo.yaml --out runs/compare --seeds 0,1,2 --noise 0,0.25
    python -m mmrlhf_lite.compare_dpo recipes/demo.yaml --out runs/compare --seeds 0 --methods "w0.5k1:0.5:1"
    python -m mmrlhf_lite.compare_dpo recipes/demo.yaml --out runs/sft --noise 0 --policy-samples 1 \
        --methods "chosen:0.1:0.5,best:0.1:0.5" --set chosen:dpo.sft_target=chosen --set best:dpo.sft_target=best
    python -m mmrlhf_lite.compare_dpo recipes/demo.yaml --out runs/beta --methods "MM-DPO:1:1,DPO:0:0.5,DPO-mean:0:0.5" \
        --beta-from DPO-mean=MM-DPO
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import NamedTuple

DEFAULT_METHODS = "MM-DPO:0.1:0.5,DPO:0:0.5"


class Method(NamedTuple):
    name: str
    w: float
    k: float
    overrides: tuple[str, ...] = ()   # recipe overrides of this method only (`--set NAME:key=value`)
    beta_from: str | None = None      # dpo.beta = the mean beta_i of this method's runs (`--beta-from`)


def parse_methods(text: str, sets: list[str] = (), beta_from: list[str] = ()) -> list[Method]:
    """`--methods` (NAME:W:K, comma-separated) with each method's `--set NAME:key=value` overrides and
    `--beta-from NAME=REF`; a bad entry stops the command before any run, naming the entry."""
    out = []
    for part in text.split(","):
        try:
            name, w, k = part.split(":")
            out.append(Method(name.strip(), float(w), float(k)))
        except ValueError:
            raise SystemExit(f"error: --methods entry {part!r} is not NAME:W:K (e.g. MM-DPO:0.1:0.5)") from None
    names = [m.name for m in out]
    if len(set(names)) < len(names):
        raise SystemExit(f"error: --methods names must differ: {', '.join(names)}")
    for item in sets:
        name, _, override = item.partition(":")
        if name not in names or "=" not in override:
            raise SystemExit(f"error: --set {item!r} is not NAME:key=value with NAME one of {', '.join(names)}")
        i = names.index(name)
        out[i] = out[i]._replace(overrides=out[i].overrides + (override,))
    for item in beta_from:
        name, _, ref = item.partition("=")
        if name not in names or ref not in names or names.index(ref) >= names.index(name):
            raise SystemExit(f"error: --beta-from {item!r} is not NAME=REF with both in --methods and REF before "
                             "NAME (its runs give the beta)")
        i = names.index(name)
        out[i] = out[i]._replace(beta_from=ref)
    return out


def trained_beta_mean(run: Path) -> float | None:
    """Mean of the `beta_mean` metric over the dpo stage's logged steps (events.jsonl): the average beta_i
    the run trained with."""
    values = []
    path = run / "events.jsonl"
    for line in path.read_text().splitlines() if path.exists() else ():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("type") == "metrics" and event.get("stage") == "dpo" and "beta_mean" in event:
            values.append(float(event["beta_mean"]))
    return sum(values) / len(values) if values else None


def _run(recipe_path: str, overrides: list[str], stages: list[str]) -> None:
    from .recipe import load_recipe
    from .train import run_pipeline

    run_pipeline(load_recipe(recipe_path, overrides), stages, echo=False)


def _mean_sd(xs: list[float], digits: int = 3) -> str:
    """Mean ± sample standard deviation."""
    if not xs:
        return "-"
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return f"{m:.{digits}f} ± {sd:.{digits}f}"


def matched_beta(rows: list[dict], name: str) -> float:
    """The beta of `--beta-from`: the mean over method `name`'s runs of the mean beta_i each trained with."""
    betas = [r["beta_mean"] for r in rows if r.get("beta_mean") is not None]
    if not betas:
        raise SystemExit(f"error: --beta-from: the runs of {name} logged no beta_mean (dpo metrics in events.jsonl)")
    return sum(betas) / len(betas)


def compare(recipe_path: str, out: Path, seeds: list[int], noises: list[float], methods: list[Method],
            overrides: list[str], reward_from: str | None = None, policy_samples: int = 0) -> dict:
    results: dict = {}
    for noise in noises:
        root = out / f"noise{noise:g}"
        base = root / "base"
        cache = root / "cache"
        # the caches are content-keyed (reward model, responses): a `cache.dir=` override shared by every
        # level and by other comparisons with the same reward model recomputes nothing
        common = [f"cache.dir={cache}"] + overrides + [f"data.label_noise={noise}"]
        t = time.time()
        if reward_from:  # one reward model (trained on clean labels) for every noise level
            _run(recipe_path, common + [f"run.dir={base}", "run.seed=0", f"reward.model_from={reward_from}"],
                 ["score", "reference"])
        else:
            _run(recipe_path, common + [f"run.dir={base}", "run.seed=0"], ["reward", "score", "reference"])
        print(f"[noise {noise:g}] base (reward, score, reference): {time.time() - t:.0f} s", flush=True)
        score = json.loads((base / "stages" / "score.json").read_text())
        per = results.setdefault(str(noise), {})
        for method in methods:
            settings = list(method.overrides)
            if method.beta_from:
                settings.append(f"dpo.beta={matched_beta(per.get(method.beta_from, []), method.beta_from):.6g}")
            for seed in seeds:
                run = root / f"{method.name}-s{seed}"
                (run / "score").mkdir(parents=True, exist_ok=True)
                shutil.copyfile(base / "score" / "margins.jsonl", run / "score" / "margins.jsonl")
                t = time.time()
                _run(recipe_path, common + [f"run.dir={run}", f"run.seed={seed}",
                                            f"reward.model_from={reward_from or base}",
                                            f"dpo.w={method.w}", f"dpo.k={method.k}", "eval.critique_modes=[]",
                                            f"eval.policy_samples={policy_samples}"] + settings, ["dpo", "eval"])
                pol = json.loads((run / "eval" / "report.json").read_text())["policy"]
                row = {"seed": seed, "w": method.w, "k": method.k, "settings": settings,
                       "implicit_accuracy": pol["implicit_accuracy"], "logp_accuracy": pol["logp_accuracy"],
                       "beta_mean": trained_beta_mean(run), "seconds": round(time.time() - t, 1)}
                if pol.get("right_answers"):
                    row["right_answers"] = pol["right_answers"]["after"]
                if pol.get("reward_rank"):
                    row["reward_rank"] = pol["reward_rank"]["after"]
                per.setdefault(method.name, []).append(row)
                extra = "".join(f", {label} {row[key]:.3f}" for key, label in
                                (("right_answers", "right answers"), ("reward_rank", "reward rank")) if key in row)
                print(f"[noise {noise:g}] {method.name} seed {seed}: implicit acc {pol['implicit_accuracy']:.3f}, "
                      f"log-prob acc {pol['logp_accuracy']:.3f}{extra} ({time.time() - t:.0f} s)", flush=True)
        per["_margins"] = {"mode": score.get("mode"), "eval_delta_rank_spearman": score.get("eval_delta_rank_spearman"),
                           "beta": score.get("beta")}
    return results


def table(results: dict, methods: list) -> str:
    """Markdown: one row per noise level and method, mean ± sd over seeds; the columns for the policy's
    answers, the trained mean beta_i and the method's own settings appear when some row has them."""
    rows_of = {(noise, m[0]): per.get(m[0], []) for noise, per in results.items() for m in methods}
    every = [r for rows in rows_of.values() for r in rows]
    optional = [(key, label) for key, label in (("right_answers", "held-out right answers"),
                                                ("reward_rank", "reward rank of its answers (1 = first)"),
                                                ("beta_mean", "mean beta_i (training)"))
                if any(r.get(key) is not None for r in every)]
    with_settings = any(r.get("settings") for r in every)
    head = ["label noise", "method (w, k)"] + (["settings"] if with_settings else []) + \
        ["held-out implicit reward acc", "held-out log-prob acc"] + [label for _, label in optional] + ["seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for noise in results:
        for name, w, k, *_ in methods:
            rows = rows_of[(noise, name)]
            cells = [f"{float(noise):.0%}", f"{name} ({w:g}, {k:g})"]
            if with_settings:
                cells.append(", ".join(rows[0].get("settings") or []) if rows else "")
            cells += [_mean_sd([r["implicit_accuracy"] for r in rows]), _mean_sd([r["logp_accuracy"] for r in rows])]
            cells += [_mean_sd([r[key] for r in rows if r.get(key) is not None], 4 if key == "beta_mean" else 3)
                      for key, _ in optional]
            lines.append("| " + " | ".join(cells + [str(len(rows))]) + " |")
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
    p.add_argument("--set", action="append", default=[], metavar="NAME:KEY=VALUE",
                   help="a recipe override for method NAME only (repeatable), e.g. best:dpo.sft_target=best")
    p.add_argument("--beta-from", action="append", default=[], metavar="NAME=REF",
                   help="run method NAME at dpo.beta = the mean beta_i that method REF (listed before it) trained "
                   "with at the same noise level")
    p.add_argument("--policy-samples", type=int, default=0, help="eval.policy_samples of every run: > 0 generates "
                   "the policy's answers (right-answer share, reward rank) at the cost of generation and scoring")
    a = p.parse_intermixed_args(argv)
    methods = parse_methods(a.methods, a.set, a.beta_from)
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
        for method in methods:  # a bad override stops here, not after the first runs
            load_recipe(frozen, a.overrides + list(method.overrides))
    except RecipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    results = compare(str(frozen), out, seeds, noises, methods, a.overrides, a.reward_from, a.policy_samples)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    md = table(results, methods)
    (out / "table.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
