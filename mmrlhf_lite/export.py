"""Export a run's trained policy or critique reward model for use without this project.

    python -m mmrlhf_lite.export runs/demo --what policy --to exported/policy            # LoRA adapter (peft)
    python -m mmrlhf_lite.export runs/demo --what policy --to exported/merged --merge    # full model, bf16
    python -m mmrlhf_lite.export runs/demo --what reward --to exported/reward            # adapter + head

What lands in `--to`:
- adapter (default): `adapter_config.json` + `adapter_model.safetensors`, loadable with
  `PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(BASE), DIR)`; the config's
  `base_model_name_or_path` names the base the run trained on. The processor (tokenizer, chat template,
  image processor) is saved beside it.
- `--merge`: the LoRA weights merged into the base, saved with `save_pretrained` (safetensors, the
  standard Hugging Face layout, `--dtype` bfloat16 by default) with the processor, so
  `AutoModelForImageTextToText.from_pretrained(DIR)` and `AutoProcessor.from_pretrained(DIR)` load it
  with transformers alone (and serving engines that read that layout can too).
  A run trained in 4-bit (`model.load_in_4bit`) trained its adapter on the nf4-quantised base, so the
  merge first dequantises that base (the weights the adapter was trained against), then adds the LoRA
  deltas: the merged model computes what the trained 4-bit model computed, not the original full-precision
  base plus the adapter.
- `--what reward` adds `reward_head.safetensors` + `reward_head.json` (the scalar head read at the
  last token) and `load_reward_model.py`, a loader that needs only torch, transformers and peft.
- Always: `README.md`, a model card with the run's recipe, data and evaluation table, and
  `mmrlhf_lite.json` (what was exported from where).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

EXPORT_META = "mmrlhf_lite.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
DTYPES = ("bfloat16", "float16", "float32")


class ExportError(ValueError):
    """The export cannot be done as asked; the message says what to do."""


def _recipe(run: Path):
    from .recipe import load_recipe

    path = run / "recipe.yaml"
    if not path.exists():
        raise ExportError(f"{path} not found: is {run} a run folder (made by python -m mmrlhf_lite.train)?")
    return load_recipe(path, check_paths=False)


def adapter_dir(run: Path, what: str) -> Path:
    """The trained adapter of a run: `dpo/final` (policy) or the reward model (`reward/final` or model_from)."""
    if what == "policy":
        from .dpo.trainer import policy_dir

        path, stage = policy_dir(run), "dpo"
    elif what == "reward":
        from .reward.trainer import reward_model_dir

        path, stage = reward_model_dir(run), "reward"
    else:
        raise ExportError(f"--what must be 'policy' or 'reward', not {what!r}")
    if not (path / "adapter_config.json").exists():
        raise ExportError(f"run {run} has no trained {what} yet ({path} is missing): run its `{stage}` stage first")
    return path


def _check_target(to: Path, overwrite: bool) -> None:
    if to.exists() and not to.is_dir():
        raise ExportError(f"--to {to} is a file: give a folder")
    if to.exists() and any(to.iterdir()):
        if not overwrite:
            raise ExportError(f"--to {to} exists and is not empty: give a new folder (or --overwrite to replace it)")
        if (to / EXPORT_META).exists():
            shutil.rmtree(to)
        else:
            raise ExportError(f"--to {to} holds files that are not an earlier export: refusing to replace them")


def export_model(run_dir, what: str, to, *, merge: bool = False, dtype: str = "bfloat16",
                 overwrite: bool = False, progress=print) -> Path:
    """Export `what` ('policy' | 'reward') of a run folder into `to`; returns `to`. See the module doc."""
    import torch

    from .models.loading import load_model, resolve_model_path

    run, to = Path(run_dir), Path(to)
    if dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    recipe = _recipe(run)
    adapter = adapter_dir(run, what)
    _check_target(to, overwrite)
    base_path = resolve_model_path(recipe.model.path)
    tmp = to.with_name(to.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    quantised = bool(recipe.model.load_in_4bit)
    head = None
    try:
        if merge:
            progress(f"loading the base {recipe.model.path}" + (" (4-bit, to dequantise)" if quantised else ""))
            from peft import PeftModel

            # merge on the CPU in fp32; a 4-bit base is loaded as trained, then dequantised
            cfg = dataclasses.replace(recipe.model, device="cpu", compute_dtype="float32")
            base, processor = load_model(cfg, trainable=False, lora=False)
            if quantised:
                base = base.dequantize()
            if what == "reward":
                from .models.heads import RewardHead

                info = json.loads((adapter / "mmrlhf_lite.json").read_text()).get("reward_head") or {}
                base.reward_head = RewardHead(base.config.get_text_config().hidden_size, info.get("kind", "mlp"),
                                              info.get("dropout", 0.0))
            progress(f"merging {adapter}")
            model = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
            if what == "reward":
                head = model.reward_head
                del model.reward_head
            model.to(getattr(torch, dtype))
            model.config.use_cache = True
            model.save_pretrained(str(tmp), safe_serialization=True)
            _save_processor(processor, base_path, tmp)
        else:
            from .models.loading import load_processor
            from .models.families import detect_family

            for name in ADAPTER_FILES:
                shutil.copyfile(adapter / name, tmp / name)
            conf = json.loads((tmp / "adapter_config.json").read_text())
            conf["base_model_name_or_path"] = base_path
            (tmp / "adapter_config.json").write_text(json.dumps(conf, indent=2))
            _save_processor(load_processor(base_path, detect_family(base_path, recipe.model.family), recipe.model),
                            base_path, tmp)
            if what == "reward":
                head = _head_from_adapter(adapter)
        if what == "reward":
            _write_head(tmp, head, adapter)
        meta = {"run": str(run.resolve()), "what": what, "merged": merge, "dtype": dtype if merge else None,
                "base_model": recipe.model.path, "base_model_path": base_path, "adapter": str(adapter.resolve()),
                "trained_in_4bit": quantised, "dequantised_base": merge and quantised}
        (tmp / EXPORT_META).write_text(json.dumps(meta, indent=2))
        (tmp / "README.md").write_text(model_card(run, recipe, meta))
        if to.exists():
            to.rmdir()
        tmp.rename(to)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    progress(f"exported the {what} of {run} to {to}")
    return to


def _save_processor(processor, base_path: str, out: Path) -> None:
    """The processor files AutoProcessor reads. Without torchvision the project's loader builds the processor
    from its parts (no video processor); then the parts are saved and the base's processor_config copied, so
    the folder is what AutoProcessor loads wherever torchvision is installed."""
    from .models.loading import FramesOnlyVideoProcessor, local_processor_files

    if not isinstance(getattr(processor, "video_processor", None), FramesOnlyVideoProcessor):
        processor.save_pretrained(str(out))
        return
    processor.tokenizer.save_pretrained(str(out))
    processor.image_processor.save_pretrained(str(out))
    if processor.chat_template:
        (out / "chat_template.jinja").write_text(processor.chat_template)
    src = Path(local_processor_files(base_path))
    for name in ("processor_config.json", "video_preprocessor_config.json"):
        if (src / name).exists():
            shutil.copyfile(src / name, out / name)
    if not (out / "processor_config.json").exists():
        (out / "processor_config.json").write_text(json.dumps({"processor_class": type(processor).__name__}, indent=2))


# --------------------------------------------------------------------------------------------------
# reward head

class _Head:
    """The head's tensors and shape, read from the peft file without building the model."""

    def __init__(self, state: dict, kind: str, dropout: float):
        self.state, self.kind, self.dropout = state, kind, dropout


