"""The Live tab: one run's progress, curves, messages and log; for a run with online rounds, one curve per
round metric over rounds; Stop / Resume; rename, delete, and the run's log and report to download; the table of
all runs.

The page polls only what can change: one timer, ticking only while this tab is shown, the browser tab is
visible and some run is active (starting, running, stopping); it stops itself when the last run ends, on the
tick that shows that end (whether a run is active is read before the view). A browser tab shown again catches
up at once (`shown_again`). Each tick sends only the outputs whose content changed (`tick`: a fingerprint per
output), so a plot gets new data in place and is never re-drawn for nothing. Job state is read from the run
folders on every look.

`LiveHandlers` holds the tab's handlers (what its tests call); `build` lays the tab out and wires its own
events; blocks.py turns the timer on and off as tabs and the page's visibility change.

    python app.py            # Live tab
"""
from __future__ import annotations

import hashlib
import html
import itertools
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pandas as pd

from ...events import EVENTS_FILE
from ...recipe import STAGES
from ...runs import RunDir
from .. import evalcard, jobs, runview, serving
from ..base import UIConfig, log, readable
from ..safety import Refused

JOB_COLUMNS = ["run", "status", "stages done", "launch", "updated"]  # the "All runs" table
# the outputs of `view` and `tick`, in order (the first 14 are the API's /view answer as before)
# the fingerprints' entry (never an output) saying whether some run was active when they were read
ACTIVE = "_active"
OUTPUTS = ["status", "progress", "error", "points", *[f"plot-{n}" for n in runview.CURVES], "tokens", "gpu", "log",
           "jobs", "stop", "resume", "card", "hist", "rename", "delete", "rounds",
           *[f"plot-{n}" for n in runview.ROUND_CURVES]]


