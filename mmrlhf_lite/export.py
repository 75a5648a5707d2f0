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
- `--what reward` adds the whole score function, so the folder scores as the run does with torch,
  transformers and peft only: `reward_score.py` (a verbatim copy of `mmrlhf_lite/models/reward_score.py`:
  the critique prompt template, where the head reads, the head, the log-prob term, critique generation),
  `reward_score.json` (its settings: the head's shape, `response_logp_weight`, the template's reply
  boundaries, max length, critique length and mode, how to load the base), `reward_head.safetensors`,
  and `load_reward_model.py`: `score(images, question, answers, critique=...)` from Python and
  `python load_reward_model.py --image a.png --question "..." --answer "..." --answer "..."
  [--critique none|generate]` (prints any critiques, then `score<TAB>answer` per answer).
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
                from .models.reward_score import RewardHead

                info = _head_info(adapter)
                base.reward_head = RewardHead(base.config.get_text_config().hidden_size, info.get("kind", "mlp"),
                                              info.get("dropout", 0.0), info.get("response_logp_weight", 0.0))
            progress(f"merging {adapter}")
            model = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
            if what == "reward":
                head = model.reward_head
                del model.reward_head
            model.to(getattr(torch, dtype))
            model.config.use_cache = True
            model.save_pretrained(str(tmp), safe_serialization=True)
            _save_processor(processor, base_path, tmp)
            reward_processor = processor
        else:
            from .models.loading import load_processor
            from .models.families import detect_family

            for name in ADAPTER_FILES:
                shutil.copyfile(adapter / name, tmp / name)
            conf = json.loads((tmp / "adapter_config.json").read_text())
            conf["base_model_name_or_path"] = base_path
            (tmp / "adapter_config.json").write_text(json.dumps(conf, indent=2))
            reward_processor = load_processor(base_path, detect_family(base_path, recipe.model.family), recipe.model)
            _save_processor(reward_processor, base_path, tmp)
            if what == "reward":
                head = _head_from_adapter(adapter)
        if what == "reward":
            _write_reward_scorer(tmp, head, adapter, recipe, reward_processor, base_path, merged=merge)
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
    from .models.loading import local_processor_files
    from .models.reward_score import FramesOnlyVideoProcessor

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
# reward model: the score function, whole

LOADER_FILE = "load_reward_model.py"

LOADER = '''"""This exported critique reward model, scored exactly as the run that trained it scores (torch, transformers
and peft only; the score function is reward_score.py, a copy of the training project's own).

    python load_reward_model.py --image a.png --question "What is shown?" --answer "A red square." \\
        --answer "A blue circle." [--critique none|generate]

    from load_reward_model import score
    score(["a.png"], "What is shown?", ["A red square.", "A blue circle."], critique="none")
"""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from reward_score import AnswerScore, Scorer, main  # noqa: E402

_loaded = {}


def load(device="auto", dtype=None):
    """The reward model of this folder (loaded once per device and dtype)."""
    key = (device, dtype)
    if key not in _loaded:
        _loaded[key] = Scorer.load(HERE, device=device, dtype=dtype)
    return _loaded[key]


def score(images, question, answers, critique=None, critiques=None):
    """One score per answer. critique: "none" | "given" (with critiques=[one per answer]) | "generate"
    (greedy); default: the run's mode (see reward_score.json)."""
    return load().score(images, question, answers, critique, critiques)


def score_answers(images, question, answers, critique=None, critiques=None, **kwargs) -> "list[AnswerScore]":
    """Each answer's score with its parts (head, response log-prob) and the critique it was scored with."""
    return load().score_answers(images, question, answers, critique, critiques, **kwargs)


if __name__ == "__main__":
    sys.exit(main(folder=HERE))
'''


class _Head:
    """The head's tensors and shape, read from the peft file without building the model."""

    def __init__(self, state: dict, kind: str, dropout: float, response_logp_weight: float):
        self.state, self.kind, self.dropout = state, kind, dropout
        self.response_logp_weight = response_logp_weight


def _head_info(adapter: Path) -> dict:
    """The head settings saved with the adapter (`save_adapter`): kind, dropout, response_logp_weight; the
    project's scorer reads the same ones (`load_model`)."""
    return json.loads((adapter / "mmrlhf_lite.json").read_text()).get("reward_head") or {}


def _head_from_adapter(adapter: Path) -> _Head:
    from safetensors.torch import load_file

    state = load_file(str(adapter / "adapter_model.safetensors"))
    head = {k.split("reward_head.", 1)[1].replace("modules_to_save.default.", "").replace("modules_to_save.", ""): v
            for k, v in state.items() if "reward_head." in k}
    info = _head_info(adapter)
    if not head:
        raise ExportError(f"{adapter} holds no reward head: is it a reward model adapter?")
    return _Head(head, info.get("kind", "mlp"), info.get("dropout", 0.0), info.get("response_logp_weight", 0.0))


