"""The one training loop both trainers share: a `transformers.Trainer` subclass over preference groups.

Resume, gradient accumulation, schedulers, checkpoint rotation, `report_to` logging and the data
sharding of `torchrun` / `accelerate launch` come from the library. Subclasses give
`group_loss(model, batch, norm) -> (loss, metrics)` and `step_counts(batch)` (what the loss averages
over); the loss of an optimizer step is the mean over all of its pairs however the step is split into
micro-batches, accumulation steps and ranks (the step's counts are summed and passed as `norm`, as
transformers does with `num_items_in_batch`). Under a launcher `distributed.TrainerOverRanks` sums those
counts over the ranks, averages the gradients (or lets FSDP2 reduce-scatter them) and saves and loads sharded
checkpoints (docs/distributed.md): this module reads as one process. The collator turns group indices into
encoded groups.
Progress and metrics go to the run's event stream; a stop request (the run folder's STOP file, SIGTERM,
Ctrl-C) saves a checkpoint and raises `StageStopped` (on every rank at the same step), and the next
invocation resumes from it. A checkpoint is complete once every rank's part of it is written: rank 0 then
writes its `checkpoint_complete.json` (after a barrier) and only then removes checkpoints beyond
`save_total_limit`; a resume takes the newest complete one, so a rank killed while saving (its
`rng_state_N.pth` cut short) costs the steps since the checkpoint before, never a crash on every resume.
An inf/NaN loss stops the stage (`NonFiniteLoss`) before it reaches the weights, naming the fix for the
compute dtype (float16 on GPUs without native bf16: models/precision.py).

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
from .models.precision import NonFiniteLoss, overflow_fix, policy_forward_context, trainer_precision
from .recipe import TrainConfig
from .runs import write_atomic

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


AUTO_WORKERS_PER_PROCESS = 4   # CUDA: decoding + templating of the next batches, a few groups each


def dataloader_workers(setting: int | None, device: torch.device) -> int:
    """`train.dataloader_workers`: None (auto) = collation in worker processes on CUDA (image decoding, chat
    templating and mask building of the next micro-batches run beside the GPU step; under a launcher every
    rank has its own), min(4, cores per process - 1); 0 on CPU, where workers would take cores from the
    step's own compute threads. An explicit number is used as given."""
    if setting is not None:
        return setting
    if device.type != "cuda":
        return 0
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    per_process = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(0, min(AUTO_WORKERS_PER_PROCESS, per_process - 1))


def training_arguments(cfg: TrainConfig, out_dir: Path, *, device: torch.device, dtype: torch.dtype,
                       seed: int, report_to: str) -> TrainingArguments:
    workers = dataloader_workers(cfg.dataloader_workers, device)
    if workers:   # the tokenizer runs in the forked workers: without this, each fork warns and turns it off
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
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
        **trainer_precision(device, dtype),
        seed=seed,
        data_seed=seed,
        remove_unused_columns=False,
        # workers only collate (the sampler stays in the main process): the same batches in the same order as
        # without them, and a resumed run skips the same ones
        dataloader_num_workers=workers,
        dataloader_persistent_workers=workers > 0,
        dataloader_prefetch_factor=2 if workers > 0 else None,
        disable_tqdm=True,
        gradient_checkpointing=False,  # enabled by the loader (non-reentrant, input grads on)
    )


class _EventsCallback(TrainerCallback):
    def __init__(self, trainer: "GroupTrainer"):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._last_log_step = state.global_step   # after a resumed checkpoint's state is loaded

    def on_step_end(self, args, state, control, **kwargs):
        t = self.trainer
        t.events.progress(state.global_step, state.max_steps, unit="step")
        if distributed.any_rank(t.stop_check()):  # every rank stops at the same step
            t.stopped = True
            control.should_save = True
            control.should_training_stop = True
        return control


COLLATE_SECONDS = "collate_seconds"   # a batch's own collation time, measured where it was collated


class CollateGroups:
    """The Trainer's collator: group indices -> the stage's encoded batch, timed. A plain object, not a
    closure over the Trainer, so that a DataLoader worker gets the groups and the encoder only (and it pickles
    where workers are spawned rather than forked)."""

    def __init__(self, groups: Sequence, collate: Callable[[list], Any]):
        self.groups, self.collate = groups, collate

    def __call__(self, indices: list[int]) -> dict:
        start = time.perf_counter()
        batch = self.collate([self.groups[i] for i in indices])
        batch[COLLATE_SECONDS] = time.perf_counter() - start
        return batch


CHECKPOINT_COMPLETE = "checkpoint_complete.json"   # in a checkpoint folder once every rank's part is written
TRAIN_RESULT = "train_result.json"                 # in a training stage's folder once its model is saved


class _CheckpointCompletion(TrainerCallback):
    """After every rank saved its part of a checkpoint (transformers saves each rank's RNG state, rank 0
    the rest), rank 0 marks it complete and removes the complete checkpoints beyond the `keep` newest
    (transformers' own rotation would remove the one before while another rank still writes the new one)."""

    def __init__(self, keep: int | None):
        self.keep = keep

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        distributed.barrier(f"{folder.name} saved by every rank")
        distributed.on_main(f"{folder.name} complete", lambda: mark_complete(folder, self.keep))
        return control


