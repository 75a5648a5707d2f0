"""The Colab notebooks: committed without outputs, shaped the same way (Colab install cell, a `parameters`
cell the environment overrides, no training logic), and each one executes headless on the demo recipe.

    python -m pytest -q tests/test_notebooks.py
"""
from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
# the smallest tiny model (xs) on 56-pixel images, two steps a stage: each notebook's stages run in seconds, and
# every curve, table and plot the notebook promises is still drawn (two logged points a curve)
ROUND_PROMPTS, ROUND_SAMPLES = 3, 2
CI_OVERRIDES = ("model.path=tiny:qwen2_vl:xs data.demo.image_size=56 data.demo.groups=16 data.eval_fraction=0.25 "
                "reward.train.max_steps=2 dpo.train.max_steps=2 reward.train.logging_steps=1 "
                "dpo.train.logging_steps=1 reward.max_new_tokens=8 eval.max_new_tokens=8 eval.max_groups=2 "
                f"rounds.max_new_tokens=8 rounds.max_prompts={ROUND_PROMPTS} rounds.samples={ROUND_SAMPLES}")


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


def test_the_four_notebooks_are_shipped():
    assert [p.name for p in NOTEBOOKS] == ["mm_dpo.ipynb", "quickstart.ipynb", "reward_model.ipynb", "rounds.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_committed_notebook_has_no_outputs(path):
    """Outputs are stripped in git (re-run to see them); the file is valid nbformat 4."""
    import nbformat

    nbformat.validate(nbformat.read(path, as_version=4))
    for i, cell in enumerate(_cells(path)):
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, f"{path.name} cell {i} has outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_shape(path):
    code = [c for c in _cells(path) if c["cell_type"] == "code"]
    install = "".join(code[0]["source"])
    assert '"google.colab" in sys.modules' in install and "pip" in install  # Colab only
    params = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1
    source = "".join(params[0]["source"])
    assert 'os.environ.get("MMRLHF_LITE_RECIPE")' in source and '"MMRLHF_LITE_OVERRIDES"' in source
    everything = "\n".join("".join(c["source"]) for c in code)
    assert "run_pipeline(" in everything and "dry_run(" in everything
    # no training logic in cells: the package does it
    for pattern in (r"\.backward\(", r"torch\.optim", r"Trainer\(", r"load_model\(", r"group_forward\("):
        assert not re.search(pattern, everything), f"{path.name}: {pattern}"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes_on_the_demo_recipe(path, tmp_path, monkeypatch, cache_dir):
    import nbformat
    from nbclient import NotebookClient

    run_dir = tmp_path / "run"
    monkeypatch.setenv("MMRLHF_LITE_RECIPE", "recipes/demo.yaml")
    monkeypatch.setenv("MMRLHF_LITE_OVERRIDES", f"{CI_OVERRIDES} run.dir={shlex.quote(str(run_dir))}")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel inherits the environment
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert images, "no plot was shown"
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "plan OK" in text  # the pre-flight printed its plan
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    logged = {e.get("stage") for e in events if e["type"] == "metrics" and "loss" in e}
    assert logged == {"reward_model.ipynb": {"reward"}, "rounds.ipynb": {"reward", "dpo", "rounds"}}.get(
        path.name, {"reward", "dpo"})  # the curves
    if path.name == "reward_model.ipynb":
        assert (run_dir / "reward" / "final" / "adapter_config.json").exists()
        assert "critique:" in text and len(images) >= 2
        bench = json.loads((run_dir / "bench" / "vl-rewardbench" / "report.json").read_text())  # ends with it
        assert set(bench["results"]) == {"generate", "none"} and bench["smoke"] and bench["pairs"] >= 1
        assert any("Macro Average Accuracy" in o.get("data", {}).get("text/markdown", "") for o in outputs)
        assert any("Overall Accuracy" in o.get("data", {}).get("text/html", "") for o in outputs)  # the compare table
    elif path.name == "rounds.ipynb":
        summary = json.loads((run_dir / "rounds" / "summary.json").read_text())
        assert [h["round"] for h in summary["history"]] == [0, 1, 2]          # ROUNDS = 2
        assert all(h["prompts"] == ROUND_PROMPTS and h["samples"] == ROUND_PROMPTS * ROUND_SAMPLES
                   for h in summary["history"][1:])
        shown = "".join(o.get("data", {}).get("text/markdown", "") for o in outputs if o.output_type == "display_data")
        assert "| round | right answers |" in shown and "| prompt | answer | score | critique |" in shown
        # rounds.steps 0 is one pass over each round's groups (not dpo.train.max_steps, which it once printed)
        assert "ranked by the reward model, one pass of MM-DPO over each round's groups" in text
    else:
        report = json.loads((run_dir / "eval" / "report.json").read_text())
        assert report["policy"]["implicit_accuracy"] is not None
        assert any(o.output_type == "display_data" and "text/markdown" in o.get("data", {}) for o in outputs)
