"""Typed recipes: YAML sections map 1:1 onto dataclasses; defaults and help text live here only.

    python -m mmrlhf_lite.train recipes/demo.yaml --dry-run dpo.beta=0.2

`load_recipe(path, overrides)` reads a YAML file, applies `key.path=value` overrides and validates
everything; every error names the file and the key path (and the closest valid key for typos).
The same field metadata (type, default, help) feeds the CLI's `--help-recipe` and the UI's form; its `stages`
(which stages' results a key changes) feeds the run folder's check of finished stages (runs.py).
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

STAGES = ("reward", "score", "reference", "dpo", "eval", "rounds")
_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class RecipeError(ValueError):
    """A recipe problem, with the file and key path it concerns."""

    def __init__(self, message: str, *, source: str | None = None, key: str | None = None):
        self.source, self.key, self.message = source, key, message
        where = ", ".join(p for p in (f"{source}" if source else "", f"key '{key}'" if key else "") if p)
        super().__init__(f"{where}: {message}" if where else message)


# What each key feeds: the stages whose results change when the key does (field metadata `stages`, required).
# A run folder refuses to reuse a finished stage whose keys changed, and `--redo` of it reruns the stages that
# read its outputs too (runs.py). A key feeds a stage when it changes what the stage computes beyond the
# order of rounding: the data, the model, its precision and kernels (the caches key on those too), seeds,
# hyper-parameters, and what its report quotes. A key that changes only speed, memory, how often it logs or
# checkpoints, or where files go feeds none, and its `why` says so.
EVERY_STAGE = STAGES  # every stage reads the groups and loads the model
TRAINER = ("<trainer>",)  # in TrainConfig: the stage that trains with the section holding it (its `trains`)
LORA_STAGES = ("reward", "dpo", "rounds")
LORA_WHY = ("the stages that train an adapter (rounds: when they start from the base model); score and eval load "
            "the saved one, reference none")
SPLIT_WHY = "the split decides the training and held-out groups, and what each stage reports per split"
CRITIQUE_WHY = "eval generates critiques with the same settings"
BETA_WHY = "score reports the training pairs' beta_i and their histogram with it; eval's report quotes it"


def _f(default: Any, help: str, *, stages: tuple[str, ...], why: str | None = None, choices: tuple | None = None,
       gt: float | None = None, ge: float | None = None, le: float | None = None, lt: float | None = None):
    """A recipe field: default + help text + the stages it feeds (and why, where that is not obvious) +
    optional range/choices checked by `validate`."""
    meta = {"help": help, "stages": tuple(stages), "why": why, "choices": choices, "gt": gt, "ge": ge, "le": le,
            "lt": lt}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    path: str = _f("tiny:qwen2_vl", "Local folder or hub id of an image-text-to-text model; "
                   "`tiny:<family>` builds the offline tiny random-init model (tests, demo).", stages=EVERY_STAGE)
    family: str = _f("auto", "Model family (see mmrlhf_lite.models.families); `auto` reads config.json.",
                     stages=EVERY_STAGE)
    backend: str = _f("auto", "`unsloth` (CUDA only; opt-in, not yet verified on the packed path), `transformers` "
                      "(bitsandbytes + peft, CPU too), `auto` = transformers (says so where unsloth is installed).",
                      choices=("auto", "transformers", "unsloth"), stages=EVERY_STAGE,
                      why="another backend runs other kernels and its own LoRA code")
    device: str = _f("auto", "`auto` = cuda when available, else cpu.", choices=("auto", "cpu", "cuda"),
                     stages=EVERY_STAGE, why="the `auto` compute dtype and the random streams follow the device")
    load_in_4bit: bool = _f(True, "Quantise the language model's linear layers to nf4 + double quant (QLoRA).",
                            stages=EVERY_STAGE)
    compute_dtype: str = _f("auto", "Compute dtype: `auto` = bfloat16 on CUDA (float16 if the GPU lacks bf16), "
                            "float32 on CPU.", choices=("auto", "bfloat16", "float16", "float32"), stages=EVERY_STAGE)
    attn_implementation: str = _f("sdpa", "Attention kernel passed to from_pretrained.",
                                  choices=("sdpa", "eager", "flash_attention_2"), stages=EVERY_STAGE,
                                  why="another kernel rounds differently (the reward and reference caches key on "
                                      "it) and decides `packing: auto`")
    lora_r: int = _f(16, "LoRA rank.", gt=0, stages=LORA_STAGES, why=LORA_WHY)
    lora_alpha: float = _f(32.0, "LoRA alpha (scale = alpha / r).", gt=0, stages=LORA_STAGES, why=LORA_WHY)
    lora_dropout: float = _f(0.0, "LoRA dropout.", ge=0, lt=1, stages=LORA_STAGES, why=LORA_WHY)
    lora_target_modules: list = _f(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                   "Linear layer names LoRA wraps inside the language model.", stages=LORA_STAGES,
                                   why=LORA_WHY)
    lora_vision: bool = _f(False, "Also put LoRA on the vision tower's and projector's linear layers.",
                           stages=LORA_STAGES, why=LORA_WHY)
    gradient_checkpointing: bool = _f(True, "Non-reentrant gradient checkpointing with input grads enabled.",
                                      stages=(), why="recomputes activations in the backward pass: the same numbers "
                                                     "in less memory")
    max_pixels: int | None = _f(None, "Cap on image pixels given to the processor (fewer image tokens).", gt=0,
                                stages=EVERY_STAGE)
    min_pixels: int | None = _f(None, "Floor on image pixels given to the processor.", gt=0, stages=EVERY_STAGE)
    packing: str = _f("auto", "`packed`: one sequence per group [prompt][r1]..[rK] with a 4-D mask; "
                      "`unpacked`: one row per response; `auto` = packed where the family supports it.",
                      choices=("auto", "packed", "unpacked"), stages=EVERY_STAGE,
                      why="packed and unpacked forwards round differently; the reward and reference caches key on it")
    trust_remote_code: bool = _f(False, "Allow model code from the model folder / hub (only when you trust it).",
                                 stages=EVERY_STAGE,
                                 why="decides whether the model folder's own code or transformers' class runs")


@dataclass
class DemoDataConfig:
    groups: int = _f(480, "Number of synthetic preference groups.", gt=0, stages=EVERY_STAGE)
    seed: int = _f(0, "Seed of the synthetic data generator.", stages=EVERY_STAGE)
    image_size: int = _f(112, "Canvas size in pixels (square).", ge=28, stages=EVERY_STAGE)
    safety_fraction: float = _f(0.05, "Share of safety-style prompts where the refusal ranks first.", ge=0, le=1,
                                stages=EVERY_STAGE)


@dataclass
class DataConfig:
    path: str = _f("demo", "Preference data: a JSONL/JSON/Parquet file, a folder of them, a `datasets` folder "
                   "saved with save_to_disk, or `demo` for the synthetic image-grounded demo set.", stages=EVERY_STAGE)
    format: str = _f("auto", "Row format; `auto` detects it from the fields (docs/data-formats.md): `ranked` (K "
                     "responses per row), MM-RLHF pairs `mmrlhf` / `mmrlhf_bench`, `trl`, `swift`, `llamafactory`, "
                     "`rlaifv`, `rlhfv` (LLaVA style), `vlfeedback`, and the reward-model benchmarks "
                     "`vl_rewardbench` (VL-RewardBench) / `mm_rewardbench` (Multimodal RewardBench).",
                     choices=("auto", "ranked", "mmrlhf", "mmrlhf_bench", "trl", "swift", "llamafactory",
                              "rlaifv", "rlhfv", "vlfeedback", "vl_rewardbench", "mm_rewardbench"), stages=EVERY_STAGE)
    dataset: str | None = _f(None, "LLaMA-Factory: the entry of the `dataset_info.json` that data.path names (the "
                             "file or its folder); the entry's file, columns and tags are applied.", stages=EVERY_STAGE)
    media_root: str | None = _f(None, "Folder that relative image/video paths resolve against "
                                "(default: the data file's folder).", stages=EVERY_STAGE)
    max_frames: int = _f(8, "Frames sampled from each video (a folder of frames or a list).", gt=0, stages=EVERY_STAGE)
    eval_fraction: float = _f(0.15, "Share of groups held out for evaluation (split by group).", ge=0, lt=1,
                              stages=EVERY_STAGE, why=SPLIT_WHY)
    eval_path: str | None = _f(None, "Separate evaluation data (replaces the split when given).", stages=EVERY_STAGE,
                               why=SPLIT_WHY)
    split_seed: int = _f(0, "Seed of the deterministic train/eval split.", stages=EVERY_STAGE, why=SPLIT_WHY)
    label_noise: float = _f(0.0, "Share of the training groups' ranked pairs flipped on purpose (each pair with "
                            "this probability, seeded by split_seed): a label-noise experiment; held-out groups "
                            "keep their labels. 0 = off.", ge=0, le=1, stages=("reward", "score", "dpo"),
                            why="it flips training pairs only: reference log-probs are per response, and eval reads "
                                "the held-out groups, which keep their labels")
    max_groups: int | None = _f(None, "Use at most this many groups (after validation).", gt=0, stages=EVERY_STAGE)
    on_error: str = _f("raise", "`raise` stops at the first bad row; `skip` drops it and counts it by reason.",
                       choices=("raise", "skip"), stages=(),
                       why="two runs that both get past loading read the same rows: `raise` stops at the first bad "
                           "row where `skip` drops it")
    max_image_pixels: int = _f(178_956_970, "Largest image (width x height) that is opened; a bigger one is a "
                               "validation error naming its row (PIL's guard against decompression bombs, whose "
                               "default this is). 0 = no limit.", ge=0, stages=EVERY_STAGE,
                               why="with on_error: skip, a row over the limit is dropped")
    demo: DemoDataConfig = field(default_factory=DemoDataConfig, metadata={"help": "Synthetic demo data."})


@dataclass
class TrainConfig:
    """Optimisation settings shared by the reward and DPO trainers (`stages=TRAINER`: the stage that trains with
    the section holding them, named by that section's `trains`)."""
    learning_rate: float = _f(2e-4, "Peak learning rate.", gt=0, stages=TRAINER)
    epochs: float = _f(1.0, "Passes over the training groups (ignored when max_steps > 0).", gt=0, stages=TRAINER)
    max_steps: int = _f(0, "Optimizer steps; 0 = use epochs.", ge=0, stages=TRAINER)
    groups_per_step: int = _f(1, "Groups (each one packed sequence) per micro-batch.", gt=0, stages=TRAINER,
                              why="it sets the groups per optimizer step and the data order; the reference stage's "
                                  "batches of dpo.train.groups_per_step are no-grad passes that it does not change")
    grad_accum: int = _f(4, "Micro-batches accumulated per optimizer step.", gt=0, stages=TRAINER)
    warmup_ratio: float = _f(0.05, "Share of steps with linear warm-up.", ge=0, lt=1, stages=TRAINER)
    lr_scheduler: str = _f("cosine", "transformers scheduler name.",
                           choices=("cosine", "linear", "constant", "constant_with_warmup"), stages=TRAINER)
    weight_decay: float = _f(0.0, "AdamW weight decay.", ge=0, stages=TRAINER)
    max_grad_norm: float = _f(1.0, "Gradient clipping norm.", gt=0, stages=TRAINER)
    max_length: int = _f(4096, "Longest tokenised sequence allowed (prompt with image tokens + one response "
                         "+ critique); longer samples are reported, never truncated.", gt=0, stages=(),
                         why="a limit checked, never applied: a longer sequence is an error naming it and nothing "
                             "is truncated, so no finished stage's numbers depend on it")
    save_steps: int = _f(50, "Checkpoint every N optimizer steps (resume point).", gt=0, stages=(),
                         why="where a stopped run resumes from, not what it computes")
    logging_steps: int = _f(5, "Log metrics every N optimizer steps.", gt=0, stages=(),
                            why="how often metrics are logged")
    save_total_limit: int = _f(2, "Checkpoints kept.", gt=0, stages=(), why="how many checkpoints stay on disk")
    dataloader_workers: int | None = _f(None, "Processes that collate the next micro-batches (image decoding, chat "
                                        "template, masks) while the step runs; null = auto: up to 4 on CUDA, 0 on "
                                        "CPU (workers would take cores from the step). Same batches, same order.",
                                        ge=0, stages=(), why="who collates the batches, not which or in what order")


@dataclass
class RewardConfig:
    model_from: str | None = _f(None, "A run folder whose trained reward model this run uses instead of "
                                "training one (stage `reward` then does nothing): one reward model, many DPO runs.",
                                stages=("reward", "score", "eval", "rounds"),
                                why="the reward model that score, eval and the rounds load")
    head: str = _f("mlp", "`mlp` = the paper's dropout-Linear(h,h)-tanh-dropout-Linear(h,1); `linear` = Linear(h,1).",
                   choices=("mlp", "linear"), stages=("reward", "eval"),
                   why="eval's before-training baseline builds a fresh head of this kind")
    head_dropout: float = _f(0.0, "Dropout inside the reward head.", ge=0, lt=1, stages=("reward",),
                             why="dropout is off when scoring")
    w_rank: float = _f(1.0, "Weight of the Bradley-Terry ranking loss.", ge=0, stages=("reward",))
    w_tie: float = _f(0.1, "Weight of the tie loss mean((r_c - r_r)^2) on tied pairs.", ge=0, stages=("reward",))
    w_center: float = _f(0.01, "Weight of the centering loss mean((r_c + r_r)^2).", ge=0, stages=("reward",))
    w_crit: float = _f(1.0, "Weight of the critique cross-entropy (critique tokens only).", ge=0, stages=("reward",))
    response_logp_weight: float = _f(0.0, "Score = head + this weight * mean log-prob of the response's tokens "
                                     "under the reward model's own LM (image and question in context; trained "
                                     "through the ranking loss, like a reference-free DPO reward). 0 = the "
                                     "paper's head alone. Saved with the model, so every scorer applies it.", ge=0,
                                     stages=("reward", "eval"),
                                     why="it shapes training and is saved with the model, which score applies; "
                                         "eval's before-training baseline scores with it")
    w_response_rank: float = _f(1.0, "With response_logp_weight > 0: weight of a Bradley-Terry loss on that "
                                "log-prob term alone (the joint loss stops teaching it once the head reads the "
                                "critiques' verdicts).", ge=0, stages=("reward",))
    margin_scale: float = _f(0.0, "Bradley-Terry margin = margin_scale * (score gap) when scores are given; "
                             "0 = plain BT.", ge=0, stages=("reward",))
    critique_mode: str = _f("generate", "How `score` gets critiques: `generate` (the model writes them), "
                            "`given` (the dataset's), `none` (score without critique).",
                            choices=("generate", "given", "none"), stages=("score", "eval", "rounds"),
                            why="eval scores the policy's answers in this mode")
    n_samples: int = _f(1, "Critiques sampled per response; scores are averaged (1 = greedy).", gt=0,
                        stages=("score", "eval", "rounds"), why=CRITIQUE_WHY)
    temperature: float = _f(0.7, "Sampling temperature when n_samples > 1.", gt=0, stages=("score", "eval", "rounds"),
                            why=CRITIQUE_WHY)
    max_new_tokens: int = _f(96, "Longest generated critique.", gt=0, stages=("score", "eval", "rounds"),
                             why=CRITIQUE_WHY)
    generation_batch_size: int = _f(8, "Responses per batched generate call.", gt=0, stages=(),
                                    why="a batch size of no-grad passes: with sampling it decides which random draw "
                                        "a response gets, not how the draws are distributed; the reward cache does "
                                        "not key on it either")
    train: TrainConfig = field(default_factory=TrainConfig,
                               metadata={"help": "Reward-model optimisation.", "trains": "reward"})


@dataclass
class CacheConfig:
    dir: str | None = _f(None, "Cache folder for reward scores and reference log-probs; default "
                         "`<run dir>/cache`. Point several runs at one folder to share entries.", stages=(),
                         why="the caches are keyed by content: another folder reuses or recomputes the same numbers")


@dataclass
class DpoConfig:
    beta: float = _f(0.1, "beta_0 of MM-DPO.", gt=0, stages=("score", "dpo", "eval", "rounds"), why=BETA_WHY)
    w: float = _f(0.1, "Dynamic reward scaling weight: beta_i = beta*(1 + w*(1 - exp(-k*delta_i))); "
                  "0 = plain DPO.", ge=0, stages=("score", "dpo", "eval", "rounds"), why=BETA_WHY)
    k: float = _f(0.5, "Dynamic reward scaling sharpness k.", ge=0, stages=("score", "dpo", "eval", "rounds"), why=BETA_WHY)
    beta_floor: float = _f(1e-3, "Positive floor on beta_i.", gt=0, stages=("score", "dpo", "rounds"),
                           why="score reports the training pairs' beta_i and their histogram with it")
    pairs: str = _f("all", "`all` ranked pairs of a group, or `best_vs_worst`.", choices=("all", "best_vs_worst"),
                    stages=("dpo", "eval", "rounds"), why="eval's report quotes it")
    loss_type: str = _f("sigmoid", "`sigmoid` (the paper's) or `ipo` (on length-normalised log-probs, as in TRL).",
                        choices=("sigmoid", "ipo"), stages=("dpo", "eval", "rounds"), why="eval's report quotes it")
    alpha: float = _f(1.0, "Weight of the DPO term.", ge=0, stages=("dpo", "rounds"))
    gamma: float = _f(0.25, "Weight of the SFT (NLL) term (its response: sft_target).", ge=0,
                      stages=("dpo", "eval", "rounds"), why="eval's report quotes it")
    sft_target: str = _f("chosen", "Response whose mean token NLL the SFT term adds to each pair: `chosen` = the "
                         "pair's better response (the paper's alpha * L_dpo + gamma * NLL(chosen)), `best` = its "
                         "group's rank-1 response (the same for every pair of the group; in online rounds the "
                         "reward model's pick among the samples).",
                         choices=("chosen", "best"), stages=("dpo", "eval", "rounds"), why="eval's report quotes it")
    label_smoothing: float = _f(0.0, "Conservative DPO label smoothing (sigmoid loss only).", ge=0, lt=0.5,
                                stages=("dpo", "rounds"))
    margin_source: str = _f("reward", "Where delta_i comes from: `reward` (the reward cache of stage score), "
                            "`scores` (the dataset's scores), `none` (delta = 0, plain DPO beta).",
                            choices=("reward", "scores", "none"), stages=("dpo", "rounds"))
    reference: str = _f("previous", "Online rounds: the reference policy of each round's MM-DPO, `previous` (the policy "
                        "the round starts from, i.e. the previous round's) or `initial` (the policy round 1 started "
                        "from). The offline `dpo` stage always starts from, and refers to, the base model.",
                        choices=("previous", "initial"), stages=("rounds",))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(learning_rate=5e-5),
                               metadata={"help": "MM-DPO optimisation.", "trains": ("dpo", "rounds")})


