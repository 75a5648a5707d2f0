"""The one training loop both trainers share: a `transformers.Trainer` subclass over preference groups.

Resume, gradient accumulation, schedulers, checkpoint rotation, `report_to` logging and the data
sharding of `torchrun` / `accelerate launch` come from the library. Subclasses give
`group_loss(model, batch, norm) -> (loss, metrics)` and `step_counts(batch)` (what the loss averages
over); the loss of an optimizer step is the mean over all of its pairs however the step is split into
micro-batches, accumulation steps and ranks (the step's counts are summed and passed as `norm`, as
transformers does with `num_items_in_batch`). Under a launcher the trainable gradients are averaged over
ranks once per step (docs/distributed.md). The collator turns group indices into encoded groups.
Progress and metrics go to the run's event stream; a stop request (the run folder's STOP file, SIGTERM,
Ctrl-C) saves a checkpoint and raises `StageStopped` (on every rank at the same step), and the next
invocation resumes from it.

    python -m mmrlhf_lite.train recipes/demo.yaml --stages reward
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from . import distributed
from .events import EventLog, StageStopped
from .models.wrappers import ShardedModel
from .recipe import TrainConfig

log = logging.getLogger(__name__)


class GroupIndexDataset(Dataset):
    """Items are group indices; the collator encodes them (images are processed lazily per step)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def training_arguments(cfg: TrainConfig, out_dir: Path, *, device: torch.device, dtype: torch.dtype,
                       seed: int, report_to: str) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(out_dir),
        per_device_train_batch_size=cfg.groups_per_step,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps if cfg.max_steps > 0 else -1,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # transformers 5 takes a ratio here when < 1
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        logging_steps=cfg.logging_steps,
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        save_strategy="steps",
        report_to=[] if report_to == "none" else [report_to],
        use_cpu=device.type == "cpu",
        bf16=dtype == torch.bfloat16 and device.type == "cuda",
        fp16=dtype == torch.float16 and device.type == "cuda",
        seed=seed,
        data_seed=seed,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        gradient_checkpointing=False,  # enabled by the loader (non-reentrant, input grads on)
    )


class _EventsCallback(TrainerCallback):
    def __init__(self, trainer: "GroupTrainer"):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        t = self.trainer
        t.events.progress(state.global_step, state.max_steps, unit="step")
        if distributed.any_rank(t.stop_check()):  # every rank stops at the same step
            t.stopped = True
            control.should_save = True
            control.should_training_stop = True
        return control


