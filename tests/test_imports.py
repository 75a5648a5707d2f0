"""Every module under mmrlhf_lite imports, including stages that are not built yet (DESIGN.md).

    python -m pytest -q tests/test_imports.py
"""
from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import pytest

import mmrlhf_lite

WALK = list(pkgutil.walk_packages(mmrlhf_lite.__path__, "mmrlhf_lite."))
MODULES = sorted(m.name for m in WALK)
PACKAGES = {m.name for m in WALK if m.ispkg}


def test_the_walk_finds_the_foundation():
    for name in ("mmrlhf_lite.recipe", "mmrlhf_lite.train", "mmrlhf_lite.events", "mmrlhf_lite.runs",
                 "mmrlhf_lite.plan", "mmrlhf_lite.models.loading", "mmrlhf_lite.models.packing",
                 "mmrlhf_lite.models.logprobs", "mmrlhf_lite.models.vision_cache", "mmrlhf_lite.distributed.lockstep",
                 "mmrlhf_lite.data.groups"):
        assert name in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_module_imports(name):
    module = importlib.import_module(name)
    assert module.__name__ == name
    if name not in PACKAGES:  # an __init__ may be empty; a module says why it exists and how to run it
        assert module.__doc__, f"{name} has no module docstring"


def test_package_import_is_light():
    """`import mmrlhf_lite` and the recipe module must not pull torch/transformers (fast CLI help, UI start)."""
    code = ("import sys, mmrlhf_lite, mmrlhf_lite.recipe, mmrlhf_lite.events, mmrlhf_lite.runs; "
            "print(sorted(m for m in ('torch', 'transformers', 'gradio') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
