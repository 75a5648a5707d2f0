"""One run, N processes (torchrun, gloo on CPU): 2 ranks x B groups per step train the same LoRA weights
as 1 rank x 2B; a SIGKILLed rank ends the job in bounded time with the launcher naming it, and the same
command resumes to the same final weights; two "nodes" (two launchers, --nnodes 2) run the stages end to end;
score/reference/eval split over ranks in lockstep count every rank's groups in their progress, stop
every rank at one point, and eval writes the single process's report.

Every launcher runs in its own process group with a hard timeout, and the group is killed afterwards.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmrlhf_lite.recipe import load_recipe
from mmrlhf_lite.train import run_pipeline

REPO = Path(__file__).resolve().parents[1]
COMMON = ["model.path=tiny:qwen2_vl:xs", "model.load_in_4bit=false", "model.device=cpu", "data.demo.groups=8",
          "data.demo.image_size=56", "data.eval_fraction=0", "data.demo.safety_fraction=0",
          "dpo.margin_source=none", "dpo.w=0", "dpo.gamma=0.5", "dpo.train.max_steps=8", "dpo.train.save_steps=2",
          "dpo.train.logging_steps=1", "dpo.train.learning_rate=1e-2", "dpo.train.grad_accum=1",
          "reward.train.max_steps=2", "reward.train.logging_steps=1", "reward.train.learning_rate=1e-2",
          "reward.train.grad_accum=1", "reward.critique_mode=given"]
STAGES = "reward,score,reference,dpo"
TIMEOUT = 480   # a hang's bound, not a speed bound: a launch of the four stages takes ~1 min on 2 idle cores


def _per_rank(groups: int) -> list[str]:
    return [f"dpo.train.groups_per_step={groups}", f"reward.train.groups_per_step={groups}"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict:
    """A launch's environment. TORCHDYNAMO_DISABLE: bitsandbytes wraps its int8 kernels (unused here) in
    torch.compile at import, which imports inductor: ~1.1 of a rank's ~6 CPU s of imports (measured side by side);
    nothing these launches run is compiled."""
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MMRLHF_LITE_DIST_TIMEOUT": "60",
            "TORCHDYNAMO_DISABLE": "1", **extra}


def _launch(recipe: Path, stages: str, *, nproc: int = 2, nnodes: int = 1, node_rank: int = 0,
            port: int | None = None, extra: tuple[str, ...] = (), env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc_per_node={nproc}",
           f"--node_rank={node_rank}", "--master_addr=127.0.0.1", f"--master_port={port or _free_port()}",
           "-m", "mmrlhf_lite.train", str(recipe), "--stages", stages, "-q", *extra]
    return subprocess.Popen(cmd, env=_env(**(env or {})), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _kill_group(proc: subprocess.Popen) -> None:
    """Stop the launcher and every rank it started. torchrun starts each rank in a session of its own (its
    process group: the rank and its DataLoader workers), so killing the launcher's group alone left the ranks of
    a launch that timed out running on (two DDP ranks train on together); their groups are killed first."""
    ranks = _children(proc.pid) if proc.poll() is None else []
    for pid in ranks:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _finish(proc: subprocess.Popen, timeout: float = TIMEOUT) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        out = ""
        raise AssertionError(f"launcher still running after {timeout} s") from None
    finally:
        _kill_group(proc)
        if proc.poll() is None:
            out = proc.communicate()[0]


def _recipe(tmp: Path, name: str, groups_per_rank: int) -> Path:
    path = tmp / f"{name}.yaml"
    load_recipe(None, COMMON + _per_rank(groups_per_rank) + [f"run.dir={tmp / name}"]).save(path)
    return path


def _copy_run(src: Path, tmp: Path, drop: tuple[str, ...] = ("dpo",)) -> Path:
    """`tmp/run`: a copy of the finished run folder `src` (data, caches, stage results) without the stages in `drop`.
    The tests that need the precompute stages done start from the module's two-rank run instead of launching
    them again: the same recipe (`_recipe(tmp, "run", 1)`) finds them done with its settings."""
    dst = tmp / "run"
    shutil.copytree(src, dst)
    (dst / "run.lock").unlink(missing_ok=True)
    for stage in drop:
        shutil.rmtree(dst / stage, ignore_errors=True)
        (dst / "stages" / f"{stage}.json").unlink(missing_ok=True)
    return dst


def _weights(run_dir: Path, stage: str) -> dict[str, torch.Tensor]:
    return load_file(run_dir / stage / "final" / "adapter_model.safetensors")


def _same_weights(a: dict, b: dict, tol: float = 5e-5) -> None:
    """Within fp32 noise after 8 Adam steps at lr 1e-2 (measured <= 1.2e-5; the two-rank run killed, stopped and
    resumed against one process: <= 1e-7; unsynchronised ranks: 1.9e-2)."""
    assert a.keys() == b.keys() and a
    for k in a:
        err = (a[k].float() - b[k].float()).abs().max().item()
        assert err <= tol * max(1.0, a[k].abs().max().item()), (k, err)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """1 process x 2 groups per step (in-process: the real pipeline)."""
    tmp = tmp_path_factory.mktemp("single")
    recipe = load_recipe(None, COMMON + _per_rank(2) + [f"run.dir={tmp / 'run'}"])
    run_pipeline(recipe, STAGES.split(","), echo=False)
    return tmp / "run"


@pytest.fixture(scope="module")
def two_ranks(dpo_interrupted) -> Path:
    """torchrun --nproc_per_node 2, 1 group per rank per step: the run of `dpo_interrupted`, its four stages
    launched by one command (killed, stopped and cut short in dpo, and finished by the same command)."""
    return dpo_interrupted["run"]


def test_two_ranks_train_the_same_weights_as_one_rank_with_twice_the_batch(single, two_ranks):
    # the steps really were data-parallel: 2 ranks each logged 1 group/step but the same global batch
    events = [json.loads(x) for x in (two_ranks / "events.jsonl").read_text().splitlines()]
    assert any(e["type"] == "run_start" and e.get("world_size") == 2 for e in events)
    assert json.loads((two_ranks / "dpo" / "train_result.json").read_text())["steps"] == 8
    last = [e for e in events if e["type"] == "metrics" and e.get("stage") == "dpo"][-1]
    assert last["rank0_groups_per_s"] > 0 and last["rank1_groups_per_s"] > 0   # per-rank throughput
    assert last["groups_per_s"] == pytest.approx(last["rank0_groups_per_s"] + last["rank1_groups_per_s"])
    for stage in ("reward", "dpo"):
        _same_weights(_weights(single, stage), _weights(two_ranks, stage))
    # ... and the weights did move (a test that cannot fail on an untrained adapter)
    b = {k: v for k, v in _weights(two_ranks, "dpo").items() if "lora_B" in k}
    assert max(v.abs().max().item() for v in b.values()) > 1e-4
    # rank 0 alone owns the run folder: one lock holder, one event stream, stages marked once
    assert sorted(p.name for p in (two_ranks / "stages").glob("*.json")) == ["dpo.json", "reference.json",
                                                                             "reward.json", "score.json"]


def _events(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]


def test_score_and_reference_progress_counts_every_rank_with_per_rank_throughput(two_ranks):
    events = _events(two_ranks)
    for stage in ("score", "reference"):
        progress = [e for e in events if e["type"] == "progress" and e.get("stage") == stage]
        assert progress[0]["n"] == 0 and progress[-1]["n"] == progress[-1]["total"] == 8, (stage, progress)
        assert [e["n"] for e in progress] == sorted(e["n"] for e in progress)
        rates = [e for e in events if e["type"] == "metrics" and e.get("stage") == stage and "groups_per_s" in e][-1]
        assert rates["rank0_groups_per_s"] > 0 and rates["rank1_groups_per_s"] > 0, rates
        assert rates["groups_per_s"] == pytest.approx(rates["rank0_groups_per_s"] + rates["rank1_groups_per_s"])


def _cache(run_dir: Path, name: str) -> dict[str, dict]:
    lines = [json.loads(x) for x in (run_dir / "cache" / name).read_text().splitlines()]
    out = {r["key"]: r for r in lines}
    assert len(out) == len(lines), "a cache entry was written twice"
    return out


def test_sharded_score_and_reference_give_the_same_caches_and_margins(single, two_ranks):
    # reward keys hold the reward adapter's hash (its weights agree within fp32 noise, not bit for bit):
    # entries are matched by group and response there
    for name, field in (("reference.jsonl", "logp"), ("reward.jsonl", "score")):
        a, b = _cache(single, name), _cache(two_ranks, name)
        if name == "reward.jsonl":
            a, b = ({(r["group_id"], r["response"]): r for r in x.values()} for x in (a, b))
        assert a.keys() == b.keys() and len(a) == 8 * 4
        for k in a:
            assert b[k][field] == pytest.approx(a[k][field], rel=1e-4, abs=1e-4), (name, k)
    ma = [json.loads(x) for x in (single / "score" / "margins.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (two_ranks / "score" / "margins.jsonl").read_text().splitlines()]
    assert [m["group_id"] for m in ma] == [m["group_id"] for m in mb]
    for x, y in zip(ma, mb):
        assert y["scores"] == pytest.approx(x["scores"], rel=1e-4, abs=1e-4)
    # each rank computed its own share: both ranks' stage results count all 32 responses as computed
    assert json.loads((two_ranks / "stages" / "reference.json").read_text())["computed"] == 32


def _children(pid: int) -> list[int]:
    out = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:          # exited meanwhile
        return out
    for task in tasks:
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def _rank_pid(launcher: int, rank: int) -> int | None:
    for child in _children(launcher):
        try:
            env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return child
    return None


def _wait_for_checkpoint(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = TIMEOUT) -> None:
    """Until the dpo checkpoint of `step` is completely written: every rank's part (rank 0 then writes its
    completion marker, training.CHECKPOINT_COMPLETE)."""
    from mmrlhf_lite.training import CHECKPOINT_COMPLETE

    marker = run_dir / "dpo" / "checkpoints" / f"checkpoint-{step}" / CHECKPOINT_COMPLETE
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        if marker.exists():
            return
        time.sleep(0.05)
    raise AssertionError(f"no complete checkpoint-{step} within {timeout} s")

# a launch whose collectives would wait an hour for a dead rank: a job that ends is ended by the launcher
NO_COLLECTIVE_TIMEOUT = {"MMRLHF_LITE_DIST_TIMEOUT": "3600"}
KILL_BOUND = 240


def _kill_rank_1_after_checkpoint(proc, run_dir: Path, step: int) -> tuple[int, str]:
    """SIGKILL rank 1 of the launch `proc` (started with NO_COLLECTIVE_TIMEOUT) once dpo's checkpoint `step` is
    written; the launcher must end the job within KILL_BOUND s, far less than the hour rank 0 would otherwise wait
    in its next collective (with the default 60 s timeout, a 90 s bound could not tell the launcher's doing from
    the timeout's, and was tight on a loaded machine). Returns its (exit code, output)."""
    try:
        _wait_for_checkpoint(run_dir, step, proc)
        victim = _rank_pid(proc.pid, 1)
        assert victim, "rank 1 not found"
        os.kill(victim, signal.SIGKILL)
        rc, out = _finish(proc, timeout=KILL_BOUND)
    finally:
        _kill_group(proc)
    assert rc != 0, (rc, out[-3000:])
    return rc, out


def _checkpoints(run_dir: Path) -> list[int]:
    return sorted(int(d.name.split("-")[1]) for d in (run_dir / "dpo" / "checkpoints").glob("checkpoint-*"))


@pytest.fixture(scope="module")
def dpo_interrupted(tmp_path_factory) -> dict:
    """The module's two-rank run (`two_ranks`): one command, `--stages reward,score,reference,dpo`, launched three
    times, each launch checked by its own test (three launches where the tests once made six):
    1. `killed`: rank 1 SIGKILLed once dpo's checkpoint-2 is complete (the precompute stages done before);
    2. `stopped`: the same command (the done stages skipped) resumes dpo, and is stopped by the run folder's STOP
       file once the next checkpoint (`waited`) is complete;
    3. `cut`: the newest checkpoint is cut short as a rank killed while saving leaves it, and the same command
       finishes; the final weights, after both interruptions, must be the single process's (`single`)."""
    from mmrlhf_lite.training import CHECKPOINT_COMPLETE

    tmp = tmp_path_factory.mktemp("ddp")
    run_dir, recipe = tmp / "run", _recipe(tmp, "run", 1)
    state: dict = {"run": run_dir}

    rc, out = _kill_rank_1_after_checkpoint(_launch(recipe, STAGES, env=NO_COLLECTIVE_TIMEOUT), run_dir, 2)
    complete = [c for c in _checkpoints(run_dir)
                if (run_dir / "dpo" / "checkpoints" / f"checkpoint-{c}" / CHECKPOINT_COMPLETE).exists()]
    state["killed"] = {"rc": rc, "out": out, "done": (run_dir / "stages" / "dpo.json").exists(), "complete": complete,
                       "precomputed": sorted(p.name for p in (run_dir / "stages").glob("*.json"))}

    waited = max(complete) + 2           # written by the resumed launch (the marker of a newer one cannot be there)
    offset = len(_events(run_dir))
    proc = _launch(recipe, STAGES)
    try:
        _wait_for_checkpoint(run_dir, waited, proc)
        (run_dir / "STOP").write_text("test")
        rc, out = _finish(proc, timeout=120)
    finally:
        _kill_group(proc)
    events = _events(run_dir)
    state["stopped"] = {"rc": rc, "out": out, "events": events[offset:], "waited": waited,
                        "checkpoints": _checkpoints(run_dir), "done": (run_dir / "stages" / "dpo.json").exists()}

    newest = run_dir / "dpo" / "checkpoints" / f"checkpoint-{_checkpoints(run_dir)[-1]}"
    part = newest / "rng_state_1.pth"
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    (newest / CHECKPOINT_COMPLETE).unlink()
    (run_dir / "STOP").unlink(missing_ok=True)
    offset = len(events)
    rc, out = _finish(_launch(recipe, STAGES))
    state["cut"] = {"rc": rc, "out": out, "newest": newest.name, "events": _events(run_dir)[offset:]}
    return state


def test_sigkill_of_one_rank_ends_the_job_naming_it_and_the_same_command_resumes(dpo_interrupted, single):
    killed, stopped = dpo_interrupted["killed"], dpo_interrupted["stopped"]
    assert killed["rc"] != 0
    assert "rank      : 1 (local_rank: 1)" in killed["out"] and "Signal 9 (SIGKILL)" in killed["out"], \
        killed["out"][-3000:]
    assert not killed["done"] and 2 in killed["complete"]
    assert killed["precomputed"] == ["reference.json", "reward.json", "score.json"]   # killed in dpo
    # the same command resumes from the newest complete checkpoint the kill left ...
    said = [e["message"] for e in stopped["events"] if e["type"] == "log"]
    assert any(m.startswith("resuming from") and m.endswith(f"checkpoint-{max(killed['complete'])}")
               for m in said), said[-10:]
    # ... and the run ends (after the stop and the cut checkpoint below) with the uninterrupted weights (those of
    # one process with twice the batch: two ranks train those, test_two_ranks_train_the_same_weights...)
    assert dpo_interrupted["cut"]["rc"] == 0, dpo_interrupted["cut"]["out"][-4000:]
    _same_weights(_weights(single, "dpo"), _weights(dpo_interrupted["run"], "dpo"))


def test_a_checkpoint_whose_rank_1_part_is_cut_short_is_skipped_for_the_one_before(dpo_interrupted, single):
    """What a rank killed while saving leaves: the newest checkpoint with rank 1's rng_state_1.pth cut short
    and no completion marker. The same command resumes from the checkpoint before (it used to pick the newest
    every time, and rank 1 died in transformers' _load_rng_state with EOFError) and ends with the
    uninterrupted run's weights."""
    stopped, cut = dpo_interrupted["stopped"], dpo_interrupted["cut"]
    waited = stopped["waited"]
    newest = int(cut["newest"].split("-")[1])
    assert stopped["checkpoints"] == [waited, newest] and newest > waited                   # 2 kept
    assert cut["rc"] == 0, cut["out"][-4000:]
    said = [e["message"] for e in cut["events"] if e["type"] in ("log", "warning")]
    assert f"{cut['newest']} was not completely written (interrupted save); removed" in said
    assert any(m.startswith("resuming from") and m.endswith(f"checkpoint-{waited}") for m in said), said[-10:]
    _same_weights(_weights(single, "dpo"), _weights(dpo_interrupted["run"], "dpo"))


# every eval part, critiques sampled (n_samples 2) and policy answers sampled (policy_samples 2), on 8 held-out groups
EVAL = ["data.demo.groups=24", "data.eval_fraction=0.34", "eval.max_new_tokens=6", "reward.max_new_tokens=6",
        "reward.n_samples=2", "eval.policy_samples=2", "reward.generation_batch_size=4", "dpo.train.max_steps=2"]


def _eval_recipe(run_dir: Path, groups_per_rank: int):
    return load_recipe(None, COMMON + _per_rank(groups_per_rank) + EVAL + [f"run.dir={run_dir}"])


@pytest.fixture(scope="module")
def single_eval(tmp_path_factory) -> Path:
    """1 process x 2 groups per step, the five stages (in-process: the real pipeline), on the EVAL data: the
    single-process weights and eval report the two-node and the two-rank eval runs must reproduce."""
    run_dir = tmp_path_factory.mktemp("single-eval") / "run"
    run_pipeline(_eval_recipe(run_dir, 2), None, echo=False)
    return run_dir


def test_two_nodes_on_localhost_run_the_stages_end_to_end(tmp_path, single_eval):
    """Two launchers (`--nnodes 2 --node_rank 0|1`, one process each) run all five stages; the weights and
    the eval report (split over the two nodes) are those of a single process with twice the groups per step."""
    path = tmp_path / "nodes.yaml"
    _eval_recipe(tmp_path / "nodes", 1).save(path)
    port = _free_port()
    procs = [_launch(path, "reward,score,reference,dpo,eval", nproc=1, nnodes=2, node_rank=r, port=port)
             for r in (0, 1)]
    results = [_finish(p) for p in procs]
    for rc, out in results:
        assert rc == 0, out[-4000:]
    for stage in ("reward", "dpo"):
        _same_weights(_weights(single_eval, stage), _weights(tmp_path / "nodes", stage))
    assert sorted(p.name for p in (tmp_path / "nodes" / "stages").glob("*.json")) == [
        "dpo.json", "eval.json", "reference.json", "reward.json", "score.json"]
    a = json.loads((single_eval / "eval" / "report.json").read_text())
    b = json.loads((tmp_path / "nodes" / "eval" / "report.json").read_text())
    assert _numbers(a) == pytest.approx(_numbers(b), rel=1e-4, abs=1e-4)


def _numbers(tree, prefix="") -> dict:
    """The report's numbers by path (timings left out)."""
    out = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(_numbers(v, f"{prefix}.{k}"))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            out.update(_numbers(v, f"{prefix}[{i}]"))
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool) and "second" not in prefix and "time" not in prefix:
        out[prefix] = float(tree)
    return out


