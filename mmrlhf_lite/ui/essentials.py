"""The Train tab's essentials beside Start: the few keys most runs change, two presets, the pre-flight's
numbers for the form as it is, and the recipe YAML that Start will write.

- `ESSENTIALS`: model, data (and the demo set's size while the data is `demo`), stages, per trainer the
  optimizer steps / epochs / learning rate, and the LoRA rank. Every other key stays in its accordion.
- `PRESETS`: a preset sets a few keys of the form (never more than those) and says which; over edits of
  those keys it asks first (`preset_conflicts`), like picking another recipe does.
- `estimate`: the plan of `python -m mmrlhf_lite.train recipe.yaml --dry-run` (`train.preflight_plan`: the
  same checks, data, token counts, optimizer steps and memory estimate), for the form's values, plus a time
  estimate scaled from the speed a finished run of the same model and device measured on this machine (the
  dry run has no clock: a run's speed depends on the machine).
- `yaml_preview`: the keys whose values differ from the defaults, as YAML, validated like Start does.

    python app.py            # Train tab
"""
from __future__ import annotations

import hashlib
import json
import re
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..recipe import STAGES, Recipe
from . import form
from .form import FormValues, same_value
from .runview import format_duration, stage_times
from .safety import Refused

ESSENTIALS = ("model.path", "data.path", "data.demo.groups", "run.stages",
              "reward.train.max_steps", "reward.train.epochs", "reward.train.learning_rate",
              "dpo.train.max_steps", "dpo.train.epochs", "dpo.train.learning_rate", "model.lora_r")

SMOKE = "smoke test"
FULL = "full demo"
PRESETS: dict[str, dict[str, Any]] = {
    SMOKE: {"model.path": "tiny:qwen2_vl", "data.path": "demo", "data.demo.groups": 120,
            "run.stages": list(STAGES), "reward.train.max_steps": 60, "dpo.train.max_steps": 60,
            "eval.max_groups": 24},
    FULL: {"model.path": "tiny:qwen2_vl", "data.path": "demo", "data.demo.groups": 600,
           "run.stages": list(STAGES), "reward.train.max_steps": 600, "dpo.train.max_steps": 600,
           "eval.max_groups": None},
}
# what each preset is; how long the smoke test takes is measured on this machine (`preset_label`), never promised
PRESET_HELP = {SMOKE: "every stage on 120 demo groups, 60 steps per trainer",
               FULL: "recipes/demo.yaml's sizes: 600 demo groups, 600 steps per trainer"}


# --------------------------------------------------------------------------------------------------
# presets

def preset_form_values(name: str) -> dict[str, Any]:
    """The preset's keys with values as the form holds them (a list key as its text)."""
    if name not in PRESETS:
        raise Refused(f"unknown preset '{name}'; presets are {', '.join(PRESETS)}")
    out = {}
    for key, value in PRESETS[name].items():
        spec = form.FIELD_BY_KEY[key]
        out[key] = ", ".join(value) if spec.kind == "list" else value
    return out


def preset_conflicts(name: str, now: FormValues, loaded: Mapping | None, preset_state: Mapping | None) -> list[str]:
    """The preset's keys whose current value is an edit of the user's that the preset would replace:
    differs from what the last load/save/start left there (`loaded`, keyed by recipe key), from what the last
    preset set, and from the preset's own value."""
    wanted = preset_form_values(name)
    out = []
    for key, value in wanted.items():
        current = now[key]
        if same_value(current, value):
            continue
        if loaded is not None and key in loaded and same_value(current, loaded[key]):
            continue
        if preset_state and key in preset_state and same_value(current, preset_state[key]):
            continue
        if loaded is None and not preset_state:
            continue  # nothing loaded yet: the form holds the defaults
        out.append(key)
    return out


def apply_preset(name: str, now: FormValues) -> tuple[FormValues, list[str]]:
    """(the form with the preset's keys set, the keys whose value changed)."""
    wanted = preset_form_values(name)
    changed = [key for key, value in wanted.items() if not same_value(now[key], value)]
    return now.replace(wanted), changed


def preset_message(name: str, changed: list[str]) -> str:
    wanted = preset_form_values(name)
    shown = ", ".join(f"`{k}` = {_show(wanted[k])}" for k in changed) if changed else "nothing (the form had its values)"
    return (f"Preset **{name}** ({PRESET_HELP[name]}) set {shown}. Every other setting is as it was; "
            "the YAML below is what Start will run, and the pre-flight beside Start says how long it takes here.")


