"""The product on a GPU in one command: every stage of recipes/qwen2_5_vl_7b-24gb.yaml on a random-init
Qwen2.5-VL-7B-shaped checkpoint under a 24 GiB memory cap, a few steps or groups each, measured as it goes.

    bash scripts/gpu-smoke.sh                 # on a GPU (installs carried wheels from .whl/ first)
    bash scripts/gpu-smoke.sh --dry           # the same on CPU with the tiny Qwen2.5-VL twin (CI runs it)

What it does, in order, writing to $OUT (default runs/gpu-smoke/out) after every step, so a run cut short
still leaves what it measured:
1. builds the checkpoint offline (`python -m bench.build 2.5-7b`: the real 7B config, random weights, the tiny
   kit's tokenizer; `--dry`: `python -m mmrlhf_lite.models.tiny qwen2_5_vl:xs`) and synthetic data (the demo
   set, `mmrlhf_lite/data/demo.py`, at 896 x 896 pixels: 1024 image tokens, the recipe's image cap);
2. the pre-flight (`python -m mmrlhf_lite.train ... --dry-run --gpu-mem 24GiB`): its per-stage estimates;
3. each stage as its own `python -m mmrlhf_lite.train` process (`--stages <stage>`, the recipe with a few
   steps' overrides) whose CUDA allocator is capped at 24 GiB (torch.cuda.set_per_process_memory_fraction),
   so its peak allocated / reserved memory is that stage's. A stage that fails is recorded (its `error:`
   line) and the next one still runs.

Files in $OUT: `summary.md` (the table), `smoke.jsonl` (one record per step), `preflight.txt`, `stages.log`
(the stages' terminal output), `events.jsonl` (the run's event stream). The numbers: per stage measured peak
allocated and reserved GiB beside the estimate (allocated and needed), seconds, time from the command to the
first training step, steps/s and groups/s of reward and dpo (after step 1), critiques/s of score (after its
first batch; and over the whole stage, model load included), the step-0 log-ratio max |log pi - log pi_ref|
of dpo (0 when the reference pass and the training step agree: models/precision.py), the compute dtype,
and the collation seconds per step of reward and dpo (`collate_s`, `data_wait_s`: docs/benchmarks.md).
With `--dry` the build, the pre-flight and each stage are forks of one warm interpreter (bench/warm.py: torch,
transformers and peft imported once; on the tiny twin a fresh interpreter's imports cost more than a stage), each
still a process of its own with its own peaks; on a GPU each is a fresh interpreter.
`MMRLHF_LITE_SMOKE_EXTRA='key=value ...'` adds recipe overrides (to try a setting); `--budget` bounds the
whole run (a stage still running at the end is stopped and recorded).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # the project from this checkout, installed or not (the GPU machine: not)
RECIPE = REPO / "recipes" / "qwen2_5_vl_7b-24gb.yaml"
STAGES = ("reward", "score", "reference", "dpo", "eval")
CAP_GIB = 24
GIB = 2 ** 30


def overrides(model_path: str, run_dir: Path, dry: bool) -> list[str]:
    """The recipe's settings (memory-relevant ones untouched: lengths, batch shapes, image cap) with few steps,
    few groups and short generations, so that every stage runs in seconds."""
    grad_accum, new_tokens = (1, 8) if dry else (2, 48)
    # 6 demo groups with eval_fraction 0.4: 5 train groups and 1 held out (the split hashes group ids)
    return [f"model.path={model_path}", "data.path=demo", "data.media_root=null", "data.demo.groups=6",
            f"data.demo.image_size={112 if dry else 896}", "data.demo.safety_fraction=0", "data.eval_fraction=0.4",
            "reward.train.max_steps=3", f"reward.train.grad_accum={grad_accum}", "reward.train.logging_steps=1",
            "reward.train.save_steps=1000", f"reward.max_new_tokens={new_tokens}",
            "dpo.train.max_steps=3", f"dpo.train.grad_accum={grad_accum}", "dpo.train.logging_steps=1",
            "dpo.train.save_steps=1000", "eval.max_groups=1", f"eval.max_new_tokens={new_tokens // 2}",
            f"run.dir={run_dir}", "run.report_to=none"]


class Recorder:
    """Appends records to smoke.jsonl and rewrites summary.md after each one."""

    def __init__(self, out: Path, dry: bool):
        self.out, self.dry = out, dry
        out.mkdir(parents=True, exist_ok=True)
        for name in ("smoke.jsonl", "summary.md", "preflight.txt", "stages.log", "events.jsonl"):
            (out / name).unlink(missing_ok=True)
        self.records: list[dict] = []

    def add(self, kind: str, **fields) -> dict:
        rec = {"kind": kind, "time": round(time.time(), 2), **fields}
        self.records.append(rec)
        with open(self.out / "smoke.jsonl", "a") as fh:
            fh.write(json.dumps(rec, default=str) + "\n")
        self.write_summary()
        shown = {k: v for k, v in fields.items() if v is not None and k not in ("stages", "budget")}
        print(f"[gpu-smoke] {kind}: " + ", ".join(f"{k}={v}" for k, v in shown.items()), flush=True)
        return rec

    def write_summary(self) -> None:
        env = next((r for r in self.records if r["kind"] == "environment"), {})
        pre = next((r for r in self.records if r["kind"] == "preflight"), {})
        lines = [f"# GPU smoke{' (--dry: tiny Qwen2.5-VL twin on CPU)' if self.dry else ''}", "",
                 f"device: {env.get('device', '?')}; torch {env.get('torch', '?')}, transformers "
                 f"{env.get('transformers', '?')}; compute dtype {env.get('compute_dtype', '?')}; memory cap "
                 f"{env.get('cap', '?')}", ""]
        for r in self.records:
            if r["kind"] == "build":
                lines.append(f"checkpoint: {r.get('model')} ({r.get('status')}, {r.get('seconds')} s)")
        if pre:
            lines.append(f"pre-flight: {pre.get('status')}" + (f", peak needed {pre['peak']['needed_gib']} GiB "
                                                               f"({pre['peak']['stage']})" if pre.get("peak") else ""))
        lines += ["", "| stage | status | s | peak alloc GiB | peak reserved GiB | est. alloc GiB | est. needed GiB "
                      "| first step s | steps/s | groups/s | critiques/s | step-0 log-ratio |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in self.records:
            if r["kind"] != "stage":
                continue
            est = (pre.get("stages") or {}).get(r["stage"]) or {}
            cells = [r["stage"], r["status"], r.get("seconds"), r.get("peak_allocated_gib"),
                     r.get("peak_reserved_gib"), est.get("allocated_gib"), est.get("needed_gib"),
                     r.get("first_step_s"), r.get("steps_per_s"), r.get("groups_per_s"), r.get("critiques_per_s"),
                     r.get("step0_abs_log_ratio_max")]
            lines.append("| " + " | ".join("" if c is None else str(c) for c in cells) + " |")
        errors = [r for r in self.records if r.get("error")]
        if errors:
            lines += ["", "## Errors", ""] + [f"- {r.get('stage') or r['kind']}: {r['error']}" for r in errors]
        (self.out / "summary.md").write_text("\n".join(lines) + "\n")


def _python_env(dry: bool) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}   # local checkpoint, no network there
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    if dry:
        env.setdefault("OMP_NUM_THREADS", "2")
    return env


def _run(cmd: list[str], log: Path, env: dict, timeout: float) -> tuple[int | None, str, float]:
    """(exit code or None on timeout, the output, seconds); the output is appended to `log`."""
    def as_text(x) -> str:
        return x.decode(errors="replace") if isinstance(x, bytes) else (x or "")

    start = time.time()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=max(1.0, timeout))
        code, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:   # the child was killed; its output so far is kept
        code, text = None, as_text(exc.stdout) + as_text(exc.stderr)
    with open(log, "a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n{text}\n")
    return code, text, round(time.time() - start, 1)


def _error_line(text: str) -> str | None:
    lines = [x for x in text.splitlines() if x.startswith("error:")]
    if lines:
        return lines[-1][len("error:"):].strip()[:2000]
    tail = [x for x in text.splitlines() if x.strip()]
    return tail[-1][:2000] if tail else None


def _events(run_dir: Path, since: float) -> list[dict]:
    path = run_dir / "events.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if isinstance(e, dict) and e.get("time", 0) >= since:
            out.append(e)
    return out


def stage_numbers(stage: str, events: list[dict], started: float, recipe) -> dict:
    """Throughput and first-step numbers of one stage from its events."""
    mine = [e for e in events if e.get("stage") == stage]
    out: dict = {}
    progress = [e for e in mine if e["type"] == "progress" and e.get("n", 0) >= 1]
    metrics = [e for e in mine if e["type"] == "metrics" and "step" in e]
    if stage in ("reward", "dpo") and progress:
        out["first_step_s"] = round(progress[0]["time"] - started, 1)
        later = [m for m in metrics if m["step"] >= 2 and m.get("step_s")]
        if later:
            step_s = sum(m["step_s"] for m in later) / len(later)
            out["steps_per_s"] = round(1 / step_s, 3)
            out["groups_per_s"] = round(sum(m["groups_per_s"] for m in later) / len(later), 3)
            out["collate_s_per_step"] = round(sum(m.get("collate_s", 0) for m in later) / len(later), 4)
            out["data_wait_s_per_step"] = round(sum(m.get("data_wait_s", 0) for m in later) / len(later), 4)
        if stage == "dpo":
            first = next((m for m in metrics if m["step"] == 1), None)
            if first is not None and "abs_log_ratio_max" in first:
                out["step0_abs_log_ratio_max"] = first["abs_log_ratio_max"]
    if stage == "score":
        ticks = [e for e in mine if e["type"] == "progress"]
        per_group = 4 * (recipe.reward.n_samples if recipe else 1)   # the demo set's K = 4 responses
        if len(ticks) >= 3 and ticks[-1]["n"] > ticks[1]["n"]:
            span = ticks[-1]["time"] - ticks[1]["time"]
            out["critiques_per_s"] = round((ticks[-1]["n"] - ticks[1]["n"]) * per_group / max(span, 1e-9), 2)
        end = next((e for e in mine if e["type"] == "stage_end"), None)
        if ticks and end:
            out["critiques_per_s_with_load"] = round((ticks[-1]["n"] - ticks[0]["n"]) * per_group
                                                     / max(end["time"] - started, 1e-9), 2)
    errors = [e.get("message") for e in mine if e["type"] == "log" and e.get("level") == "error"]
    if errors:
        out["event_error"] = errors[-1]
    return out


def child(peaks_file: str, argv: list[str]) -> int:
    """One stage: the memory cap, the CLI, then this process's peaks (a process per stage: per-stage peaks)."""
    import torch

    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, CAP_GIB * GIB / total), 0)
    from mmrlhf_lite.train import main

    try:
        code = main(argv)
    finally:
        peaks = {"rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 2)}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            peaks.update(allocated_gib=round(torch.cuda.max_memory_allocated() / GIB, 2),
                         reserved_gib=round(torch.cuda.max_memory_reserved() / GIB, 2))
        Path(peaks_file).write_text(json.dumps(peaks))
    return code


