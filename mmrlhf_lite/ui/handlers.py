"""Event handlers: thin adapters from gradio inputs to the ui modules, with readable errors.

Each handler takes plain values from the page and returns values or `gr.update`s; the work is done
by jobs / runview / databrowser / form / playground / compare. A refused or failed request becomes a
`gr.Error` whose text is one readable sentence (the trace goes to the app's log, never the page).
Job state is read from the run folders on every call, never kept here.

    python app.py
"""
from __future__ import annotations

import functools
import html
import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import pandas as pd

from ..events import EVENTS_FILE
from ..recipe import STAGES, RecipeError
from ..runs import RunDir, RunFolderError
from . import compare, databrowser, essentials, form, jobs, playground, runview
from .safety import Refused

log = logging.getLogger("mmrlhf_lite.ui")
_STAMP = re.compile(r"-\d{8}-\d{6}$")  # the time stamp of a suggested run name


@dataclass(frozen=True)
class UIConfig:
    data_root: Path
    runs_root: Path
    recipes_root: Path
    upload_dir: Path
    max_upload_bytes: int


def readable(fn):
    """Turn any exception into a gr.Error with a one-line message (HTML-escaped; no stack trace)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (Refused, RecipeError, RunFolderError, ValueError, FileNotFoundError) as exc:
            raise gr.Error(html.escape(str(exc)), print_exception=False) from None
        except Exception as exc:  # noqa: BLE001 - the page gets a sentence, the log gets the trace
            log.exception("UI handler %s failed", fn.__name__)
            raise gr.Error(html.escape(f"{type(exc).__name__}: {exc}"), print_exception=False) from None
    return wrapper


class Handlers:
    def __init__(self, cfg: UIConfig):
        self.cfg = cfg
        self.tail = runview.EventTail()
        self._margins: dict = {}
        self._margins_lock = threading.Lock()

    # ------------------------------------------------------------------------------------------ page load
    def load_data(self):
        files = self.data_choices()
        return (files, self.score_run_choices(), *self.inspect(files["value"], "auto", "", ""))

    def load_train(self):
        recipes = self.recipe_choices()
        if recipes["value"] is None:
            return (recipes, *[gr.skip()] * (len(form.FIELDS) + 1))
        return (recipes, *self.load_recipe(recipes["value"]))

    def load_live(self):
        runs = self.live_choices(None)
        return (runs, *self.view(runs["value"]))

    def load_lists(self):
        return self.reward_run_choices(), self.cache_run_choices(), self.compare_choices()

    # ------------------------------------------------------------------------------------------ data
    def data_choices(self, value: str | None = None):
        choices = databrowser.list_data(self.cfg.data_root)
        return gr.update(choices=choices, value=value if value is not None else (choices[0] if choices else None))

    @readable
    def upload(self, temp_file: str | None):
        if not temp_file:
            raise Refused("no file was uploaded")
        name = databrowser.save_upload(temp_file, upload_dir=self.cfg.upload_dir, data_root=self.cfg.data_root,
                                       max_bytes=self.cfg.max_upload_bytes)
        return self.data_choices(name)

    @readable
    def make_demo(self, groups: float | None):
        n = int(groups or 40)
        if not 4 <= n <= 5000:
            raise Refused("the demo set can have 4 to 5000 groups")
        return self.data_choices(databrowser.make_demo(self.cfg.data_root, groups=n))

    @readable
    def inspect(self, name: str | None, fmt: str, media_root: str | None, scores_run: str | None = None):
        """Summary, validation report, group slider and the first group."""
        if not name:
            empty = pd.DataFrame(columns=["where", "problem", "how to fix"])
            return ("Pick a data file under the data root, upload one, or create the demo set.", empty,
                    gr.update(maximum=1, value=0, interactive=False), *self._empty_group())
        report = databrowser.load_report(self.cfg.data_root, name, fmt or "auto", (media_root or "").strip() or None)
        summary = databrowser.summary_markdown(report)
        problems = databrowser.problems_frame(report, self.cfg.data_root)
        n = len(report.groups)
        slider = gr.update(maximum=max(n - 1, 1), value=0, interactive=n > 1)
        return (summary, problems, slider, *self.group(name, fmt, media_root, 0, scores_run))

    def _empty_group(self):
        return [], "", pd.DataFrame(columns=databrowser.RESPONSE_COLUMNS), ""

    @readable
    def group(self, name: str | None, fmt: str, media_root: str | None, index: float | None,
              scores_run: str | None):
        if not name:
            return self._empty_group()
        report = databrowser.load_report(self.cfg.data_root, name, fmt or "auto", (media_root or "").strip() or None)
        if not report.groups:
            return self._empty_group()
        i = min(max(int(index or 0), 0), len(report.groups) - 1)
        g = report.groups[i]
        reward = self._reward_for(scores_run, g.id) if scores_run else None
        images, notes = databrowser.group_images(g, self.cfg.data_root, (self.cfg.runs_root,))
        question = databrowser.question_markdown(g, self.cfg.data_root)
        if notes:
            question += "\n\n" + "\n".join(f"- {html.escape(n)}" for n in notes)
        if scores_run and reward is None:
            question += f"\n\n_Run `{html.escape(scores_run)}` has no reward scores for this group._"
        elif scores_run and not self._trained_on(scores_run, report):
            question += (f"\n\n_Run `{html.escape(scores_run)}` was trained on other data: its scores are "
                         "matched by group id only._")
        return images, question, databrowser.responses_frame(g, reward), databrowser.pairs_markdown(g)

    def _reward_for(self, run_name: str, group_id: str) -> dict | None:
        run = jobs.run_path(self.cfg.runs_root, run_name)
        path = run / "score" / "margins.jsonl"
        if not path.exists():
            raise Refused(f"run '{run_name}' has no reward cache (its `score` stage has not finished)")
        from ..reward.scorer import load_margins  # imports torch: only once there is something to read

        key = (str(path), path.stat().st_mtime_ns)
        with self._margins_lock:
            if self._margins.get("key") != key:
                self._margins = {"key": key, "margins": load_margins(run)}
            return self._margins["margins"].get(group_id)

    def _trained_on(self, run_name: str, report) -> bool:
        """Whether the run's recipe used this very file (the demo set counts by its copy in the run)."""
        import yaml

        run = jobs.run_path(self.cfg.runs_root, run_name)
        try:
            data_path = (yaml.safe_load((run / jobs.RECIPE_FILE).read_text()) or {}).get("data", {}).get("path")
        except (OSError, yaml.YAMLError, AttributeError):
            return False
        if data_path == "demo":
            data_path = run / "data" / "demo" / "demo.jsonl"
        try:
            return Path(data_path).resolve() == databrowser.resolve_data(self.cfg.data_root, report.name)
        except (Refused, TypeError, OSError):
            return False

    def score_run_choices(self):
        return gr.update(choices=[""] + playground.cache_runs(self.cfg.runs_root))

    # ----------------------------------------------------------------------------------------- train
    def recipe_choices(self):
        choices = [(r, r) for r in form.list_recipes(self.cfg.recipes_root)]
        last = self._last_run_with_recipe()
        if last:
            choices.append((f"last used (run {last})", form.LAST_USED))
        default = "demo.yaml" if any(v == "demo.yaml" for _, v in choices) else (choices[0][1] if choices else None)
        return gr.update(choices=choices, value=default)

    def _last_run_with_recipe(self) -> str | None:
        runs = [n for n in jobs.list_runs(self.cfg.runs_root) if (self.cfg.runs_root / n / jobs.RECIPE_FILE).exists()]
        if not runs:
            return None
        return max(runs, key=lambda n: (self.cfg.runs_root / n / jobs.RECIPE_FILE).stat().st_mtime)

    @readable
    def load_recipe(self, choice: str | None):
        """Form values (in form.FIELDS order) from a recipe file or the last run's recipe, + a run name."""
        if choice == form.LAST_USED:
            last = self._last_run_with_recipe()
            if not last:
                raise Refused("no run has a recipe yet")
            path, stem = jobs.run_path(self.cfg.runs_root, last) / jobs.RECIPE_FILE, _STAMP.sub("", last)
        else:
            from .safety import inside

            path = inside(self.cfg.recipes_root, choice, what="recipe")
            if path.suffix != ".yaml" or not path.is_file():
                raise Refused(f"recipe '{choice}' not found under the recipes folder")
            stem = path.stem
        values = form.form_values(form.recipe_tree(path), self.cfg.data_root, path.parent, self.cfg.runs_root)
        return (*values, f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}")

    # The form is never replaced behind the user's back: a recipe is loaded when it is picked from the list
    # (not when the list is merely opened and closed), and over edited settings only after asking.
    # `loaded` (a gr.State) is what the form held right after the last load, save or start: edits are
    # the fields that differ from it.
    def remember(self, choice: str | None, run_name: str, *values):
        """The form as it is now becomes the unedited state (after a load, a save or a start)."""
        return ({"choice": choice, "values": [run_name, *values]}, gr.update(visible=False))

    @staticmethod
    def edited_keys(loaded: dict | None, run_name: str, values) -> list[str]:
        if not loaded or loaded.get("values") is None:
            return []
        keys = ["run name", *form.field_names()]
        return [k for k, old, new in zip(keys, loaded["values"], [run_name, *values]) if not form.same_value(old, new)]

    @readable
    def choose_recipe(self, choice: str | None, loaded: dict | None, run_name: str, *values):
        """A recipe picked from the list: load it unless that would discard edits, which it names instead."""
        n = len(form.FIELDS) + 1
        if not choice:
            return (*[gr.skip()] * n, gr.skip(), gr.skip(), gr.update(visible=False))
        edited = self.edited_keys(loaded, run_name, values)
        current = (loaded or {}).get("choice")
        if choice == current and not edited:
            return (*[gr.skip()] * n, gr.skip(), "", gr.update(visible=False))
        if edited:
            label = _choice_label(choice)
            shown = ", ".join(f"`{html.escape(k)}`" for k in edited[:8]) + (f" and {len(edited) - 8} more" if len(edited) > 8 else "")
            notice = (f"**Nothing was changed.** The form holds your edits of {html.escape(_choice_label(current))}: "
                      f"{shown}. Keep editing, or load **{html.escape(label)}** with the button below "
                      "(your edits are lost).")
            return (*[gr.skip()] * n, gr.skip(), notice,
                    gr.update(visible=True, value=f"Load {label} (discard my edits)"))
        out = self.load_recipe(choice)
        return (*out, {"choice": choice, "values": [out[-1], *out[:-1]]}, f"Loaded recipe **{html.escape(_choice_label(choice))}**.",
                gr.update(visible=False))

    # presets (essentials.PRESETS): a few keys; over the user's edits of those keys, ask first
    @readable
    def preset(self, name: str, loaded: dict | None, *values):
        """A preset button: apply it, unless it would replace edits, which it names instead."""
        n = len(form.FIELDS)
        conflicts = essentials.preset_conflicts(name, list(values), loaded, (loaded or {}).get("preset"))
        if conflicts:
            shown = ", ".join(f"`{html.escape(k)}`" for k in conflicts)
            notice = (f"**Nothing was changed.** The preset **{html.escape(name)}** would replace your edits of "
                      f"{shown}. Keep editing, or apply it with the button below (those edits are lost).")
            return (*[gr.skip()] * n, gr.skip(), notice,
                    gr.update(visible=True, value=f"Apply {name} (discard my edits of {', '.join(conflicts)})"), name)
        return self.apply_preset(name, loaded, *values)

    @readable
    def apply_preset(self, name: str | None, loaded: dict | None, *values):
        """Set the preset's keys (the confirmation button, or a preset that replaces no edit)."""
        if not name:
            raise Refused("no preset is waiting to be applied; click a preset button first")
        new, changed = essentials.apply_preset(name, list(values))
        state = {**(loaded or {}), "preset": dict(essentials.preset_form_values(name))}
        return (*new, state, essentials.preset_message(name, changed), gr.update(visible=False), None)

    def recipe_yaml(self, run_name: str, *values) -> str:
        """The read-only preview of what Start will write (keys that differ from the defaults)."""
        return essentials.yaml_preview(list(values), data_root=self.cfg.data_root, runs_root=self.cfg.runs_root,
                                       run_name=(run_name or "").strip() or None)

    def estimate(self, *values) -> str:
        """The dry run's numbers for the form as it is, beside Start (the form's values, then optionally the
        Train tab's processes and sharding)."""
        t0 = time.time()
        values = list(values)
        processes, sharding = _launch_inputs(values)
        try:
            return essentials.estimate_markdown(values, data_root=self.cfg.data_root,
                                                runs_root=self.cfg.runs_root,
                                                scratch=essentials.scratch_dir(self.cfg.upload_dir),
                                                processes=processes, sharding=sharding)
        except Exception as exc:  # noqa: BLE001 - the estimate never takes the form down
            log.exception("pre-flight estimate failed")
            return f"**Pre-flight: no estimate** ({html.escape(type(exc).__name__)}: {html.escape(str(exc))})"
        finally:
            log.debug("pre-flight estimate in %.2f s", time.time() - t0)

    @readable
    def start(self, run_name: str, *values):
        values = list(values)
        processes, sharding = _launch_inputs(values)  # the Train tab's "processes" and "sharding"
        try:
            processes = int(processes or 1)
        except (TypeError, ValueError):
            raise Refused(f"processes must be a whole number (one process per GPU), got {processes!r}") from None
        jobs.check_launch(processes, sharding)
        name = (run_name or "").strip() or f"run-{time.strftime('%Y%m%d-%H%M%S')}"
        run = jobs.run_path(self.cfg.runs_root, name)
        if run.exists():
            raise Refused(f"run '{name}' already exists; pick another name (or Resume it in the live view)")
        text = form.run_recipe(list(values), data_root=self.cfg.data_root, runs_root=self.cfg.runs_root, run_dir=run)
        jobs.start_run(self.cfg.runs_root, name, text, processes=processes, sharding=sharding)
        msg = (f"Started **{html.escape(name)}** ({jobs.launch_label(processes, sharding)}): following it in the "
               "live view.")
        return msg, gr.update(selected="live"), gr.update(choices=jobs.list_runs(self.cfg.runs_root), value=name)

    @readable
    def save_recipe(self, name: str, *values):
        path = form.save_recipe(list(values), name, recipes_root=self.cfg.recipes_root,
                                data_root=self.cfg.data_root, runs_root=self.cfg.runs_root)
        rel = path.relative_to(self.cfg.recipes_root).as_posix()
        update = self.recipe_choices()
        update["value"] = rel
        return f"Saved recipe **{html.escape(rel)}**.", update

    @readable
    def use_data(self, name: str | None):
        if not name:
            raise Refused("pick a data file first")
        databrowser.resolve_data(self.cfg.data_root, name)
        return gr.update(value=name.rstrip("/")), gr.update(selected="train")

    # ------------------------------------------------------------------------------------------ live
    def live_choices(self, current: str | None = None):
        runs = jobs.list_runs(self.cfg.runs_root)
        if current in runs:
            return gr.update(choices=runs, value=current)
        active = [n for n in runs if jobs.job_state(self.cfg.runs_root / n, self.tail.events(self.cfg.runs_root / n)).active]
        return gr.update(choices=runs, value=(active or runs or [None])[0])

    def refresh_lists(self):
        """Run lists change while a page is open (a job started in another tab): new choices, same values."""
        runs = jobs.list_runs(self.cfg.runs_root)
        cached = playground.cache_runs(self.cfg.runs_root)
        return (gr.update(choices=runs), gr.update(choices=playground.reward_runs(self.cfg.runs_root)),
                gr.update(choices=cached), gr.update(choices=runs), gr.update(choices=[""] + cached))

    def jobs_frame(self) -> pd.DataFrame:
        rows = []
        for n in jobs.list_runs(self.cfg.runs_root):
            run = self.cfg.runs_root / n
            try:
                st = jobs.job_state(run, self.tail.events(run))
                rd = RunDir(run)
                stale = rd.stale_stages()  # finished, but an input stage was recomputed since
                done = [f"{s} (stale)" if s in stale else s for s in STAGES if rd.is_done(s)]
                status = st.status
                if damaged := self.tail.damaged(run):
                    status += f" (damaged: {len(damaged)} unreadable line(s) in {EVENTS_FILE})"
            except Exception as exc:  # noqa: BLE001 - one damaged folder must not take the table down
                log.warning("run folder %s could not be read", run, exc_info=True)
                status, done = f"damaged ({type(exc).__name__}: {exc})", []
            launch = jobs.launch_label(*jobs.launch_of(run)) if (run / jobs.JOB_FILE).exists() else "-"
            rows.append({"run": n, "status": status, "stages done": ", ".join(done) or "-", "launch": launch,
                         "updated": time.strftime("%H:%M:%S", time.localtime(_mtime(run)))})
        return pd.DataFrame(rows, columns=JOB_COLUMNS)

    N_VIEW = 10 + len(runview.CURVES)  # outputs of `view`

    @readable
    def view(self, run_name: str | None):
        """Everything the live view shows for one run (status, bars, error, curves, log, jobs, buttons)."""
        if not run_name:
            empty = runview.curve_table()
            return ("No run selected: start one in the Train tab.", runview.progress_html([]), "", "",
                    *[runview.curve_plot([], n) for n in runview.CURVES], runview.with_series(empty, runview.SPEED_SERIES),
                    gr.update(value=runview.with_series(empty, runview.GPU_SERIES), visible=False), "",
                    self.jobs_frame(), gr.update(interactive=False), gr.update(interactive=False))
        run = jobs.run_path(self.cfg.runs_root, run_name)
        events = self.tail.events(run)
        state = jobs.job_state(run, events)
        views = runview.stage_views(events)
        status = f"**{html.escape(run_name)}** · status: **{state.status}**"
        if state.pid and state.active:
            status += f" (pid {state.pid})"
        processes, sharding = jobs.launch_of(run)
        if processes > 1:  # how it was launched (one process is the plain CLI: nothing to say)
            status += f" · {jobs.launch_label(processes, sharding)}"
        done_at = next((e for e in reversed(events) if e.get("type") == "run_end"), None)
        if done_at and not state.active:
            status += f" · ended {time.strftime('%H:%M:%S', time.localtime(done_at['time']))}"
        error = ""
        if state.message and state.status in ("error", "interrupted"):
            error = f"**{'Error' if state.status == 'error' else 'Interrupted'}:** {html.escape(state.message)}"
        warn = [(k, st, m) for k, st, m in runview.messages(events) if not (k == "error" and m in state.message)]
        if damaged := self.tail.damaged(run):
            warn.append(("warning", "-", f"{EVENTS_FILE}: skipped {len(damaged)} unreadable line(s) "
                         f"({'; '.join(damaged[:3])}{'; ...' if len(damaged) > 3 else ''})"))
        if warn:
            error += ("\n\n" if error else "") + "\n".join(
                f"- {kind} [{html.escape(stage)}]: {html.escape(msg)}" for kind, stage, msg in warn)
        counts = runview.point_counts(events)
        points = "Curve points: " + (", ".join(f"{s} {n}" for s, n in counts.items()) if counts else "none yet")
        curves = [runview.curve_plot(events, name) for name in runview.CURVES]
        speed = runview.with_series(runview.tokens_per_second(events, _grad_accum(run)), runview.SPEED_SERIES)
        gpu = runview.gpu_memory(events)
        log_text = jobs.tail_text(run / jobs.CONSOLE_LOG, 24_000)
        log_text = runview.explain_library_noise("\n".join(log_text.splitlines()[-60:]))
        return (status, runview.progress_html(views), error, points, *curves, speed,
                gr.update(value=runview.with_series(gpu, runview.GPU_SERIES), visible=not gpu.empty), log_text,
                self.jobs_frame(),
                gr.update(interactive=state.active), gr.update(interactive=state.resumable))

    def tick(self, run_name: str | None, last_sig):
        """The timer: the full view when something changed, else nothing (no traffic, no redraw)."""
        try:
            run = jobs.run_path(self.cfg.runs_root, run_name) if run_name else None
        except Refused:
            run = None
        sig = None
        if run is not None:
            events = self.tail.events(run)
            state = jobs.job_state(run, events)
            sig = (run_name, self.tail.offset(run), state.status, _size(run / jobs.CONSOLE_LOG),
                   tuple(jobs.list_runs(self.cfg.runs_root)), int(time.time() // 30) if state.active else 0)
        if sig is not None and sig == last_sig:
            return (*[gr.skip()] * self.N_VIEW, last_sig)
        try:
            out = self.view(run_name)
        except gr.Error:
            return (*[gr.skip()] * self.N_VIEW, last_sig)
        return (*out, sig)

    @readable
    def stop(self, run_name: str):
        return jobs.stop_run(jobs.run_path(self.cfg.runs_root, run_name))

    @readable
    def resume(self, run_name: str):
        run = jobs.run_path(self.cfg.runs_root, run_name)
        jobs.resume_run(run)
        return (f"Resumed **{html.escape(run_name)}** ({jobs.launch_label(*jobs.launch_of(run))}): finished stages "
                "are skipped, training continues from its checkpoint.")

    # ------------------------------------------------------------------------------------ playground
    def reward_run_choices(self):
        runs = playground.reward_runs(self.cfg.runs_root)
        return gr.update(choices=runs, value=runs[0] if runs else None)

    def cache_run_choices(self):
        runs = playground.cache_runs(self.cfg.runs_root)
        return gr.update(choices=runs, value=runs[0] if runs else None)

    def warm(self, run_name: str | None) -> None:
        playground.warm(self.cfg.runs_root, run_name)

    @readable
    def score(self, run_name: str, image, question: str, a1: str, a2: str, a3: str, a4: str, a5: str,
              mode: str, max_new_tokens: float):
        if not run_name:
            raise Refused("choose a run with a trained reward model")
        data = databrowser.image_bytes(image) if image is not None else None
        results = playground.score(self.cfg.runs_root, run_name, data, question, [a1, a2, a3, a4, a5], mode,
                                   int(max_new_tokens or 64))
        return playground.cards_html(results), playground.results_frame(results)

    def beta_histogram_mtime(self, run_name: str | None) -> float | None:
        """When the run's beta histogram was last written (None: not yet, or no such run)."""
        if not run_name:
            return None
        try:
            return (jobs.run_path(self.cfg.runs_root, run_name) / "score" / "beta_hist.png").stat().st_mtime
        except (Refused, OSError):
            return None

    def beta_histogram(self, run_name: str | None):
        """The run's histogram of the dynamic beta_i (written by its score stage), as an image; None until then."""
        if not run_name:
            return None
        try:
            path = jobs.run_path(self.cfg.runs_root, run_name) / "score" / "beta_hist.png"
        except Refused:
            return None
        if not path.is_file():
            return None
        from PIL import Image

        with Image.open(path) as img:
            return img.copy()

    @readable
    def cache(self, run_name: str):
        if not run_name:
            raise Refused("choose a run whose score stage has finished")
        frame, summary = playground.cache_pairs(self.cfg.runs_root, run_name)
        return summary, frame

    # --------------------------------------------------------------------------------------- compare
    def compare_choices(self):
        return gr.update(choices=compare.comparable_runs(self.cfg.runs_root))

    @readable
    def compare(self, names: list[str] | None, curve: str):
        names = list(names or [])
        if not names:
            raise Refused("pick one or more runs")
        if curve not in runview.CURVES:
            raise Refused(f"unknown curve '{curve}'")
        return compare.eval_table(self.cfg.runs_root, names), compare.overlay(self.cfg.runs_root, names, curve, self.tail)

    @readable
    def compare_benchmarks(self, names: list[str] | None):
        names = list(names or [])
        if not names:
            raise Refused("pick one or more runs")
        return compare.bench_table(self.cfg.runs_root, names)


JOB_COLUMNS = ["run", "status", "stages done", "launch", "updated"]  # the Live tab's "All runs" table


def _launch_inputs(values: list) -> tuple:
    """Pop the Train tab's processes and sharding off the end of a handler's inputs (the form's fields come
    first; either may be missing: 1 process, no sharding)."""
    extra = values[len(form.FIELDS):]
    del values[len(form.FIELDS):]
    processes = extra[0] if extra else 1
    sharding = extra[1] if len(extra) > 1 else jobs.NO_SHARDING
    return processes, sharding or jobs.NO_SHARDING


def _choice_label(choice: str | None) -> str:
    if choice == form.LAST_USED:
        return "the last used recipe"
    return choice or "the form's defaults"


def _mtime(run: Path) -> float:
    try:
        return max((run / f).stat().st_mtime for f in ("events.jsonl", jobs.RECIPE_FILE, jobs.JOB_FILE)
                   if (run / f).exists())
    except ValueError:
        return run.stat().st_mtime


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def _grad_accum(run: Path) -> int:
    import yaml

    try:
        tree = yaml.safe_load((run / jobs.RECIPE_FILE).read_text()) or {}
        return int(tree.get("dpo", {}).get("train", {}).get("grad_accum", 4))
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        return 4