def test_a_stop_request_stops_every_rank_at_the_same_step_with_a_checkpoint(dpo_interrupted):
    stopped = dpo_interrupted["stopped"]
    out = stopped["out"]
    assert stopped["rc"] != 0
    # both ranks stopped at the same step (the first to exit with code 3 makes the launcher end the other,
    # which may be SIGTERMed while it exits)
    steps_seen = re.findall(r"stopped: stopped at step (\d+);", out)
    assert len(steps_seen) == 2 and len(set(steps_seen)) == 1, out[-3000:]
    assert "exitcode  : 3" in out and not re.search(r"exitcode\s*:\s*(1|-9)\b", out), out[-3000:]
    ends = [e for e in stopped["events"] if e["type"] == "stage_end"]
    assert ends[-1]["stage"] == "dpo" and ends[-1]["status"] == "stopped"
    # STOP came once checkpoint `waited` was complete: the step it stopped at was saved too
    assert max(stopped["checkpoints"]) > stopped["waited"] and not stopped["done"]


def test_unsloth_is_refused_under_a_launcher(tmp_path, monkeypatch, capsys):
    from mmrlhf_lite.train import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    recipe = _recipe(tmp_path, "run", 1)
    assert main([str(recipe), "model.backend=unsloth", "--stages", "dpo", "-q"]) == 1
    assert "model.backend=unsloth under a multi-process launcher is not supported" in capsys.readouterr().err


