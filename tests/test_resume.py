"""A stopped (or killed) DPO run resumes from its last checkpoint and reproduces the loss curve of an
uninterrupted run; the stop request leaves status `stopped` and nothing marked done."""
import json

import pytest

from mmrlhf_lite import train as train_mod
from mmrlhf_lite.events import StageStopped
from mmrlhf_lite.recipe import load_recipe
from mmrlhf_lite.train import run_pipeline

BASE = ["model.path=tiny:qwen2_vl:xs", "model.load_in_4bit=false", "model.device=cpu",
        "data.demo.groups=12", "data.demo.image_size=56", "data.eval_fraction=0", "data.demo.safety_fraction=0",
        "dpo.margin_source=none", "dpo.w=0", "dpo.train.groups_per_step=2", "dpo.train.grad_accum=1",
        "dpo.train.max_steps=6", "dpo.train.logging_steps=1", "dpo.train.save_steps=3",
        "dpo.train.learning_rate=1e-3"]


def _losses(run_dir):
    out = {}
    for line in (run_dir / "events.jsonl").read_text().splitlines():
        e = json.loads(line)
        if e["type"] == "metrics" and e.get("stage") == "dpo" and "loss" in e:
            out[e["step"]] = e["loss"]
    return out


def test_stopped_run_resumes_with_the_same_loss_curve(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    full = load_recipe(None, BASE + [f"run.dir={tmp_path / 'full'}", f"cache.dir={cache}"])
    run_pipeline(full, ["reference", "dpo"], echo=False)
    want = _losses(tmp_path / "full")
    assert sorted(want) == [1, 2, 3, 4, 5, 6]

    part = load_recipe(None, BASE + [f"run.dir={tmp_path / 'part'}", f"cache.dir={cache}"])
    run_pipeline(part, ["reference"], echo=False)   # every stage checks for a stop: count dpo's checks only
    checks = {"n": 0}

    def stop_after_three_steps(self):
        checks["n"] += 1
        return checks["n"] >= 3
    monkeypatch.setattr(train_mod.RunContext, "stop_requested", stop_after_three_steps)
    with pytest.raises(StageStopped, match="stopped at step 3"):
        run_pipeline(part, ["dpo"], echo=False)
    run = tmp_path / "part"
    assert (run / "dpo" / "checkpoints" / "checkpoint-3").is_dir()
    assert not (run / "stages" / "dpo.json").exists()
    ends = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines() if '"stage_end"' in x]
    assert ends[-1]["stage"] == "dpo" and ends[-1]["status"] == "stopped"

    monkeypatch.undo()
    run_pipeline(part, ["reference", "dpo"], echo=False)
    got = _losses(run)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), step
    assert (run / "stages" / "dpo.json").exists()
    assert (run / "dpo" / "final" / "adapter_config.json").exists()
    assert not list((run / "dpo" / "checkpoints").glob("checkpoint-*"))   # cleaned after the final save


def test_an_interrupted_checkpoint_save_is_skipped(tmp_path):
    """A kill during a save leaves checkpoint-N without trainer_state.json: resume uses the one before."""
    from mmrlhf_lite.events import EventLog
    from mmrlhf_lite.training import last_complete_checkpoint

    out = tmp_path / "checkpoints"
    for step, complete in ((3, True), (6, True), (9, False), (12, "torn")):
        d = out / f"checkpoint-{step}"
        d.mkdir(parents=True)
        (d / "adapter_model.safetensors").write_bytes(b"x")
        if complete is True:
            (d / "trainer_state.json").write_text('{"global_step": %d}' % step)
        elif complete == "torn":
            (d / "trainer_state.json").write_text('{"global_st')
    events = EventLog(tmp_path, echo=False)
    assert last_complete_checkpoint(out, events) == str(out / "checkpoint-6")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-3", "checkpoint-6"]
    warnings = [json.loads(x)["message"] for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert warnings == ["checkpoint-12 was not completely written (interrupted save); removed",
                        "checkpoint-9 was not completely written (interrupted save); removed"]
    assert last_complete_checkpoint(tmp_path / "missing") is None


def _checkpoint(out, step: int, marked: bool, rng_parts: int = 2, cut: int | None = None):
    """A checkpoint folder as the trainer writes one (trainer state, each rank's RNG state as torch.save
    writes it), with its completion marker or not, rank `cut`'s RNG state cut short."""
    import torch

    from mmrlhf_lite.training import CHECKPOINT_COMPLETE

    d = out / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / "trainer_state.json").write_text('{"global_step": %d}' % step)
    for rank in range(rng_parts):
        part = d / f"rng_state_{rank}.pth"
        torch.save({"python": list(range(600)), "cpu": torch.get_rng_state()}, part)
        if rank == cut:
            part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    if marked:
        (d / CHECKPOINT_COMPLETE).write_text('{"step": %d}' % step)
    return d


