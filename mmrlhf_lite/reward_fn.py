"""A trained critique reward model as a reward function for TRL's GRPOTrainer (and any RL loop that calls
reward functions the same way): it sees the image, which TRL's own reward-model path does not (it
tokenises the completions as text only).

    from mmrlhf_lite.reward_fn import RewardFunction
    rf = RewardFunction.from_run("runs/demo")          # or an exported folder (python -m mmrlhf_lite.export)
    trainer = GRPOTrainer(model=policy, reward_funcs=rf, args=GRPOConfig(...), train_dataset=ds)

TRL calls `rf(prompts=..., completions=..., completion_ids=..., **columns)`, the columns being the data
set's others (`image` or `images` among them) plus its own (`trainer_state`, `log_metric`, ...). Prompts
and completions come in the standard format (strings) or the conversational one (lists of messages,
text or typed parts; after TRL prepares a multimodal prompt its image parts carry the images). The
completions of one prompt (same text, same images) are scored as one group, the image encoded once, in
the run's own score function (`models/reward_score.py`; from a run folder through the project's packed
scorer, from an exported folder through the export's plain one: the same numbers, tests/test_reward_export.py).
Returns one float per completion. Critique mode: the run's (`given` becomes `generate`: a completion has
no critique of its own) or `critique=`.

    python -m pytest -q tests/test_reward_fn.py
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from pathlib import Path
from typing import Any, Sequence

from .data.groups import PreferenceGroup, Response, text_to_turn
from .models.reward_score import AnswerScore

MODES = ("none", "generate")


class RewardFunctionError(ValueError):
    """A call the reward function cannot score; the message says what is wrong with which sample."""


def image_media(image: Any, where: str):
    """A data-set image (a path, bytes, a PIL image, or a `datasets` Image dict) as the project's media:
    a path or encoded bytes. A PIL image is written as PNG (lossless: the processor sees the same pixels)."""
    if isinstance(image, (str, Path)):
        return str(image)
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    if isinstance(image, dict) and (image.get("bytes") or image.get("path")):
        return bytes(image["bytes"]) if image.get("bytes") else str(image["path"])
    if hasattr(image, "save") and hasattr(image, "mode"):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
    raise RewardFunctionError(f"{where}: an image must be a path, bytes, a PIL image or a datasets Image dict, "
                              f"not {type(image).__name__}")


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text") or "" for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def completion_text(completion: Any, where: str) -> str:
    """The answer: a string, or (conversational) the text of the last message."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return _text(completion[-1].get("content"))
    raise RewardFunctionError(f"{where}: a completion must be a string or a list of messages, "
                              f"not {type(completion).__name__}")


def prompt_group(prompt: Any, images: list, where: str) -> PreferenceGroup:
    """A prompt (string, or messages with text or typed parts) and its images as a group without responses.

    Image parts that carry their image (TRL's prepared multimodal prompts) supply the images; otherwise
    the `image` / `images` column does, placed before the text (or at `<image>` tags of a string prompt)."""
    if isinstance(prompt, str):
        return PreferenceGroup(id=where, prompt=[text_to_turn(prompt, len(images))], responses=[], images=images)
    if not isinstance(prompt, list) or not all(isinstance(m, dict) and "role" in m for m in prompt):
        raise RewardFunctionError(f"{where}: a prompt must be a string or a list of messages with a role")
    turns, carried, placeholders = [], [], 0
    for message in prompt:
        content = message.get("content")
        parts = []
        if isinstance(content, str):
            parts.append({"type": "text", "text": content})
        elif isinstance(content, list):
            for p in content:
                kind = p.get("type") if isinstance(p, dict) else None
                if kind == "image":
                    parts.append({"type": "image"})
                    if p.get("image") is not None:
                        carried.append(image_media(p["image"], where))
                    else:
                        placeholders += 1
                elif kind == "text":
                    parts.append({"type": "text", "text": p.get("text") or ""})
        turns.append({"role": message["role"], "content": parts or [{"type": "text", "text": ""}]})
    if carried:
        if placeholders:
            raise RewardFunctionError(f"{where}: {len(carried)} image part(s) of the prompt carry their image and "
                                      f"{placeholders} do not")
        return PreferenceGroup(id=where, prompt=turns, responses=[], images=carried)
    if placeholders == 0 and images:  # images beside a text-only prompt go before its first user text
        first_user = next((t for t in turns if t["role"] == "user"), turns[-1])
        first_user["content"] = [{"type": "image"}] * len(images) + first_user["content"]
    elif placeholders != len(images):
        raise RewardFunctionError(f"{where}: the prompt has {placeholders} image part(s) but {len(images)} image(s) "
                                  "came with it")
    return PreferenceGroup(id=where, prompt=turns, responses=[], images=images)


def _sample_images(kwargs: dict, i: int) -> list:
    """The images of sample i from the `images` (a list per sample) or `image` (one per sample) column."""
    where = f"sample {i}"
    if kwargs.get("images") is not None:
        value = kwargs["images"][i]
        return [image_media(x, where) for x in (value or [])]
    if kwargs.get("image") is not None:
        value = kwargs["image"][i]
        return [] if value is None else [image_media(value, where)]
    return []


def _group_key(group: PreferenceGroup) -> str:
    h = hashlib.sha256(json.dumps(group.prompt, sort_keys=True).encode())
    for m in group.images:
        h.update(m if isinstance(m, bytes) else b"path:" + str(m).encode())
    return h.hexdigest()


