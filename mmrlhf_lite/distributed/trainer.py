"""What `transformers.Trainer` needs to train over the ranks of a launch, in one mixin (`TrainerOverRanks`), so
that the training loop (`training.GroupTrainer`) reads as one process.

transformers and accelerate already shard the data over the ranks (the DataLoader's sampler) and save each
rank's RNG state. This adds what the packed forward and FSDP2 need:
- the optimizer step's counts (pairs, ties, critiques: what the loss averages over) summed over the ranks,
  under the union of their names (`summed_over_ranks`), so the step's loss is the mean over all of its pairs
  however they are split (docs/distributed.md, "The step objective");
- data-parallel: the trainable gradients averaged once per optimizer step (`average_gradients`), since the
  packed forward calls the model below the DDP wrapper and DDP's hooks never fire;
- FSDP2 (`shards_base()`): the model is not wrapped again (`ShardedModel`), FSDP reduce-scatters once per
  optimizer step (gradient sync off on the other micro-batches), and a checkpoint holds a normal adapter,
  the trainable parameters by name (`sharded_trainable.safetensors`) and one full optimizer state, which
  every rank reads back on resume, keeping its shards; a checkpoint of the other kind is refused;
- per-rank numbers for the logs (`per_rank`).
In one process every one of these is the plain Trainer's behaviour.

    python -m pytest tests/test_distributed.py tests/test_fsdp.py -q
"""
from __future__ import annotations

import os

import torch

from ..models.wrappers import ShardedModel
from .collectives import average_gradients, gather
from .fsdp import load_trainable_state, sharded_root, trainable_state
from .launch import shards_base

SHARDED_STATE = "sharded_trainable.safetensors"   # a sharded run's checkpoint: trainable parameters by name


def _raw_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)   # accelerate's AcceleratedOptimizer wraps it


class TrainerOverRanks:
    """Mixed in before `transformers.Trainer`: `class GroupTrainer(TrainerOverRanks, Trainer)`."""

    _trainable: list | None = None

    @property
    def sharded(self) -> bool:
        """The base is sharded over the ranks (FSDP2); `distributed.shard` sharded it before the optimizer."""
        return shards_base()

    def summed_over_ranks(self, counts: list[dict[str, float]], device: torch.device) -> dict[str, float] | None:
        """Named counts (one dict per micro-batch of this rank) summed over the micro-batches and over all
        ranks, as transformers sums `num_items_in_batch` tokens; None when there is nothing to count. Every
        rank must reduce the same vector: its names are the union of all ranks' names."""
        keys = sorted({k for c in counts for k in c}) if counts else []
        several = self.args.world_size > 1
        if several:
            keys = sorted({k for ks in gather(keys) for k in ks})
        if not keys:
            return None
        total = torch.tensor([[c.get(k, 0.0) for k in keys] for c in counts] or [[0.0] * len(keys)],
                             dtype=torch.float64).sum(0)
        if several:
            total = self.accelerator.reduce(total.to(device), reduction="sum").cpu()
        return dict(zip(keys, total.tolist()))

    def per_rank(self, value) -> list:
        """Every rank's `value`, in rank order (collective under a launcher; one process: [value])."""
        return gather(value) if self.args.world_size > 1 else [value]

    def _wrap_model(self, model, training: bool = True, dataloader=None):
        if self.sharded and training:
            if isinstance(model, ShardedModel):
                return model
            return ShardedModel(model)  # not `self.model`: Trainer then does not DDP-wrap it
        return super()._wrap_model(model, training, dataloader)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.sharded:  # reduce-scatter once per optimizer step (its last micro-batch), not per micro-batch
            sharded_root(self.model).set_requires_gradient_sync(self.accelerator.sync_gradients)
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.args.world_size > 1 and not self.sharded and self.accelerator.sync_gradients:  # last micro-batch
            # (sharded: FSDP reduce-scatters and averages the gradients itself)
            if self._trainable is None:
                self._trainable = [p for p in self.model.parameters() if p.requires_grad]
            average_gradients(self._trainable)
        return loss

    def trainable_state(self) -> dict[str, torch.Tensor] | None:
        """Sharded: the full trainable parameters by name (collective: every rank calls it); else None (the
        model holds them whole)."""
        return trainable_state(self.model) if self.sharded else None

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not self.sharded:
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir or self.args.output_dir
        state = trainable_state(self.model)   # every rank takes part in the gather
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            self._save(output_dir, state_dict=state)       # a normal adapter, loadable in one process
            from safetensors.torch import save_file
            save_file(state, os.path.join(output_dir, SHARDED_STATE))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        path = os.path.join(resume_from_checkpoint, SHARDED_STATE)
        if os.path.isfile(path) != self.sharded:   # the optimizer states of the two are laid out differently
            from ..runs import RunFolderError
            wrote, now = ("an FSDP launch", "without FSDP") if not self.sharded else ("a run without FSDP",
                                                                                        "with FSDP")
            raise RunFolderError(
                f"{resume_from_checkpoint} was written by {wrote} and this run is {now}: resume with the launch "
                "that wrote it (recipes/accelerate/fsdp2.yaml or not; the number of processes may change), or "
                f"start the stage again with --redo {self.events.stage or 'STAGE'}")
        if not self.sharded:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        from safetensors.torch import load_file
        load_trainable_state(self.model, load_file(path))

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
