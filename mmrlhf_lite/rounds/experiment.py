"""Do online rounds help when labels are few? One command that writes the table of docs/rounds.md.

Per task (the demo's shapes, `data/demo.py`; the majority colour, `data/majority.py`) and seed:

1. the held-out groups are the recipe's split (data.eval_fraction of the task's groups, human-ranked); of the
   training groups a seeded `--labelled` share (default 20%) keeps its ranked responses, the rest become prompts
   (responses withheld: only the question, the image and the `meta` that says which answer is right);
2. **rounds**: the reward model and a first MM-DPO policy (`--first-steps`) train on the labelled share, then
   `--rounds` online rounds (`--round-steps` MM-DPO steps each) sample answers for the withheld prompts, rank them
   with that reward model and train on them (`python -m mmrlhf_lite.train ... --rounds N`, stages reward, score,
   reference, dpo, rounds);
3. **offline (a)**: MM-DPO on the labelled share alone, **offline (b)**: on every human-ranked training group, each
   for the same number of steps as the rounds in all (the first policy's and every round's), with the same reward model
   (`reward.model_from`: margins and the reward rank come from it) and the same held-out evaluation.

It reports held-out right answers, well-formed answers, the reward rank (among the group's 4 human-ranked
responses, 1 = above all) and the implicit reward accuracy, mean ± sd over the seeds, after each round and for
the two offline runs, into `OUT/table.md` and `OUT/results.json`, with the wall time and the machine's load.

    python -m mmrlhf_lite.rounds.experiment --out /tmp/rounds-exp --seeds 0,1,2 --tasks shapes,majority

The tasks can run side by side, one process each (`--tasks shapes --out A`, `--tasks majority --out B`); `--merge
A,B` then writes the one table of the seeds that finished in each (`results.json` is rewritten after every seed),
training nothing.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

TASKS = ("shapes", "majority")
METRICS = (("right_answers", "right answers", True), ("well_formed", "well-formed", True),
           ("reward_rank", "reward rank", False), ("implicit_accuracy", "implicit acc", True))


def write_task(task: str, folder: Path, groups: int) -> Path:
    if task == "shapes":
        from ..data.demo import write_demo
        return write_demo(folder, groups, 0)
    from ..data.majority import write_majority
    return write_majority(folder, groups, 0)


def labelled_share(gid: str, seed: int) -> float:
    return int(hashlib.sha256(f"labelled:{seed}:{gid}".encode()).hexdigest()[:12], 16) / 16 ** 12


def split_files(task_file: Path, out: Path, seed: int, labelled: float, eval_fraction: float) -> dict[str, Path]:
    """eval.jsonl (held-out, ranked), labelled.jsonl (the labelled share), all.jsonl (every training group) and
    rounds.jsonl (the labelled share, ranked, and every other training group as a prompt without responses)."""
    from ..data import split_groups
    from ..data.groups import PreferenceGroup

    rows = [json.loads(line) for line in task_file.read_text().splitlines() if line.strip()]
    groups = [PreferenceGroup.from_record(r) for r in rows]
    train, evals = split_groups(groups, eval_fraction, 0)
    by_id = {r["id"]: r for r in rows}
    root = task_file.parent

    def absolute(rec: dict) -> dict:
        return {**rec, "images": [str(root / p) for p in rec["images"]]}

    out.mkdir(parents=True, exist_ok=True)
    chosen = {g.id for g in train if labelled_share(g.id, seed) < labelled}
    files = {}
    for name, recs in (
            ("eval", [by_id[g.id] for g in evals]),
            ("labelled", [by_id[g.id] for g in train if g.id in chosen]),
            ("all", [by_id[g.id] for g in train]),
            ("rounds", [by_id[g.id] if g.id in chosen else {k: v for k, v in by_id[g.id].items() if k != "responses"}
                        for g in train])):
        files[name] = out / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(absolute(r)) + "\n" for r in recs))
    return files


def _run(recipe: str, overrides: list[str], stages: list[str]) -> float:
    from ..recipe import load_recipe
    from ..train import run_pipeline

    start = time.time()
    run_pipeline(load_recipe(recipe, overrides), stages, echo=False)
    return time.time() - start


def one_seed(args, task: str, seed: int, task_file: Path) -> dict:
    root = Path(args.out) / task / f"seed{seed}"
    files = split_files(task_file, root / "data", seed, args.labelled, args.eval_fraction)
    common = list(args.overrides) + [f"run.seed={seed}", f"data.eval_path={files['eval']}",
                                     f"reward.critique_mode={args.critique_mode}", "eval.critique_modes=[]",
                                     f"cache.dir={root / 'cache'}", f"rounds.temperature={args.temperature}",
                                     f"rounds.samples={args.samples}", "rounds.patience=0",
                                     # the SFT term on each group's best answer: in a round, the reward model's pick
                                     "dpo.sft_target=best"]
    if args.max_prompts:
        common.append(f"rounds.max_prompts={args.max_prompts}")
    seconds = {}
    rounds_dir = root / "rounds"
    seconds["rounds"] = _run(args.recipe, common + [
        f"run.dir={rounds_dir}", f"data.path={files['rounds']}", f"rounds.n={args.rounds}", "rounds.prompts=unranked",
        f"rounds.steps={args.round_steps}", f"dpo.train.max_steps={args.first_steps}"],
        ["reward", "score", "reference", "dpo", "rounds"])
    history = json.loads((rounds_dir / "rounds" / "summary.json").read_text())["history"]
    # the offline runs train for as many steps as the first policy and every round together
    total = args.first_steps + sum(h.get("steps") or 0 for h in history[1:])
    from . import signals
    from .guard import stop_reason
    from .round import held_out_numbers

    out = {"rounds": [h["held_out"] for h in history], "sampled": [h.get("sampled") for h in history],
           "dropped": [h.get("dropped") for h in history], "steps": [args.first_steps] + [h.get("steps") for h in
                                                                                    history[1:]], "total_steps": total,
           "guard": next((stop_reason(signals(history[:r + 1]), 2) for r in range(len(history))
                          if stop_reason(signals(history[:r + 1]), 2)), None)}
    for name in ("labelled", "all"):
        run_dir = root / f"offline-{name}"
        seconds[name] = _run(args.recipe, common + [
            f"run.dir={run_dir}", f"data.path={files[name]}", f"reward.model_from={rounds_dir}",
            f"dpo.train.max_steps={total}"] + ([f"eval.critique_modes=[{args.critique_mode}]"] if name == "labelled"
                                                else []), ["score", "reference", "dpo", "eval"])
        report = json.loads((run_dir / "eval" / "report.json").read_text())
        out[name] = held_out_numbers(report["policy"])
        if name == "labelled":
            out["reward_model_acc"] = report["reward_model"]["modes"][args.critique_mode]["overall"]["acc"]
    out["seconds"] = seconds
    out["seed"] = seed
    out["groups"] = {k: sum(1 for _ in open(v)) for k, v in files.items()}
    return out


def fmt_steps(xs: list[int]) -> str:
    return str(xs[0]) if len(set(xs)) == 1 else f"{min(xs)}-{max(xs)}"


def mean_sd(xs: list) -> tuple[float, float] | None:
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def fmt(xs: list, pct: bool) -> str:
    ms = mean_sd(xs)
    if ms is None:
        return "-"
    m, sd = ms
    return f"{100 * m:.1f} ± {100 * sd:.1f}%" if pct else f"{m:.2f} ± {sd:.2f}"


def table(task: str, per_seed: list[dict], args) -> list[str]:
    total = fmt_steps([s["total_steps"] for s in per_seed])
    lines = [f"| {task} | " + " | ".join(label for _, label, _ in METRICS) + " |",
             "|---|" + "---|" * len(METRICS)]
    rows = []
    for r in range(args.rounds + 1):
        steps = fmt_steps([sum(s["steps"][:r + 1]) for s in per_seed if len(s["steps"]) > r])
        what = ("first MM-DPO policy (labelled share)" if r == 0 else f"after round {r}") + f", {steps} steps"
        rows.append((what, [s["rounds"][r] if r < len(s["rounds"]) else {} for s in per_seed]))
    rows.append((f"offline (a): labelled share only, {total} steps", [s["labelled"] for s in per_seed]))
    rows.append((f"offline (b): all human-ranked training groups, {total} steps", [s["all"] for s in per_seed]))
    for what, cells in rows:
        lines.append(f"| {what} | " + " | ".join(fmt([c.get(k) for c in cells], pct) for k, _, pct in METRICS) + " |")
    lines += ["", f"Reward model (labelled share) held-out pair accuracy: "
                  f"{fmt([s.get('reward_model_acc') for s in per_seed], True)}. Samples per round (right / well-formed / "
                  "KL to the first policy, mean over seeds): "
                  + "; ".join(f"round {r}: {fmt([s['sampled'][r]['right_answers'] for s in per_seed], True)} / "
                              f"{fmt([s['sampled'][r]['well_formed'] for s in per_seed], True)} / "
                              f"{fmt([s['sampled'][r]['kl_to_initial'] for s in per_seed], False)}"
                              for r in range(1, args.rounds + 1) if all(s['sampled'][r] for s in per_seed)) + ".",
              "The reward model on each round's samples (rounds/guard.py, `ranker_check`: right above wrong in the "
              "pairs where the data knows, / its top answer right where a prompt has both, mean over seeds; '-' "
              "where no seed recorded it): "
              + "; ".join(f"round {r}: {fmt([s['sampled'][r].get('ranker_right') for s in per_seed], True)} / "
                          f"{fmt([s['sampled'][r].get('best_right') for s in per_seed], True)}"
                          for r in range(1, args.rounds + 1) if all(s['sampled'][r] for s in per_seed)) + ".",
              "Guard (rounds.patience 2, applied after the fact): "
              + "; ".join(f"seed {s['seed']}: {s['guard'] or 'no stop'}" for s in per_seed)]
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mmrlhf_lite.rounds.experiment", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--recipe", default="recipes/demo.yaml")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--groups", type=int, default=600, help="groups of each task (held-out ones included)")
    ap.add_argument("--labelled", type=float, default=0.2, help="share of the training groups that keep their labels")
    ap.add_argument("--eval-fraction", type=float, default=0.15)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--first-steps", type=int, default=600, help="MM-DPO steps of the first policy (labelled share)")
    ap.add_argument("--round-steps", type=int, default=0, help="rounds.steps (0 = one pass over the round's groups)")
    ap.add_argument("--temperature", type=float, default=0.7, help="rounds.temperature")
    ap.add_argument("--samples", type=int, default=4, help="rounds.samples")
    ap.add_argument("--max-prompts", type=int, default=0, help="rounds.max_prompts (0 = all)")
    ap.add_argument("--critique-mode", default="none", choices=("none", "generate"),
                    help="how the reward model scores answers (none: no critique, the faster)")
    ap.add_argument("--merge", default="", help="comma-separated OUT folders of earlier runs: write the table of "
                                                "their finished seeds into --out, training nothing")
    ap.add_argument("overrides", nargs="*", help="recipe overrides for every run, e.g. rounds.max_prompts=200")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        return merge(args, out)
    results, lines = {}, []
    start, loads = time.time(), []
    for task in args.tasks.split(","):
        if task not in TASKS:
            print(f"error: unknown task {task!r}; tasks are {', '.join(TASKS)}", file=sys.stderr)
            return 2
        task_file = write_task(task, out / task / "data", args.groups)
        per_seed = []
        for seed in [int(s) for s in args.seeds.split(",")]:
            per_seed.append(one_seed(args, task, seed, task_file))
            loads.append(os.getloadavg()[0])
            (out / "results.json").write_text(json.dumps({**results, task: per_seed}, indent=2))
            print(f"{task} seed {seed}: {json.dumps(per_seed[-1]['seconds'])}", file=sys.stderr, flush=True)
        results[task] = per_seed
        lines += table(task, per_seed, args) + [""]
    wall = time.time() - start
    lines.append(f"Wall time {wall / 60:.0f} min; 1-minute load average after each seed: "
                 + ", ".join(f"{x:.1f}" for x in loads) + f" ({os.cpu_count()} CPUs).")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print("\n".join(lines))
    return 0


def merge(args, out: Path) -> int:
    """The table of the finished seeds of several earlier runs' `results.json` (a task in two of them: the seeds
    of both)."""
    results: dict[str, list] = {}
    for folder in args.merge.split(","):
        path = Path(folder) / "results.json"
        if not path.is_file():
            print(f"error: {path} not found (a run writes it once its first seed has finished)", file=sys.stderr)
            return 2
        for task, per_seed in json.loads(path.read_text()).items():
            results.setdefault(task, []).extend(per_seed)
    lines = []
    for task, per_seed in results.items():
        args.rounds = max(len(s["rounds"]) for s in per_seed) - 1
        lines += table(task, sorted(per_seed, key=lambda s: s["seed"]), args) + [""]
    seconds = [sum(s["seconds"].values()) for per_seed in results.values() for s in per_seed]
    lines.append("Seeds: " + "; ".join(f"{task} {', '.join(str(s['seed']) for s in sorted(per_seed, key=lambda s: s['seed']))}"
                                        for task, per_seed in results.items())
                 + f". Training time per task and seed (all three runs): {min(seconds) / 60:.0f}-{max(seconds) / 60:.0f} min.")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