def test_dry_run_shows_the_global_batch_of_a_launch(tmp_path, capsys):
    from mmrlhf_lite.train import main

    recipe = _recipe(tmp_path, "run", 3)
    assert main([str(recipe), "--dry-run", "--processes", "4", "dpo.train.grad_accum=2"]) == 0
    out = capsys.readouterr().out
    assert "4 processes" in out and "dpo 3 x 2 x 4 = 24 groups per optimizer step" in out
    assert "reward 3 x 1 x 4 = 12 groups per optimizer step" in out
    assert "torchrun --nproc_per_node 4 -m mmrlhf_lite.train" in out


def test_an_error_of_rank_0_before_the_stages_ends_every_rank_with_its_message(tmp_path, two_ranks):
    """A refusal of rank 0 (here: a finished stage with other settings) reaches rank 1 as rank 0's message,
    and the launcher exits; nothing waits for a timeout: the collectives' timeout is an hour in this launch, so
    a rank left waiting would keep the job past the test's bound (a wall-clock bound on the exit would not tell
    a timeout from a slow start on a loaded machine)."""
    _copy_run(two_ranks, tmp_path, drop=("reward", "score", "dpo"))   # reference alone done (two ranks)
    recipe = _recipe(tmp_path, "run", 1)
    load_recipe(recipe, ["model.max_pixels=50000"]).save(recipe)   # reference's inputs changed
    rc, out = _finish(_launch(recipe, "reference", env={"MMRLHF_LITE_DIST_TIMEOUT": "3600"}))
    assert rc != 0
    assert "has finished stage 'reference' with different settings" in out
    assert "rank 0 failed at 'run setup'" in out, out[-3000:]


