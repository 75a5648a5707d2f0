"""GPU code paths, held on CPU: what the code asks of torch (`torch.cuda.is_available`,
`get_device_capability`) is patched where a path is reachable only on a GPU; the models are the real tiny ones.

- unsloth is looked up, never imported, by a transformers run (importing it patches libraries process-wide).

    python -m pytest -q tests/test_gpu_paths.py
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------
# unsloth: found, not imported

FAKE_UNSLOTH = '''
import os, pathlib
pathlib.Path(os.environ["FAKE_UNSLOTH_MARK"]).write_text("imported")
'''

CHECK_NO_IMPORT = '''
import logging, sys
import torch
import peft, bitsandbytes  # noqa: F401 - imported before CUDA is faked: they probe torch's CUDA bindings
torch.cuda.is_available = lambda: True                 # the CUDA branch of every backend question is reachable
torch.cuda.get_device_capability = lambda device=None: (9, 0)
torch.cuda.is_bf16_supported = lambda *a, **k: True
logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(message)s")
from mmrlhf_lite.cache.reference import policy_settings
from mmrlhf_lite.models.loading import load_model, unsloth_available
from mmrlhf_lite.recipe import ModelConfig
gpu = ModelConfig(path=sys.argv[1], device="cuda", backend="auto", load_in_4bit=False)
print("available", unsloth_available())
print("settings", policy_settings(gpu)["backend"], policy_settings(gpu)["compute_dtype"])
model, _ = load_model(ModelConfig(path=sys.argv[1], device="cpu", backend="auto", load_in_4bit=False))
print("loaded", model.mmrlhf.backend)
print("unsloth in sys.modules", "unsloth" in sys.modules)
'''


def test_a_transformers_run_never_imports_unsloth(tmp_path, tiny_qwen2_vl_xs):
    """With unsloth installed (a fake package that records its import), `backend: auto` on a GPU and the cache
    keys see that it is there (the auto note is logged) but never import it."""
    site = tmp_path / "site"
    (site / "unsloth").mkdir(parents=True)
    (site / "unsloth" / "__init__.py").write_text(FAKE_UNSLOTH)
    mark = tmp_path / "imported"
    script = tmp_path / "check.py"
    script.write_text(textwrap.dedent(CHECK_NO_IMPORT))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)]), "FAKE_UNSLOTH_MARK": str(mark)}
    res = subprocess.run([sys.executable, str(script), str(tiny_qwen2_vl_xs)], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert "available True" in lines
    assert "settings transformers bfloat16" in lines
    assert "loaded transformers" in lines
    assert any("model.backend=auto uses transformers" in x for x in lines)   # the note: unsloth would run here
    assert "unsloth in sys.modules False" in lines
    assert not mark.exists()
