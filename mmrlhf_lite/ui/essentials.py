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
from pathlib import Path
from typing import Any

import yaml

from ..recipe import STAGES, Recipe
from . import form
from .safety import Refused

ESSENTIALS = ("model.path", "data.path", "data.demo.groups", "run.stages",
              "reward.train.max_steps", "reward.train.epochs", "reward.train.learning_rate",
              "dpo.train.max_steps", "dpo.train.epochs", "dpo.train.learning_rate", "model.lora_r")

SMOKE = "smoke test, 1 minute"
FULL = "full demo"
# On the demo recipe (recipes/demo.yaml), the smoke test runs every stage on 120 synthetic groups in
# 33-49 s on 2 shared CPU cores (docs/ui.md); the full demo is recipes/demo.yaml's own values (about 10 minutes).
PRESETS: dict[str, dict[str, Any]] = {
    SMOKE: {"model.path": "tiny:qwen2_vl", "data.path": "demo", "data.demo.groups": 120,
            "run.stages": list(STAGES), "reward.train.max_steps": 60, "dpo.train.max_steps": 60,
            "eval.max_groups": 24},
    FULL: {"model.path": "tiny:qwen2_vl", "data.path": "demo", "data.demo.groups": 600,
           "run.stages": list(STAGES), "reward.train.max_steps": 600, "dpo.train.max_steps": 600,
           "eval.max_groups": None},
}
PRESET_HELP = {SMOKE: "every stage on 120 demo groups, 60 steps per trainer: 33-49 s on 2 CPU cores",
               FULL: "recipes/demo.yaml's sizes: 600 demo groups, 600 steps per trainer (about 10 minutes on CPU)"}

_INDEX = {s.key: i for i, s in enumerate(form.FIELDS)}
_SPEC = {s.key: s for s in form.FIELDS}


# --------------------------------------------------------------------------------------------------
# presets

def preset_form_values(name: str) -> dict[str, Any]:
    """The preset's keys with values as the form holds them (a list key as its text)."""
    if name not in PRESETS:
        raise Refused(f"unknown preset '{name}'; presets are {', '.join(PRESETS)}")
    out = {}
    for key, value in PRESETS[name].items():
        spec = _SPEC[key]
        out[key] = ", ".join(value) if spec.kind == "list" else value
    return out


def preset_conflicts(name: str, values: list, loaded: dict | None, preset_state: dict | None) -> list[str]:
    """The preset's keys whose current value is an edit of the user's that the preset would replace:
    differs from what the last load/save/start left there, from what the last preset set, and from the
    preset's own value."""
    wanted = preset_form_values(name)
    base = (loaded or {}).get("values")
    out = []
    for key, value in wanted.items():
        current = values[_INDEX[key]]
        if form.same_value(current, value):
            continue
        if base is not None and form.same_value(current, base[1 + _INDEX[key]]):  # base[0] is the run name
            continue
        if preset_state and key in preset_state and form.same_value(current, preset_state[key]):
            continue
        if base is None and not preset_state:
            continue  # nothing loaded yet: the form holds the defaults
        out.append(key)
    return out


def apply_preset(name: str, values: list) -> tuple[list, list[str]]:
    """(new form values, the keys whose value changed)."""
    new = list(values)
    changed = []
    for key, value in preset_form_values(name).items():
        i = _INDEX[key]
        if not form.same_value(new[i], value):
            changed.append(key)
        new[i] = value
    return new, changed


def preset_message(name: str, changed: list[str]) -> str:
    wanted = preset_form_values(name)
    shown = ", ".join(f"`{k}` = {_show(wanted[k])}" for k in changed) if changed else "nothing (the form had its values)"
    return (f"Preset **{name}** ({PRESET_HELP[name]}) set {shown}. Every other setting is as it was; "
            "the YAML below is what Start will run.")


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


def yaml_preview(values: list, *, data_root, runs_root, run_name: str | None = None) -> str:
    """The keys of the recipe Start would write whose values differ from the defaults (validated as
    Start validates them: a problem is said instead of a YAML)."""
    try:
        tree = form.values_tree(list(values))
        form._check_paths(tree, Path(data_root), Path(runs_root))
        text = form.validated_yaml(tree)
    except Refused as exc:
        return f"# Start would refuse this form:\n# {exc}"
    except (TypeError, ValueError) as exc:
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
# the pre-flight estimate