LOCKSTEP_SCRIPT = '''
import json, sys
from mmrlhf_lite import distributed
from mmrlhf_lite.distributed import lockstep
from mmrlhf_lite.events import EventLog, StageStopped

distributed.init("cpu")
me, out = distributed.rank(), sys.argv[1]
events = EventLog(out if me == 0 else None, echo=False)
for case, stop_after in (("uneven", None), ("stop", 2)):
    checks, seen = [0], []

    def stop():  # rank 1 alone sees the request, at its third check (rank 0 never sees it)
        checks[0] += 1
        return me == 1 and stop_after is not None and checks[0] > stop_after

    batches = [[0, 1], [2], [3, 4, 5]] if me == 0 else []      # rank 1 has no batch at all
    try:
        res = lockstep.run_in_lockstep(batches, lambda b: seen.extend(b) or 10 * len(b), done=0 if me == 0 else 1,
                                       events=events, stop_requested=stop, part=case,
                                       stopped=lambda done, total: f"stopped after {done} of {total} groups")
        said = f"done {res.groups} {res.computed} {res.computed_groups}"
    except StageStopped as exc:
        said = f"stopped: {exc}"
    print(f"[{case}] rank {me}: {said}; worked on {seen}", flush=True)
distributed.destroy()
'''


def test_lockstep_with_uneven_shards_count_all_ranks_and_stop_every_rank_at_one_point(tmp_path):
    """lockstep.run_in_lockstep under torchrun: rank 0 holds 3 batches, rank 1 none (no deadlock: both join
    every round); progress counts both ranks' groups; a stop seen by rank 1 alone stops both after the
    same round with the same message."""
    script = tmp_path / "lockstep_script.py"
    script.write_text(LOCKSTEP_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(script), str(tmp_path)]
    proc = subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    rc, out = _finish(proc, timeout=120)
    assert rc == 0, out[-3000:]
    assert "[uneven] rank 0: done 7 60 [6, 0]; worked on [0, 1, 2, 3, 4, 5]" in out, out[-3000:]
    assert "[uneven] rank 1: done 7 60 [6, 0]; worked on []" in out, out[-3000:]
    # checked before steps 0, 1, 2: rank 1's third check stops both before rank 0's third batch
    assert "[stop] rank 0: stopped: stopped after 4 of 7 groups; worked on [0, 1, 2]" in out, out[-3000:]
    assert "[stop] rank 1: stopped: stopped after 4 of 7 groups; worked on []" in out, out[-3000:]
    events = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    progress = [(e["n"], e["total"]) for e in events if e["type"] == "progress" and e["part"] == "uneven"]
    assert progress == [(1, 7), (3, 7), (4, 7), (7, 7)]           # rank 1's cached group counted from the start
    rates = [e for e in events if e["type"] == "metrics" and e["part"] == "uneven"][-1]
    assert rates["rank0_groups_per_s"] > 0 and rates["rank1_groups_per_s"] == 0
    assert rates["groups_per_s"] == pytest.approx(rates["rank0_groups_per_s"])
    assert [(e["n"], e["total"]) for e in events if e["type"] == "progress" and e["part"] == "stop"] == [
        (1, 7), (3, 7), (4, 7)]


