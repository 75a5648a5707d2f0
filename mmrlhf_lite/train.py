"""The CLI and the one pipeline function that the UI and notebooks also call.

    python -m mmrlhf_lite.train recipes/demo.yaml                      # all stages
    python -m mmrlhf_lite.train recipes/demo.yaml --dry-run            # validate + plan, no model
    python -m mmrlhf_lite.train recipes/demo.yaml --stages reward,score dpo.beta=0.2 run.dir=runs/x

Stages run in order: reward -> score -> reference -> dpo -> eval -> rounds (online MM-DPO rounds, only with
rounds.n > 0 or `--rounds N`). Each reads the previous stages' files from the run folder, so any stage can be
re-run or resumed alone. Exit codes: 0 done,
1 error (a clear message, no traceback), 2 usage error / stage not available, 3 stopped on request
(resume with the same command).
"""
from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .events import EventLog, StageStopped
from .recipe import STAGES, Recipe, RecipeError, describe_fields, load_recipe
from .runs import RunDir, RunFolderError, cache_dir_of

log = logging.getLogger("mmrlhf_lite")

# stage -> "module:function(ctx)"; the module is imported only when the stage runs.
STAGE_RUNNERS = {
    "reward": "mmrlhf_lite.reward.trainer:run_stage",
    "score": "mmrlhf_lite.reward.scorer:run_stage",
    "reference": "mmrlhf_lite.cache.reference:run_stage",
    "dpo": "mmrlhf_lite.dpo.trainer:run_stage",
    "eval": "mmrlhf_lite.evaluate.pipeline:run_stage",
    "rounds": "mmrlhf_lite.rounds:run_stage",
}


class StageUnavailable(RuntimeError):
    pass


class UserError(RuntimeError):
    """Bad input (data, recipe, run folder): reported as one clear message."""


@dataclass
class RunContext:
    """What every stage gets: the recipe, the run folder, the event stream and the (lazily loaded) data."""
    recipe: Recipe
    run: RunDir
    events: EventLog
    _data: Any = field(default=None, repr=False)

    @property
    def run_dir(self) -> Path:
        return self.run.path

    @property
    def cache_dir(self) -> Path:
        return cache_dir_of(self.recipe)

    def data(self):
        """(train_groups, eval_groups): the human-ranked groups, loaded and validated once per process."""
        data = self.prepared()
        return data.train, data.evals

    def prepared(self):
        """All of the recipe's data (`data.PreparedData`): the ranked groups and the prompts for online rounds."""
        if self._data is None:
            from .data import load_data
            self._data = load_data(self.recipe, self.run.path, self.events)
        return self._data

    def stop_requested(self) -> bool:
        return self.run.stop_requested()

    def with_events(self, events: EventLog) -> "RunContext":
        """The same context (data included) writing to `events` (e.g. a view tagged with an online round)."""
        import dataclasses

        return dataclasses.replace(self, events=events)

    def reward_model_dir(self) -> Path:
        """The trained critique reward model: this run's, or the one of `reward.model_from`."""
        root = Path(self.recipe.reward.model_from) if self.recipe.reward.model_from else self.run.path
        return root / "reward" / "final"


def _runner(stage: str):
    module_name, func = STAGE_RUNNERS[stage].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("mmrlhf_lite"):
            raise StageUnavailable(f"stage '{stage}' is not available in this version") from None
        raise
    if not hasattr(module, func):
        raise StageUnavailable(f"stage '{stage}' is not available in this version")
    return getattr(module, func)


