"""DPO step benchmark: ours (packed groups) against TRL and Unsloth + TRL on the same weights and data.

    # CPU smoke (tiny model; TRL / Unsloth / memory caps are recorded as skipped):
    python -m bench.dpo --model tiny --image-tokens 16 --response-tokens 24 --groups-per-step 1,2 \\
        --systems ours,ours-unpacked,ours-vcache,trl,unsloth-trl --steps 5 --warmup 1 --out results.jsonl
    # GPU (bench/README.md has the setup):
    python -m bench.dpo --model 7b --image-tokens 1024 --groups-per-step 1,4,8 --pairs-per-step 1,4,8 \\
        --systems ours,ours-unpacked,ours-vcache,ours-unsloth,trl,unsloth-trl --steps 20 --warmup 3 \\
        --mem-cap-gb 24,16,12 --out bench/results/h100-7b-1024.jsonl

Writes JSONL rows (appended to --out): one `env` row (machine, versions, command), one `gate` row (the
correctness gate), one `run` row per (system, batch size) and one `memcap` row per (system, cap). Then
prints a table; `python -m bench.chart results.jsonl` draws pairs/s against peak memory.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

DEFAULT_SYSTEMS = "ours,ours-unpacked,ours-vcache,ours-unsloth,trl,unsloth-trl"
UNSLOTH_SYSTEMS = ("unsloth-trl", "ours-unsloth")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.dpo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="shape: tiny, 2b, 7b, 2.5-7b (bench/configs.py)")
    p.add_argument("--image-tokens", type=int, default=1024, help="image tokens per prompt (Qwen2-VL: W/28 * H/28)")
    p.add_argument("--response-tokens", type=int, default=186, help="mean response length (spread +-15%%)")
    p.add_argument("--question-tokens", type=int, default=12, help="question text tokens besides the image")
    p.add_argument("--k", type=int, default=4, help="responses per group (K(K-1)/2 pairs)")
    p.add_argument("--systems", default=DEFAULT_SYSTEMS, help="comma-separated; see bench/runs.py")
    p.add_argument("--groups-per-step", type=_ints, default=[1], help="batch sizes of ours*, in groups")
    p.add_argument("--pairs-per-step", type=_ints, default=None,
                   help="batch sizes of trl / unsloth-trl, in pairs (default: the --groups-per-step numbers)")
    p.add_argument("--steps", type=int, default=20, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (step 1 = first-step time)")
    p.add_argument("--mem-cap-gb", type=_floats, default=[], help="caps for the most-groups-per-step search")
    p.add_argument("--memcap-max-batch", type=int, default=64)
    p.add_argument("--memcap-steps", type=int, default=2)
    p.add_argument("--w", type=float, default=0.1, help="MM-DPO dynamic beta weight for ours (0 = plain DPO)")
    p.add_argument("--gate", action=argparse.BooleanOptionalAction, default=True, help="run the correctness gate")
    p.add_argument("--runs", action=argparse.BooleanOptionalAction, default=True,
                   help="run the throughput measurements (--no-runs: only the gate and/or memory caps)")
    p.add_argument("--gate-dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--gate-groups", type=int, default=2)
    p.add_argument("--isolate", default="auto", choices=("auto", "yes", "no"),
                   help="each measurement in a fresh process (auto: yes on CUDA) for clean memory peaks and "
                        "import order (unsloth must come before transformers)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="device peak for MFU (H100 SXM bf16 dense)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default="bench-results.jsonl")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    return p


# --------------------------------------------------------------------------------------------------
# child process: one measurement

def child_main(spec_path: str, out_path: str, threads: int | None) -> int:
    spec_dict = json.loads(Path(spec_path).read_text())
    gate = spec_dict.pop("_gate", None)
    if spec_dict["system"] in UNSLOTH_SYSTEMS:
        try:  # before anything imports transformers, so that its patches apply
            import unsloth  # noqa: F401
        except Exception:  # noqa: BLE001 - the run records the skip
            pass
    import torch

    if threads:
        torch.set_num_threads(threads)
    from .runs import RunSpec, run

    if gate is not None:
        from .gate import run_gate
        row = run_gate(RunSpec(**spec_dict), n_groups=gate["n_groups"], dtype=gate["dtype"])
    else:
        row = run(RunSpec(**spec_dict))
    row["isolated"] = True
    Path(out_path).write_text(json.dumps(row, default=str))
    return 0


def run_isolated(spec, threads: int | None, gate: dict | None = None) -> dict:
    """One measurement (or, with `gate`, the correctness gate) in a fresh Python process."""
    with tempfile.TemporaryDirectory(prefix="mmrlhf-bench-child-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "row.json"
        spec_path.write_text(json.dumps({**spec.to_dict(), **({"_gate": gate} if gate else {})}))
        cmd = [sys.executable, "-m", "bench.dpo", "--child", str(spec_path), "--child-out", str(out_path)]
        if threads:
            cmd += ["--threads", str(threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(Path(__file__).resolve().parents[1]))
        if out_path.exists():
            return json.loads(out_path.read_text())
        tail = (proc.stderr or proc.stdout)[-3000:]
        if gate:
            return {"kind": "gate", "model": spec.model, "passed": False, "skipped": [], "isolated": True,
                    "checks": [{"name": "error", "status": "error", "passed": False,
                                "reason": f"child process exited {proc.returncode} without a result", "stderr": tail}]}
        from .spec import result_row
        status = "oom" if "out of memory" in tail.lower() else "error"
        return result_row(spec, status, reason=f"child process exited {proc.returncode} without a result", stderr=tail,
                    isolated=True)


# --------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.child:
        return child_main(args.child, args.child_out, args.threads)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from . import memcap
    from .build import ensure_model
    from .measure import cuda, environment
    from .runs import OURS, SYSTEMS, RunSpec, run

    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        print(f"unknown system(s) {unknown}; known: {', '.join(SYSTEMS)}", file=sys.stderr)
        return 2
    isolate = args.isolate == "yes" or (args.isolate == "auto" and cuda())
    pairs_per_step = args.pairs_per_step or args.groups_per_step
    run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    command = "python -m bench.dpo " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def emit(row: dict) -> dict:
        row = {"schema": 1, "run_id": run_id, **row}
        with out.open("a") as fh:
            fh.write(json.dumps(row, default=str) + "\n")
        return row

    t0 = time.time()
    model_dir = str(ensure_model(args.model, seed=args.seed))
    emit({"kind": "env", "command": command, "env": environment(), "model_dir": model_dir,
          "build_s": time.time() - t0, "isolate": isolate,
          "args": {k: v for k, v in vars(args).items() if k not in ("child", "child_out")}})

    def spec_for(system: str, batch: int) -> RunSpec:
        return RunSpec(system=system, model=args.model, model_dir=model_dir, batch=batch,
                       image_tokens=args.image_tokens, response_tokens=args.response_tokens,
                       question_tokens=args.question_tokens, k=args.k, steps=args.steps, warmup=args.warmup,
                       seed=args.seed, peak_tflops=args.peak_tflops, w=args.w)

    def measure(spec) -> dict:
        if isolate:
            return run_isolated(spec, args.threads)
        row = run(spec)
        row["isolated"] = False
        return row

    rows = []
    if args.gate:
        if isolate:  # the gate loads the model twice (ours, TRL): its memory must not stay in this process
            gate = emit(run_isolated(spec_for("ours", 1), args.threads,
                                     gate={"n_groups": args.gate_groups, "dtype": args.gate_dtype}))
        else:
            from .gate import run_gate
            gate = emit(run_gate(spec_for("ours", 1), n_groups=args.gate_groups, dtype=args.gate_dtype))
        print(f"gate: {'PASSED' if gate['passed'] else 'FAILED'}"
              + (f" (skipped: {', '.join(gate['skipped'])})" if gate["skipped"] else ""), flush=True)
    for system in (systems if args.runs else []):
        for batch in (args.groups_per_step if system in OURS else pairs_per_step):
            row = emit(measure(spec_for(system, batch)))
            rows.append(row)
            print(_line(row), flush=True)
    for cap in args.mem_cap_gb:
        for system in systems:
            row = emit(memcap.search(spec_for(system, 1), cap, measure, max_batch=args.memcap_max_batch,
                                     steps=args.memcap_steps))
            print(f"memcap {cap:g} GB {system:14s} {row['status']}: "
                  + (f"max {row['max_batch']} {row['batch_unit']} ({row['pairs_per_step']} pairs/step)"
                     if row["status"] == "ok" else row.get("reason", "")), flush=True)
    print(f"results appended to {out} (run_id {run_id})")
    return 0


def _line(row: dict) -> str:
    head = f"{row['system']:14s} {row['batch']:3d} {row['batch_unit']:6s} {row['status']:7s}"
    if row["status"] != "ok":
        return head + " " + str(row.get("reason", ""))[:160]
    mem = row.get("peak_allocated_gib")
    mem_s = f"{mem:6.2f} GiB alloc" if mem is not None else f"{row.get('peak_rss_gib') or 0:6.2f} GiB rss"
    return (head + f" {row['pairs_per_s']:9.2f} pairs/s  {row['unique_tokens_per_s']:10.0f} tok/s  "
            f"step {row['step_s_median']:.3f}s  ref {row['reference_s_per_step']:.3f}s  first {row['first_step_s']:.2f}s  "
            f"{mem_s}  MFU {row['mfu'] * 100:.4f}%")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