def _lines_with_keys(path: Path) -> set[str]:
    kept = set()
    for line in path.read_bytes().splitlines():
        try:
            kept.add(json.loads(line)["key"])
        except ValueError:
            pass
    return kept


SCORE_GROUPS = 16   # 64 responses: STOP after 8 leaves most of them to the resume, and so does the kill in reference


def _wait_for_lines(path: Path, n: int, proc: subprocess.Popen, timeout: float = TIMEOUT) -> None:
    """Until the cache file `path` holds `n` lines, the launch `proc` still running."""
    deadline = time.time() + timeout
    while not (path.exists() and path.read_bytes().count(b"\n") >= n):
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        assert time.time() < deadline, f"{path.name} held fewer than {n} lines after {timeout} s"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def precompute_interrupted(tmp_path_factory) -> dict:
    """One command, `--stages score,reference` on 2 ranks (critiques generated: score's shards are uneven by
    content), launched three times, each launch checked by its own test (three launches where the two tests made
    four): 1. `stopped`: STOP once two groups are scored; 2. `killed`: the same command finishes score, then rank 1
    is SIGKILLed once reference has written 8 cache lines; 3. `resumed`: the same command finishes reference."""
    tmp = tmp_path_factory.mktemp("precompute")
    path, run_dir = tmp / "score.yaml", tmp / "run"
    recipe = load_recipe(None, COMMON + _per_rank(1) + [
        f"data.demo.groups={SCORE_GROUPS}", "reward.critique_mode=generate", "reward.max_new_tokens=8",
        "reward.generation_batch_size=4", f"run.dir={run_dir}"])
    recipe.save(path)
    run_pipeline(recipe, ["reward"], echo=False)
    scores, references = run_dir / "cache" / "reward.jsonl", run_dir / "cache" / "reference.jsonl"
    state: dict = {"run": run_dir}

    proc = _launch(path, "score,reference")
    try:
        _wait_for_lines(scores, 8, proc)                                    # two groups scored
        (run_dir / "STOP").write_text("test")
        rc, out = _finish(proc, timeout=120)
    finally:
        _kill_group(proc)
    state["stopped"] = {"rc": rc, "out": out, "events": _events(run_dir), "kept": _lines_with_keys(scores),
                        "score_done": (run_dir / "stages" / "score.json").exists()}

    proc = _launch(path, "score,reference", env=NO_COLLECTIVE_TIMEOUT)     # the same command resumes
    try:
        _wait_for_lines(references, 8, proc)
        state["score"] = json.loads((run_dir / "stages" / "score.json").read_text())   # score ended before
        os.kill(_rank_pid(proc.pid, 1), signal.SIGKILL)
        rc, out = _finish(proc, timeout=KILL_BOUND)
    finally:
        _kill_group(proc)
    state["killed"] = {"rc": rc, "out": out, "kept": _lines_with_keys(references),
                       "reference_done": (run_dir / "stages" / "reference.json").exists()}

    rc, out = _finish(_launch(path, "score,reference"))
    state["resumed"] = {"rc": rc, "out": out}
    return state