class LiveHandlers:
    def __init__(self, cfg: UIConfig):
        self.cfg = cfg
        self.tail = runview.EventTail()
        # the newest view returned to each page: (read number, when); see `_newest`
        self._reads = itertools.count()
        self._shown: dict[str, tuple[int, float]] = {}
        self._shown_lock = threading.Lock()

    # A page's views come from several handlers (the timer's tick, a pick, a tab opened, Start), which run at the
    # same time and finish in any order. A view read earlier that finishes later would replace a newer one: CI
    # saw a curve's point count go 24 -> 23 (a pick's view, slower since it draws the margins histogram, read
    # before a tick that finished first), and a tick for the run shown before showed that run's outputs under
    # a newly started one for a timer period. So each view is numbered when it starts reading, and one that
    # finishes after a newer one was returned to the same page changes nothing.

    def _read_number(self) -> int:
        with self._shown_lock:
            return next(self._reads)

    def _newest(self, request: gr.Request | None, number: int) -> bool:
        """Whether the view read as `number` is the newest one returned to the page of `request` (and, if it is,
        that it now is). Without a page (a direct call, the API), always."""
        session = getattr(request, "session_hash", None)
        if not session:
            return True
        now = time.monotonic()
        with self._shown_lock:
            if number < self._shown.get(session, (-1, now))[0]:
                return False
            self._shown[session] = (number, now)
            if len(self._shown) > 1000:  # pages gone for an hour
                self._shown = {k: v for k, v in self._shown.items() if now - v[1] < 3600}
            return True

    # ------------------------------------------------------------------------------------ lists
    def choices(self, current: str | None = None):
        """The run picker: every run, the current one kept, else the first active one (else the newest)."""
        runs = jobs.list_runs(self.cfg.runs_root)
        if current in runs:
            return gr.update(choices=runs, value=current)
        active = [n for n in runs if self.state(n).active]
        return gr.update(choices=runs, value=(active or runs or [None])[0])

    def state(self, run_name: str) -> jobs.JobState:
        run = self.cfg.runs_root / run_name
        return jobs.job_state(run, self.tail.events(run))

    def any_active(self) -> bool:
        return any(self.state(n).active for n in jobs.list_runs(self.cfg.runs_root))

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

    # ------------------------------------------------------------------------------------ the view
    def parts(self, run_name: str | None) -> dict:
        """Every output of the view by name (OUTPUTS); the histogram as the key of its file, loaded by `view`
        and `tick` only when it changed."""
        if not run_name:
            empty = runview.curve_table()
            out = {"status": "No run selected: start one in the Train tab.", "progress": runview.progress_html([]),
                   "error": "", "points": "", "tokens": runview.with_series(empty, runview.SPEED_SERIES),
                   "gpu": gr.update(value=runview.with_series(empty, runview.GPU_SERIES), visible=False), "log": "",
                   "jobs": self.jobs_frame(), "stop": gr.update(interactive=False),
                   "resume": gr.update(interactive=False), "card": "", "hist": None,
                   "rename": gr.update(interactive=False), "delete": gr.update(interactive=False)}
            out.update({f"plot-{n}": runview.curve_plot([], n) for n in runview.CURVES})
            out.update(self.round_parts([], False))
            return out
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
        gpu = runview.gpu_memory(events)
        log_text = jobs.tail_text(run / jobs.CONSOLE_LOG, 24_000)
        report, report_mtime = evalcard.report_of(self.cfg.runs_root, run_name)
        out = {"status": status, "progress": runview.progress_html(views), "error": error, "points": points,
               "tokens": runview.with_series(runview.tokens_per_second(events, _grad_accum(run)), runview.SPEED_SERIES),
               "gpu": gr.update(value=runview.with_series(gpu, runview.GPU_SERIES), visible=not gpu.empty),
               "log": runview.explain_library_noise("\n".join(log_text.splitlines()[-60:])),
               "jobs": self.jobs_frame(), "stop": gr.update(interactive=state.active),
               "resume": gr.update(interactive=state.resumable), "card": evalcard.card_html(report),
               "hist": (str(run), self.beta_histogram_mtime(run_name)),
               # never renamed or deleted while its job runs (the handlers refuse it too)
               "rename": gr.update(interactive=not state.active), "delete": gr.update(interactive=not state.active)}
        out.update({f"plot-{n}": runview.curve_plot(events, n) for n in runview.CURVES})
        out.update(self.round_parts(events, _rounds_asked(run)))
        return out

    @staticmethod
    def round_parts(events: list[dict], asked: bool) -> dict:
        """The rounds section (shown for a run whose recipe asks for rounds or that has a round's metrics) and its
        plots over rounds."""
        shown = asked or runview.has_rounds(events)
        out = {"rounds": gr.update(visible=shown)}
        events = events if shown else []
        order = runview.round_order(events) or None
        out.update({f"plot-{n}": gr.update(value=runview.round_plot(events, n), sort=order)
                    for n in runview.ROUND_CURVES})
        return out

    # Whether a run is active is read BEFORE the view, never after: a run that ends between the two would
    # otherwise be shown running while the timer turns off, and the page stays on "running" for good.

    @readable
    def view(self, run_name: str | None, request: gr.Request = None):
        """Everything the Live tab shows for one run (OUTPUTS), and the fingerprints `tick` compares with (with
        ACTIVE: whether some run was active when the view was read, for `follow`); nothing changed when a view
        read later was already returned to the page."""
        number = self._read_number()
        parts, sig = self._read(run_name)
        parts["hist"] = self.beta_histogram(run_name)
        if not self._newest(request, number):
            return (*[gr.skip()] * len(OUTPUTS), gr.skip())
        return (*[parts[k] for k in OUTPUTS], sig)

    def _read(self, run_name: str | None) -> tuple[dict, dict]:
        """The view's parts and their fingerprints, with ACTIVE read first."""
        active = self.any_active()
        parts = self.parts(run_name)
        sig = {k: _fingerprint(v) for k, v in parts.items()}
        sig[ACTIVE] = active
        return parts, sig

    def changes(self, run_name: str | None, last: dict | None) -> tuple[list, dict | None, bool]:
        """(the outputs whose content changed since the fingerprints `last`, the rest `gr.skip()`; the new
        fingerprints; whether some run was active before they were read)."""
        try:
            parts, sig = self._read(run_name)
        except Exception:  # noqa: BLE001 - a run renamed or deleted meanwhile: nothing to show; the timer
            return [gr.skip()] * len(OUTPUTS), last, self.any_active()  # follows the other runs
        last = last or {}
        active = sig[ACTIVE]
        out = []
        for k in OUTPUTS:
            if sig[k] == last.get(k):
                out.append(gr.skip())
            elif k == "hist":
                out.append(self.beta_histogram(run_name))
            else:
                out.append(parts[k])
        return out, sig, active

    def tick(self, run_name: str | None, last: dict | None, request: gr.Request = None):
        """The timer: only the outputs whose content changed (no traffic, no redraw for the rest), the new
        fingerprints, and the timer itself, turned off once no run was active before the outputs were read
        (the tick that turns it off has shown every run's end). Nothing when a newer view reached the page
        first."""
        number = self._read_number()
        out, sig, active = self.changes(run_name, last)
        if not self._newest(request, number):
            return (*[gr.skip()] * len(OUTPUTS), gr.skip(), gr.skip())
        return (*out, sig, gr.skip() if active else gr.Timer(active=False))

    def follow(self, sig: dict | None):
        """The timer after a view: on while some run is active, or was when the view was read (one more tick
        then shows the end of a run that ended meanwhile)."""
        return gr.Timer(active=bool((sig or {}).get(ACTIVE)) or self.any_active())

    def shown_again(self, tab: str | None, run_name: str | None, last: dict | None, request: gr.Request = None):
        """The browser tab shown again: on the Live tab, what changed while it was hidden (a run may have ended
        then, and no tick would come to show it) and the timer on while a run is active; on another tab,
        nothing (its timer stays off)."""
        if tab != "live":
            return (*[gr.skip()] * len(OUTPUTS), last, gr.Timer(active=False))
        number = self._read_number()
        out, sig, active = self.changes(run_name, last)
        if not self._newest(request, number):  # a newer view is shown; the timer as it says
            return (*[gr.skip()] * len(OUTPUTS), gr.skip(), gr.Timer(active=active))
        return (*out, sig, gr.Timer(active=active))

    # ------------------------------------------------------------------------------------ jobs
    @readable
    def stop(self, run_name: str):
        return jobs.stop_run(jobs.run_path(self.cfg.runs_root, run_name))

    @readable
    def resume(self, run_name: str):
        run = jobs.run_path(self.cfg.runs_root, run_name)
        jobs.resume_run(run)
        return (f"Resumed **{html.escape(run_name)}** ({jobs.launch_label(*jobs.launch_of(run))}) at "
                f"{time.strftime('%H:%M:%S')}: finished stages are skipped, training continues from its checkpoint.")

    @readable
    def ask_delete(self, run_name: str | None):
        """Delete, first click: say what goes (and refuse a running run), show the confirmation."""
        if not run_name:
            raise Refused("choose a run")
        run = jobs.run_path(self.cfg.runs_root, run_name)
        state = self.state(run_name)
        if state.active:
            raise Refused(f"run '{run_name}' is {state.status}: Stop it and wait until it has stopped before you "
                          "delete it")
        _not_served(run, "delete")
        size = jobs.folder_size(run) / 2**20
        notice = (f"**Delete run {html.escape(run_name)}?** Its folder goes, with everything in it ({size:.1f} MB: "
                  "recipe, log, checkpoints, caches, exports). This cannot be undone.")
        return notice, gr.update(visible=True, value=f"Delete {run_name} for good"), gr.update(visible=True), run_name

    @readable
    def delete(self, pending: str | None):
        """Delete, confirmed: the run that was asked about (not whatever is picked now)."""
        if not pending:
            raise Refused("nothing is waiting to be deleted; click Delete first")
        _not_served(jobs.run_path(self.cfg.runs_root, pending), "delete")
        message = jobs.delete_run(self.cfg.runs_root, pending)
        return (f"{html.escape(message[0].upper() + message[1:])}.", "", gr.update(visible=False),
                gr.update(visible=False), None, self.choices(None))

    def cancel_delete(self):
        return "", gr.update(visible=False), gr.update(visible=False), None

    @readable
    def rename(self, run_name: str | None, new_name: str | None):
        if not run_name:
            raise Refused("choose a run")
        new_name = (new_name or "").strip()
        _not_served(jobs.run_path(self.cfg.runs_root, run_name), "rename")
        message = jobs.rename_run(self.cfg.runs_root, run_name, new_name)
        return f"{html.escape(message[0].upper() + message[1:])}.", "", self.choices(new_name)

    @readable
    def run_files(self, run_name: str | None):
        """The run's log and evaluation report, copied for download."""
        if not run_name:
            raise Refused("choose a run")
        files = jobs.run_files(jobs.run_path(self.cfg.runs_root, run_name), self.cfg.upload_dir)
        return gr.update(value=[str(f) for f in files], visible=True)

    # ------------------------------------------------------------------------------------ histogram
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