@dataclass
class EvalConfig:
    critique_modes: list = _f(["given", "none", "generate"], "Reward-bench critique modes to report.",
                              stages=("eval",))
    max_groups: int | None = _f(None, "Evaluate at most this many held-out groups.", gt=0, stages=("eval", "rounds"))
    policy_samples: int = _f(1, "Answers per held-out prompt for the policy metrics before vs after DPO (1 = "
                             "greedy; more are sampled at temperature 1).",
                             ge=0, stages=("eval", "rounds"))
    max_new_tokens: int = _f(48, "Longest generated policy answer.", gt=0, stages=("eval", "rounds"))
    min_well_formed: float = _f(0.5, "The win rate after vs before DPO is reported only when at least this share "
                                "of the starting policy's answers is well-formed (non-empty, clean text, >= 80% "
                                "of its words among the group's responses' words); else the report says why.",
                                ge=0, le=1, stages=("eval",))


ROUNDS = ("rounds",)


@dataclass
class RoundsConfig:
    n: int = _f(0, "Online MM-DPO rounds after the offline stages (stage `rounds`; `--rounds N` sets it): each round "
                "the current policy samples answers per prompt, the reward model ranks them, MM-DPO trains on them. "
                "0 = none. Raising it later continues from the last finished round.", ge=0, stages=(),
                why="how many rounds run, not what one computes: raising it continues after the last finished round")
    patience: int = _f(2, "Stop early when, for this many rounds in a row, the reward model's mean score of the "
                       "policy's held-out answers rose while a signal it cannot game (right answers, well-formed "
                       "answers, held-out implicit accuracy) fell (docs/rounds.md). 0 = never stop early.", ge=0, stages=(),
                       why="read again from the finished rounds' metrics each time the stage runs")
    samples: int = _f(4, "Answers sampled per prompt each round (K of a group).", ge=2, stages=ROUNDS)
    temperature: float = _f(1.0, "Sampling temperature of the round's answers.", gt=0, stages=ROUNDS)
    top_p: float = _f(1.0, "Nucleus sampling top-p of the round's answers (1 = off).", gt=0, le=1, stages=ROUNDS)
    max_new_tokens: int = _f(48, "Longest sampled answer.", gt=0, stages=ROUNDS)
    steps: int = _f(0, "MM-DPO optimizer steps per round; 0 = one pass over the round's groups (their number "
                    "varies: prompts whose answers are degenerate or tied are dropped). The other optimisation "
                    "settings are dpo.train's.", ge=0, stages=ROUNDS)
    prompts: str = _f("all", "Which training prompts the rounds sample for: `all` (the human-ranked groups' prompts "
                      "and the rows without a ranking) or `unranked` (only the rows without a ranking).",
                      choices=("all", "unranked"), stages=ROUNDS)
    max_prompts: int | None = _f(None, "Sample for at most this many prompts per round (a different seeded subset "
                                 "each round); null = all.", gt=0, stages=ROUNDS)
    min_gap: float = _f(0.0, "Two sampled answers whose reward scores differ by no more than this are a tie (no "
                        "pair); a group whose answers are all tied is dropped and counted.", ge=0, stages=ROUNDS)
    ranker: str = _f("reward", "What orders a round's sampled answers: `reward` (the reward model's scores) or "
                     "`answer` (the data's `meta` answer: every right answer above every wrong one, score 1 and 0, so "
                     "each pair's delta is 1; prompts whose right answer the data does not know are dropped and "
                     "counted). The reward model scores every answer either way (critiques, the guard's numbers).",
                     choices=("reward", "answer"), stages=ROUNDS)