def test_a_stop_during_score_stops_every_rank_at_one_point_and_the_same_command_resumes(precompute_interrupted):
    """STOP created mid-score (critiques generated, sharded unevenly by content): both ranks stop after the
    same round with the same message and exit code 3; the cache keeps what was written; the same command
    computes only the rest."""
    stopped, run_dir = precompute_interrupted["stopped"], precompute_interrupted["run"]
    out = stopped["out"]
    assert stopped["rc"] != 0
    said = re.findall(rf"stopped: stopped after (\d+) of {SCORE_GROUPS} groups; the cache keeps them\. "
                      r"Run the same command", out)
    assert len(said) == 2 and len(set(said)) == 1, out[-3000:]
    assert "exitcode  : 3" in out and not re.search(r"exitcode\s*:\s*(1|-9)\b", out), out[-3000:]
    events = stopped["events"]
    end = [e for e in events if e["type"] == "stage_end"][-1]
    assert end["stage"] == "score" and end["status"] == "stopped"
    last = [e for e in events if e["type"] == "progress" and e.get("stage") == "score"][-1]
    assert last["n"] == int(said[0]) < last["total"] == SCORE_GROUPS          # both ranks' groups, stopped midway
    kept = stopped["kept"]
    assert 8 <= len(kept) < SCORE_GROUPS * 4
    assert not stopped["score_done"]

    result = precompute_interrupted["score"]                             # the same command resumed score
    assert result["computed"] == SCORE_GROUPS * 4 - len(kept) and result["reused"] == len(kept)
    assert len(_cache(run_dir, "reward.jsonl")) == SCORE_GROUPS * 4