def _fingerprint(value) -> str:
    """What an output shows, as a short hash: equal when a re-send would change nothing on the page."""
    if isinstance(value, pd.DataFrame):
        text = "|".join(map(str, value.columns)) + "\n" + value.to_csv(index=False)
    elif isinstance(value, dict):
        text = repr(sorted((k, _fingerprint(v)) for k, v in value.items()))
    else:
        text = repr(value)
    return hashlib.sha1(text.encode("utf-8", "replace")).hexdigest()


def _mtime(run: Path) -> float:
    try:
        return max((run / f).stat().st_mtime for f in ("events.jsonl", jobs.RECIPE_FILE, jobs.JOB_FILE)
                   if (run / f).exists())
    except ValueError:
        return run.stat().st_mtime


def _grad_accum(run: Path) -> int:
    import yaml

    try:
        tree = yaml.safe_load((run / jobs.RECIPE_FILE).read_text()) or {}
        return int(tree.get("dpo", {}).get("train", {}).get("grad_accum", 4))
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        return 4


def _rounds_asked(run: Path) -> bool:
    """Whether the run's recipe asks for online rounds (rounds.n > 0)."""
    import yaml

    try:
        tree = yaml.safe_load((run / jobs.RECIPE_FILE).read_text()) or {}
        return int((tree.get("rounds") or {}).get("n") or 0) > 0
    except (OSError, ValueError, TypeError, AttributeError, yaml.YAMLError):
        return False


