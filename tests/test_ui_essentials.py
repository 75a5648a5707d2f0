"""The Train tab's essentials (mmrlhf_lite/ui/essentials.py): presets, the YAML preview, the pre-flight
numbers (the same as `--dry-run`), the measured-speed time estimate, and the smoke-test preset's real run.

    python -m pytest -q tests/test_ui_essentials.py
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from run_support import run_main

from mmrlhf_lite.recipe import Recipe, load_recipe
from mmrlhf_lite.ui import essentials, form

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "recipes" / "demo.yaml"
KEYS = [s.key for s in form.FIELDS]


def demo_values(data_root) -> form.FormValues:
    return form.form_values(form.recipe_tree(DEMO), data_root)


def test_every_essential_is_a_form_field_and_presets_set_only_form_keys():
    assert set(essentials.ESSENTIALS) <= set(KEYS)
    for name, keys in essentials.PRESETS.items():
        assert set(keys) <= set(KEYS), name


def test_full_demo_preset_is_the_demo_recipes_own_values():
    demo = load_recipe(DEMO, check_paths=False)
    for key, wanted in essentials.PRESETS[essentials.FULL].items():
        node = demo
        for part in key.split("."):
            node = getattr(node, part)
        assert node == wanted, key


def test_preset_sets_its_keys_and_says_so(tmp_path):
    values = demo_values(tmp_path)
    new, changed = essentials.apply_preset(essentials.SMOKE, values)
    assert changed == ["data.demo.groups", "reward.train.max_steps", "dpo.train.max_steps", "eval.max_groups"]
    assert (new["reward.train.max_steps"], new["data.demo.groups"]) == (60, 120)
    untouched = [k for k in KEYS if k not in essentials.PRESETS[essentials.SMOKE]]
    assert all(new[k] == values[k] for k in untouched)
    msg = essentials.preset_message(essentials.SMOKE, changed)
    assert "`reward.train.max_steps` = 60" in msg and "`eval.max_groups` = 24" in msg
    assert "`model.path`" not in msg  # it already had the preset's value


def test_preset_asks_before_replacing_edits_but_not_its_own_values(tmp_path):
    values = demo_values(tmp_path)
    loaded = dict(values)  # what the last recipe load left in the form
    # unedited form: no conflict
    assert essentials.preset_conflicts(essentials.SMOKE, values, loaded, None) == []
    # an edit of a key the preset sets is a conflict; an edit of another key is not
    edited = values.replace({"dpo.train.max_steps": 7, "dpo.beta": 0.3})
    assert essentials.preset_conflicts(essentials.SMOKE, edited, loaded, None) == ["dpo.train.max_steps"]
    # an edit equal to the preset's value replaces nothing
    edited = edited.replace({"dpo.train.max_steps": 60})
    assert essentials.preset_conflicts(essentials.SMOKE, edited, loaded, None) == []
    # the values a preset set are not edits for the next preset
    smoke, _ = essentials.apply_preset(essentials.SMOKE, values)
    state = essentials.preset_form_values(essentials.SMOKE)
    assert essentials.preset_conflicts(essentials.FULL, smoke, loaded, state) == []
    smoke = smoke.replace({"reward.train.max_steps": 61})
    assert essentials.preset_conflicts(essentials.FULL, smoke, loaded, state) == ["reward.train.max_steps"]


def test_yaml_preview_holds_exactly_the_keys_that_differ_and_rebuilds_the_recipe(tmp_path):
    values, _ = essentials.apply_preset(essentials.SMOKE, demo_values(tmp_path))
    text = essentials.yaml_preview(values, data_root=tmp_path, runs_root=tmp_path, run_name="r1")
    assert text.startswith("# what Start will run: the keys whose values differ from the defaults")
    shown = yaml.safe_load(text)
    assert shown["reward"]["train"]["max_steps"] == 60 and shown["data"]["demo"]["groups"] == 120
    assert "beta" not in shown.get("dpo", {}) and "run" not in shown  # defaults are left out
    # independent check: the preview + the defaults are the recipe Start writes
    started = yaml.safe_load(form.run_recipe(values, data_root=tmp_path, runs_root=tmp_path, run_dir=tmp_path / "r1"))
    started["run"].pop("dir")
    path = tmp_path / "preview.yaml"
    path.write_text(text)
    rebuilt = load_recipe(path, check_paths=False).to_dict()
    rebuilt["run"].pop("dir")
    assert rebuilt == started
    # a form Start would refuse: the preview says why instead
    values = values.replace({"data.path": "missing.jsonl"})
    bad = essentials.yaml_preview(values, data_root=tmp_path, runs_root=tmp_path)
    assert bad.startswith("# Start would refuse this form") and "missing.jsonl" in bad and "does not exist" in bad


def test_estimate_shows_the_dry_runs_numbers(tmp_path, capsys):
    """The steps, groups and memory peak beside Start are the ones `--dry-run` prints for the same recipe."""
    values, _ = essentials.apply_preset(essentials.SMOKE, demo_values(tmp_path))
    p = essentials.preflight(values, data_root=tmp_path, runs_root=tmp_path, scratch=tmp_path / "pf")
    md = p.markdown
    assert p.can_start and not p.errors
    recipe = tmp_path / "smoke.yaml"
    recipe.write_text(form.run_recipe(values, data_root=tmp_path, runs_root=tmp_path, run_dir=tmp_path / "dry"))
    from mmrlhf_lite.train import main

    # the command's own code in-process (its output is the same; a subprocess only imported the stack again)
    result = run_main(main, [recipe, "--dry-run"], cwd=tmp_path, capsys=capsys)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    train, evals = (int(x) for x in re.search(r"\n  train\s+(\d+).*\n(?:.*\n)*?  eval\s+(\d+)", out).groups())
    assert f"data: {train} train / {evals} held-out groups" in md, (md, out)
    for stage in ("reward", "dpo"):
        steps = re.search(rf"\n  {stage}\s+(\d+) steps", out).group(1)
        assert f"{stage}: {steps} optimizer steps" in md
    peak = re.search(r"peak: (\w+), ([\d.]+) GiB needed", out)
    assert f"peak {float(peak.group(2)):.1f} GiB ({peak.group(1)})" in md, (md, peak.group(0))
    assert "time: no estimate (no finished run of this model and device here yet)" in md
    assert md.rstrip().endswith("plan OK")
    # a problem the real run would refuse on is said, with its key
    p = essentials.preflight(values.replace({"model.path": "tiny:nosuchfamily"}), data_root=tmp_path,
                             runs_root=tmp_path, scratch=tmp_path / "pf")
    assert "error: model.path 'tiny:nosuchfamily'" in p.markdown and not p.can_start


def test_preflight_names_every_bad_row_and_the_key_that_trains_past_them(tmp_path):
    """Bad rows under `data.on_error: raise`: the pre-flight cannot start, counts every bad row (not only the
    first) by kind with where they are, and offers `data.on_error: skip`; with it, the plan is OK and says how
    many rows were left out. A run name that is taken stops Start too."""
    from mmrlhf_lite.data.demo import write_demo

    data = write_demo(tmp_path / "data" / "set", groups=20, seed=0)
    lines = data.read_text().splitlines()
    lines[4] = "{not json"
    lines[9] = lines[9].replace("images/", "images/missing-")
    data.write_text("\n".join(lines) + "\n")
    runs = tmp_path / "runs"
    (runs / "taken").mkdir(parents=True)
    (runs / "taken" / "recipe.yaml").write_text("model: {}\n")
    now = demo_values(tmp_path / "data").replace({"data.path": "set/demo.jsonl", "run.stages": ["reward"]})
    kw = dict(data_root=tmp_path / "data", runs_root=runs, scratch=tmp_path / "pf")
    p = essentials.preflight(now, **kw)
    assert not p.can_start and p.bad_rows == 2, p.markdown
    assert "2 bad data row(s) (data.path: 1 malformed json, 1 missing image), first at set/demo.jsonl:5, " \
           "set/demo.jsonl:10" in p.markdown, p.markdown
    assert "trains on the 18 good group(s): the button below sets it" in p.markdown
    skip = essentials.preflight(now.replace({"data.on_error": "skip"}), **kw)
    assert skip.can_start and skip.bad_rows == 0 and "data: 16 train / 2 held-out groups" in skip.markdown, skip.markdown
    taken = essentials.preflight(now.replace({"data.on_error": "skip"}), run_name="taken", **kw)
    assert not taken.can_start and "run name 'taken' is taken" in taken.markdown
    assert essentials.preflight(now.replace({"data.on_error": "skip"}), run_name="free", **kw).can_start


def test_preset_label_says_the_time_measured_here_or_that_there_is_none(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    now = demo_values(tmp_path)
    kw = dict(data_root=tmp_path, runs_root=runs, scratch=tmp_path / "pf")
    assert essentials.preset_label(essentials.SMOKE, now, **kw) == "Preset: smoke test · not timed here yet"
    recipe = load_recipe(DEMO, check_paths=False).to_dict()
    # a finished run of the same model and device: 2 s per trained group, 0.1 s per scored/referenced/evaluated one
    _finished_run(runs, "measured", recipe, 80, 20, {"reward": 8.0 * 2, "score": 10.0, "reference": 10.0,
                                                      "dpo": 8.0 * 2, "eval": 2.0}, {"reward": 2, "dpo": 2})
    plan, applied, _ = essentials.plan_for(essentials.apply_preset(essentials.SMOKE, now)[0], **kw)
    total = essentials.time_estimate(plan, applied, runs)[0]
    assert total and essentials.preset_label(essentials.SMOKE, now, **kw) == (
        f"Preset: smoke test · about {essentials.format_duration(total)} here")


def _finished_run(runs: Path, name: str, recipe: dict, n_train: int, n_eval: int, seconds: dict, steps: dict):
    run = runs / name
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    ev = [{"time": 0.0, "type": "run_start", "stages": list(seconds), "skip": []},
          {"time": 0.1, "type": "log", "stage": "data",
           "message": f"data: {n_train} train groups, {n_eval} eval groups from x.jsonl (ranked)"}]
    for stage, s in seconds.items():
        ev.append({"time": 1.0, "type": "stage_start", "stage": stage})
        if stage in steps:
            ev.append({"time": 1.5, "type": "progress", "stage": stage, "n": steps[stage], "total": steps[stage],
                       "unit": "step"})
        ev.append({"time": 2.0, "type": "stage_end", "stage": stage, "status": "done", "seconds": s})
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in ev))


def test_time_estimate_scales_a_finished_runs_measured_speed_by_hand(tmp_path):
    runs = tmp_path / "runs"
    recipe = Recipe().to_dict()
    recipe["model"].update(device="cpu")
    recipe["reward"]["train"].update(groups_per_step=2, grad_accum=1)
    recipe["dpo"]["train"].update(groups_per_step=1, grad_accum=2)
    recipe["eval"]["max_groups"] = 5
    # 80 train + 20 eval groups; reward 10 steps x 2 groups in 20 s (1 s/group), score 50 s for 100 groups,
    # reference 10 s, dpo 10 steps x 2 groups in 40 s (2 s/group), eval 10 s for 5 groups
    _finished_run(runs, "measured", recipe, 80, 20, {"reward": 20.0, "score": 50.0, "reference": 10.0, "dpo": 40.0,
                                                      "eval": 10.0}, {"reward": 10, "dpo": 10})
    other = json.loads(json.dumps(recipe))
    other["model"]["device"] = "cuda"  # another device: its speed is not used
    _finished_run(runs, "gpu", other, 80, 20, {"reward": 1.0}, {"reward": 10})
    # the newest run is read first: make it the one on another device (set, not slept for: no timing dependence)
    st = (runs / "measured").stat()
    os.utime(runs / "gpu", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    plan = {"stages": [{"stage": s, "status": "run"} for s in ("reward", "score", "reference", "dpo", "eval")],
            "data": {"train": {"groups": 160}, "eval": {"groups": 40}},
            "steps": {"reward": {"steps": 30, "groups_per_optimizer_step": 4},
                      "dpo": {"steps": 5, "groups_per_optimizer_step": 2}}}
    target = Recipe()
    target.model.device = "cpu"
    target.eval.max_groups = 10
    total, per_stage, source = essentials.time_estimate(plan, target, runs)
    assert source == "measured"
    assert per_stage == pytest.approx({"reward": 120 * 1.0, "score": 200 * 0.5, "reference": 200 * 0.1,
                                       "dpo": 10 * 2.0, "eval": 10 * 2.0})
    assert total == pytest.approx(280.0)
    # a stage already done in the run folder costs nothing; another model has no measured speed
    plan["stages"][0]["status"] = "done"
    assert essentials.time_estimate(plan, target, runs)[0] == pytest.approx(160.0)
    target.model.path = "tiny:qwen3_vl"
    assert essentials.time_estimate(plan, target, runs) == (None, {}, None)


@pytest.mark.slow
def test_smoke_preset_runs_every_stage_and_its_label_is_the_time_it_took(tmp_path):
    """The smoke-test preset on the demo recipe, as Start writes it, through the CLI; afterwards the preset's
    label on this machine is the time that run measured (its stages' seconds: the same work, scaled by 1), not
    a promise (a loaded machine took minutes where a quiet one took seconds)."""
    values, _ = essentials.apply_preset(essentials.SMOKE, demo_values(tmp_path))
    runs = tmp_path / "runs"
    run = runs / "smoke"
    text = form.run_recipe(values, data_root=tmp_path, runs_root=runs, run_dir=run)
    recipe = tmp_path / "smoke.yaml"
    recipe.write_text(text)
    kw = dict(data_root=tmp_path, runs_root=runs, scratch=tmp_path / "pf")
    assert essentials.preset_label(essentials.SMOKE, values, **kw).endswith("not timed here yet")
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "mmrlhf_lite.train", str(recipe), "--quiet"], capture_output=True,
                          text=True, timeout=900, cwd=tmp_path)
    wall = time.time() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    ends = [json.loads(ln) for ln in (run / "events.jsonl").read_text().splitlines() if '"stage_end"' in ln]
    assert [(e["stage"], e["status"]) for e in ends] == [(s, "done") for s in ("reward", "score", "reference", "dpo",
                                                                               "eval")]
    assert (run / "eval" / "report.json").exists()
    measured = sum(e["seconds"] for e in ends)
    print(f"smoke preset: {wall:.1f} s wall, {measured:.1f} s in its stages")
    assert essentials.preset_label(essentials.SMOKE, values, **kw) == (
        f"Preset: smoke test · about {essentials.format_duration(measured)} here")