def test_two_ranks_killed_while_filling_one_shared_cache_lose_and_duplicate_nothing(precompute_interrupted):
    """Rank 1 SIGKILLed while both ranks append to cache/reference.jsonl: the job fails, the cache keeps every
    whole line (a line torn by the kill is repaired by the next run), and the same command computes the rest only."""
    killed, run_dir = precompute_interrupted["killed"], precompute_interrupted["run"]
    assert killed["rc"] != 0, killed["out"][-3000:]
    assert not killed["reference_done"]
    kept, total = killed["kept"], SCORE_GROUPS * 4
    assert 8 <= len(kept) < total
    resumed = precompute_interrupted["resumed"]
    assert resumed["rc"] == 0, resumed["out"][-4000:]
    assert json.loads((run_dir / "stages" / "reference.json").read_text())["computed"] == total - len(kept)
    cache = _cache(run_dir, "reference.jsonl")
    assert set(cache) >= kept and len(cache) == total


def _without_timings(tree):
    if isinstance(tree, dict):
        return {k: _without_timings(v) for k, v in tree.items() if "second" not in k}
    if isinstance(tree, list):
        return [_without_timings(v) for v in tree]
    return tree


@pytest.fixture(scope="module")
def eval_stopped_then_resumed(single_eval, tmp_path_factory) -> dict:
    """The trained `single_eval` run copied without its eval; a two-rank eval launch that gets SIGTERM to rank 1
    alone once eval has made progress; then the same command again, which evaluates from the start (an evaluation
    is not kept in parts). What each launch said and left: the stop test reads the first, the report test the
    second (one two-rank eval serves both)."""
    tmp = tmp_path_factory.mktemp("eval-stop")
    run_dir = _copy_run(single_eval, tmp, drop=("eval",))   # trained: eval's nine parts to run
    path = tmp / "eval.yaml"
    _eval_recipe(run_dir, 2).save(path)
    offset = (run_dir / "events.jsonl").stat().st_size     # the copied run's own events come before
    proc = _launch(path, "eval")
    try:
        deadline = time.time() + TIMEOUT
        while not any('"stage": "eval"' in x and '"progress"' in x and '"n": 0,' not in x
                      for x in (run_dir / "events.jsonl").read_bytes()[offset:].decode(errors="replace").splitlines()):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-4000:]
            time.sleep(0.05)
        os.kill(_rank_pid(proc.pid, 1), signal.SIGTERM)
        stopped_rc, stopped_out = _finish(proc, timeout=120)
    finally:
        _kill_group(proc)
    stopped = {"rc": stopped_rc, "out": stopped_out, "events": _events(run_dir),
               "report": (run_dir / "eval" / "report.json").exists(),
               "done": (run_dir / "stages" / "eval.json").exists()}
    start = len(stopped["events"])
    rc, out = _finish(_launch(path, "eval"))
    return {"run": run_dir, "stopped": stopped, "rc": rc, "out": out, "events": _events(run_dir)[start:]}


def test_sigterm_of_one_rank_during_eval_stops_both_at_one_point_and_the_same_command_evaluates(
        eval_stopped_then_resumed):
    """SIGTERM to rank 1 alone while eval runs: both ranks stop after the same round of the same part with
    the same message and exit code 3, no report is written; the same command then evaluates."""
    stopped = eval_stopped_then_resumed["stopped"]
    out = stopped["out"]
    assert stopped["rc"] != 0
    said = re.findall(r"stopped: stopped during evaluation \(([^)]*)\)", out)
    assert len(said) == 2 and len(set(said)) == 1 and " of " in said[0], out[-3000:]
    assert "exitcode  : 3" in out and not re.search(r"exitcode\s*:\s*(1|-9)\b", out), out[-3000:]
    end = [e for e in stopped["events"] if e["type"] == "stage_end"][-1]
    assert end["stage"] == "eval" and end["status"] == "stopped"
    assert not stopped["report"] and not stopped["done"]
    assert eval_stopped_then_resumed["rc"] == 0, eval_stopped_then_resumed["out"][-4000:]
    run_dir = eval_stopped_then_resumed["run"]
    assert json.loads((run_dir / "eval" / "report.json").read_text())["reward_model"]["modes"]["generate"]