def score_settings(recipe, processor, family, head: _Head, hidden: int, merged: bool) -> dict:
    """`reward_score.json`: what `reward_score.Scorer` needs besides the weights to score as the run does."""
    from .models.families import reply_boundary
    from .models.reward_score import READ_AT, TEMPLATE_VERSION, describe

    reply_prefix, end_of_turn = reply_boundary(processor, family)
    rc, m = recipe.reward, recipe.model
    pins = getattr(processor.image_processor, "image_grid_pinpoints", None)
    return {
        "template_version": TEMPLATE_VERSION,
        "scores": describe(head.response_logp_weight),
        "response_logp_weight": head.response_logp_weight,
        "head": {"kind": head.kind, "hidden_size": hidden, "dropout": head.dropout, "read_at": READ_AT},
        "reply_prefix": reply_prefix, "end_of_turn": end_of_turn,
        "max_length": rc.train.max_length, "max_new_tokens": rc.max_new_tokens, "critique_mode": rc.critique_mode,
        "generation_batch_size": rc.generation_batch_size,
        "compute_dtype": None if m.compute_dtype == "auto" else m.compute_dtype,
        "attn_implementation": m.attn_implementation, "trust_remote_code": m.trust_remote_code,
        "load_in_4bit": bool(m.load_in_4bit) and not merged, "skip_4bit": list(family.skip_4bit),
        "image_grid_pinpoints": pins if family.pixel_limits == "anyres" and m.max_pixels else None,
        "processor": {"processor_class": family.processor_class, "image_processor_class": family.image_processor_class,
                      "image_processor_module": family.image_processor_module},
    }


def _write_reward_scorer(out: Path, head, adapter: Path, recipe, processor, base_path: str, merged: bool) -> None:
    """The head's weights, the score function (`reward_score.py`, copied verbatim), its settings and the loader."""
    from safetensors.torch import save_file

    from .models import reward_score
    from .models.families import detect_family

    if not isinstance(head, _Head):  # a merged model's RewardHead module
        head = _Head({k: v.detach().float().contiguous() for k, v in head.state_dict().items()}, head.kind,
                     head.dropout_p, head.response_logp_weight)
    save_file({k: v.float().contiguous() for k, v in head.state.items()}, str(out / reward_score.HEAD_WEIGHTS))
    hidden = int(head.state["net.1.weight"].shape[1])
    family = detect_family(base_path, recipe.model.family)
    settings = score_settings(recipe, processor, family, head, hidden, merged)
    (out / reward_score.SETTINGS_FILE).write_text(json.dumps(settings, indent=2))
    shutil.copyfile(reward_score.__file__, out / "reward_score.py")
    (out / LOADER_FILE).write_text(LOADER)


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
        lines += reward_card(recipe, _head_info(Path(meta["adapter"])))
    d = recipe.data
    lines += ["## Data", "", f"- `data.path`: `{d.path}`" + (" (the synthetic demo set)" if d.path == "demo" else ""),
              f"- held-out fraction {d.eval_fraction}" + (f", eval file `{d.eval_path}`" if d.eval_path else ""), ""]
    report = load_report(run)
    lines += ["## Evaluation (held-out)", ""]
    lines += [format_report(report).strip(), ""] if report else ["No evaluation yet (the run's `eval` stage has not run).", ""]
    text = (run / "recipe.yaml").read_text()
    lines += ["## Recipe", "", "```yaml", yaml.safe_dump(yaml.safe_load(text), sort_keys=False).strip(), "```", ""]
    return "\n".join(lines)


def reward_card(recipe, head: dict) -> list[str]:
    """The model card's section on how this reward model scores and how to score with the folder."""
    weight = float(head.get("response_logp_weight") or 0.0)
    if weight:
        what = [f"**A hybrid reward model**: score = head on the critique + {weight:g} x the answer's mean token "
                "log-prob under the reward model's own LM, image in context (`reward.response_logp_weight` = "
                f"{weight:g}). Both parts count: the head alone does not rank as the score does (the evaluation "
                "below gives each part's accuracy where the run measured it)."]
    else:
        what = ["Scores with the head on the critique alone (the paper's critique reward model; "
                "`reward.response_logp_weight` = 0)."]
    mode = recipe.reward.critique_mode
    return ["## Score", ""] + what + ["", f"The run scored in critique mode `{mode}`; for new answers the default is "
            f"`{'generate' if mode == 'given' else mode}` (a `given` critique needs the data's critique text).", "",
            "```bash", 'python load_reward_model.py --image a.png --question "What is shown?" \\',
            '    --answer "A red square." --answer "A blue circle." --critique generate', "```", "",
            "```python", "from load_reward_model import score", 'score(["a.png"], "What is shown?", ["A red square.", '
            '"A blue circle."], critique="none")', "```", "",
            "`reward_score.py` is the score function the training project itself scores with (copied verbatim: the "
            "critique prompt template, where the head reads, the head, the log-prob term, critique generation); "
            "`reward_score.json` holds its settings, `reward_head.safetensors` the head. Needs torch, transformers "
            "and peft only.", ""]


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