def _show(value) -> str:
    return "empty" if value is None or value == "" else str(value)


# --------------------------------------------------------------------------------------------------
# the recipe Start would write

def _defaults_tree() -> dict:
    return Recipe().to_dict()


def _diff(tree: dict, defaults: dict) -> dict:
    out = {}
    for key, value in tree.items():
        base = defaults.get(key) if isinstance(defaults, dict) else None
        if isinstance(value, dict):
            sub = _diff(value, base if isinstance(base, dict) else {})
            if sub:
                out[key] = sub
        elif value != base:
            out[key] = value
    return out


def yaml_preview(now: FormValues, *, data_root, runs_root, run_name: str | None = None) -> str:
    """The keys of the recipe Start would write whose values differ from the defaults (validated as
    Start validates them: a problem is said instead of a YAML)."""
    try:
        tree = form.values_tree(now)
        form.keep_under_roots(tree, Path(data_root), Path(runs_root))
        text = form.validated_yaml(tree)
    except (Refused, TypeError, ValueError) as exc:
        return f"# Start would refuse this form:\n# {exc}"
    resolved = yaml.safe_load(text)
    resolved.get("run", {}).pop("dir", None)  # Start sets run.dir to the run's folder
    changed = _diff(resolved, _defaults_tree())
    head = ("# what Start will run: the keys whose values differ from the defaults (every other key has its "
            "default;\n# `python -m mmrlhf_lite.train --help-recipe` lists them)")
    where = f"\n# run.dir: <runs root>/{run_name}" if run_name else ""
    body = yaml.safe_dump(changed, sort_keys=False) if changed else "{}  # all defaults\n"
    return f"{head}{where}\n{body}"


# --------------------------------------------------------------------------------------------------
# the pre-flight

_PLAN_LOCK = threading.Lock()
_PLANS: dict[str, tuple] = {}  # form + data stamps -> (plan, recipe, data warnings)
_DATA_MESSAGE = re.compile(r"data: (\d+) train groups, (\d+) eval groups")


def _user_errors() -> tuple[type, ...]:
    from ..recipe import RecipeError
    from ..runs import RunFolderError
    from ..train import UserError, known_user_errors

    return (Refused, RecipeError, RunFolderError, UserError, OSError, *known_user_errors())


def recipe_of(now: FormValues, *, data_root, runs_root, run_dir: Path):
    """The validated Recipe of a form (paths kept under their roots), run in `run_dir`; no data is read."""
    from ..recipe import load_recipe

    tree = form.values_tree(now)
    form.keep_under_roots(tree, Path(data_root), Path(runs_root))
    if not tree["run"]["stages"]:
        raise Refused("choose at least one stage to run")
    tree["run"]["dir"] = str(run_dir)
    tree.setdefault("cache", {})["dir"] = None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recipe.yaml"
        path.write_text(form.validated_yaml(tree))
        return load_recipe(path)


def plan_for(now: FormValues, *, data_root, runs_root, scratch: Path):
    """(plan, recipe, data warnings): the dry run's plan of the form's recipe (its data prepared under
    `scratch`, never in a run folder)."""
    from ..events import EventLog
    from ..train import preflight_plan

    class Collect(EventLog):  # data warnings (skipped rows, ...) are shown with the estimate
        def __init__(self):
            super().__init__(None, echo=False)
            self.warnings: list[str] = []

        def warning(self, message: str, **extra: Any) -> None:
            self.warnings.append(message)

    tree = form.values_tree(now)
    form.keep_under_roots(tree, Path(data_root), Path(runs_root))
    folders = [tree["data"].get("path"), tree["data"].get("eval_path"), (tree.get("reward") or {}).get("model_from"),
               tree["model"].get("path")]
    key = json.dumps([tree, [_stamp(f) for f in folders]], sort_keys=True, default=str)
    with _PLAN_LOCK:
        if key in _PLANS:  # the same form over the same files: the same plan (a second tab, a re-render)
            return _PLANS[key]
        # one folder per demo set (its images are written once), holding the token-count memo
        demo = tree["data"].get("demo") or {}
        folder = scratch / ("plan-" + hashlib.sha1(json.dumps(demo, sort_keys=True).encode()).hexdigest()[:10])
        (folder / "cache").mkdir(parents=True, exist_ok=True)
        recipe = recipe_of(now, data_root=data_root, runs_root=runs_root, run_dir=folder)
        events = Collect()
        plan = preflight_plan(recipe, list(recipe.run.stages), events=events)
        if len(_PLANS) >= 32:
            _PLANS.pop(next(iter(_PLANS)))
        _PLANS[key] = (plan, recipe, events.warnings)
        return _PLANS[key]