def _head_from_adapter(adapter: Path) -> _Head:
    from safetensors.torch import load_file

    state = load_file(str(adapter / "adapter_model.safetensors"))
    head = {k.split("reward_head.", 1)[1].replace("modules_to_save.default.", "").replace("modules_to_save.", ""): v
            for k, v in state.items() if "reward_head." in k}
    info = json.loads((adapter / "mmrlhf_lite.json").read_text()).get("reward_head") or {}
    if not head:
        raise ExportError(f"{adapter} holds no reward head: is it a reward model adapter?")
    return _Head(head, info.get("kind", "mlp"), info.get("dropout", 0.0))


def _write_head(out: Path, head, adapter: Path) -> None:
    from safetensors.torch import save_file

    if not isinstance(head, _Head):  # a merged model's RewardHead module
        head = _Head({k: v.detach().float().contiguous() for k, v in head.state_dict().items()}, head.kind,
                     head.dropout_p)
    save_file({k: v.float().contiguous() for k, v in head.state.items()}, str(out / "reward_head.safetensors"))
    hidden = int(head.state["net.1.weight"].shape[1])
    (out / "reward_head.json").write_text(json.dumps({"kind": head.kind, "hidden_size": hidden, "dropout": head.dropout,
                                                      "read_at": "last non-padding token"}, indent=2))
    (out / "load_reward_model.py").write_text(LOADER)