class GroupTrainer(Trainer):
    """Trainer over preference groups; subclasses implement `group_loss`."""

    def __init__(self, model, args: TrainingArguments, *, groups: Sequence, collate: Callable[[list], Any],
                 events: EventLog, stop_check: Callable[[], bool] = lambda: False):
        self.groups = list(groups)
        self.events = events
        self.stop_check = stop_check
        self.stopped = False
        self._metric_sums: dict[str, float] = defaultdict(float)
        self._metric_counts: dict[str, int] = defaultdict(int)
        self._trainable: list | None = None
        self._groups_since_log, self._last_log_time = 0, None
        self.sharded = distributed.shards_base()
        if self.sharded:   # before the optimizer exists: it must hold the sharded parameters
            # decoder layers only: ranks whose micro-batches differ in media (an image on one, text only or a
            # video on the other) must make the same collectives, and only the decoder runs on every forward
            distributed.shard_frozen(model, events)
        super().__init__(model=model, args=args, train_dataset=GroupIndexDataset(len(self.groups)),
                         data_collator=lambda idx: collate([self.groups[i] for i in idx]))
        # compute_loss gets the optimizer step's item counts (summed over micro-batches and ranks) and
        # returns this micro-batch's share of the step's mean, so Trainer must not divide by grad_accum
        self.model_accepts_loss_kwargs = True
        self.remove_callback(PrinterCallback)  # metrics reach the terminal through the event stream
        self.add_callback(_EventsCallback(self))

    def group_loss(self, model, batch, norm: dict[str, float] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss, metrics) of one micro-batch; with `norm` (the step's counts of `step_counts`, summed
        over the step's micro-batches and ranks) the loss is the batch's share of the step's mean."""
        raise NotImplementedError

    def step_counts(self, batch) -> dict[str, float]:
        """What the loss averages over in one micro-batch (pairs, ...), to be summed over the step."""
        raise NotImplementedError

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        """One optimizer step's micro-batches, with the step's counts in place of transformers' token count
        (`num_items_in_batch`, then passed to compute_loss)."""
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        return batch_samples, self._step_counts(batch_samples, device)

    def _step_counts(self, batch_samples: list, device: torch.device) -> dict[str, float] | None:
        """The optimizer step's counts: summed over its micro-batches here and over all ranks (as
        transformers does for `num_items_in_batch` tokens), so the step's loss is the mean over all of its
        pairs however they are split into micro-batches, accumulation steps and ranks."""
        counts = [self.step_counts(b) for b in batch_samples]
        keys = sorted({k for c in counts for k in c}) if counts else []
        if self.args.world_size > 1:
            keys = self._agreed_keys(keys)
        if not keys:
            return None
        total = torch.tensor([[c.get(k, 0.0) for k in keys] for c in counts] or [[0.0] * len(keys)],
                             dtype=torch.float64).sum(0)
        if self.args.world_size > 1:
            total = self.accelerator.reduce(total.to(device), reduction="sum").cpu()
        return dict(zip(keys, total.tolist()))

    def _agreed_keys(self, keys: list[str]) -> list[str]:
        """Every rank must reduce the same vector: the union of the count names of all ranks."""
        import torch.distributed as dist
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, keys)
        return sorted({k for g in gathered for k in g})

    # ---- FSDP2 (docs/distributed.md): the base is sharded by `distributed.shard_model`, not by accelerate
    def _wrap_model(self, model, training: bool = True, dataloader=None):
        if self.sharded and training:
            if isinstance(model, ShardedModel):
                return model
            return ShardedModel(model)  # not `self.model`: Trainer then does not DDP-wrap it
        return super()._wrap_model(model, training, dataloader)

    def trainable_state(self) -> dict[str, torch.Tensor] | None:
        """Sharded: the full trainable parameters by name (collective: every rank calls it); else None."""
        return distributed.trainable_state(self.model) if self.sharded else None

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not self.sharded:
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir or self.args.output_dir
        state = distributed.trainable_state(self.model)   # every rank takes part in the gather
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            self._save(output_dir, state_dict=state)       # a normal adapter, loadable in one process
            from safetensors.torch import save_file
            save_file(state, os.path.join(output_dir, SHARDED_STATE))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        path = os.path.join(resume_from_checkpoint, SHARDED_STATE)
        if os.path.isfile(path) != self.sharded:   # the optimizer states of the two are laid out differently
            from .runs import RunFolderError
            wrote, now = ("an FSDP launch", "without FSDP") if not self.sharded else ("a run without FSDP",
                                                                                        "with FSDP")
            raise RunFolderError(
                f"{resume_from_checkpoint} was written by {wrote} and this run is {now}: resume with the launch "
                "that wrote it (recipes/accelerate/fsdp2.yaml or not; the number of processes may change), or "
                f"start the stage again with --redo {self.events.stage or 'STAGE'}")
        if not self.sharded:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        from safetensors.torch import load_file
        distributed.load_trainable_state(self.model, load_file(path))

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.sharded:
            return super()._save_optimizer_and_scheduler(output_dir)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        full = get_optimizer_state_dict(self.model, _raw_optimizer(self.optimizer),
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.args.should_save:   # one full optimizer state, whatever the number of ranks
            torch.save(full, os.path.join(output_dir, "optimizer.pt"))
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, "scheduler.pt"))

    def _load_optimizer_and_scheduler(self, checkpoint):
        """Under a CPU launcher (gloo) transformers maps the optimizer state to `cpu:0`, which torch.load
        cannot restore; load it on the CPU as a single process does. Sharded: every rank reads the full
        state and keeps its shards."""
        if checkpoint is not None and self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
            opt, sched = os.path.join(checkpoint, "optimizer.pt"), os.path.join(checkpoint, "scheduler.pt")
            if os.path.isfile(opt) and os.path.isfile(sched):
                set_optimizer_state_dict(self.model, _raw_optimizer(self.optimizer),
                                         torch.load(opt, map_location="cpu", weights_only=True),
                                         options=StateDictOptions(full_state_dict=True))
                self.lr_scheduler.load_state_dict(torch.load(sched, weights_only=True))
            return
        if checkpoint is None or self.args.world_size <= 1 or self.args.device.type != "cpu":
            return super()._load_optimizer_and_scheduler(checkpoint)
        opt, sched = os.path.join(checkpoint, "optimizer.pt"), os.path.join(checkpoint, "scheduler.pt")
        if os.path.isfile(opt) and os.path.isfile(sched):
            self.optimizer.load_state_dict(torch.load(opt, map_location="cpu", weights_only=True))
            self.lr_scheduler.load_state_dict(torch.load(sched, weights_only=True))

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.sharded:  # reduce-scatter once per optimizer step (its last micro-batch), not per micro-batch
            distributed.sharded_root(self.model).set_requires_gradient_sync(self.accelerator.sync_gradients)
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.args.world_size > 1 and not self.sharded and self.accelerator.sync_gradients:  # last micro-batch
            # (sharded: FSDP reduce-scatters and averages the gradients itself)
            if self._trainable is None:
                self._trainable = [p for p in self.model.parameters() if p.requires_grad]
            distributed.average_gradients(self._trainable)
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, metrics = distributed.through_root(model, lambda: self.group_loss(model, inputs, norm=num_items_in_batch))
        if num_items_in_batch is not None:
            # gradients are averaged over ranks (average_gradients, or FSDP's reduce-scatter when sharded);
            # the shares of all ranks must add up
            loss = loss * self.accelerator.num_processes
        self._groups_since_log += len(inputs.get("encoded", ()))
        for k, v in metrics.items():
            if v is not None and math.isfinite(v):
                self._metric_sums[k] += float(v)
                self._metric_counts[k] += 1
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            for k in list(self._metric_sums):
                logs[k] = self._metric_sums[k] / max(1, self._metric_counts[k])
            self._metric_sums.clear()
            self._metric_counts.clear()
            step_logs = {k: v for k, v in logs.items() if isinstance(v, (int, float))}
            step_logs.update(self._throughput())
            if torch.cuda.is_available():
                step_logs["gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
            self.events.metrics(step=self.state.global_step, **step_logs)
        super().log(logs, start_time)

    def _throughput(self) -> dict[str, float]:
        """Groups per second since the last log: over all ranks, and per rank under a launcher (every
        rank logs at the same steps, so the gather below is collective)."""
        now = time.time()
        start, groups = self._last_log_time or self._train_start, self._groups_since_log
        self._last_log_time, self._groups_since_log = now, 0
        rate = groups / max(now - start, 1e-9)
        if self.args.world_size <= 1:
            return {"groups_per_s": rate}
        rates = distributed.gather_objects(rate)
        return {"groups_per_s": sum(rates), **{f"rank{i}_groups_per_s": r for i, r in enumerate(rates)}}

    def train(self, *args, **kwargs):
        self._train_start, self._last_log_time, self._groups_since_log = time.time(), None, 0
        return super().train(*args, **kwargs)


SHARDED_STATE = "sharded_trainable.safetensors"   # a sharded run's checkpoint: trainable parameters by name


def _raw_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)   # accelerate's AcceleratedOptimizer wraps it