def _round_plot(name: str, height: int = 220):
    """A plot over rounds: x is the round as text (a nominal axis: one tick per round; its `sort`, the rounds in
    numeric order, comes with the data), each point marked (`mm-plot`: a round-0-only series is one point)."""
    title, ylabel, _ = runview.ROUND_CURVES[name]
    return gr.LinePlot(runview.round_plot([], name), x="round", y="value", color="series", title=title,
                       y_title=ylabel, x_title="round", sort=None, height=height, elem_id=f"plot-{name}",
                       elem_classes="mm-plot")


def _plot(name: str, height: int = 220):
    title, ylabel, _ = runview.CURVES.get(name, (name, "", []))
    return gr.LinePlot(runview.curve_plot([], name), x="step", y="value", color="series", title=title,
                       y_title=ylabel, x_title="step", height=height, elem_id=f"plot-{name}",
                       elem_classes="mm-plot")


def _not_served(run: Path, what: str) -> None:
    """Refuse to touch a run folder whose reward model is being served (its service reads it and writes its log
    there; a renamed or deleted folder would leave it running untracked)."""
    port = serving.serving_port(run)
    if port is not None:
        raise Refused(f"run '{run.name}' is being served on port {port}: Stop serving it (Reward playground) "
                      f"before you {what} it")


