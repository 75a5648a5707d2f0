"""What wraps a transformers model here, and `unwrap` to look through it: peft, DDP, `torch.compile` and
`ShardedModel` (the trainers' handle on a model whose base FSDP2 sharded, distributed/fsdp.py).

A leaf module (torch only): the loaders, the forwards and the distributed helpers all need `unwrap`, so it
lives below them and imports run one way.

    python -m pytest tests/test_loading.py -q -k unwrap
"""
from __future__ import annotations

import torch


class ShardedModel(torch.nn.Module):
    """The trainer's handle on a model whose base `distributed.shard_model` sharded: transformers.Trainer takes
    a model it did not build as already wrapped, so accelerate neither wraps it in DDP (which cannot hold
    DTensors) nor shards it again."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):  # the trainers call the model's parts through `distributed.forward`
        return self.module(*args, **kwargs)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers `...ForConditionalGeneration` under peft/DDP/compile/`ShardedModel` wrappers."""
    while True:
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif isinstance(model, (torch.nn.parallel.DistributedDataParallel, ShardedModel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