def run_pipeline(recipe: Recipe, stages: list[str] | None = None, *, redo: tuple[str, ...] = (),
                 echo: bool = True) -> RunContext:
    """Run `stages` (default: recipe.run.stages) into recipe.run.dir. Raises on error; `StageStopped`
    when a stop was requested (the stage saved its state; calling again resumes).

    Under `torchrun` / `accelerate launch` (docs/distributed.md) every rank calls this: rank 0 owns the
    run folder (lock, recipe, events, data preparation, stage status), the others wait for it and read;
    a stage is marked done once every rank has finished it."""
    from . import distributed

    stages = active_stages(recipe, stages or recipe.run.stages)
    launch = distributed.start(recipe.model.backend, "cuda" if recipe.model.device in ("cuda", "auto") else "cpu")
    main = launch.main
    run = RunDir(recipe.run.dir)
    if main:
        run.acquire()
    try:
        events = EventLog(run.path if main else None, echo=echo and main)
        ctx = RunContext(recipe=recipe, run=run, events=events)

        def setup() -> list[str]:
            for stage in redo:
                run.clear(stage)
                events.info(f"--redo {stage}: its earlier outputs were deleted")
            for stage, why in run.stale_stages().items():
                if stage in stages:
                    run.clear(stage)
                    events.info(f"stage {stage} is recomputed: {why}", stage=stage)
                else:
                    events.warning(f"stage {stage} is out of date ({why}); run it again with --stages {stage}",
                                   stage=stage)
            skip = run.check_recipe(recipe, stages)
            if "rounds" in skip and recipe.rounds.n > 0:
                from .rounds import rounds_pending

                if rounds_pending(run, recipe):  # rounds.n was raised: continue after the last finished round
                    skip.remove("rounds")
            from .checks import preflight_problems

            todo = [s for s in stages if s not in skip]
            problems = preflight_problems(recipe, todo)
            if launch.sharded:
                from .checks import FSDP_EVAL, fsdp_problems

                problems += fsdp_problems(recipe, todo)
                if "eval" in todo:
                    events.warning(FSDP_EVAL)
            if problems:
                raise UserError("not starting:\n" + "\n".join(f"  {p}" for p in problems))
            recipe.save(run.path / "recipe.yaml")
            events.emit("run_start", stages=stages, skip=skip, recipe=str(run.path / "recipe.yaml"),
                        **({"world_size": launch.world} if launch.several else {}))
            if launch.several:
                events.info(launch_summary(recipe, launch.world, launch.sharded))
            refuse_over_long(ctx, [s for s in stages if s not in skip])
            return skip

        skip = distributed.on_main("run setup", setup)
        for stage in stages:
            if stage in skip:
                events.info(f"stage {stage} already done with these settings; skipped (--redo {stage} recomputes)",
                            stage=stage)
                continue
            runner = _runner(stage)

            def run_stage(runner=runner, stage=stage) -> dict:
                with events.stage_run(stage):
                    return runner(ctx) or {}
            # every stage runs on every rank: reward/dpo data-parallel, score/reference/eval on each rank's
            # share of the groups (cache/sharded.py, distributed/lockstep.py)
            info = run_stage()
            distributed.barrier(f"end of stage {stage}")
            if main:
                run.mark_done(stage, recipe, **info)
        if main:
            events.emit("run_end", status="done")
        return ctx
    except StageStopped:
        if main:
            EventLog(run.path, echo=False).emit("run_end", status="stopped")
        raise
    except BaseException as exc:
        if main:
            EventLog(run.path, echo=False).emit("run_end", status="error", message=str(exc) or type(exc).__name__)
        raise
    finally:
        if main:
            run.release()


def active_stages(recipe: Recipe, stages) -> list[str]:
    """The stages that run: `rounds` only when online rounds are asked for (rounds.n > 0)."""
    return [s for s in stages if s != "rounds" or recipe.rounds.n > 0]


def launch_summary(recipe: Recipe, world: int, fsdp: bool = False) -> str:
    """The global batch of each training stage under `world` processes (DDP: each process holds a full
    copy of the model, so the per-GPU memory is the single-GPU estimate of --dry-run; FSDP2: the training and
    precompute stages hold 1/world of the base each, eval a full copy, see the dry run's FSDP2 lines)."""
    parts = []
    for stage in ("reward", "dpo"):
        t = getattr(recipe, stage).train
        parts.append(f"{stage} {t.groups_per_step} x {t.grad_accum} x {world} = "
                     f"{t.groups_per_step * t.grad_accum * world} groups per optimizer step")
    how = (f"FSDP2: reward, dpo, score and reference shard the base over the processes, 1/{world} of it each; "
           "eval holds a full copy each" if fsdp else
           "data-parallel; per-GPU memory as in --dry-run, one model copy each")
    return (f"{world} processes ({how}); "
            f"global batch: {'; '.join(parts)}; score/reference/eval shard their groups over the processes")