class GroupTrainer(distributed.TrainerOverRanks, Trainer):
    """Trainer over preference groups; subclasses implement `group_loss`."""

    def __init__(self, model, args: TrainingArguments, *, groups: Sequence, collate: Callable[[list], Any],
                 events: EventLog, stop_check: Callable[[], bool] = lambda: False):
        self.groups = list(groups)
        self.events = events
        self.stop_check = stop_check
        self.stopped = False
        self._metric_sums: dict[str, float] = defaultdict(float)
        self._metric_counts: dict[str, int] = defaultdict(int)
        loaded = getattr(model, "mmrlhf", None)      # models.loading.LoadedModel: the device and compute dtype
        self.compute_device = loaded.device if loaded is not None else args.device
        self.compute_dtype = loaded.dtype if loaded is not None else None
        self._groups_since_log, self._last_log_time = 0, None
        self._collate_seconds = self._data_wait_seconds = 0.0   # since the last log
        self._last_log_step = 0
        keep, args.save_total_limit = args.save_total_limit, None   # rotated once complete (_CheckpointCompletion)
        distributed.shard(model, events)   # before the optimizer exists: it must hold the sharded parameters
        super().__init__(model=model, args=args, train_dataset=GroupIndexDataset(len(self.groups)),
                         data_collator=CollateGroups(self.groups, collate))
        # compute_loss gets the optimizer step's item counts (summed over micro-batches and ranks) and
        # returns this micro-batch's share of the step's mean, so Trainer must not divide by grad_accum
        self.model_accepts_loss_kwargs = True
        self.remove_callback(PrinterCallback)  # metrics reach the terminal through the event stream
        self.add_callback(_EventsCallback(self))
        self.add_callback(_CheckpointCompletion(keep))

    def group_loss(self, model, batch, norm: dict[str, float] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss, metrics) of one micro-batch; with `norm` (the step's counts of `step_counts`, summed
        over the step's micro-batches and ranks) the loss is the batch's share of the step's mean."""
        raise NotImplementedError

    def step_counts(self, batch) -> dict[str, float]:
        """What the loss averages over in one micro-batch (pairs, ...), to be summed over the step."""
        raise NotImplementedError

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        """One optimizer step's micro-batches, with the step's counts in place of transformers' token count
        (`num_items_in_batch`, then passed to compute_loss): summed over its micro-batches and over all ranks,
        so the step's loss is the mean over all of its pairs however they are split into micro-batches,
        accumulation steps and ranks."""
        start = time.perf_counter()
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._data_wait_seconds += time.perf_counter() - start   # what collation costs the step's critical path
        return batch_samples, self.summed_over_ranks([self.step_counts(b) for b in batch_samples], device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._collate_seconds += float(inputs.pop(COLLATE_SECONDS, 0.0))
        with policy_forward_context(self.compute_device):   # the reference pass's numerics (models/precision.py)
            loss, metrics = distributed.forward(model, lambda: self.group_loss(model, inputs, norm=num_items_in_batch))
        self._check_finite(loss)
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

    def _check_finite(self, loss: torch.Tensor) -> None:
        """Stop at the first inf/NaN loss, before its gradients reach the weights (the last checkpoint stays
        good), with the fix for the dtype in use. transformers would log the step's loss as filtered and train
        on; under float16's loss scaling the steps would be skipped one by one. Every rank stops together."""
        bad = not bool(torch.isfinite(loss.detach()).all())
        if self.args.world_size > 1:
            bad = distributed.any_rank(bad)
        if not bad:
            return
        dtype = self.compute_dtype or loss.dtype
        value = "a NaN" if bool(loss.detach().isnan().any()) else "an inf"
        stage = self.events.stage or "training"
        raise NonFiniteLoss(f"{stage}: the loss is {value} at step {self.state.global_step + 1} in "
                            f"{str(dtype).replace('torch.', '')}; {overflow_fix(dtype)} (the checkpoints written "
                            f"so far in {self.args.output_dir} are kept)")

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
        """Since the last log: groups per second over all ranks (and per rank under a launcher: every rank
        logs at the same steps, so `per_rank` is collective); per optimizer step of this process, its wall
        time `step_s`, the seconds spent collating its batches `collate_s` (in workers or not) and the seconds
        the step waited for them `data_wait_s` (0 when workers keep up)."""
        now = time.time()
        start, groups = self._last_log_time or self._train_start, self._groups_since_log
        steps = max(1, self.state.global_step - self._last_log_step)
        timing = {"step_s": (now - start) / steps, "collate_s": self._collate_seconds / steps,
                  "data_wait_s": self._data_wait_seconds / steps}
        self._last_log_time, self._groups_since_log, self._last_log_step = now, 0, self.state.global_step
        self._collate_seconds = self._data_wait_seconds = 0.0
        rates = self.per_rank(groups / max(now - start, 1e-9))
        if len(rates) == 1:
            return {"groups_per_s": rates[0], **timing}
        return {"groups_per_s": sum(rates), **{f"rank{i}_groups_per_s": r for i, r in enumerate(rates)}, **timing}

    def train(self, *args, **kwargs):
        self._train_start, self._last_log_time, self._groups_since_log = time.time(), None, 0
        self._last_log_step = 0   # a resumed run's checkpoint step: _EventsCallback.on_train_begin
        return super().train(*args, **kwargs)


def run_training(trainer: GroupTrainer, out_dir: Path) -> dict:
    """Train (resuming from the newest checkpoint in out_dir) and return the final log history entry.

    Raises StageStopped after saving a checkpoint when a stop was requested.
    """
    last = distributed.on_main("resume point", lambda: last_complete_checkpoint(out_dir, trainer.events))
    if last:
        trainer.events.info(f"resuming from {last}")
    result = trainer.train(resume_from_checkpoint=last)
    if trainer.stopped:
        raise StageStopped(f"stopped at step {trainer.state.global_step}; checkpoint saved in {out_dir}")
    return {"train_loss": result.training_loss, "steps": trainer.state.global_step,
            "seconds": result.metrics.get("train_runtime")}


def checkpoints(out_dir: Path) -> list[Path]:
    """The `checkpoint-N` folders of a training stage, newest first."""
    found = [d for d in out_dir.glob("checkpoint-*") if d.name.split("-")[-1].isdigit()] if out_dir.exists() else []
    return sorted(found, key=lambda d: int(d.name.split("-")[-1]), reverse=True)


def mark_complete(folder: Path, keep: int | None) -> None:
    """Mark a checkpoint complete (every rank's part is written), then remove the checkpoints older than the
    `keep` newest complete ones (all kept when `keep` is None)."""
    write_atomic(folder / CHECKPOINT_COMPLETE, json.dumps({"step": int(folder.name.split("-")[-1])}) + "\n")
    complete = [d for d in checkpoints(folder.parent) if (d / CHECKPOINT_COMPLETE).exists()]
    if keep and len(complete) > keep:
        oldest_kept = int(complete[keep - 1].name.split("-")[-1])
        for d in checkpoints(folder.parent):
            if int(d.name.split("-")[-1]) < oldest_kept:
                shutil.rmtree(d, ignore_errors=True)


def _parts_read_whole(folder: Path) -> bool:
    """A checkpoint written before completion markers existed: its trainer state parses and each rank's RNG
    state (a torch.save zip archive) reads to its end with matching checksums."""
    import zipfile

    try:
        json.loads((folder / "trainer_state.json").read_text())
        for part in folder.glob("rng_state*.pth"):
            with zipfile.ZipFile(part) as archive:
                if archive.testzip() is not None:
                    return False
        return True
    except (OSError, ValueError, zipfile.BadZipFile):
        return False


def last_complete_checkpoint(out_dir: Path, events: EventLog | None = None) -> str | None:
    """The newest complete checkpoint: the newest with its completion marker (`mark_complete`). Newer ones
    are what a kill during a save left (a rank's part missing or cut short): they are removed, since they
    cannot be resumed and would be taken as the newest, and the one before is used. In a folder of
    checkpoints written before the markers existed, a checkpoint counts as complete when its parts read
    whole (`_parts_read_whole`)."""
    found = checkpoints(out_dir)
    before_markers = not any((d / CHECKPOINT_COMPLETE).exists() for d in found)
    for d in found:
        if _parts_read_whole(d) if before_markers else (d / CHECKPOINT_COMPLETE).exists():
            return str(d)
        if events is not None:
            events.warning(f"{d.name} was not completely written (interrupted save); removed")
        shutil.rmtree(d, ignore_errors=True)
    return None


def finished_result(out_dir: Path, final: Path, events: EventLog) -> dict | None:
    """A training stage's result when its model is already saved (killed before the stage was marked done),
    else None (train, resuming from its checkpoints). A `train_result.json` that does not parse (written
    before it was written atomically, and cut by a kill) costs its numbers, not the trained model."""
    from .models.loading import ModelLoadError, check_saved_files

    path = out_dir / TRAIN_RESULT
    if not (path.exists() and (final / "adapter_config.json").exists()):
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        try:
            check_saved_files(final, "trained adapter")
        except ModelLoadError:
            return None
        events.warning(f"{path} is damaged (an interrupted write); the trained model in {final} is kept and "
                       "its training numbers are lost")
        result = {"train_result": f"lost: {path.name} was damaged; the model in {final.name}/ is complete"}
        write_result(out_dir, result)
        return result


def write_result(out_dir: Path, result: dict) -> None:
    write_atomic(out_dir / TRAIN_RESULT, json.dumps(result, indent=2))


def remove_checkpoints(out_dir: Path) -> None:
    """After the final adapter is saved, the resume checkpoints (optimizer state) are not needed."""
    for d in out_dir.glob("checkpoint-*"):
        shutil.rmtree(d, ignore_errors=True)
