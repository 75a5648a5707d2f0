"""The side-by-side verdict of one benchmark run: each system's best batch, ours over TRL, the FLOP
model's predicted ratio, the share of the measured matmul peak, and where a step's time goes.

The last printed line is the ratio, in one fixed form that scripts and tests read:

    ours/trl pairs/s = 11.20x at cpu: 256 image tokens, K=4, ~64-token responses

    python -m bench.summary bench/results/cpu-side-by-side.jsonl     # re-reads a result file's last run
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

RATIO_LINE = re.compile(r"^ours/trl pairs/s = (\d+\.\d\d)x at (.+)$")


def best_rows(rows: list[dict]) -> dict[str, dict]:
    """Per system, its `ok` run row with the most pairs/s (memory-cap trials excluded)."""
    best: dict[str, dict] = {}
    for r in rows:
        if r.get("kind") == "run" and r.get("status") == "ok" and not r.get("mem_cap_gb") and r.get("pairs_per_s"):
            if r["system"] not in best or r["pairs_per_s"] > best[r["system"]]["pairs_per_s"]:
                best[r["system"]] = r
    return best


def shape_label(row: dict) -> str:
    return (f"{row['model']}: {row['image_tokens_target']} image tokens, K={row['k']}, "
            f"~{row['response_tokens_target']}-token responses")


def side_by_side(rows: list[dict], peak_gflops: float | None = None, ours: str = "ours",
                 baseline: str = "trl", also: tuple[str, ...] = ("unsloth-trl",)) -> tuple[dict, list[str]]:
    """(`kind: summary` row, printed lines). The last line is the ratio line (`RATIO_LINE`) when both
    `ours` and `baseline` have an ok row; otherwise it says which one is missing and why."""
    best = best_rows(rows)
    summary: dict = {"kind": "summary", "ours": ours, "baseline": baseline, "peak_gflops": peak_gflops,
                     "systems": {}}
    lines = ["side by side (best batch of each system):"]
    for system, r in best.items():
        executed = r["pairs_per_s"] * r["executed_tflop_per_pair"] * 1e3       # GFLOP/s
        useful = r["pairs_per_s"] * r["useful_tflop_per_pair"] * 1e3
        entry = {"batch": r["batch"], "batch_unit": r["batch_unit"], "pairs_per_s": r["pairs_per_s"],
                 "trl": r.get("trl"), "executed_gflops": executed, "useful_gflops": useful,
                 "executed_over_useful": r["executed_tflop_per_pair"] / r["useful_tflop_per_pair"]}
        if peak_gflops:
            entry.update(executed_share_of_peak=executed / peak_gflops, mfu_measured_peak=useful / peak_gflops)
        summary["systems"][system] = entry
        share = (f", {entry['executed_share_of_peak'] * 100:.0f}% of the measured peak executed, "
                 f"MFU {entry['mfu_measured_peak'] * 100:.0f}%") if peak_gflops else ""
        lines.append(f"  {system:14s} {r['batch']:3d} {r['batch_unit']:6s} {r['pairs_per_s']:8.3f} pairs/s  "
                     f"executed {r['executed_tflop_per_pair'] * 1e3:8.2f} GFLOP/pair "
                     f"({entry['executed_over_useful']:.3f}x useful), {executed:7.1f} GFLOP/s{share}"
                     + (f"  [trl {r['trl']}]" if r.get("trl") else ""))
        prof = r.get("profile")
        if prof:
            cats = ", ".join(f"{c} {v['share'] * 100:.0f}%" for c, v in list(prof["categories"].items())[:5])
            lines.append(f"  {'':14s} profile of one step ({prof['time_of']} self time): {cats}")
    if peak_gflops:
        lines.append(f"  measured matmul peak: {peak_gflops:.1f} GFLOP/s")
    missing = [s for s in (ours, baseline) if s not in best]
    if missing:
        why = []
        for s in missing:
            row = next((r for r in rows if r.get("kind") == "run" and r.get("system") == s), None)
            why.append(f"{s}: {row['status']} ({str(row.get('reason', ''))[:120]})" if row else f"{s}: not run")
        lines.append("ours/trl pairs/s: not measured (" + "; ".join(why) + ")")
        summary["ratio"] = None
        return summary, lines
    o, b = best[ours], best[baseline]
    for other in also:   # further baselines (Unsloth + TRL on a GPU), each a line before the last
        if other in best:
            r = best[other]
            summary.setdefault("ratios", {})[other] = o["pairs_per_s"] / r["pairs_per_s"]
            lines.append(f"ours/{other} pairs/s = {o['pairs_per_s'] / r['pairs_per_s']:.2f}x at {shape_label(o)}")
    ratio = o["pairs_per_s"] / b["pairs_per_s"]
    predicted = b["executed_tflop_per_pair"] / o["executed_tflop_per_pair"]
    summary.update(ratio=ratio, flop_model_ratio=predicted, shape=shape_label(o))
    lines.append(f"  FLOP model: {baseline} executes {predicted:.2f}x the FLOPs per pair of {ours} "
                 f"(the ratio at equal FLOP/s); measured {ratio:.2f}x")
    lines.append(f"ours/trl pairs/s = {ratio:.2f}x at {shape_label(o)}")
    return summary, lines


def read_rows(path: str | Path, from_line: int = 0) -> list[dict]:
    lines = Path(path).read_text().splitlines()[from_line:]
    return [json.loads(line) for line in lines if line.strip()]


def last_run(path: str | Path) -> list[dict]:
    rows = read_rows(path)
    run_id = rows[-1]["run_id"]
    return [r for r in rows if r.get("run_id") == run_id]


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m bench.summary", description=__doc__.split("\n\n")[0])
    p.add_argument("results", help="a bench JSONL file")
    p.add_argument("--from-line", type=int, default=None,
                   help="summarise every row from this line on (several runs, e.g. bench/gpu.sh's items); "
                        "default: the file's last run")
    p.add_argument("--append", action="store_true", help="append the summary row to the file")
    args = p.parse_args(argv)
    rows = last_run(args.results) if args.from_line is None else read_rows(args.results, args.from_line)
    peak = next((r["peak_gflops"] for r in rows if r.get("kind") == "peak"), None)
    summary, lines = side_by_side(rows, peak)
    if args.append:
        with open(args.results, "a") as fh:
            fh.write(json.dumps(summary, default=str) + "\n")
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
