"""The CLI as a user meets it: help, recipe help, recipe errors (exit 2, no traceback), the dry-run plan.

The help, no recipe given and a recipe error run `python -m mmrlhf_lite.train` as a subprocess (a real
process's exit code and output); the other tests run its `main` in the test process (tests/run_support.run_main:
the same exit code and output, without ~7 CPU s of imports each). Both in a temporary working directory (the
demo recipe's run folder is relative), with the session's offline environment and tiny-model cache.

    python -m pytest -q tests/test_cli.py
"""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from run_support import run_main

from mmrlhf_lite.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "recipes" / "demo.yaml"


def cli(*args, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "mmrlhf_lite.train", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture
def cli_here(capsys):
    """`cli_here(*args, cwd=...)`: `python -m mmrlhf_lite.train args` run in this process."""
    from mmrlhf_lite.train import main

    return lambda *args, cwd: run_main(main, args, cwd=cwd, capsys=capsys)


def test_help_documents_stages_overrides_and_exit_codes(tmp_path):
    out = cli("--help", cwd=tmp_path)
    assert out.returncode == 0
    text = " ".join(out.stdout.split())  # argparse wraps lines
    assert "usage: python -m mmrlhf_lite.train" in text
    assert "--stages STAGES comma-separated subset of reward,score,reference,dpo,eval,rounds" in text
    assert "Overrides are key.path=value pairs, e.g. dpo.beta=0.2" in text
    assert "Exit codes: 0 done, 1 error, 2 usage/unavailable stage, 3 stopped (re-run to resume)." in text
    for flag in ("--dry-run", "--redo", "--help-recipe", "--gpu-mem"):
        assert flag in text


def test_help_recipe_lists_every_key_with_help(tmp_path):
    out = cli("--help-recipe", cwd=tmp_path)
    assert out.returncode == 0
    assert "  dpo.beta (float, default 0.1)\n      beta_0 of MM-DPO.\n" in out.stdout
    assert "  reward.train.learning_rate (float, default 0.0002)\n      Peak learning rate.\n" in out.stdout
    assert "  dpo.train.learning_rate (float, default 5e-05)\n" in out.stdout
    assert len(re.findall(r"^  [a-z_.]+ \(", out.stdout, flags=re.M)) >= 80


def test_no_recipe_is_a_usage_error(tmp_path):
    out = cli(cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.endswith("error: a recipe is required (try recipes/demo.yaml)\n")


def test_recipe_error_exits_2_with_the_key_path_and_no_traceback(tmp_path):
    out = cli(DEMO, "dpo.betta=0.2", "--dry-run", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr == f"error: {DEMO} (override dpo.betta=0.2), key 'dpo.betta': unknown key; did you mean 'dpo.beta'?\n"
    assert out.stdout == ""


def test_error_inside_the_file_names_file_and_key(tmp_path, cli_here):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  path: tiny:qwen2_vl:xs\ndpo:\n  beta: -1\n")
    out = cli_here(bad, cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr == f"error: {bad}, key 'dpo.beta': must be > 0, got -1.0\n"
    assert "Traceback" not in out.stderr


def test_missing_recipe_and_unknown_stage(tmp_path, cli_here):
    out = cli_here(tmp_path / "nope.yaml", cwd=tmp_path)
    assert (out.returncode, out.stderr) == (2, f"error: {tmp_path / 'nope.yaml'}: recipe file not found\n")
    out = cli_here(DEMO, "--stages", "reward,dpoo", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr == ("error: command line, key '--stages': unknown stage 'dpoo'; "
                          "stages are reward, score, reference, dpo, eval, rounds\n")


def test_dry_run_on_the_demo_recipe_prints_the_plan(tmp_path, cli_here):
    out = cli_here(DEMO, "--dry-run", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    text = out.stdout
    assert text.startswith(f"recipe: {DEMO}\nrun dir: runs/demo\nmodel: tiny:qwen2_vl (family qwen2_vl, 4-bit on, "
                           "packing auto)\n\nstages: reward, score, reference, dpo, eval\n")
    train = re.search(r"^  train\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)$", text, flags=re.M)
    evals = re.search(r"^  eval\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)$", text, flags=re.M)
    n_train, n_eval = int(train.group(1)), int(evals.group(1))
    recipe = load_recipe(DEMO)
    groups = recipe.data.demo.groups
    assert n_train + n_eval == groups
    assert f"responses per group (train): 4 x {n_train} groups" in text
    assert f"tokens per group ({groups} groups, model processor):" in text
    for label in ("prompt (incl. image):", "of which image:", "response:", "prompt + one response:",
                  "packed group:", "critique:"):
        assert re.search(rf"^ +{re.escape(label)} +p50 \d+, p95 \d+, max \d+", text, flags=re.M), label
    t = recipe.reward.train
    per_step = t.groups_per_step * t.grad_accum
    if t.max_steps:
        assert (f"  reward  {t.max_steps} steps (max_steps {t.max_steps}; {n_train} groups, {t.groups_per_step} per "
                f"micro-batch x {t.grad_accum} accumulated = {per_step} per step, "
                f"{math.ceil(n_train / per_step)} steps per epoch") in text
    else:
        steps = math.ceil(n_train / per_step) * int(t.epochs)
        assert f"  reward  {steps} steps" in text
    assert text.rstrip().endswith("plan OK")
    # the data were written into the run folder (the stages will read them), nothing else was
    assert sorted(p.name for p in (tmp_path / "runs" / "demo").iterdir()) == ["data"]
    assert f"data: {n_train} train groups, {n_eval} eval groups" in out.stderr


def test_dry_run_reports_over_long_samples_and_exits_1(tmp_path, cli_here):
    out = cli_here(DEMO, "--dry-run", "data.demo.groups=12", "dpo.train.max_length=40", "--stages", "dpo",
              cwd=tmp_path)
    assert out.returncode == 1, out.stderr
    listed = re.findall(r"^  \[dpo\.train\.max_length\] (runs/demo/data/demo/demo\.jsonl:\d+): prompt \+ response "
                        r"of response \d is (\d+) tokens", out.stdout, flags=re.M)
    assert listed and all(int(n) > 40 for _, n in listed)
    assert f"ERROR: {len(listed)} sequence(s) longer than max_length (listed above)" in out.stdout
    assert "Traceback" not in out.stderr
