"""Export: the policy as a peft adapter or merged into the base.

Each exported folder is loaded in a fresh Python process in which `mmrlhf_lite` cannot be imported
(transformers, peft and torch only), and what it computes is compared with the run's own model loaded by
the project's loader: response log-probs (fp32) within 1e-4. Adapters are real
LoRA adapters on the tiny twins with random non-zero LoRA B (a fresh LoRA is a no-op, which would hide
a wrong merge), saved by the project's `save_adapter`. The reward model's export (its whole score function)
is tested in tests/test_reward_export.py.

    python -m pytest -q tests/test_export.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mmrlhf_lite.export import ExportError, export_model, main
from mmrlhf_lite.models.loading import load_model, save_adapter
from mmrlhf_lite.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]

QUESTION, ANSWER = "What colour is the square?", "It is red."


def answer_inputs(processor, image_path):
    """Processor inputs of [question + image][answer] and the prompt's length (answer tokens follow it)."""
    from PIL import Image

    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    image = Image.open(image_path).convert("RGB")
    n = processor(text=[prompt], images=[image], return_tensors="pt")["input_ids"].shape[1]
    return dict(processor(text=[prompt + ANSWER], images=[image], return_tensors="pt")), n


def answer_logps(model, inputs: dict, n: int) -> list[float]:
    with torch.no_grad():
        logits = model(**inputs).logits.float()
    return logits[0, n - 1:-1].log_softmax(-1).gather(-1, inputs["input_ids"][0, n:, None])[:, 0].tolist()


# The fresh process: the project cannot be imported; transformers/peft load the folder, run the model on the
# inputs the test process made, and check that the folder's own processor files make the same inputs
# (AutoProcessor where torchvision is installed; without it, Qwen2-VL's AutoProcessor and AutoImageProcessor
# cannot be built, so the folder's tokenizer and the PIL image processor are checked one by one).
FRESH = r'''
import sys
sys.modules["mmrlhf_lite"] = None          # any import of the project fails from here on
import json
from pathlib import Path
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer
folder, inputs_file, mode = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
out = {}
if mode == "merged":
    model = AutoModelForImageTextToText.from_pretrained(folder)
    out["dtype"] = str(model.dtype)
    model = model.float()
else:
    from peft import PeftModel
    base = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32), folder)
saved = torch.load(inputs_file)
inputs, n = saved["inputs"], saved["n"]
with torch.no_grad():
    logits = model.eval()(**inputs).logits.float()
out["logps"] = logits[0, n - 1:-1].log_softmax(-1).gather(-1, inputs["input_ids"][0, n:, None])[:, 0].tolist()
image = Image.open(saved["image"]).convert("RGB")
try:
    processor = AutoProcessor.from_pretrained(folder)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": saved["question"]}]}]
    prompt = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    again = processor(text=[prompt + saved["answer"]], images=[image], return_tensors="pt")
    out["processor"] = "AutoProcessor"
    out["same_inputs"] = all(torch.equal(again[k], v) for k, v in inputs.items())
except ImportError:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    tok, ip = AutoTokenizer.from_pretrained(folder), Qwen2VLImageProcessorPil.from_pretrained(folder)
    pix = ip(images=[image], return_tensors="pt")
    out["processor"] = "tokenizer + image processor"
    tail = tok(saved["answer"], add_special_tokens=False)["input_ids"]
    out["same_inputs"] = (torch.equal(pix["pixel_values"], inputs["pixel_values"])
                          and torch.equal(pix["image_grid_thw"], inputs["image_grid_thw"])
                          and inputs["input_ids"][0, -len(tail):].tolist() == tail)
assert not any(m == "mmrlhf_lite" or m.startswith("mmrlhf_lite.") for m in sys.modules if sys.modules[m] is not None)
print("RESULT " + json.dumps(out))
'''