def fsdp_memory_lines(plan: dict, processes: int) -> list[str]:
    """The dry run's per-GPU estimate of the training stages under FSDP2 (memory.fsdp_training_estimate)."""
    from .memory import fsdp_training_estimate

    m = plan.get("memory") or {}
    if not m.get("available"):
        return [f"memory per GPU with FSDP2 over {processes} GPUs: {m.get('note', 'no estimate')}"]
    lines = [f"memory per GPU with FSDP2 over {processes} GPUs (training stages; the base sharded; "
             "docs/distributed.md):"]
    loads = []
    for stage in ("reward", "dpo"):
        e = m["stages"].get(stage)
        if not e:
            continue
        f = fsdp_training_estimate(e, processes, m["architecture"]["layers"], load={
            "largest_linear": m["architecture"]["largest_linear"], "weight_bytes": m["weight_bytes"],
            "load_in_4bit": m["load_in_4bit"]})
        fit = ""
        if m.get("budget"):
            fit = "; fits" if f["needed_gib"] * 2**30 <= m["budget"]["bytes"] else "; does NOT fit"
        lines.append(f"  {stage:<10}{f['allocated_gib']:>6.1f} GiB allocated {f['needed_gib']:>5.1f} GiB needed "
                     f"(one GPU: {e['needed_gib']} GiB){fit} = "
                     + " + ".join(f"{k} {v:.2f}" for k, v in f["components_gib"].items() if v >= 0.005))
        loads.append(f["load"])
    if loads:   # the stages' loads differ by the reward head only: the larger one
        load = max(loads, key=lambda x: x["needed_gib"])
        lines.append(f"  {'loading':<10}{load['allocated_gib']:>6.1f} GiB allocated {load['needed_gib']:>5.1f} GiB needed "
                     f"(each rank reads only its shards; loaded whole first: {load['whole_base_gib']} GiB) = "
                     + " + ".join(f"{k} {v:.2f}" for k, v in load["components_gib"].items() if v >= 0.005))
    pre = [s for s in m["stages"] if s in ("score", "reference")]
    if pre:
        lines.append(f"  {', '.join(pre)}: the base sharded too (decoder layers; the vision tower, embeddings and "
                     "LM head gathered for each forward), so below the one-GPU table")
    if "eval" in m["stages"]:
        lines.append("  eval: NOT sharded, each GPU holds the whole model (as in the table above); a model that fits "
                     "only sharded runs out of memory there")
    return lines


def refuse_over_long(ctx: RunContext, stages: list[str]) -> None:
    """Pre-flight before any model loads: a sample longer than max_length stops the run here, naming its
    file:line (nothing is ever truncated, so it would otherwise fail mid-stage)."""
    from .plan import TOO_LONG_SHOWN, preflight_too_long

    if not any(s in ("reward", "reference", "dpo", "eval") for s in stages):
        return
    train, evals = ctx.data()
    too_long = preflight_too_long(ctx.recipe, stages, list(train) + list(evals), memo_dir=ctx.cache_dir)
    if too_long:
        from .models.encoding import SequenceTooLong
        shown = "\n".join(f"  [{x['limit']}] {x['message']}" for x in too_long[:TOO_LONG_SHOWN])
        more = f"\n  ... and {len(too_long) - TOO_LONG_SHOWN} more" if len(too_long) > TOO_LONG_SHOWN else ""
        raise SequenceTooLong(f"{len(too_long)} sample(s) longer than max_length; not starting (samples are never "
                              f"truncated; --dry-run lists them all):\n{shown}{more}")


# --------------------------------------------------------------------------------------------------
# dry run: recipe + data + plan, no model

def preflight_plan(recipe: Recipe, stages: list[str], gpu_mem: str | None = None, events: EventLog | None = None) -> dict:
    """The dry run's plan (recipe, data and pre-flight checks, no model) without printing it: the UI's
    Train tab shows the same numbers beside Start. Data warnings go to `events` (default: the terminal)."""
    from .checks import preflight_problems
    from .data import load_data
    from .plan import make_plan

    events = events if events is not None else EventLog(None, echo=True)
    problems = preflight_problems(recipe, stages)
    data = load_data(recipe, Path(recipe.run.dir), events, dry_run=True)
    plan = make_plan(recipe, stages, data.train, data.evals, gpu_mem=gpu_mem,
                     prompts=(data.train_prompts, data.eval_prompts))
    plan["errors"] = problems + list(plan["errors"])
    return plan


def dry_run(recipe: Recipe, stages: list[str], gpu_mem: str | None = None, processes: int = 1,
            fsdp: bool = False) -> dict:
    """Validate recipe and data and print the plan. The pre-flight checks of the real run (checks.py) are
    errors here too, so "plan OK" means the run can start. `fsdp`: also the per-GPU estimate of the training
    stages with the base sharded over `processes` GPUs by FSDP2."""
    from .plan import format_plan

    # data warnings (skipped rows, ...) belong in the dry run's output
    plan = preflight_plan(recipe, stages, gpu_mem, EventLog(None, echo=True))
    fsdp = fsdp and processes > 1
    if fsdp:
        from .checks import fsdp_problems

        plan["errors"] = list(plan["errors"]) + fsdp_problems(recipe, stages)
    print(format_plan(plan))
    if fsdp:
        print("\n" + "\n".join(fsdp_memory_lines(plan, processes)))
    if processes > 1:
        launch = (f"accelerate launch --config_file recipes/accelerate/fsdp2.yaml --num_processes {processes}"
                  if fsdp else f"torchrun --nproc_per_node {processes}")
        print(f"\nlaunch: {launch_summary(recipe, processes, fsdp)}\n"
              f"  {launch} -m mmrlhf_lite.train {recipe.source} ... (docs/distributed.md)")
    return plan