@dataclass
class RunConfig:
    dir: str = _f("runs/demo", "Run folder: resolved recipe, events.jsonl, logs, and each stage's outputs.",
                  stages=(), why="the run folder itself: another one starts empty")
    seed: int = _f(0, "Seed of model init, sampling and data order.", stages=("reward", "score", "dpo", "eval", "rounds"),
                   why="reference log-probs draw nothing at random")
    stages: list = _f(list(STAGES), "Stages to run, in order: reward, score, reference, dpo, eval, rounds (rounds "
                      "runs only with rounds.n > 0).", stages=(), why="which stages run, not what they compute")
    report_to: str = _f("none", "transformers `report_to` (none, tensorboard, wandb).", stages=(),
                        why="where metrics are logged")


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "Model and adapters."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Preference data."})
    reward: RewardConfig = field(default_factory=RewardConfig, metadata={"help": "Critique reward model."})
    cache: CacheConfig = field(default_factory=CacheConfig, metadata={"help": "Content-keyed caches."})
    dpo: DpoConfig = field(default_factory=DpoConfig, metadata={"help": "MM-DPO."})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "Evaluation."})
    rounds: RoundsConfig = field(default_factory=RoundsConfig, metadata={"help": "Online MM-DPO rounds."})
    run: RunConfig = field(default_factory=RunConfig, metadata={"help": "Run folder and stages."})
    source: str | None = field(default=None, repr=False, metadata={"help": "", "internal": True})

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "source"}

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