def fresh(folder: Path, mode: str, *extra: str, processor=None, image: Path | None = None) -> dict:
    """Run FRESH on an exported folder; for a policy, on the inputs `processor` makes of `image`."""
    inputs_file = folder.parent / "inputs.pt"
    if processor is not None:
        inputs, n = answer_inputs(processor, image)
        torch.save({"inputs": inputs, "n": n, "image": str(image), "question": QUESTION, "answer": ANSWER}, inputs_file)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", FRESH, str(folder), str(inputs_file), mode, *extra],
                          capture_output=True, text=True, timeout=300, env=env, cwd=str(folder.parent))
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def make_run(root: Path, name: str, *, four_bit: bool) -> Path:
    """A run folder with a recipe and a trained-looking adapter (LoRA B random, so the LoRA changes outputs)."""
    run = root / name
    run.mkdir(parents=True)
    tree = yaml.safe_load((REPO / "recipes" / "demo.yaml").read_text())
    tree["model"].update(path="tiny:qwen2_vl:xs", load_in_4bit=four_bit, device="cpu")
    (run / "recipe.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    recipe = load_recipe(run / "recipe.yaml", check_paths=False)
    model, _ = load_model(recipe.model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    save_adapter(model, run / "dpo" / "final", kind="policy")
    return run


def project_model(run: Path):
    recipe = load_recipe(run / "recipe.yaml", check_paths=False)
    return load_model(recipe.model, adapter=run / "dpo" / "final", trainable=False)


@pytest.mark.parametrize("four_bit", [False, True], ids=["fp32-trained", "4bit-trained"])
def test_merged_policy_loads_without_the_project_and_matches_the_adapter_model(tmp_path, images, four_bit):
    run = make_run(tmp_path, "r", four_bit=four_bit)
    out = export_model(run, "policy", tmp_path / "merged", merge=True, dtype="float32", progress=lambda m: None)
    assert (out / "model.safetensors").exists() and (out / "config.json").exists() and not (out / "adapter_config.json").exists()
    meta = json.loads((out / "mmrlhf_lite.json").read_text())
    assert meta["dequantised_base"] is four_bit and meta["merged"]
    card = (out / "README.md").read_text()
    assert ("dequantised the 4-bit base first" in card) is four_bit and "A toy." in card and "```yaml" in card

    model, processor = project_model(run)
    got = fresh(out, "merged", processor=processor, image=images[0])
    assert got["same_inputs"], got
    inputs, n = answer_inputs(processor, images[0])
    want = answer_logps(model, inputs, n)
    assert len(want) >= 3 and len(got["logps"]) == len(want)
    diff = max(abs(a - b) for a, b in zip(got["logps"], want))
    assert diff < 1e-4, diff
    with model.disable_adapter():  # and the LoRA matters: without it the log-probs differ
        plain = answer_logps(model, inputs, n)
    assert max(abs(a - b) for a, b in zip(plain, want)) > 1e-3


def test_default_merge_is_bf16_safetensors_in_the_hf_layout(tmp_path, images):
    run = make_run(tmp_path, "r", four_bit=False)
    assert main([str(run), "--what", "policy", "--to", str(tmp_path / "bf16"), "--merge"]) == 0
    model, processor = project_model(run)
    got = fresh(tmp_path / "bf16", "merged", processor=processor, image=images[0])
    assert got["dtype"] == "torch.bfloat16" and got["same_inputs"]
    want = answer_logps(model, *answer_inputs(processor, images[0]))
    assert max(abs(a - b) for a, b in zip(got["logps"], want)) < 0.1  # bf16 rounding of the weights only


def test_adapter_export_loads_with_peft(tmp_path, images):
    run = make_run(tmp_path, "r", four_bit=False)
    out = export_model(run, "policy", tmp_path / "adapter", progress=lambda m: None)
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    model, processor = project_model(run)
    got = fresh(out, "adapter", processor=processor, image=images[0])
    assert got["same_inputs"], got
    want = answer_logps(model, *answer_inputs(processor, images[0]))
    assert max(abs(a - b) for a, b in zip(got["logps"], want)) < 1e-4


def test_export_refuses_clearly(tmp_path, capsys):
    run = make_run(tmp_path, "r", four_bit=False)
    with pytest.raises(ExportError, match="no trained reward yet.*run its `reward` stage first"):
        export_model(run, "reward", tmp_path / "x", progress=lambda m: None)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert main([str(run), "--to", str(tmp_path / "busy")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert main([str(run), "--to", str(tmp_path / "busy"), "--overwrite"]) == 2
    assert "not an earlier export" in capsys.readouterr().err and (tmp_path / "busy" / "notes.txt").exists()
    assert main([str(tmp_path), "--to", str(tmp_path / "y")]) == 2
    assert "recipe.yaml not found: is " in capsys.readouterr().err
    assert main([str(tmp_path / "nope"), "--to", str(tmp_path / "y")]) == 2
    assert "recipe.yaml not found" in capsys.readouterr().err
    # an earlier export is replaced only with --overwrite
    assert main([str(run), "--to", str(tmp_path / "a")]) == 0
    assert main([str(run), "--to", str(tmp_path / "a")]) == 2
    assert main([str(run), "--to", str(tmp_path / "a"), "--overwrite"]) == 0
    assert not (tmp_path / "a.partial").exists()
