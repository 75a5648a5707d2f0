"""Pre-flight checks of what a recipe points at, before any data or model loads: the ones a dry run must
share with the real run, so that `--dry-run` never says "plan OK" for a run that cannot start.

Each problem names the recipe key and says what to do (docs/errors.md lists them all):
- `run.dir` that is a file, or lies under a file;
- `model.path`: `tiny:<family>[:<size>]` of a family the tiny kit does not have; a local-looking path that
  does not exist; a hub id that is neither a local folder nor in the Hugging Face cache while offline;
- `model.device=cuda` / `model.backend=unsloth` on a machine without CUDA (or without unsloth);
- `reward.model_from` that is not a run folder holding a trained reward model (or holds a damaged one).

    python -m mmrlhf_lite.train recipes/demo.yaml --dry-run model.path=tiny:nosuchfamily   # -> ERROR, exit 1
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from .recipe import Recipe
from .runs import RunFolderError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name, as the hub spells repository ids


def check_run_dir(recipe: Recipe) -> None:
    """Raise RunFolderError when `run.dir` is a file or sits under one (mkdir would fail deep inside)."""
    run = Path(recipe.run.dir)
    if run.exists() and not run.is_dir():
        raise RunFolderError(f"run.dir '{recipe.run.dir}' is a file, not a folder; choose another run.dir "
                             "(e.g. run.dir=runs/try2) or move the file away")
    for parent in run.parents:
        if parent.exists():
            if not parent.is_dir():
                raise RunFolderError(f"run.dir '{recipe.run.dir}' lies under '{parent}', which is a file, not a "
                                     "folder; choose another run.dir")
            break


def model_path_problem(path: str) -> str | None:
    """Why `model.path` cannot load (None when it can, or when only the hub can tell)."""
    if path.startswith("tiny:"):
        from .models.tiny import parse_spec

        try:
            parse_spec(path)
        except ValueError as exc:
            return f"model.path '{path}': {exc}"
        return None
    p = Path(os.path.expanduser(path))
    if p.is_dir():
        if not (p / "config.json").is_file():
            return (f"model.path '{path}' is a folder without config.json: not a saved Hugging Face model "
                    "(point it at the folder that holds config.json and the weights)")
        return _damaged(p, "model.path: model")
    if p.exists():
        return f"model.path '{path}' is a file; it must be a model folder, a hub id or tiny:<family>"
    if path.startswith((".", "/", "~")) or not _HUB_ID.match(path):
        return (f"model.path '{path}' is not an existing folder (nor a hub id of the form owner/name); check the "
                "path (relative paths resolve against the working directory, then the recipe's folder)")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        from .models.loading import in_hub_cache

        if not in_hub_cache(path):
            return (f"model.path '{path}' is neither a local folder nor in the Hugging Face cache, and the hub is "
                    "offline (HF_HUB_OFFLINE=1): download it first (huggingface-cli download "
                    f"{path}) or point model.path at a local folder")
    return None


def device_problems(recipe: Recipe) -> list[str]:
    """The refusals the loader (`models.loading.resolve_device / resolve_backend`) would raise."""
    import torch

    cuda = torch.cuda.is_available()
    m = recipe.model
    out = []
    if m.device == "cuda" and not cuda:
        out.append("model.device is 'cuda' but no CUDA GPU is visible; use model.device=auto or cpu")
    if m.backend == "unsloth":
        if m.device == "cpu" or not cuda:
            out.append("model.backend=unsloth needs a CUDA GPU (FastVisionModel is CUDA only); use "
                       "model.backend=transformers (4-bit also works on CPU) or auto")
        else:
            from .models.loading import unsloth_available

            if not unsloth_available():
                out.append("model.backend=unsloth but unsloth is not installed; pip install -r "
                           "requirements-gpu.txt, or use model.backend=transformers")
    return out


def reward_from_problem(recipe: Recipe, stages: list[str]) -> str | None:
    """The reward model the stages score with (score, eval) when they do not train it: `reward.model_from`
    must be a run folder holding a trained one; that one, or this run's own, must be readable."""
    src = recipe.reward.model_from
    scorers = ("score", "eval", "rounds") if recipe.rounds.n > 0 else ("score", "eval")
    if not any(s in scorers for s in stages) or "reward" in stages and not src:
        return None
    if not src:
        final = Path(recipe.run.dir) / "reward" / "final"
        return _damaged(final, "saved adapter") if (final / "adapter_config.json").is_file() else None
    final = Path(src) / "reward" / "final"
    if not (final / "adapter_config.json").is_file():
        what = "a run folder" if (Path(src) / "recipe.yaml").exists() else "not a run folder"
        return (f"reward.model_from '{src}' holds no trained reward model ({what}; expected {final}/adapter_config.json): "
                "point it at a run whose `reward` stage finished, or leave it unset to train one")
    return _damaged(final, "reward.model_from: saved adapter")


def _damaged(folder: Path, what: str) -> str | None:
    from .models.loading import ModelLoadError, check_saved_files

    try:
        check_saved_files(folder, what)
    except ModelLoadError as exc:
        return str(exc)
    return None


def fsdp_problems(recipe: Recipe, stages: list[str]) -> list[str]:
    """What cannot run with the base sharded by FSDP2 (an FSDP launch, or the dry run's `--fsdp`): the score
    stage generating critiques (reward/scorer.py `FSDP_GENERATE` says what to use)."""
    from .reward.scorer import FSDP_GENERATE

    out = [FSDP_GENERATE] if "score" in stages and recipe.reward.critique_mode == "generate" else []
    if "rounds" in stages and recipe.rounds.n > 0:
        out.append(FSDP_ROUNDS)
    return out


FSDP_ROUNDS = ("rounds.n > 0: the online rounds cannot run under an FSDP launch (they sample answers and critiques "
               "by generation, which is not sharded); run `--stages rounds` under torchrun (each GPU holds the whole "
               "model) or in one process, and the other stages under FSDP")


FSDP_EVAL = ("eval is not sharded under FSDP: each GPU loads the whole policy (and the reward model) for its "
             "share of the groups; a model that fits only sharded runs out of memory there. Leave eval out of "
             "--stages under FSDP and run `--stages eval` where one GPU holds the whole model (or take the risk)")


def preflight_problems(recipe: Recipe, stages: list[str]) -> list[str]:
    """Every problem found, each naming its key; empty when the run can start."""
    problems = []
    if any(s in ("reward", "score", "reference", "dpo", "eval", "rounds") for s in stages):
        problems += [p for p in [model_path_problem(recipe.model.path)] if p]
        problems += device_problems(recipe)
    problems += [p for p in [reward_from_problem(recipe, stages)] if p]
    return problems