# ---------------------------------------------------------------------------------------------------
# Loading and validation

def recipe_fields(cls=Recipe, prefix: str = ""):
    """Yield (key_path, dataclass_field, type) for every leaf field: the single source for CLI help and UI."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            yield from recipe_fields(t, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, t


def stages_fed(cls=Recipe, prefix: str = "", trainer: str | None = None) -> dict[str, tuple[str, ...]]:
    """Every leaf key -> the stages whose results it changes, in pipeline order (field metadata `stages`, with
    `TRAINER` read as the `trains` of the section holding the key). The single source of the run folder's
    `STAGE_INPUTS`; a key without `stages`, with an unknown stage, or feeding none without a `why`, is an error."""
    out: dict[str, tuple[str, ...]] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(stages_fed(hints[f.name], f"{key}.", f.metadata.get("trains", trainer)))
            continue
        if "stages" not in f.metadata:
            raise ValueError(f"recipe key '{key}' does not say which stages it feeds (the `stages` of its field)")
        stages = set(f.metadata["stages"])
        if TRAINER[0] in stages:
            if trainer is None:
                raise ValueError(f"recipe key '{key}' feeds the trainer of its section, which names none (`trains`)")
            stages = stages - {TRAINER[0]} | set((trainer,) if isinstance(trainer, str) else trainer)
        unknown = stages - set(STAGES)
        if unknown:
            raise ValueError(f"recipe key '{key}' feeds unknown stage(s) {sorted(unknown)}; stages are {STAGES}")
        if not stages and not f.metadata.get("why"):
            raise ValueError(f"recipe key '{key}' feeds no stage and does not say why (the `why` of its field)")
        out[key] = tuple(s for s in STAGES if s in stages)
    return out


def _type_name(t) -> str:
    args = typing.get_args(t)
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + " or null"
    return getattr(t, "__name__", str(t))


def _coerce(value: Any, t, key: str, source: str | None) -> Any:
    """Check/convert one YAML value to the field type; ints are accepted where floats are expected."""
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, source)
    if t is bool:
        if isinstance(value, bool):
            return value
    elif t is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif t is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
            return float(value)  # PyYAML (YAML 1.1) reads `2e-4` as a string; people write it anyway
    elif t is str:
        if isinstance(value, str):
            return value
    elif t is list or origin is list:
        # every list field is a list of names (modules, stages, modes)
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list):
            bad = [v for v in value if not isinstance(v, str)]
            if not bad:
                return value
            raise RecipeError(f"expected a list of strings, got {type(bad[0]).__name__} {bad[0]!r} in {value!r}",
                              source=source, key=key)
    else:
        return value
    raise RecipeError(f"expected {_type_name(t)}, got {type(value).__name__} {value!r}", source=source, key=key)


def _build(cls, data: dict, prefix: str, source: str | None, base=None):
    """`data` over `base` (the section's default: `DpoConfig.train` differs from a bare `TrainConfig`)."""
    if not isinstance(data, dict):
        raise RecipeError(f"expected a mapping (section), got {type(data).__name__}", source=source,
                          key=prefix.rstrip(".") or None)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    names = list(fields)
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            raise RecipeError(f"unknown key{hint}", source=source, key=f"{prefix}{key}")
        t = hints[key]
        if dataclasses.is_dataclass(t):
            kwargs[key] = _build(t, {} if value is None else value, f"{prefix}{key}.", source,
                                 fields[key].default_factory())
        else:
            kwargs[key] = _coerce(value, t, f"{prefix}{key}", source)
    return cls(**kwargs) if base is None else dataclasses.replace(base, **kwargs)


def _set_path(tree: dict, key_path: str, value: Any, source: str) -> None:
    """Apply one override to the raw YAML tree (validated later with the rest)."""
    parts = key_path.split(".")
    node, cls = tree, Recipe
    for i, part in enumerate(parts):
        names = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
        if part not in names:
            close = difflib.get_close_matches(part, list(names), n=1, cutoff=0.5)
            prefix = ".".join(parts[:i])
            prefix = prefix + "." if prefix else ""
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            raise RecipeError(f"unknown key{hint}", source=source, key=key_path)
        t = typing.get_type_hints(cls)[part]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(t):
                raise RecipeError("is a section; override one of its keys", source=source, key=key_path)
            node[part] = value
        else:
            if not dataclasses.is_dataclass(t):
                raise RecipeError(f"'{'.'.join(parts[:i + 1])}' is not a section", source=source, key=key_path)
            if node.get(part) is None:
                node[part] = {}
            elif not isinstance(node[part], dict):
                raise RecipeError("expected a mapping (section)", source=source, key=".".join(parts[:i + 1]))
            node, cls = node[part], t


def parse_override(text: str) -> tuple[str, Any]:
    """`dpo.beta=0.2` -> ("dpo.beta", 0.2); the value is parsed as YAML (so `null`, `[a, b]`, `true` work)."""
    if "=" not in text:
        raise RecipeError(f"override '{text}' is not of the form key.path=value", source="command line")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def validate(recipe: Recipe, source: str | None = None) -> Recipe:
    """Range and choice checks from field metadata, plus cross-field rules."""
    for key, f, _ in recipe_fields():
        value = recipe
        for part in key.split("."):
            value = getattr(value, part)
        m = f.metadata
        if value is None:
            continue
        if m.get("choices") and value not in m["choices"]:
            close = difflib.get_close_matches(str(value), [str(c) for c in m["choices"]], n=1, cutoff=0.4)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise RecipeError(f"{value!r} is not one of {', '.join(map(str, m['choices']))}{hint}",
                              source=source, key=key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            for op, bound, ok in (("gt", m.get("gt"), lambda v, b: v > b), ("ge", m.get("ge"), lambda v, b: v >= b),
                                  ("lt", m.get("lt"), lambda v, b: v < b), ("le", m.get("le"), lambda v, b: v <= b)):
                if bound is not None and not ok(value, bound):
                    sym = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}[op]
                    raise RecipeError(f"must be {sym} {bound}, got {value}", source=source, key=key)
    bad = [s for s in recipe.run.stages if s not in STAGES]
    if bad:
        close = difflib.get_close_matches(bad[0], STAGES, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise RecipeError(f"unknown stage '{bad[0]}'{hint}; stages are {', '.join(STAGES)}", source=source,
                          key="run.stages")
    for mode in recipe.eval.critique_modes:
        if mode not in ("generate", "given", "none"):
            raise RecipeError(f"unknown critique mode {mode!r}; use generate, given or none", source=source,
                              key="eval.critique_modes")
    if not recipe.model.lora_target_modules:
        raise RecipeError("needs at least one module name", source=source, key="model.lora_target_modules")
    return recipe


def _check_paths(recipe: Recipe, base: Path, source: str | None) -> None:
    """Relative paths resolve against the working directory first, then the recipe file's folder."""
    def resolve(value: str | None, key: str, must_exist: bool) -> str | None:
        if value is None or value == "demo" and key == "data.path" or value.startswith("tiny:"):
            return value
        p = Path(os.path.expanduser(value))
        if not p.is_absolute():
            cands = [Path.cwd() / p, base / p]
            p = next((c for c in cands if c.exists()), cands[0])
        if must_exist and not p.exists():
            raise RecipeError(f"path not found: {value}", source=source, key=key)
        return str(p)

    recipe.data.path = resolve(recipe.data.path, "data.path", True)
    recipe.data.eval_path = resolve(recipe.data.eval_path, "data.eval_path", True)
    recipe.data.media_root = resolve(recipe.data.media_root, "data.media_root", True)
    recipe.reward.model_from = resolve(recipe.reward.model_from, "reward.model_from", True)
    mp = recipe.model.path
    if mp.startswith((".", "/", "~")) or os.path.sep in mp and Path(mp).expanduser().exists():
        recipe.model.path = resolve(mp, "model.path", True)


def load_recipe(path: str | os.PathLike | None, overrides: list[str] | tuple = (),
                check_paths: bool = True) -> Recipe:
    """Load + override + validate. `path=None` gives the defaults (the demo recipe's base)."""
    source = str(path) if path is not None else "<defaults>"
    tree: dict = {}
    empty_warning = None
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise RecipeError("recipe file not found", source=source)
        if not p.is_file():
            raise RecipeError("is a folder, not a recipe file", source=source)
        raw = p.read_bytes()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line = raw.count(b"\n", 0, exc.start) + 1
            raise RecipeError(f"not UTF-8 text (byte 0x{raw[exc.start]:02x}); save the recipe as UTF-8",
                              source=f"{source}:{line}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            message, where = _yaml_error(e, source)
            raise RecipeError(message, source=where) from None
        except RecursionError:
            raise RecipeError("not valid YAML: nested too deeply", source=source) from None
        if loaded is None:
            empty_warning = f"{source}: recipe is empty: using the defaults (the demo recipe's base)"
        tree = loaded or {}
        if not isinstance(tree, dict):
            raise RecipeError("a recipe is a mapping of sections (model, data, reward, ...)", source=source)
    overridden: dict[str, str] = {}
    for text in overrides:
        key, value = parse_override(text)
        _set_path(tree, key, value, f"{source} (override {text})")
        overridden[key] = text
    try:
        recipe = _build(Recipe, tree, "", source)
        recipe.source = source
        validate(recipe, source)
    except RecipeError as exc:
        if exc.key in overridden:  # the bad value came from the command line, not the file
            raise RecipeError(exc.message, source=f"{source} (override {overridden[exc.key]})", key=exc.key) from None
        raise
    if check_paths:
        _check_paths(recipe, Path(path).resolve().parent if path is not None else Path.cwd(), source)
    recipe.load_warnings = [empty_warning] if empty_warning else []
    return recipe


def _yaml_error(e: Exception, source: str) -> tuple[str, str]:
    """(message, file:line) of a YAML error at the line that explains it: for an unclosed bracket or
    quote, where it opened (PyYAML's `context_mark`), not where the parser gave up (often the file's end)."""
    problem = getattr(e, "problem", None) or str(e)
    mark, ctx_mark = getattr(e, "problem_mark", None), getattr(e, "context_mark", None)
    context = getattr(e, "context", None)
    if ctx_mark is not None and mark is not None and ctx_mark.line != mark.line:
        what = str(context or "a construct").removeprefix("while parsing ").removeprefix("while scanning ")
        return (f"not valid YAML: {what} starts here (column {ctx_mark.column + 1}) and is never closed: {problem} "
                f"at line {mark.line + 1} (an unclosed bracket or quote on this line?)", f"{source}:{ctx_mark.line + 1}")
    line = f":{mark.line + 1}" if mark is not None else ""
    return f"not valid YAML: {problem}", f"{source}{line}"


def describe_fields() -> str:
    """Help text for every key, with the stages it feeds (the CLI's --help-recipe; the UI form uses
    `recipe_fields` directly)."""
    lines = []
    defaults = Recipe()
    fed = stages_fed()
    for key, f, t in recipe_fields():
        value = defaults
        for part in key.split("."):
            value = getattr(value, part)
        choices = f" [{'|'.join(map(str, f.metadata['choices']))}]" if f.metadata.get("choices") else ""
        why = f" ({f.metadata['why']})" if f.metadata.get("why") else ""
        feeds = f"Feeds: {', '.join(fed[key])}{why}." if fed[key] else f"Feeds no stage{why}."
        lines.append(f"  {key} ({_type_name(t)}{choices}, default {value!r})\n      {f.metadata['help']}\n"
                     f"      {feeds}")
    return "\n".join(lines)