LOADER = '''"""Load this exported critique reward model with torch + transformers (+ peft for an adapter export).

    python load_reward_model.py            # loads it and scores one text answer

The score of an answer is the head applied to the last hidden state at the last token of
[prompt + answer + critique] as the reward model was trained on (mmrlhf_lite's critique prompt; with
`mmrlhf_lite` installed, `RewardScorer.from_adapter(...)` builds that prompt and generates the critique).
"""
import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

HERE = Path(__file__).resolve().parent


class RewardHead(nn.Module):
    def __init__(self, hidden, kind="mlp"):
        super().__init__()
        if kind == "mlp":
            self.net = nn.Sequential(nn.Dropout(0.0), nn.Linear(hidden, hidden), nn.Tanh(), nn.Dropout(0.0),
                                     nn.Linear(hidden, 1))
        else:
            self.net = nn.Sequential(nn.Dropout(0.0), nn.Linear(hidden, 1))

    def forward(self, h):
        return self.net(h.float()).squeeze(-1)


def load(folder=HERE, dtype=torch.float32):
    """(model, processor, head); the model is merged or the base with this folder's LoRA adapter."""
    folder = Path(folder)
    if (folder / "adapter_config.json").exists():
        from peft import PeftModel

        base = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
        model = AutoModelForImageTextToText.from_pretrained(base, dtype=dtype)
        model = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    else:
        model = AutoModelForImageTextToText.from_pretrained(str(folder), dtype=dtype)
    info = json.loads((folder / "reward_head.json").read_text())
    head = RewardHead(info["hidden_size"], info["kind"])
    head.load_state_dict(load_file(str(folder / "reward_head.safetensors")))
    try:
        processor = AutoProcessor.from_pretrained(str(folder))
    except (ImportError, ValueError, OSError):  # Qwen2-VL's AutoProcessor wants torchvision (video); text works
        processor = AutoTokenizer.from_pretrained(str(folder))
    return model.eval(), processor, head.eval()


@torch.no_grad()
def score(model, head, **inputs):
    """Reward of each row of `inputs` (processor output; right-padded rows use their attention mask)."""
    out = model(**inputs, output_hidden_states=True)
    last = inputs["attention_mask"].sum(-1) - 1 if "attention_mask" in inputs else None
    h = out.hidden_states[-1]
    idx = last if last is not None else torch.full((h.shape[0],), h.shape[1] - 1)
    return head(h[torch.arange(h.shape[0]), idx])


if __name__ == "__main__":
    model, processor, head = load()
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "What is shown?"}]},
                                          {"role": "assistant", "content": [{"type": "text", "text": "A red square."}]}],
                                         tokenize=False)
    print(float(score(model, head, **processor(text=[text], return_tensors="pt"))[0]))
'''


# --------------------------------------------------------------------------------------------------
# model card

def model_card(run: Path, recipe, meta: dict) -> str:
    import yaml

    from .evaluate.pipeline import load_report
    from .evaluate.report import format_report

    what = "MM-DPO policy" if meta["what"] == "policy" else "critique reward model"
    lines = [f"# {run.name}: {what}", ""]
    if str(recipe.model.path).startswith("tiny:"):
        lines += ["> **A toy.** The base is `" + recipe.model.path + "`, a tiny random-init model built offline for "
                  "tests and the demo: its answers and critiques are not meaningful.", ""]
    form = ("merged into the base weights (" + str(meta["dtype"]) + ", safetensors)" if meta["merged"]
            else "a LoRA adapter (peft) on the base")
    lines += [f"Trained with mmrlhf-lite (MM-RLHF: critique reward model, then MM-DPO with dynamic beta) from the "
              f"base `{recipe.model.path}`; exported as {form}.", ""]
    if meta["trained_in_4bit"]:
        lines += ["Trained in 4-bit (nf4): " + (
            "the merge dequantised the 4-bit base first, so these weights compute what the trained model did."
            if meta["merged"] else "the adapter was trained on the nf4-quantised base; load the base in 4-bit "
            "(bitsandbytes nf4, double quant) to reproduce the trained model, or export with --merge."), ""]
    lines += ["## Load", "", "```python", "from transformers import AutoModelForImageTextToText, AutoProcessor"]
    if meta["merged"]:
        lines += ['model = AutoModelForImageTextToText.from_pretrained("THIS_FOLDER")']
    else:
        lines += ["from peft import PeftModel",
                  f'base = AutoModelForImageTextToText.from_pretrained("{meta["base_model_path"]}")',
                  'model = PeftModel.from_pretrained(base, "THIS_FOLDER")']
    lines += ['processor = AutoProcessor.from_pretrained("THIS_FOLDER")', "```", ""]
    if meta["what"] == "reward":
        lines += ["The scalar head is in `reward_head.safetensors` (`reward_head.json`); `load_reward_model.py` loads "
                  "model + head with torch/transformers/peft and scores inputs.", ""]
    d = recipe.data
    lines += ["## Data", "", f"- `data.path`: `{d.path}`" + (" (the synthetic demo set)" if d.path == "demo" else ""),
              f"- held-out fraction {d.eval_fraction}" + (f", eval file `{d.eval_path}`" if d.eval_path else ""), ""]
    report = load_report(run)
    lines += ["## Evaluation (held-out)", ""]
    lines += [format_report(report).strip(), ""] if report else ["No evaluation yet (the run's `eval` stage has not run).", ""]
    text = (run / "recipe.yaml").read_text()
    lines += ["## Recipe", "", "```yaml", yaml.safe_dump(yaml.safe_load(text), sort_keys=False).strip(), "```", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mmrlhf_lite.export", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="the run folder (runs/<name>)")
    p.add_argument("--what", choices=["policy", "reward"], default="policy", help="which trained model (default policy)")
    p.add_argument("--to", required=True, help="a new folder to write")
    p.add_argument("--merge", action="store_true", help="merge the LoRA weights into the base (full model)")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="weights dtype of a merged export")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in --to")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        export_model(args.run, args.what, args.to, merge=args.merge, dtype=args.dtype, overwrite=args.overwrite,
                     progress=lambda m: print(m, file=sys.stderr))
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