# --------------------------------------------------------------------------------------------------
# CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mmrlhf_lite.train",
        description="MM-RLHF on one GPU: critique reward model -> reward scores -> reference log-probs -> "
                    "MM-DPO -> evaluation, driven by a YAML recipe.",
        epilog="Overrides are key.path=value pairs, e.g. dpo.beta=0.2 reward.train.max_steps=50 "
               "run.dir=runs/try2 (values are YAML: true, null, [a, b]). --help-recipe lists every key. "
               "Exit codes: 0 done, 1 error, 2 usage/unavailable stage, 3 stopped (re-run to resume).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", nargs="?", help="recipe YAML (e.g. recipes/demo.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="recipe overrides")
    p.add_argument("--stages", help=f"comma-separated subset of {','.join(STAGES)} (default: run.stages)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate recipe and data and print the plan (stages, counts, tokens, memory); no model")
    p.add_argument("--processes", type=int, default=0,
                   help="for --dry-run: the number of processes (GPUs) you will launch with torchrun, to show the "
                        "global batch (default: WORLD_SIZE, else 1)")
    p.add_argument("--fsdp", action="store_true",
                   help="for --dry-run with --processes: estimate the per-GPU memory with the base sharded by FSDP2 "
                        "(recipes/accelerate/fsdp2.yaml; default: on when ACCELERATE_USE_FSDP=true)")
    p.add_argument("--gpu-mem", help="memory budget for the dry-run estimate, e.g. 16GB (default: the GPU found)")
    p.add_argument("--rounds", type=int, default=None, metavar="N",
                   help="run N online MM-DPO rounds after the offline stages (sets rounds.n; docs/rounds.md)")
    p.add_argument("--redo", default="", help="comma-separated finished stages to recompute (outputs deleted)")
    p.add_argument("--help-recipe", action="store_true", help="list every recipe key with type, default, help")
    p.add_argument("-q", "--quiet", action="store_true", help="no terminal progress (events.jsonl still written)")
    return p


def _split_stages(text: str | None, key: str) -> list[str] | None:
    if not text:
        return None
    stages = [s.strip() for s in text.split(",") if s.strip()]
    for s in stages:
        if s not in STAGES:
            raise RecipeError(f"unknown stage '{s}'; stages are {', '.join(STAGES)}", source="command line", key=key)
    return stages


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    if args.help_recipe:
        print(describe_fields())
        return 0
    if not args.recipe:
        build_parser().print_usage(sys.stderr)
        print("error: a recipe is required (try recipes/demo.yaml)", file=sys.stderr)
        return 2
    if args.gpu_mem is not None:
        from .memory import parse_memory

        try:
            parse_memory(args.gpu_mem)
        except ValueError:
            build_parser().print_usage(sys.stderr)
            print(f"error: --gpu-mem: cannot read memory size {args.gpu_mem!r}; give a number with a unit, "
                  "e.g. --gpu-mem 16GB or --gpu-mem 24GiB", file=sys.stderr)
            return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    recipe = None
    try:
        stages = _split_stages(args.stages, "--stages")
        redo = tuple(_split_stages(args.redo, "--redo") or ())
        overrides = list(args.overrides)
        if args.rounds is not None:
            if args.rounds < 0:
                raise RecipeError("--rounds must be >= 0", source="command line", key="--rounds")
            overrides.append(f"rounds.n={args.rounds}")
        recipe = load_recipe(args.recipe, overrides)
        for warning in getattr(recipe, "load_warnings", ()):
            print(f"warning: {warning}", file=sys.stderr)
        stages = active_stages(recipe, stages or list(recipe.run.stages))
        from .checks import check_run_dir

        check_run_dir(recipe)
        if args.dry_run:
            fsdp = args.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true", "yes")
            plan = dry_run(recipe, stages, args.gpu_mem, args.processes or int(os.environ.get("WORLD_SIZE", "1") or 1),
                           fsdp=fsdp)
            return 1 if plan["errors"] else 0
        _attach_file_log(Path(recipe.run.dir))
        RunDir(recipe.run.dir).install_signal_handlers()  # SIGTERM / Ctrl-C: checkpoint, then exit 3
        start = time.time()
        run_pipeline(recipe, stages, redo=redo, echo=not args.quiet)
        from . import distributed
        if distributed.is_main():
            print(f"done in {time.time() - start:.1f} s: {recipe.run.dir}", file=sys.stderr)
        distributed.destroy()
        return 0
    except StageUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except StageStopped as exc:
        print(f"stopped: {exc}. Run the same command again to resume.", file=sys.stderr)
        # every rank stops at the same point (lockstep), so all of them can leave the group together: a rank
        # that exited with its gloo connections still open could abort ("terminate called without an active
        # exception", SIGABRT) while the other still used them
        from . import distributed
        distributed.destroy()
        return 3
    except KeyboardInterrupt:
        print("interrupted. Run the same command again to resume from the last checkpoint.", file=sys.stderr)
        return 3
    except (RecipeError, RunFolderError, UserError, _rank_failure()) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, RecipeError) else 1
    except Exception as exc:  # noqa: BLE001 - last resort: a readable message, the trace goes to train.log
        return report_error(exc, recipe.run.dir if recipe is not None else ".")