class RunRewardModel:
    """A run folder's reward model through the project's packed scorer (`RewardScorer`)."""

    def __init__(self, scorer, recipe):
        self.scorer, self.recipe = scorer, recipe
        self.response_logp_weight = scorer.response_logp_weight
        rc = recipe.reward
        self.default_mode = "generate" if rc.critique_mode == "given" else rc.critique_mode

    def score_groups(self, groups: list[PreferenceGroup], mode: str, batch_groups: int = 4) -> list[list[AnswerScore]]:
        """Each group's responses scored in `mode` (none / generate), `batch_groups` groups per packed forward."""
        rc = self.recipe.reward
        scored = self.scorer.score_groups(groups, mode, n_samples=rc.n_samples, temperature=rc.temperature,
                                          max_new_tokens=rc.max_new_tokens, batch_size=rc.generation_batch_size,
                                          seed=self.recipe.run.seed, batch_groups=batch_groups)
        return [[AnswerScore(score=s.score, head=s.head, response_logp=s.response_logp,
                             critique=" | ".join(s.critiques) if s.critiques else None) for s in g] for g in scored]


class ExportedRewardModel:
    """An exported folder's reward model through its own `reward_score.Scorer` (plain forward, no packing)."""

    def __init__(self, scorer):
        self.scorer = scorer
        self.response_logp_weight = scorer.weight
        self.default_mode = scorer.default_mode()

    def score_groups(self, groups: list[PreferenceGroup], mode: str, batch_groups: int = 4) -> list[list[AnswerScore]]:
        return [self.scorer.score_answers(list(g.images), g.question_text(), [r.text for r in g.responses], mode)
                for g in groups]


def open_reward_model(path: str | Path, device: str | None = None) -> RunRewardModel | ExportedRewardModel:
    """The reward model of a run folder (its `reward/final`, or its `reward.model_from`) or of an exported
    folder (`reward_score.json` in it). `device`: where it runs (default: the run's `model.device`; `cuda:1`
    puts it beside a policy on `cuda:0`)."""
    from .models.reward_score import SETTINGS_FILE, Scorer

    path = Path(path)
    if (path / SETTINGS_FILE).exists():
        return ExportedRewardModel(Scorer.load(path, device=device or "auto"))
    if not (path / "recipe.yaml").exists():
        raise FileNotFoundError(f"{path} is neither a run folder (no recipe.yaml) nor an exported reward model "
                                f"(no {SETTINGS_FILE}): give runs/<name> or the folder `python -m "
                                "mmrlhf_lite.export RUN --what reward` wrote")
    from .recipe import load_recipe
    from .reward.scorer import RewardScorer

    recipe = load_recipe(path / "recipe.yaml", check_paths=False)
    if device:
        recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, device=device))
    rc = recipe.reward
    scorer = RewardScorer.from_run(path, recipe.model, max_length=rc.train.max_length,
                                   max_frames=recipe.data.max_frames)
    return RunRewardModel(scorer, recipe)


class RewardFunction:
    """`rf(prompts, completions, **columns) -> list[float]`: the critique reward model's score of each completion.

    Build it with `from_run`; `model` is a `RunRewardModel` or an `ExportedRewardModel`. `critique`: `none`
    (fast: the head and, for a hybrid model, the log-prob term, without a critique) or `generate` (the model
    writes a critique first, greedy unless the run samples). `batch_groups`: prompts per packed forward
    (each prompt's completions share one row)."""

    def __init__(self, model, critique: str, *, batch_groups: int = 8, name: str = "mmrlhf_reward"):
        if critique not in MODES:
            raise RewardFunctionError(f"critique must be one of {', '.join(MODES)}, not {critique!r}")
        self.model, self.critique, self.batch_groups = model, critique, max(1, int(batch_groups))
        self.__name__ = name  # TRL logs rewards under the function's name: rewards/<name>/mean

    @classmethod
    def from_run(cls, path: str | Path, *, critique: str | None = None, device: str | None = None,
                 batch_groups: int = 8, name: str = "mmrlhf_reward") -> "RewardFunction":
        """The reward model of a run folder or an exported folder (`open_reward_model`). `critique`: default
        the run's mode (`given` becomes `generate`)."""
        model = open_reward_model(path, device)
        return cls(model, critique or model.default_mode, batch_groups=batch_groups, name=name)

    def groups(self, prompts: Sequence, completions: Sequence, **kwargs) -> tuple[list[PreferenceGroup], list]:
        """The completions grouped by prompt (same turns, same images) and, per completion, its (group, index)."""
        if len(prompts) != len(completions):
            raise RewardFunctionError(f"{len(prompts)} prompts but {len(completions)} completions")
        groups: dict[str, PreferenceGroup] = {}
        where = []
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            g = prompt_group(prompt, _sample_images(kwargs, i), f"sample {i}")
            g = groups.setdefault(_group_key(g), g)
            g.responses.append(Response(completion_text(completion, f"sample {i}")))
            where.append((g, len(g.responses) - 1))
        return list(groups.values()), where

    def __call__(self, prompts: Sequence, completions: Sequence, **kwargs) -> list[float]:
        groups, where = self.groups(prompts, completions, **kwargs)
        scores: dict[int, list[float]] = {}
        for s in range(0, len(groups), self.batch_groups):
            chunk = groups[s:s + self.batch_groups]
            for g, sc in zip(chunk, self.model.score_groups(chunk, self.critique, self.batch_groups)):
                scores[id(g)] = [a.score for a in sc]
        return [scores[id(g)][k] for g, k in where]
