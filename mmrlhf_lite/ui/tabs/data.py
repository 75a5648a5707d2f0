"""The Data tab: pick, upload or create a preference file; its validation report, stats and groups; "Train on
this data" (its wiring to the Train tab is in blocks.py). The file list also holds each run's rounds' sampled
answers with their scores and critiques (`run:<run>/rounds/<r>/groups.jsonl`, databrowser.list_round_data).

`DataHandlers` holds the tab's handlers (what its tests call); `build` lays the tab out and wires its own
events. The work is done by databrowser / datanav.

    python app.py --data-dir data      # Data tab
"""
from __future__ import annotations

import html
import threading
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pandas as pd

from ...data.formats import FORMATS
from .. import databrowser, datanav, jobs, playground
from ..base import UIConfig, readable
from ..safety import Refused

PROBLEM_COLUMNS = ["where", "problem", "how to fix"]
PROBLEM_WIDTHS = ["27%", "35%", "38%"]


class DataHandlers:
    def __init__(self, cfg: UIConfig):
        self.cfg = cfg
        self._margins: dict = {}
        self._margins_lock = threading.Lock()

    def load(self):
        """Page load: the data files, the runs with reward scores, and the first file's report."""
        files = self.data_choices()
        return (files, self.score_run_choices(), *self.inspect(files["value"], "auto", "", ""))

    def data_choices(self, value: str | None = None):
        choices = self.files()
        return gr.update(choices=choices, value=value if value is not None else (choices[0] if choices else None))

    def files(self) -> list[str]:
        """The data files under the data root, then every run's rounds' groups."""
        return databrowser.list_data(self.cfg.data_root) + databrowser.list_round_data(self.cfg.runs_root)

    def score_run_choices(self):
        return gr.update(choices=[""] + playground.cache_runs(self.cfg.runs_root))

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

    def report(self, name: str, fmt: str | None, media_root: str | None):
        return databrowser.load_report(self.cfg.data_root, name, fmt or "auto", (media_root or "").strip() or None,
                                       runs_root=self.cfg.runs_root)

    @readable
    def inspect(self, name: str | None, fmt: str, media_root: str | None, scores_run: str | None = None):
        """Summary, validation report, group slider and the first group."""
        if not name:
            return ("Pick a data file under the data root, upload one, or create the demo set.",
                    pd.DataFrame(columns=PROBLEM_COLUMNS), gr.update(maximum=1, value=0, interactive=False),
                    *self._empty_group())
        report = self.report(name, fmt, media_root)
        summary = databrowser.summary_markdown(report)
        problems = databrowser.problems_frame(report, self.cfg.data_root, extra_roots=(self.cfg.runs_root,))
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
        report = self.report(name, fmt, media_root)
        if not report.groups:
            return self._empty_group()
        i = min(max(int(index or 0), 0), len(report.groups) - 1)
        g = report.groups[i]
        reward = self._reward_for(scores_run, g.id) if scores_run else None
        images, notes = databrowser.group_images(g, self.cfg.data_root, (self.cfg.runs_root,))
        question = databrowser.question_markdown(g, self.cfg.data_root, self.cfg.runs_root)
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
        from ...reward.scorer import load_margins  # imports torch: only once there is something to read

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

    @readable
    def after_inspect(self, name: str | None, fmt: str, media_root: str | None, _scores=None):
        """After every inspect: the filters' choices, no stale CSV, "Train on this data" primary only once a
        usable file is loaded, and the choice to train without the bad rows shown only when there are some."""
        everything = gr.update(choices=[datanav.ALL], value=datanav.ALL)
        if not name:
            return everything, everything, None, gr.update(variant="secondary"), gr.update(visible=False, value=True)
        r = self.report(name, fmt, media_root)
        bad = bad_rows(r)
        skip = gr.update(visible=bool(bad and r.groups), value=True,
                         label=f"Train without the {bad} bad row(s) (data.on_error: skip)")
        return (gr.update(choices=datanav.problem_kinds(r), value=datanav.ALL),
                gr.update(choices=datanav.categories(r), value=datanav.ALL), None,
                gr.update(variant="primary" if r.ok else "secondary"), skip)

    @readable
    def step(self, name, fmt, media_root, index, category, delta: int):
        return datanav.step(self.report(name, fmt, media_root), index, delta, category) if name else 0

    @readable
    def first_of(self, name, fmt, media_root, category):
        return datanav.first_of(self.report(name, fmt, media_root), category) if name else 0

    @readable
    def problems_of_kind(self, name, fmt, media_root, kind):
        return datanav.filtered_problems(self.report(name, fmt, media_root), self.cfg.data_root, kind)

    @readable
    def report_csv(self, name, fmt, media_root):
        if not name:
            return None
        return str(datanav.report_csv(self.report(name, fmt, media_root), self.cfg.data_root, self.cfg.upload_dir))

    @readable
    def use_data(self, name: str | None, fmt: str | None, media_root: str | None, skip_bad: bool):
        """The form's data settings for "Train on this data": the file, its format and media root as this tab
        read them, and `data.on_error: skip` when the file has bad rows and the tab's choice is to leave them
        out (else the pre-flight names them and Start waits)."""
        if not name:
            raise Refused("pick a data file first")
        if databrowser.is_round_data(name):
            raise Refused(f"'{name}' is a run's round (the policy's own answers), shown here to read: to train on "
                          "it, copy the file under the data root (or upload it) and pick that copy")
        databrowser.resolve_data(self.cfg.data_root, name)
        report = self.report(name, fmt, media_root)
        on_error = "skip" if skip_bad and bad_rows(report) else "raise"
        return {"data.path": name.rstrip("/"), "data.format": fmt or "auto",
                "data.media_root": (media_root or "").strip(), "data.on_error": on_error}