def _stamp(path: str | None):
    """What a cached plan depends on besides the form: a data file's, data folder's, model folder's or
    reward run's size and modification time (None where it does not exist, as for `demo` or a hub id)."""
    if not path or path == "demo" or path.startswith("tiny:"):
        return path
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _gib(x: float) -> str:
    return f"{x:.1f} GiB" if x >= 0.1 else f"{x:.2f} GiB"


def measured_speeds(runs_root, recipe) -> tuple[str | None, dict[str, float]]:
    """Seconds per unit of work of each stage, from the newest run under `runs_root` that finished
    stages with the same model, device and 4-bit setting (units: groups per optimizer step x steps for
    the trainers, all groups for score and reference, evaluated groups for eval)."""
    from ..events import read_events
    from . import jobs

    root = Path(runs_root)
    for name in sorted(jobs.list_runs(root), key=lambda n: _mtime(root / n), reverse=True):
        run = root / name
        try:
            other = yaml.safe_load((run / jobs.RECIPE_FILE).read_text()) or {}
            model = other.get("model", {})
            if (model.get("path"), model.get("device", "auto"), model.get("load_in_4bit", True)) != (
                    recipe.model.path, recipe.model.device, recipe.model.load_in_4bit):
                continue
            events = read_events(run)[0]
        except (OSError, yaml.YAMLError, AttributeError, ValueError):
            continue
        counts = [m for e in events if e.get("type") == "log" and (m := _DATA_MESSAGE.search(str(e.get("message"))))]
        if not counts:
            continue
        n_train, n_eval = int(counts[-1].group(1)), int(counts[-1].group(2))
        totals = {e.get("stage"): e.get("total") for e in events if e.get("type") == "progress" and e.get("total")}
        speeds = {}
        for stage, (seconds, _, done) in stage_times(events).items():
            if not done or seconds <= 0:
                continue
            if stage in ("reward", "dpo"):
                train = other.get(stage, {}).get("train", {}) or {}
                per_step = int(train.get("groups_per_step", 1)) * int(train.get("grad_accum", 4))
                steps = totals.get(stage) or train.get("max_steps")
                work = per_step * int(steps or 0)
            elif stage in ("score", "reference"):
                work = n_train + n_eval
            elif stage == "eval":
                cap = (other.get("eval", {}) or {}).get("max_groups")
                work = min(n_eval, int(cap)) if cap else n_eval
            else:
                continue
            if work > 0:
                speeds[stage] = seconds / work
        if speeds:
            return name, speeds
    return None, {}


def _mtime(run: Path) -> float:
    try:
        return run.stat().st_mtime
    except OSError:
        return 0.0


def time_estimate(plan: dict, recipe, runs_root) -> tuple[float | None, dict[str, float], str | None]:
    """(total seconds or None, seconds per stage, the run whose speed was used)."""
    source, speeds = measured_speeds(runs_root, recipe)
    if not speeds:
        return None, {}, None
    n_train, n_eval = plan["data"]["train"]["groups"], plan["data"]["eval"]["groups"]
    cap = recipe.eval.max_groups
    work = {"score": n_train + n_eval, "reference": n_train + n_eval,
            "eval": min(n_eval, cap) if cap else n_eval}
    for stage, s in plan["steps"].items():
        work[stage] = s["steps"] * s["groups_per_optimizer_step"]
    per_stage = {}
    for row in plan["stages"]:
        stage = row["stage"]
        if row["status"] == "done" or (stage == "rounds" and not plan.get("rounds")):
            continue  # finished, or online rounds not asked for (rounds.n 0): no work
        if stage not in speeds:
            return None, {}, source  # a stage this run never measured: no honest total
        per_stage[stage] = speeds[stage] * work.get(stage, 0)
    return sum(per_stage.values()), per_stage, source