def test_a_checkpoint_without_every_ranks_part_is_skipped_for_the_one_before(tmp_path):
    """Rank 1 killed while writing rng_state_1.pth: the newest checkpoint has trainer_state.json (rank 0 wrote
    it) but no completion marker. Resume takes the newest marked one; in a folder from before the markers,
    the newest whose parts read whole. (It used to take the newest with a trainer_state.json, and rank 1
    crashed in transformers' _load_rng_state on every resume.)"""
    from mmrlhf_lite.events import EventLog
    from mmrlhf_lite.training import last_complete_checkpoint

    out = tmp_path / "checkpoints"
    _checkpoint(out, 2, marked=True)
    _checkpoint(out, 4, marked=True)
    _checkpoint(out, 6, marked=False, cut=1)
    events = EventLog(tmp_path, echo=False)
    assert last_complete_checkpoint(out, events) == str(out / "checkpoint-4")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    said = [json.loads(x)["message"] for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert said == ["checkpoint-6 was not completely written (interrupted save); removed"]

    before = tmp_path / "before_markers"           # written by a version without markers
    _checkpoint(before, 3, marked=False)
    _checkpoint(before, 6, marked=False, cut=1)
    assert last_complete_checkpoint(before) == str(before / "checkpoint-3")


def test_a_checkpoint_is_marked_complete_before_older_ones_are_removed(tmp_path):
    from mmrlhf_lite.training import CHECKPOINT_COMPLETE, mark_complete

    out = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        d = _checkpoint(out, step, marked=False)
        mark_complete(d, keep=2)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-4", "checkpoint-6"]
    assert json.loads((out / "checkpoint-6" / CHECKPOINT_COMPLETE).read_text()) == {"step": 6}
    d = _checkpoint(out, 8, marked=False)          # being written: nothing older goes yet
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-4", "checkpoint-6", "checkpoint-8"]
    mark_complete(d, keep=1)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-8"]


def test_a_torn_train_result_or_events_line_never_stops_a_resume(tmp_path):
    """A run killed while writing train_result.json (written in place before it was written atomically) and
    mid-line in events.jsonl, after the model was saved and before the stage was marked done: the same
    command goes on. The trained model is kept (a warning says its numbers are lost), the torn events line
    is cut before the next line is appended, so every line reads."""
    from mmrlhf_lite.events import read_events

    recipe = load_recipe(None, BASE[:7] + ["reward.train.max_steps=2", "reward.train.groups_per_step=2",
                                           "reward.critique_mode=given", f"run.dir={tmp_path / 'run'}"])
    run_pipeline(recipe, ["reward"], echo=False)
    run = tmp_path / "run"
    adapter = (run / "reward" / "final" / "adapter_model.safetensors").read_bytes()
    result = run / "reward" / "train_result.json"
    result.write_text(result.read_text()[:20])
    (run / "stages" / "reward.json").unlink()       # killed before the stage was marked done
    with open(run / "events.jsonl", "a") as fh:
        fh.write('{"time": 1764950000.0, "type": "metr')
    size = (run / "events.jsonl").stat().st_size

    run_pipeline(recipe, ["reward"], echo=False)
    damaged: list = []
    events, _ = read_events(run, damaged=damaged)
    assert damaged == [] and (run / "events.jsonl").read_bytes().count(b'"type": "metr"') == 0
    assert [e["type"] for e in events].count("run_start") == 2 and (run / "events.jsonl").stat().st_size > size
    warned = [e["message"] for e in events if e["type"] == "warning"]
    assert any("train_result.json is damaged (an interrupted write); the trained model" in m for m in warned), warned
    assert (run / "reward" / "final" / "adapter_model.safetensors").read_bytes() == adapter
    status = json.loads((run / "stages" / "reward.json").read_text())
    assert "lost" in json.dumps(status) and json.loads(result.read_text())["train_result"].startswith("lost")
