"""One run, N processes: what a stage asks of the launch it runs in, each answer a no-op in one process.

The launcher (`torchrun` / `accelerate launch`) starts N copies of `python -m mmrlhf_lite.train recipe.yaml`
with RANK / WORLD_SIZE / LOCAL_RANK set. Rank 0 owns the run folder (lock, recipe, events.jsonl, data
preparation, stage status); the other ranks wait for what it writes and then read it (`main_first`).
Training stages are data-parallel (the trainers are `transformers.Trainer`s; `average_gradients` averages
the trainable gradients once per step), or, under accelerate's FSDP launch, hold the base sharded over the
ranks (`check_launch` reads the choice, `shard_model` applies FSDP2, `through_root` runs the packed forward
in its root unit). Score / reference / eval split their groups over the ranks and run them in lockstep
(`lockstep.run_in_lockstep`, `lockstep.sharded_map`), with global progress and one agreed stop point.
Without the launcher's variables (a plain `python -m ...`) every helper is a no-op.

The package's modules, each importable alone:
- `launch`: rank, world size, the sharding choice, `alone()`: the environment only;
- `collectives`: `init`, barriers, sums, gathers, `main_first`, `average_gradients`, `destroy`;
- `fsdp`: sharding the frozen base, forwards through the root unit, trainable state to and from shards;
- `lockstep`: a work list split over the ranks, run batch by batch together.

    torchrun --nproc_per_node 2 -m mmrlhf_lite.train recipes/demo.yaml
"""
from .collectives import (all_reduce_max, all_reduce_sum, any_rank, average_gradients, barrier, destroy,
                          gather_objects, init, main_first)
from .fsdp import (load_trainable_state, shard_frozen, shard_model, shard_units, sharded_numel, sharded_root,
                   through_root, trainable_state)
from .launch import (DEFAULT_TIMEOUT_S, DEFAULT_WAIT_S, SUPPORTED, TIMEOUT_ENV, WAIT_TIMEOUT_ENV, RankFailure, alone,
                     check_launch, is_distributed, is_main, local_rank, rank, sharding, shards_base, timeout_s,
                     world_size)

__all__ = ["DEFAULT_TIMEOUT_S", "DEFAULT_WAIT_S", "SUPPORTED", "TIMEOUT_ENV", "WAIT_TIMEOUT_ENV", "RankFailure",
           "all_reduce_max", "all_reduce_sum", "alone", "any_rank", "average_gradients", "barrier", "check_launch",
           "destroy", "gather_objects", "init", "is_distributed", "is_main", "load_trainable_state", "local_rank",
           "main_first", "rank", "shard_frozen", "shard_model", "shard_units", "sharded_numel", "sharded_root",
           "sharding", "shards_base", "through_root", "timeout_s", "trainable_state", "world_size"]
