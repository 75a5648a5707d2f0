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
