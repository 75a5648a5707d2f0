"""One run, N processes: the seam between a stage and the launch it runs in. A stage reads as if it ran in
one process and asks this package a few questions; in one process every answer is the plain one.

What a stage asks (the whole interface; docs/distributed.md, "The seam"):

| a stage wants to                                | it calls                                           | one process          |
|-------------------------------------------------|----------------------------------------------------|----------------------|
| hold the model it loaded as the launch says     | `shard(model, events)` (after `load_model(..., shard=True)`) | nothing    |
| know whether its model is sharded (to refuse what sharding cannot do) | `shards_base()`              | False                |
| run a forward that calls the model's parts      | `forward(model, lambda: ...)`                      | calls it             |
| work on its share of the items                  | `shares(item_keys)`                                | all of them          |
| run batches together with the other ranks, with one agreed stop point and global progress | `run_in_lockstep(batches, work, idle_forward=..., ...)` | a loop |
| map a function over chunks dealt to the ranks, every rank getting every result | `sharded_map(items, size, fn, ...)`, `chunk_seed` | a loop |
| take a branch when any rank says so (a stop request seen, entries missing) | `any_rank(flag)`      | `flag`               |
| write the run folder once (rank 0), every rank getting the result | `on_main(what, fn)`              | `fn()`               |
| wait until every rank got here                  | `barrier(what)`                                    | nothing              |
| train over the ranks                            | `class GroupTrainer(TrainerOverRanks, Trainer)`    | the plain Trainer    |

and the CLI (train.py) starts and ends the launch: `start(backend, device_type) -> Launch`, `destroy()`,
and every rank's process ends through `exit_rank(code)`.
Failures of another rank, or a collective past its timeout, raise `RankFailure`.

Behind the seam: the launcher (`torchrun` / `accelerate launch`) starts N copies of `python -m
mmrlhf_lite.train recipe.yaml` with RANK / WORLD_SIZE / LOCAL_RANK set. Rank 0 owns the run folder (lock,
recipe, events.jsonl, data preparation, stage status); the other ranks get what it wrote through `on_main`.
Training stages are data-parallel (`TrainerOverRanks` averages the trainable gradients once per step), or,
under accelerate's FSDP launch (`check_launch` reads the choice), hold the base sharded over the ranks
(`shard_model`; `load_model(..., shard=True)` loads it straight into the shards, models/sharded_loading.py).
Score / reference / eval split their groups over the ranks and run them in lockstep: the same number of
steps on every rank, and, when the model is sharded, a forward on every rank in every step (a rank without a
batch runs the stage's `idle_forward`, since FSDP forwards are collectives). Without the launcher's
variables (a plain `python -m ...`) every helper is a no-op.

The package's modules, each importable alone:
- `launch`: rank, world size, the sharding choice, `alone()`: the environment only;
- `collectives`: `start`, `init`, barriers, sums, gathers, `on_main`, `any_rank`, `average_gradients`,
  `destroy`, `exit_rank`;
- `fsdp`: sharding the frozen base (`shard_model`, `shard`), `forward` through the root unit, trainable
  state to and from shards;
- `lockstep`: the work split by content (`shares`), batches run in lockstep, `sharded_map`;
- `trainer`: `TrainerOverRanks`, the Trainer overrides a launch needs.

    torchrun --nproc_per_node 2 -m mmrlhf_lite.train recipes/demo.yaml
"""
from .collectives import (Launch, all_reduce_max, all_reduce_sum, any_rank, average_gradients, barrier, destroy,
                          exit_rank, gather, init, on_main, start)
from .fsdp import (forward, load_trainable_state, shard, shard_model, shard_units, sharded_numel, sharded_root,
                   trainable_state)
from .launch import (DEFAULT_TIMEOUT_S, DEFAULT_WAIT_S, SUPPORTED, TIMEOUT_ENV, WAIT_TIMEOUT_ENV, RankFailure, alone,
                     check_launch, is_distributed, is_main, local_rank, rank, sharding, shards_base, timeout_s,
                     world_size)
from .lockstep import chunk_seed, rank_of, run_in_lockstep, shares, sharded_map
from .trainer import TrainerOverRanks

# what a stage may call (tests/test_architecture.py holds the stage modules to it)
SEAM = ("shard", "shards_base", "forward", "shares", "run_in_lockstep", "sharded_map", "chunk_seed", "any_rank",
        "on_main", "barrier", "TrainerOverRanks", "RankFailure")

__all__ = ["DEFAULT_TIMEOUT_S", "DEFAULT_WAIT_S", "SEAM", "SUPPORTED", "TIMEOUT_ENV", "WAIT_TIMEOUT_ENV", "Launch",
           "RankFailure", "TrainerOverRanks", "all_reduce_max", "all_reduce_sum", "alone", "average_gradients",
           "barrier", "check_launch", "chunk_seed", "destroy", "exit_rank", "forward", "gather", "init", "is_distributed",
           "is_main", "load_trainable_state", "local_rank", "on_main", "rank", "rank_of", "run_in_lockstep", "shard",
           "shard_model", "shard_units", "sharded_map", "shares", "sharded_numel", "sharded_root", "sharding",
           "shards_base", "start", "any_rank", "timeout_s", "trainable_state", "world_size"]