def bad_rows(report) -> int:
    """Rows the data layer left out of this file (each listed in the report)."""
    result = report.result
    return sum(result.skipped.values()) if result is not None and getattr(result, "skipped", None) else 0


def build(h: DataHandlers) -> SimpleNamespace:
    with gr.Tab("1 · Data", id="data") as tab:
        with gr.Row():
            data_file = gr.Dropdown(label="Data file (under the data root)", choices=[], allow_custom_value=True,
                                    elem_id="data-file", scale=3)
            fmt = gr.Dropdown(list(FORMATS), value="auto", label="Format", elem_id="data-format", scale=1)
            media_root = gr.Textbox(label="Media root (folder under the data root; empty = the file's folder)",
                                    elem_id="data-media-root", scale=2)
        with gr.Row():
            upload = gr.File(label="Upload a data file (.jsonl .json .parquet), or a .zip of one with its images: "
                                   "a bare data file brings no images, so its image rows cannot load",
                             file_types=[".jsonl", ".ndjson", ".json", ".parquet", ".zip"], type="filepath",
                             elem_id="upload", height=120, scale=3)
            with gr.Column(scale=1):
                demo_groups = gr.Number(value=40, precision=0, label="Demo groups")
                demo_btn = gr.Button("Create the demo set", elem_id="make-demo")
                use_btn = gr.Button("Train on this data →", variant="secondary", elem_id="use-data")
                skip_bad = gr.Checkbox(value=True, visible=False, label="Train without the bad rows",
                                       elem_id="data-skip-bad")
        summary = gr.Markdown(elem_id="data-summary")
        with gr.Row():
            kind = gr.Dropdown([datanav.ALL], value=datanav.ALL, label="Show problems of kind", elem_id="problem-kind",
                               scale=2)
            csv_btn = gr.Button("Download the report (CSV)", elem_id="report-csv-make", scale=1)
            csv_file = gr.File(label="Report CSV", interactive=False, elem_id="report-csv", height=80, scale=2)
        problems = gr.Dataframe(pd.DataFrame(columns=PROBLEM_COLUMNS),
                                label="Validation report: each problem with file:line and what to fix",
                                wrap=True, elem_id="data-problems", elem_classes="mm-fit", max_height=300,
                                column_widths=PROBLEM_WIDTHS)
        gr.Markdown("### Groups")
        with gr.Row():
            index = gr.Slider(0, 1, value=0, step=1, label="Group", elem_id="group-index", scale=3)
            scores_run = gr.Dropdown(label="Reward scores and critiques from run (optional)", choices=[""],
                                     value="", allow_custom_value=True, elem_id="scores-run", scale=2)
        with gr.Row():
            prev_btn = gr.Button("◀ Prev", elem_id="group-prev", scale=1)
            next_btn = gr.Button("Next ▶", elem_id="group-next", scale=1)
            category = gr.Dropdown([datanav.ALL], value=datanav.ALL, label="Category (Prev/Next stay in it)",
                                   elem_id="group-category", scale=3)
        with gr.Row():
            # whole images (contain, never cropped), up to 360 px tall, beside the question
            gallery = gr.Gallery(label="Images", columns=3, height="auto", object_fit="contain",
                                 elem_id="group-images", elem_classes="mm-gallery", scale=2)
            with gr.Column(scale=3):
                question = gr.Markdown(elem_id="group-question")
                pairs = gr.Markdown(elem_id="group-pairs")
        responses = gr.Dataframe(pd.DataFrame(columns=databrowser.RESPONSE_COLUMNS), label="Responses", wrap=True,
                                 elem_id="group-responses",
                                 column_widths=["4%", "6%", "24%", "8%", "8%", "25%", "25%"])

    group_out = [gallery, question, responses, pairs]
    inspect_out = [summary, problems, index, *group_out]
    inspect_in = [data_file, fmt, media_root, scores_run]
    group_in = [data_file, fmt, media_root, index, scores_run]
    uploaded = upload.upload(h.upload, upload, data_file, api_name="upload")
    uploaded.then(h.inspect, inspect_in, inspect_out, api_name=False)
    # the upload box empties (the file is under the data root now), ready for the next one
    uploaded.success(lambda: None, None, upload, api_name=False, show_progress="hidden")
    demo_btn.click(h.make_demo, demo_groups, data_file, api_name="make_demo").then(
        h.inspect, inspect_in, inspect_out, api_name=False)
    data_file.input(h.inspect, inspect_in, inspect_out, api_name="inspect")
    # the list is read again when it is opened: a round finished since the page loaded is there (only the choices:
    # the answer may come after the user's pick, which it must not undo)
    data_file.focus(lambda: gr.update(choices=h.files()), None, data_file, api_name=False, show_progress="hidden")
    fmt.input(h.inspect, inspect_in, inspect_out, api_name=False)
    media_root.submit(h.inspect, inspect_in, inspect_out, api_name=False)
    index.input(h.group, group_in, group_out, api_name="group",
                trigger_mode="always_last")  # dragging or typing a number; bursts collapse to the last value
    scores_run.input(h.group, group_in, group_out, api_name=False)
    summary.change(h.after_inspect, inspect_in, [kind, category, csv_file, use_btn, skip_bad], api_name=False,
                   show_progress="hidden")
    for btn, delta in ((prev_btn, -1), (next_btn, 1)):
        btn.click(lambda n, f, m, i, c, d=delta: h.step(n, f, m, i, c, d), [data_file, fmt, media_root, index, category],
                  index, api_name=False).then(h.group, group_in, group_out, api_name=False)
    # `select`, not `input`: a dropdown fires `input` again when it loses focus (clicking Next would re-jump)
    category.select(h.first_of, [data_file, fmt, media_root, category], index, api_name=False).then(
        h.group, group_in, group_out, api_name=False)
    kind.select(h.problems_of_kind, [data_file, fmt, media_root, kind], problems, api_name=False)
    csv_btn.click(h.report_csv, [data_file, fmt, media_root], csv_file, api_name="report_csv")
    return SimpleNamespace(tab=tab, file=data_file, fmt=fmt, media_root=media_root, skip_bad=skip_bad,
                           scores_run=scores_run, use=use_btn, inspect_in=inspect_in, inspect_out=inspect_out)