_PLAN_LOCK = threading.Lock()
_PLANS: dict[str, tuple] = {}  # form + data stamps -> (plan, recipe, data warnings)
_DATA_MESSAGE = re.compile(r"data: (\d+) train groups, (\d+) eval groups")


def _user_errors() -> tuple[type, ...]:
    from ..train import UserError, known_user_errors
    from ..runs import RunFolderError
    from ..recipe import RecipeError

    return (Refused, RecipeError, RunFolderError, UserError, OSError, *known_user_errors())


def plan_for(values: list, *, data_root, runs_root, scratch: Path):
    """(plan, recipe, data warnings): the dry run's plan of the form's recipe (its data prepared under
    `scratch`, never in a run folder)."""
    from ..events import EventLog
    from ..recipe import load_recipe

    class Collect(EventLog):  # data warnings (skipped rows, ...) are shown with the estimate
        def __init__(self):
            super().__init__(None, echo=False)
            self.warnings: list[str] = []

        def warning(self, message: str, **extra: Any) -> None:
            self.warnings.append(message)

    from ..train import preflight_plan

    tree = form.values_tree(list(values))
    form._check_paths(tree, Path(data_root), Path(runs_root))
    if not tree["run"]["stages"]:
        raise Refused("choose at least one stage to run")
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
        tree["run"]["dir"] = str(folder)
        tree.setdefault("cache", {})["dir"] = None
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "recipe.yaml"
            path.write_text(form.validated_yaml(tree))
            recipe = load_recipe(path)
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


def _duration(seconds: float) -> str:
    from .runview import _duration as d
    return d(seconds)


def measured_speeds(runs_root, recipe) -> tuple[str | None, dict[str, float]]:
    """Seconds per unit of work of each stage, from the newest run under `runs_root` that finished
    stages with the same model, device and 4-bit setting (units: groups per optimizer step x steps for
    the trainers, all groups for score and reference, evaluated groups for eval)."""
    from ..events import read_events
    from . import jobs
    from .runview import _stage_times

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
        for stage, (seconds, _, done) in _stage_times(events).items():
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
        if row["status"] == "done":
            continue
        if stage not in speeds:
            return None, {}, source  # a stage this run never measured: no honest total
        per_stage[stage] = speeds[stage] * work.get(stage, 0)
    return sum(per_stage.values()), per_stage, source


def estimate_markdown(values: list, *, data_root, runs_root, scratch: Path, processes: int = 1,
                      sharding: str = "none") -> str:
    """The pre-flight beside Start: steps, memory and time for the form as it is (or why it cannot run).
    With processes > 1 also the launch (global batch per optimizer step) and, with sharding "fsdp2", the
    per-GPU memory of the training stages with the base sharded (`--dry-run --processes N --fsdp`)."""
    try:
        plan, recipe, data_warnings = plan_for(values, data_root=data_root, runs_root=runs_root, scratch=scratch)
    except _user_errors() as exc:
        return f"**Pre-flight: cannot start.** {_escape(str(exc))}"
    lines = ["**Pre-flight** (the numbers of `--dry-run`)"]
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
        parts = ", ".join(f"{s} {_duration(t)}" for s, t in per_stage.items())
        lines.append(f"- time: about {_duration(total)} plus start-up ({parts}); scaled from run `{_escape(source)}`, "
                     "measured on this machine with the same model and device")
    else:
        why = (f"run `{_escape(source)}` did not finish every stage this recipe runs" if source else
               "no finished run of this model and device here yet")
        lines.append(f"- time: no estimate ({why}); the Live tab shows each stage's speed and ETA")
    for w in plan.get("warnings", []) + data_warnings:
        lines.append(f"- warning: {_escape(w)}")
    for e in plan["errors"]:
        lines.append(f"- **error: {_escape(e)}**")
    lines.append("" if plan["errors"] else "\nplan OK")
    return "\n".join(lines)


def _launch_lines(plan: dict, recipe, processes, sharding) -> list[str]:
    """The launch's lines of the estimate: nothing for one process; the global batch for several; and
    for FSDP2 the dry run's per-GPU lines (train.fsdp_memory_lines), one item each."""
    from ..train import launch_summary, fsdp_memory_lines

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


def _escape(text: str) -> str:
    import html
    return html.escape(text, quote=False)


def scratch_dir(upload_dir) -> Path:
    return Path(upload_dir) / "preflight"