def test_eval_split_over_two_ranks_writes_the_report_of_one_process(single_eval, eval_stopped_then_resumed):
    """Every eval part is split over 2 ranks (critique modes before/after training with sampled critiques,
    policy log-probs, sampled policy answers, their scoring): the report equals a single process's, every
    number and every generated text, timings aside; both ranks worked on each part. (The two-rank eval is the
    resumed one of the stop test: it starts over, so it computes every part.)"""
    run_dir = eval_stopped_then_resumed["run"]
    assert eval_stopped_then_resumed["rc"] == 0, eval_stopped_then_resumed["out"][-4000:]
    single = json.loads((single_eval / "eval" / "report.json").read_text())
    single_md = (single_eval / "eval" / "report.md").read_text()
    double = json.loads((run_dir / "eval" / "report.json").read_text())
    n = single["groups"]
    assert n >= 5 and single["policy"]["samples"] and single["reward_model"]["modes"]["generate"]
    assert _without_timings(double) == _without_timings(single)
    wall = re.compile(r"Wall time: [\d.]+ s\.")
    assert wall.sub("", (run_dir / "eval" / "report.md").read_text()) == wall.sub("", single_md)
    events = eval_stopped_then_resumed["events"]
    parts = {e["part"] for e in events if e["type"] == "progress" and e.get("stage") == "eval"}
    assert parts == {"reward model before training, given", "reward model before training, none",
                     "reward model before training, generate", "reward model, given", "reward model, none",
                     "reward model, generate", "policy log-probs", "policy answers", "scoring the policy's answers"}
    for part in parts:
        last = [e for e in events if e["type"] == "progress" and e.get("part") == part][-1]
        assert last["n"] == last["total"] == n, last
        rates = [e for e in events if e["type"] == "metrics" and e.get("part") == part][-1]
        assert rates["rank0_groups_per_s"] > 0 and rates["rank1_groups_per_s"] > 0, rates


_SPINNING_RANK = """
import atexit, runpy, sys, threading, torch
marker = sys.argv.pop(1)
a = torch.randn(800, 800)
def spin():   # a thread inside torch (gil released) whenever the interpreter starts its teardown
    while True:
        torch.mm(a, a)
threading.Thread(target=spin, daemon=True).start()
atexit.register(lambda: open(marker, "w").write("atexit ran"))
sys.argv[0] = "mmrlhf_lite.train"
runpy.run_module("mmrlhf_lite.train", run_name="__main__", alter_sys=True)
"""


def test_a_rank_s_exit_code_survives_a_thread_still_in_torch_at_exit(tmp_path):
    """A rank of a launch (WORLD_SIZE 2) exits with the code its command chose, even with a C++ thread still
    inside torch when it ends: the interpreter's teardown, where such a thread (gloo's, in the CI failure at
    3359e87) aborts the process with "terminate called without an active exception" (SIGABRT, exit -6 instead
    of a clean stop's 3), is skipped; the atexit handlers still run. Here the thread is a Python daemon thread
    in torch.mm and the command a recipe error (exit 2, before any group is joined): with `sys.exit(main())`
    every run of it aborted (5 of 5 seen)."""
    script = tmp_path / "rank.py"
    script.write_text(_SPINNING_RANK)
    marker = tmp_path / "atexit.txt"
    env = _env(WORLD_SIZE="2", RANK="1", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()))
    proc = subprocess.run([sys.executable, str(script), str(marker), str(REPO / "recipes" / "demo.yaml"),
                           "run.no_such_key=1", "-q"], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "no_such_key" in proc.stderr and "terminate called" not in proc.stderr, proc.stderr[-3000:]
    assert marker.read_text() == "atexit ran"


_GLOO_THREADS = """
import os
from mmrlhf_lite.distributed import collectives as C
def runloops():
    return sum(open(f"/proc/self/task/{t}/comm").read().strip() == "pt_gloo_runloop" for t in os.listdir("/proc/self/task"))
C.init("cpu")
C.on_main("x", lambda: 1); C.gather(1); C.any_rank(False)
before = runloops()
C.destroy()
print("runloops", before, runloops(), flush=True)
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
def test_leaving_the_group_ends_both_groups_gloo_threads(tmp_path):
    """`destroy` ends the gloo threads of both groups a launch joins (the default one and `on_main`'s), so none
    is left for the interpreter's teardown: the module's own reference kept `on_main`'s group, with its 2 work
    threads, alive after destroy_process_group. Two ranks started by hand (env://), no launcher."""
    script = tmp_path / "groups.py"
    script.write_text(_GLOO_THREADS)
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, str(script)], env=_env(WORLD_SIZE="2", RANK=str(r), LOCAL_RANK=str(r),
                              LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for r in (0, 1)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=120)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
        counts = re.findall(r"runloops (\d+) (\d+)", out)
        assert counts and int(counts[0][0]) >= 4 and counts[0][1] == "0", out[-3000:]


def test_a_stopped_run_leaves_the_process_group_like_a_finished_one(tmp_path, monkeypatch, capsys):
    """Every rank stops at one point (StageStopped, exit code 3) and then leaves the process group as a finished
    run does; a rank that exited without it kept its gloo connections open, and was seen to abort at exit
    ("terminate called without an active exception", SIGABRT) in a two-rank stop under CI."""
    import mmrlhf_lite.train as train
    from mmrlhf_lite import distributed
    from mmrlhf_lite.events import StageStopped

    left = []
    monkeypatch.setattr(distributed, "destroy", lambda: left.append(True))

    def stops(*args, **kwargs):
        raise StageStopped("stopped at step 5; checkpoint saved in x")

    monkeypatch.setattr(train, "run_pipeline", stops)
    recipe = _recipe(tmp_path, "run", 1)
    assert train.main([str(recipe), "--stages", "dpo", "-q"]) == 3
    assert "stopped: stopped at step 5" in capsys.readouterr().err
    assert left == [True]