def build(h: LiveHandlers) -> SimpleNamespace:
    with gr.Tab("3 · Live", id="live") as tab:
        with gr.Row():
            live_run = gr.Dropdown(label="Run", choices=[], allow_custom_value=True, elem_id="live-run", scale=3)
            stop = gr.Button("Stop", variant="stop", interactive=False, elem_id="stop")
            resume = gr.Button("Resume", interactive=False, elem_id="resume")
        with gr.Row(equal_height=True):  # the run's folder: renamed, deleted (never while it runs), its files
            new_name = gr.Textbox(show_label=False, placeholder="a new name for this run", elem_id="rename-to",
                                  container=False, scale=3)
            rename = gr.Button("Rename", size="sm", elem_id="rename", scale=1)
            delete = gr.Button("Delete…", size="sm", elem_id="delete", scale=1)
            files_btn = gr.Button("Log and report ↓", size="sm", elem_id="run-files-make", scale=1)
        with gr.Row(equal_height=True):
            confirm_text = gr.Markdown(elem_id="delete-notice")
            confirm = gr.Button("Delete for good", variant="stop", size="sm", visible=False, elem_id="delete-confirm",
                                scale=0)
            cancel = gr.Button("Cancel", size="sm", visible=False, elem_id="delete-cancel", scale=0)
        files = gr.File(label="The run's log and report", file_count="multiple", interactive=False, visible=False,
                        elem_id="run-files", height=90)
        status = gr.Markdown(elem_id="run-status")
        action = gr.Markdown(elem_id="run-action")
        progress = gr.HTML(elem_id="run-progress")
        eval_card = gr.HTML(elem_id="run-eval")  # the final evaluation, once `eval` has written its report
        error = gr.Markdown(elem_id="run-error")
        points = gr.Markdown(elem_id="curve-points")
        names = list(runview.CURVES)
        plots = []
        for i in range(0, len(names), 2):
            with gr.Row():
                plots += [_plot(n) for n in names[i:i + 2]]
        with gr.Column(visible=False, elem_id="rounds-curves") as rounds_box:
            gr.Markdown("### Online rounds: held-out and sampled metrics per round (round 0: the starting policy)")
            round_names = list(runview.ROUND_CURVES)
            round_plots = []
            for i in range(0, len(round_names), 2):
                with gr.Row():
                    round_plots += [_round_plot(n) for n in round_names[i:i + 2]]
        with gr.Row():
            speed = gr.LinePlot(runview.with_series(runview.curve_table(), runview.SPEED_SERIES), x="step", y="value",
                                color="series", title="DPO tokens/s", y_title="tokens/s", x_title="step", height=220,
                                elem_id="plot-tokens", elem_classes="mm-plot")
            gpu = gr.LinePlot(runview.with_series(runview.curve_table(), runview.GPU_SERIES), x="step", y="value",
                              color="series", title="GPU memory (GB)", y_title="GB", x_title="step", height=220,
                              visible=False, elem_id="plot-gpu", elem_classes="mm-plot")
        beta_hist = gr.Image(label="Reward margins and the dynamic beta_i of the training pairs (stage score)",
                             type="pil", interactive=False, height=260, elem_id="beta-hist")
        log_box = gr.Textbox(label="Log (console.log, newest last)", lines=12, max_lines=12, autoscroll=True,
                             elem_id="run-log")
        jobs_table = gr.Dataframe(pd.DataFrame(columns=JOB_COLUMNS), label="All runs", elem_id="jobs", interactive=False)
        timer = gr.Timer(h.cfg.poll_seconds, active=False)  # inside the Tab (outside, it broke the tab bar)
        sig = gr.State(None)
        pending = gr.State(None)  # the run the delete confirmation is about
    by_name = {"status": status, "progress": progress, "error": error, "points": points, "tokens": speed, "gpu": gpu,
               "log": log_box, "jobs": jobs_table, "stop": stop, "resume": resume, "card": eval_card, "hist": beta_hist,
               "rename": rename, "delete": delete, "rounds": rounds_box}
    by_name.update({f"plot-{n}": p for n, p in zip(names, plots)})
    by_name.update({f"plot-{n}": p for n, p in zip(round_names, round_plots)})
    outputs = [by_name[k] for k in OUTPUTS]

    def show(dep):
        """After an action: the view again, and the timer on while a run is active."""
        return dep.then(h.view, live_run, [*outputs, sig], api_name=False).then(h.follow, sig, timer, api_name=False)

    # another run shown: no files or delete confirmation of the one before stay under it (nor its action's
    # message: cleared when a run is picked, and by Start, in blocks.py; a rename or delete keeps its own)
    live_run.change(lambda: (gr.update(value=None, visible=False), *h.cancel_delete()), None,
                    [files, confirm_text, confirm, cancel, pending], api_name=False, show_progress="hidden")
    live_run.input(lambda: "", None, action, api_name=False, show_progress="hidden")
    # the list is read when it is opened (a run started elsewhere, by the CLI or another page, is there); only
    # the choices: its answer may come after the user's pick, which it must not undo
    live_run.focus(lambda: gr.update(choices=jobs.list_runs(h.cfg.runs_root)), None, live_run, api_name=False,
                   show_progress="hidden")
    show(live_run.input(h.view, live_run, [*outputs, sig], api_name="view"))
    timer.tick(h.tick, [live_run, sig], [*outputs, sig, timer], api_name=False, show_progress="hidden",
               concurrency_limit=8)
    # the log box shows its newest line after every update (not where the user last scrolled to)
    log_box.change(None, None, None, js="() => { const t = document.querySelector('#run-log textarea'); "
                                        "if (t) t.scrollTop = t.scrollHeight; }")
    show(stop.click(h.stop, live_run, action, api_name="stop"))
    show(resume.click(h.resume, live_run, action, api_name="resume"))
    files_btn.click(h.run_files, live_run, files, api_name="run_files")
    delete.click(h.ask_delete, live_run, [confirm_text, confirm, cancel, pending], api_name=False)
    cancel.click(h.cancel_delete, None, [confirm_text, confirm, cancel, pending], api_name=False)
    show(confirm.click(h.delete, pending, [action, confirm_text, confirm, cancel, pending, live_run],
                       api_name="delete_run"))
    show(rename.click(h.rename, [live_run, new_name], [action, new_name, live_run], api_name="rename_run"))
    return SimpleNamespace(tab=tab, run=live_run, outputs=outputs, sig=sig, timer=timer, action=action)
