"""All five stages on the xs tiny model in about a minute: the files each stage leaves, the report's
sections, the event stream, and a re-run that skips everything (fast coverage; the learning claims are
in test_demo_e2e.py)."""
import json

from mmrlhf_lite.events import read_events
from mmrlhf_lite.recipe import load_recipe
from mmrlhf_lite.train import run_pipeline

SMALL = ["model.path=tiny:qwen2_vl:xs", "model.device=cpu", "data.demo.groups=12", "data.demo.image_size=56",
         "data.eval_fraction=0.34", "reward.train.max_steps=3", "reward.train.groups_per_step=2",
         "reward.train.grad_accum=1", "reward.max_new_tokens=6", "dpo.train.max_steps=3",
         "dpo.train.groups_per_step=2", "dpo.train.grad_accum=1", "eval.max_new_tokens=6", "run.seed=0"]


def test_all_stages_small(tmp_path):
    recipe = load_recipe(None, SMALL + [f"run.dir={tmp_path / 'run'}", "reward.critique_mode=given"])
    ctx = run_pipeline(recipe, echo=False)
    run = tmp_path / "run"
    for stage in ("reward", "score", "reference", "dpo", "eval"):
        assert ctx.run.is_done(stage), stage
    assert (run / "reward" / "final" / "adapter_config.json").exists()
    assert (run / "dpo" / "final" / "adapter_config.json").exists()
    margins = [json.loads(x) for x in (run / "score" / "margins.jsonl").read_text().splitlines()]
    assert len(margins) == 12 and all(len(m["scores"]) == 4 for m in margins)
    for m in margins:
        for p in m["pairs"]:
            assert p["delta"] == m["scores"][p["better"]] - m["scores"][p["worse"]]
    report = json.loads((run / "eval" / "report.json").read_text())
    assert set(report["reward_model"]["modes"]) == {"given", "none", "generate"}
    assert set(report["reward_model"]["before"]) == {"given", "none", "generate"}
    pol = report["policy"]
    assert 0.0 <= pol["implicit_accuracy"] <= 1.0 and pol["pairs"] == report["pairs"]
    assert pol["win_rate"]["critique_mode"] == "generate" and pol["win_rate"]["n"] == report["groups"]
    md = (run / "eval" / "report.md").read_text()
    assert "| given |" in md and "implicit reward accuracy" in md
    events, _ = read_events(run)
    kinds = {e["type"] for e in events}
    assert {"run_start", "stage_start", "progress", "metrics", "stage_end", "run_end"} <= kinds
    assert [e["stage"] for e in events if e["type"] == "stage_end"] == ["reward", "score", "reference", "dpo",
                                                                         "eval"]
    # a second invocation with the same recipe does nothing but skip
    ctx2 = run_pipeline(recipe, echo=False)
    events2, _ = read_events(run)
    assert [e for e in events2[len(events):] if e["type"] == "stage_start"] == []
    assert ctx2.run.is_done("eval")
