"""Export: the policy as a peft adapter or merged into the base.

Each exported folder is loaded in a fresh Python process in which `mmrlhf_lite` cannot be imported
(transformers, peft and torch only; one process loads every folder in turn), and what it computes is compared with the run's own model loaded by
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

def check(folder, inputs_file, mode):
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
    return out

# jobs: (folder, inputs file, mode) triples, each folder checked in turn in this one process
jobs = json.loads(sys.argv[1])
results = {folder: check(Path(folder), inputs_file, mode) for folder, inputs_file, mode in jobs}
assert not any(m == "mmrlhf_lite" or m.startswith("mmrlhf_lite.") for m in sys.modules if sys.modules[m] is not None)
print("RESULT " + json.dumps(results))
'''


def fresh(jobs: list[tuple[Path, str, object, Path]]) -> dict[Path, dict]:
    """FRESH on exported folders, all in one new process (its imports once): per (folder, mode, processor, image)
    job, the inputs `processor` makes of `image`, then what the folder computes on them, by folder."""
    triples = []
    for i, (folder, mode, processor, image) in enumerate(jobs):
        inputs_file = folder.parent / f"inputs-{i}.pt"
        inputs, n = answer_inputs(processor, image)
        torch.save({"inputs": inputs, "n": n, "image": str(image), "question": QUESTION, "answer": ANSWER}, inputs_file)
        triples.append((str(folder), str(inputs_file), mode))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", FRESH, json.dumps(triples)], capture_output=True, text=True,
                          timeout=600, env=env, cwd=str(jobs[0][0].parent))
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return {Path(k): v for k, v in json.loads(line[len("RESULT "):]).items()}


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


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Runs trained in fp32 and in 4-bit, their exports (merged fp32 of each, the default bf16 merge through the
    command line, the adapter), and what one fresh process computes on each: {name: (folder, run, image, result)}."""
    from PIL import Image, ImageDraw

    root = tmp_path_factory.mktemp("export")
    image = root / "red.png"
    img = Image.new("RGB", (56, 56), (220, 40, 40))
    ImageDraw.Draw(img).rectangle((4, 4, 16, 16), fill=(255, 255, 255))
    img.save(image)
    runs = {"fp32": make_run(root, "fp32", four_bit=False), "4bit": make_run(root, "4bit", four_bit=True)}
    folders = {f"merged-{k}": (export_model(run, "policy", root / f"merged-{k}", merge=True, dtype="float32",
                                            progress=lambda m: None), run, "merged") for k, run in runs.items()}
    assert main([str(runs["fp32"]), "--what", "policy", "--to", str(root / "bf16"), "--merge"]) == 0
    folders["bf16"] = (root / "bf16", runs["fp32"], "merged")
    folders["adapter"] = (export_model(runs["fp32"], "policy", root / "adapter", progress=lambda m: None),
                          runs["fp32"], "adapter")
    processors = {run: project_model(run)[1] for run in runs.values()}
    results = fresh([(folder, mode, processors[run], image) for folder, run, mode in folders.values()])
    return {name: (folder, run, image, results[folder]) for name, (folder, run, mode) in folders.items()}


@pytest.mark.parametrize("four_bit", [False, True], ids=["fp32-trained", "4bit-trained"])
def test_merged_policy_loads_without_the_project_and_matches_the_adapter_model(exports, four_bit):
    out, run, image, got = exports["merged-4bit" if four_bit else "merged-fp32"]
    assert (out / "model.safetensors").exists() and (out / "config.json").exists() and not (out / "adapter_config.json").exists()
    meta = json.loads((out / "mmrlhf_lite.json").read_text())
    assert meta["dequantised_base"] is four_bit and meta["merged"]
    card = (out / "README.md").read_text()
    assert ("dequantised the 4-bit base first" in card) is four_bit and "A toy." in card and "```yaml" in card

    model, processor = project_model(run)
    assert got["same_inputs"], got
    inputs, n = answer_inputs(processor, image)
    want = answer_logps(model, inputs, n)
    assert len(want) >= 3 and len(got["logps"]) == len(want)
    diff = max(abs(a - b) for a, b in zip(got["logps"], want))
    assert diff < 1e-4, diff
    with model.disable_adapter():  # and the LoRA matters: without it the log-probs differ
        plain = answer_logps(model, inputs, n)
    assert max(abs(a - b) for a, b in zip(plain, want)) > 1e-3


def test_default_merge_is_bf16_safetensors_in_the_hf_layout(exports):
    out, run, image, got = exports["bf16"]
    model, processor = project_model(run)
    assert got["dtype"] == "torch.bfloat16" and got["same_inputs"]
    want = answer_logps(model, *answer_inputs(processor, image))
    assert max(abs(a - b) for a, b in zip(got["logps"], want)) < 0.1  # bf16 rounding of the weights only


def test_adapter_export_loads_with_peft(exports):
    out, run, image, got = exports["adapter"]
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    model, processor = project_model(run)
    assert got["same_inputs"], got
    want = answer_logps(model, *answer_inputs(processor, image))
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