@dataclass
class Preflight:
    """What the pre-flight beside Start says about the form: the text, whether Start may launch it, and how
    many bad data rows `data.on_error: skip` would leave out (0 when that is not what stops it)."""
    markdown: str
    can_start: bool
    bad_rows: int = 0
    errors: list[str] = field(default_factory=list)


def preflight(now: FormValues, *, data_root, runs_root, scratch: Path, run_name: str | None = None,
              processes: int = 1, sharding: str = "none") -> Preflight:
    """The pre-flight beside Start: steps, memory and time for the form as it is, or every reason it cannot
    start (a taken run name, bad data rows counted with the one key that trains past them, the dry run's
    errors). Start launches only what this accepts. With processes > 1 also the launch (global batch per
    optimizer step) and, with sharding "fsdp2", the per-GPU memory of the training stages with the base
    sharded (`--dry-run --processes N --fsdp`)."""
    name_error = _run_name_error(runs_root, run_name)
    try:
        plan, recipe, data_warnings = plan_for(now, data_root=data_root, runs_root=runs_root, scratch=scratch)
    except _user_errors() as exc:
        bad = _bad_rows(now, exc, data_root, runs_root)
        errors = [e for e in (name_error,) if e] + [bad.message if bad else str(exc)]
        lines = ["**Pre-flight: cannot start.**"] + [f"- **{_escape(e)}**" for e in errors]
        if bad and bad.good_groups:
            lines.append(f"\n`data.on_error: skip` leaves the {bad.rows} bad row(s) out and trains on the "
                         f"{bad.good_groups} good group(s): the button below sets it.")
        return Preflight("\n".join(lines), False, bad.rows if bad and bad.good_groups else 0, errors)
    lines = ["**Pre-flight** (the numbers of `--dry-run`)"]
    errors = ([name_error] if name_error else []) + list(plan["errors"])
    if errors:  # first, where they are seen: each stops Start
        lines[0] = "**Pre-flight: cannot start.**"
        lines += [f"- **error: {_escape(e)}**" for e in errors]
    d = plan["data"]
    lines.append(f"- data: {d['train']['groups']} train / {d['eval']['groups']} held-out groups, "
                 f"{d['train']['pairs']} training pairs")
    for stage, s in plan["steps"].items():
        budget = f"max_steps {s['max_steps']}" if s["max_steps"] > 0 else f"{s['epochs']:g} epoch(s)"
        lines.append(f"- {stage}: {s['steps']} optimizer steps ({budget}, {s['groups_per_optimizer_step']} "
                     "groups per step)")
    m = plan.get("memory") or {}
    if m.get("available") and m.get("peak"):
        peak = m["peak"]
        budget = m.get("budget")
        verdict = (f"; budget {budget['gib']} GiB ({budget['source']}): "
                   f"{'fits' if m.get('fits') else '**does NOT fit**'}") if budget else "; no GPU here: nothing checked"
        lines.append(f"- memory: peak {_gib(peak['needed_gib'])} ({peak['stage']}){verdict}")
    elif m.get("note"):
        lines.append(f"- memory: {_escape(m['note'])}")
    lines += _launch_lines(plan, recipe, processes, sharding)
    total, per_stage, source = time_estimate(plan, recipe, runs_root)
    if total is not None:
        parts = ", ".join(f"{s} {format_duration(t)}" for s, t in per_stage.items())
        lines.append(f"- time: about {format_duration(total)} plus start-up ({parts}); scaled from run "
                     f"`{_escape(source)}`, measured on this machine with the same model and device")
    else:
        why = (f"run `{_escape(source)}` did not finish every stage this recipe runs" if source else
               "no finished run of this model and device here yet")
        lines.append(f"- time: no estimate ({why}); the Live tab shows each stage's speed and ETA")
    for w in plan.get("warnings", []) + data_warnings:
        lines.append(f"- warning: {_escape(w)}")
    lines.append("" if errors else "\nplan OK")
    return Preflight("\n".join(lines), not errors, 0, errors)


def _run_name_error(runs_root, run_name: str | None) -> str | None:
    """Why Start cannot make this run folder (a taken or unusable name), or None. An empty name is fine:
    Start names the run by the time."""
    from . import jobs

    name = (run_name or "").strip()
    if not name:
        return None
    try:
        run = jobs.run_path(runs_root, name)
    except Refused as exc:
        return str(exc)
    if run.exists():
        return (f"run name '{name}' is taken: a run folder of that name exists; pick another name (or Resume "
                "that run in the Live tab)")
    return None