def _rank_failure() -> type:
    from .distributed import RankFailure
    return RankFailure


def report_error(exc: BaseException, out_dir, resume: str = "finished stages and caches are kept and training "
                 "resumes from its last complete checkpoint") -> int:
    """Exit code 1 with one readable line for an error a command did not expect: a full disk (whichever
    library hit it), a known user error (data, media, model loading, too long), else its type and message
    (the trace goes to the debug log)."""
    if disk_full(exc):
        where = getattr(exc, "filename", None) or f"the output folder {out_dir}"
        print(f"error: disk full while writing {where} ({_free_space(out_dir)}); free space and run the same "
              f"command again: {resume}.", file=sys.stderr)
        return 1
    return _unexpected(exc)


def disk_full(exc: BaseException) -> bool:
    """Whether `exc` (or an exception it was raised from) is a full disk. Not every writer raises OSError:
    safetensors raises SafetensorError("... No space left on device (os error 28)") and torch.save a
    RuntimeError("... file write failed")."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return True
        text = str(exc)
        if "No space left on device" in text or "os error 28" in text or "file write failed" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _free_space(path) -> str:
    import shutil

    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return f"{shutil.disk_usage(p).free / 2 ** 20:.1f} MiB free there now"
    except OSError:
        return "free space unknown"


def known_user_errors() -> tuple[type, ...]:
    """The exception types that are the user's to fix (bad data rows, missing or bad media, unloadable model
    files, a sample too long for max_length): the CLI prints their message without a traceback, and the UI's
    pre-flight shows it."""
    out: list[type] = []
    for mod, name in (("mmrlhf_lite.data.errors", "DataError"), ("mmrlhf_lite.data.media", "MediaError"),
                      ("mmrlhf_lite.models.loading", "ModelLoadError"),
                      ("mmrlhf_lite.models.encoding", "SequenceTooLong"),
                      ("mmrlhf_lite.models.precision", "NonFiniteLoss")):
        try:
            out.append(getattr(importlib.import_module(mod), name))
        except (ImportError, AttributeError):
            continue
    return tuple(out)


def _unexpected(exc: BaseException) -> int:
    if isinstance(exc, known_user_errors()):
        print(f"error: {exc}", file=sys.stderr)
        return 1
    trace = "".join(traceback.format_exception(exc))
    logs = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    if logs:
        log.debug("unexpected error\n%s", trace)
        where = logs[0].baseFilename
    else:  # no run folder log (e.g. the evaluate command): the trace goes to a file of its own
        import tempfile

        fd, where = tempfile.mkstemp(prefix="mmrlhf-lite-error-", suffix=".log")
        with os.fdopen(fd, "w") as fh:
            fh.write(trace)
    print(f"error: {type(exc).__name__}: {exc}\n(the full trace is in {where})", file=sys.stderr)
    return 1


def _attach_file_log(run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0") or 0)  # under a launcher, each rank > 0 logs to a file of its own
    handler = logging.FileHandler(run_dir / ("train.log" if rank == 0 else f"train.rank{rank}.log"))
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    handler.setLevel(logging.DEBUG)
    logging.getLogger().addHandler(handler)
    # the terminal keeps INFO; the file also gets DEBUG traces of unexpected errors
    logging.getLogger("mmrlhf_lite").setLevel(logging.DEBUG)
    for h in logging.getLogger().handlers:
        if h is not handler:
            h.setLevel(logging.INFO)


if __name__ == "__main__":
    from .distributed import exit_rank

    exit_rank(main())   # sys.exit(...) in one process; a rank of a launch skips the interpreter's teardown