WARM_PRELOAD = ("torch", "transformers", "peft", "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl")


def start_warm(env: dict, log: Path):
    """(the bench/warm.py server, the command prefix that runs a command forked from it, its socket's folder)."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="gpu-smoke-warm-"))   # a short path: a unix socket's is at most 107 bytes
    sock = str(folder / "sock")
    with open(log, "a") as fh:
        server = subprocess.Popen([sys.executable, "-m", "bench.warm", "serve", sock, *WARM_PRELOAD], cwd=REPO,
                                  env=env, stdout=fh, stderr=subprocess.STDOUT)
    return server, [sys.executable, "-m", "bench.warm", "run", sock], folder


def environment(dry: bool) -> dict:
    import torch
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "cap": "none (CPU)" if dry else f"{CAP_GIB} GiB"}
    from mmrlhf_lite.models.loading import resolve_device, resolve_dtype

    device = resolve_device("auto")
    info["compute_dtype"] = str(resolve_dtype("auto", device)).replace("torch.", "")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        info["device"] = f"{props.name}, {props.total_memory / GIB:.1f} GiB, sm{props.major}{props.minor}"
    else:
        info["device"] = f"CPU ({os.cpu_count()} cores)"
    return info


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry", action="store_true", help="the tiny Qwen2.5-VL twin on CPU (the same steps)")
    p.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "runs" / "gpu-smoke" / "out"))
    p.add_argument("--run-dir", default=str(REPO / "runs" / "gpu-smoke" / "run"))
    p.add_argument("--budget", type=float, default=None, help="seconds for everything (default 330 on a GPU, "
                   "900 with --dry); a stage past it is stopped and recorded, later ones as not run")
    p.add_argument("--child", metavar="PEAKS_JSON", help=argparse.SUPPRESS)
    args, rest = p.parse_known_args()
    if args.child:
        return child(args.child, [a for a in rest if a != "--"])

    deadline = time.time() + (args.budget or (900.0 if args.dry else 330.0))
    out, run_dir = Path(args.out), Path(args.run_dir)
    rec = Recorder(out, args.dry)
    log = out / "stages.log"
    env = _python_env(args.dry)
    rec.add("environment", **environment(args.dry))
    if not args.dry:
        return run_steps(args, deadline, out, run_dir, rec, log, env, [sys.executable])
    import shutil

    server, launcher, folder = start_warm(env, log)
    try:
        return run_steps(args, deadline, out, run_dir, rec, log, env, launcher)
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(folder, ignore_errors=True)


def run_steps(args, deadline: float, out: Path, run_dir: Path, rec: Recorder, log: Path, env: dict,
              python: list[str]) -> int:
    """Build, pre-flight and stages, each a process started by `python` (the interpreter, or bench/warm.py's client)."""
    builder = [*python, "-m", "mmrlhf_lite.models.tiny", "qwen2_5_vl:xs"] if args.dry else \
        [*python, "-m", "bench.build", "2.5-7b"]
    code, text, seconds = _run(builder, log, env, deadline - time.time())
    folders = [line.strip() for line in text.splitlines() if line.strip().startswith("/")]
    model_path = next((f for f in reversed(folders) if (Path(f) / "config.json").is_file()), None) \
        if code == 0 else None   # the builder prints the checkpoint's folder
    rec.add("build", model=model_path, status="done" if model_path else "error", seconds=seconds,
            error=None if model_path else _error_line(text))
    if not model_path:
        return 1

    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)
    settings = overrides(model_path, run_dir, args.dry) + (["model.device=cpu"] if args.dry else []) \
        + os.environ.get("MMRLHF_LITE_SMOKE_EXTRA", "").split()   # more overrides, e.g. to try a setting
    from mmrlhf_lite.events import EventLog
    from mmrlhf_lite.recipe import load_recipe
    from mmrlhf_lite.train import preflight_plan

    code, text, seconds = _run([*python, "-m", "mmrlhf_lite.train", str(RECIPE), *settings, "--dry-run",
                                "--gpu-mem", f"{CAP_GIB}GiB"], log, env, deadline - time.time())
    (out / "preflight.txt").write_text(text)
    recipe = None
    try:
        recipe = load_recipe(str(RECIPE), settings)
        plan = preflight_plan(recipe, list(STAGES), gpu_mem=f"{CAP_GIB}GiB", events=EventLog(None, echo=False))
        memory = plan["memory"]
        rec.add("preflight", status="plan OK" if code == 0 else f"exit {code}", seconds=seconds,
                peak=memory.get("peak"), budget=memory.get("budget"),
                stages={s: {k: v for k, v in e.items() if k in ("allocated_gib", "needed_gib")}
                        for s, e in (memory.get("stages") or {}).items()},
                error=None if code == 0 else _error_line(text))
    except Exception as exc:  # noqa: BLE001 - recorded; the stages still run (and say what fails)
        rec.add("preflight", status="error" if code == 0 else f"exit {code}", seconds=seconds,
                error=_error_line(text) if code else f"{type(exc).__name__}: {exc}")

    failed = 0
    for stage in STAGES:
        left = deadline - time.time()
        if left < 5:
            rec.add("stage", stage=stage, status="not run", error="out of time (--budget)")
            failed += 1
            continue
        peaks_file = out.parent / f".peaks-{stage}.json"
        peaks_file.unlink(missing_ok=True)
        started = time.time()
        code, text, seconds = _run([*python, str(Path(__file__).resolve()), "--child", str(peaks_file), "--",
                                    str(RECIPE), *settings, "--stages", stage, "-q"], log, env, left)
        peaks = json.loads(peaks_file.read_text()) if peaks_file.exists() else {}
        peaks_file.unlink(missing_ok=True)
        numbers = stage_numbers(stage, _events(run_dir, started), started, recipe)
        status = "done" if code == 0 else ("timeout" if code is None else f"exit {code}")
        error = None if code == 0 else (_error_line(text) if code is not None else "out of time (--budget)")
        failed += code != 0
        rec.add("stage", stage=stage, status=status, seconds=seconds, peak_allocated_gib=peaks.get("allocated_gib"),
                peak_reserved_gib=peaks.get("reserved_gib"), peak_rss_gib=peaks.get("rss_gib"), error=error,
                **numbers)
        if (run_dir / "events.jsonl").exists():
            shutil.copyfile(run_dir / "events.jsonl", out / "events.jsonl")
    print(f"\n{(out / 'summary.md').read_text()}\n[gpu-smoke] files in {out}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