def run_training(trainer: GroupTrainer, out_dir: Path) -> dict:
    """Train (resuming from the newest checkpoint in out_dir) and return the final log history entry.

    Raises StageStopped after saving a checkpoint when a stop was requested.
    """
    last = distributed.main_first("resume point", lambda: last_complete_checkpoint(out_dir, trainer.events))
    if last:
        trainer.events.info(f"resuming from {last}")
    result = trainer.train(resume_from_checkpoint=last)
    if trainer.stopped:
        raise StageStopped(f"stopped at step {trainer.state.global_step}; checkpoint saved in {out_dir}")
    return {"train_loss": result.training_loss, "steps": trainer.state.global_step,
            "seconds": result.metrics.get("train_runtime")}


def last_complete_checkpoint(out_dir: Path, events: EventLog | None = None) -> str | None:
    """The newest checkpoint that was fully written. Trainer writes `trainer_state.json` last, so a kill
    during a save leaves a newer folder without a readable one: it is removed (it cannot be resumed and
    would be taken as the newest) and the one before is used."""
    if not out_dir.exists():
        return None
    candidates = sorted((d for d in out_dir.glob("checkpoint-*") if d.name.split("-")[-1].isdigit()),
                        key=lambda d: int(d.name.split("-")[-1]), reverse=True)
    for d in candidates:
        try:
            json.loads((d / "trainer_state.json").read_text())
            return str(d)
        except (OSError, ValueError):
            if events is not None:
                events.warning(f"{d.name} was not completely written (interrupted save); removed")
            shutil.rmtree(d, ignore_errors=True)
    return None


def remove_checkpoints(out_dir: Path) -> None:
    """After the final adapter is saved, the resume checkpoints (optimizer state) are not needed."""
    for d in out_dir.glob("checkpoint-*"):
        shutil.rmtree(d, ignore_errors=True)
