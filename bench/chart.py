"""Chart of a benchmark results file: pairs/s against peak memory, one point per system and batch size.

    python -m bench.chart bench/results/cpu-tiny-smoke.jsonl -o docs/bench-cpu-tiny-smoke.png

Memory is the CUDA peak allocated memory of the timed steps; on CPU (no CUDA counters) the process's
peak resident memory, and the axis says which. Rows that did not run (skipped, oom, error) are listed
under the chart, not drawn. By default the chart shows the newest run (`run_id`) in the file.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

MARKERS = {"ours": "o", "ours-vcache": "*", "ours-unsloth": "P", "ours-unpacked": "s", "trl": "X", "unsloth-trl": "D"}


def load_rows(path: str | Path) -> list[dict]:
    rows = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line:
            rows.append(json.loads(line))
    return rows


def select_run(rows: list[dict], run_id: str | None = None) -> list[dict]:
    if run_id == "all":
        return rows
    ids = [r.get("run_id") for r in rows if r.get("kind") == "env"] or [r.get("run_id") for r in rows]
    wanted = run_id or (ids[-1] if ids else None)
    return [r for r in rows if r.get("run_id") == wanted]


def memory_of(row: dict) -> tuple[float | None, str]:
    if row.get("peak_allocated_gib") is not None:
        return row["peak_allocated_gib"], "peak CUDA memory allocated (GiB)"
    return row.get("peak_rss_gib"), "peak process RSS (GiB, CPU run)"


def draw(rows: list[dict], out: str | Path, title: str | None = None, targets: list[float] = ()) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    env = next((r for r in rows if r.get("kind") == "env"), {})
    runs = [r for r in rows if r.get("kind") == "run"]
    ok = [r for r in runs if r.get("status") == "ok" and r.get("pairs_per_s") is not None]
    not_run = [r for r in runs if r.get("status") != "ok"]
    device = (env.get("env") or {}).get("device", "?")
    fig, ax = plt.subplots(figsize=(8, 5.2))
    label = "peak memory (GiB)"
    for system in sorted({r["system"] for r in ok}):
        pts = sorted((r for r in ok if r["system"] == system), key=lambda r: r["batch"])
        xs, ys = [], []
        for r in pts:
            x, label = memory_of(r)
            xs.append(x if x is not None else 0.0)
            ys.append(r["pairs_per_s"])
        ax.plot(xs, ys, marker=MARKERS.get(system, "o"), linestyle="-", label=system, markersize=8)
        for x, y, r in zip(xs, ys, pts):
            ax.annotate(f"{r['batch']}{r['batch_unit'][0]}", (x, y), textcoords="offset points", xytext=(5, 4),
                        fontsize=8)
    for t in targets:
        ax.axhline(t, color="gray", linestyle=":", linewidth=1)
        ax.annotate(f"target {t:g} pairs/s", (0, t), xycoords=("axes fraction", "data"), fontsize=8, color="gray",
                    xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel(label)
    ax.set_ylabel("pairs / s (reference pass included for ours)")
    first = ok[0] if ok else (runs[0] if runs else {})
    default_title = (f"DPO step throughput: {first.get('model', '?')} shape, ~{first.get('image_tokens_target', '?')} "
                     f"image tokens, K={first.get('k', '?')} - {device}")
    if device == "cpu":
        default_title = "CPU SMOKE RUN (tiny model, shared CPU) - not a GPU benchmark\n" + default_title
    ax.set_title(title or default_title, fontsize=10)
    ax.grid(True, alpha=0.3)
    if ok:
        ax.legend(fontsize=8, title="system (label: batch, g=groups p=pairs)", title_fontsize=8)
    if not_run:
        grouped: dict[tuple, list[str]] = {}
        for r in not_run:
            grouped.setdefault((r["system"], r["status"], str(r.get("reason", ""))[:80]), []).append(
                f"{r['batch']}{r['batch_unit'][0]}")
        lines = [f"{sys_} ({', '.join(b)}): {status} - {reason}" for (sys_, status, reason), b in sorted(grouped.items())]
        fig.text(0.01, 0.01, "not run:\n" + "\n".join(lines[:8]), fontsize=6.5, va="bottom", family="monospace")
        fig.subplots_adjust(bottom=0.12 + 0.028 * min(len(lines), 8))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.chart", description=__doc__.split("\n\n")[0])
    p.add_argument("results", help="JSONL written by python -m bench.dpo")
    p.add_argument("-o", "--out", default=None, help="PNG path (default: results path with .png)")
    p.add_argument("--run-id", default=None, help="which run in the file (default: the newest; 'all' for every row)")
    p.add_argument("--title", default=None)
    p.add_argument("--target", type=float, action="append", default=[], help="draw a pairs/s target line")
    args = p.parse_args(argv)
    rows = select_run(load_rows(args.results), args.run_id)
    out = draw(rows, args.out or Path(args.results).with_suffix(".png"), args.title, args.target)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