@dataclass
class BadRows:
    rows: int           # rows `data.on_error: skip` leaves out
    good_groups: int    # the groups it keeps
    message: str


def _bad_rows(now: FormValues, exc: BaseException, data_root, runs_root) -> BadRows | None:
    """When the data stopped the plan at a bad row (`data.on_error: raise`): every bad row of the data files,
    counted by kind with where the first ones are, and how many groups a skip keeps. None when the error is
    not a bad row, or skipping is already on."""
    from ..data.errors import DataError
    from ..data.readers import load_groups

    if not isinstance(exc, DataError) or exc.reason == "bad_source" or now["data.on_error"] == "skip":
        return None
    tree = form.values_tree(now)
    form.keep_under_roots(tree, Path(data_root), Path(runs_root))
    d = tree["data"]
    rows, groups, where, kinds = 0, 0, [], []
    for key in ("path", "eval_path"):
        if not d.get(key) or d[key] == "demo":
            continue
        try:
            result = load_groups(d[key], fmt=d["format"], media_root=d.get("media_root"), on_error="skip",
                                 max_frames=d["max_frames"], allow_empty=True, dataset=d.get("dataset") if key == "path" else None)
        except (DataError, OSError, ValueError):
            return None
        rows += sum(result.skipped.values())
        groups += len(result.groups) if key == "path" else 0
        where += [_relative(e.source, data_root) for e in result.errors[:3]]
        if result.skipped:
            kinds.append(f"data.{key}: " + ", ".join(f"{n} {reason.replace('_', ' ')}"
                                                     for reason, n in result.skipped.most_common()))
    if not rows:
        return None
    more = f" and {rows - len(where)} more" if rows > len(where) else ""
    return BadRows(rows, groups, f"{rows} bad data row(s) ({'; '.join(kinds)}), first at {', '.join(where)}{more}; "
                                 "the Data tab lists each with what to fix")


def _relative(text: str, data_root) -> str:
    root = str(Path(data_root).resolve())
    return text.replace(root + "/", "")


def _launch_lines(plan: dict, recipe, processes, sharding) -> list[str]:
    """The launch's lines of the estimate: nothing for one process; the global batch for several; and
    for FSDP2 the dry run's per-GPU lines (train.fsdp_memory_lines), one item each."""
    from ..train import fsdp_memory_lines, launch_summary

    try:
        processes = int(processes or 1)
    except (TypeError, ValueError):
        return [f"- **launch: processes must be a whole number, got {_escape(repr(processes))}**"]
    if processes <= 1:
        return ["- launch: 1 process; **FSDP2 needs Processes of 2 or more**"] if sharding == "fsdp2" else []
    fsdp = sharding == "fsdp2"
    lines = [f"- launch: {_escape(launch_summary(recipe, processes, fsdp))}"]
    if fsdp:
        head, *rest = fsdp_memory_lines(plan, processes)
        lines.append(f"- {_escape(head)}")
        lines += [f"    - {_escape(r.strip())}" for r in rest]
    return lines


def preset_label(name: str, now: FormValues, *, data_root, runs_root, scratch: Path) -> str:
    """A preset button's label with the time the preset's run takes on this machine, scaled from the newest
    finished run of the same model and device here (`time_estimate`), or that it has not been timed here:
    a shared machine took minutes where a quiet one took seconds, so no fixed number is printed. Without a
    measured run this reads no data (the label is instant); with one it plans the preset's recipe once."""
    applied, _ = apply_preset(name, now)
    try:
        recipe = recipe_of(applied, data_root=data_root, runs_root=runs_root, run_dir=scratch / "label")
        total = None
        if measured_speeds(runs_root, recipe)[1]:
            plan, recipe, _ = plan_for(applied, data_root=data_root, runs_root=runs_root, scratch=scratch)
            total = time_estimate(plan, recipe, runs_root)[0]
    except _user_errors():
        total = None
    return f"Preset: {name} · " + (f"about {format_duration(total)} here" if total is not None else "not timed here yet")


def _escape(text: str) -> str:
    import html
    return html.escape(text, quote=False)


def scratch_dir(upload_dir) -> Path:
    return Path(upload_dir) / "preflight"
