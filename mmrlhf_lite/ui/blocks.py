"""The page: six tabs (Data, Train, Live, Reward playground, Compare, Policy) wired to `handlers.Handlers`
(the Policy tab to `policy.PolicyHandlers`).

Layout and wiring only. GRADIO_ANALYTICS_ENABLED must be False before this module builds the Blocks
(app.py sets it before importing gradio): then the page and the server make no outside request.
Every event has an `api_name`, so `gradio_client` drives the same actions as the browser.

    python app.py --runs-dir runs --data-dir data
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import gradio as gr
import pandas as pd

from ..data.formats import FORMATS
from . import databrowser, datanav, essentials, evalcard, form, jobs, policy, runview
from .handlers import JOB_COLUMNS, Handlers, UIConfig, readable

SHARDING_CHOICES = [("none (each GPU holds the model: DDP)", jobs.NO_SHARDING),
                    ("FSDP2 (the base sharded over the GPUs)", jobs.FSDP2)]
SHARDING_HELP = ("DDP while one GPU holds the whole model (fastest); FSDP2 when it does not (reward and dpo "
                 "then hold 1/N of the base per GPU)")

CSS = """
.mm-progress {display:flex; flex-direction:column; gap:6px}
.mm-stage {display:grid; grid-template-columns:90px 1fr 320px; align-items:center; gap:10px; font-size:14px}
.mm-bar {background:#e5e7eb; border-radius:4px; height:12px; overflow:hidden}
.mm-bar > div {height:100%}
.mm-cards {display:flex; gap:12px; flex-wrap:wrap}
.mm-card {flex:1 1 200px; border:1px solid #d1d5db; border-radius:8px; padding:10px; font-size:14px}
.mm-card[data-rank='1'] {border-color:#16a34a; border-width:2px}
.mm-card-answer {margin:6px 0; font-style:italic}
.mm-card-critique {color:#374151; word-break:break-word}
.mm-gallery {height:auto !important; min-height:0 !important}
.mm-gallery .grid-wrap {height:auto !important; max-height:none !important; overflow:visible !important}
.mm-gallery .thumbnail-item {max-height:360px}
.mm-fit table {table-layout:fixed; width:100%}
.mm-fit td, .mm-fit th, .mm-fit td *, .mm-fit th * {overflow-wrap:anywhere; word-break:break-word; white-space:normal}
"""

INTRO = ("**mmrlhf-lite**: preference data → critique reward model → MM-DPO, on one GPU. "
         "Every job here is `python -m mmrlhf_lite.train` on a recipe written into its run folder; "
         "this page only reads the run folders.")


def _input(spec: form.FieldSpec):
    common = {"label": spec.key, "info": spec.info, "elem_id": "f-" + spec.key.replace(".", "-")}
    if spec.kind == "bool":
        return gr.Checkbox(value=spec.default, **common)
    if spec.kind == "choice":
        return gr.Dropdown(choices=list(spec.choices), value=spec.default, **common)
    if spec.kind == "multi":
        return gr.CheckboxGroup(choices=list(spec.choices), value=list(spec.default), **common)
    if spec.kind in ("int", "float"):
        return gr.Number(value=spec.default, precision=0 if spec.kind == "int" else None, **common)
    if spec.kind == "list":
        return gr.Textbox(value=", ".join(spec.default), **common)
    return gr.Textbox(value=spec.default or "", **common)


def _plot(name: str, height: int = 220):
    title, ylabel, _ = runview.CURVES.get(name, (name, "", []))
    return gr.LinePlot(runview.curve_plot([], name), x="step", y="value", color="series",
                       title=title, y_title=ylabel, x_title="step", height=height, elem_id=f"plot-{name}")


def build_app(cfg: UIConfig) -> gr.Blocks:
    if os.environ.get("GRADIO_ANALYTICS_ENABLED") != "False":
        raise RuntimeError("set GRADIO_ANALYTICS_ENABLED=False before building the UI (app.py does)")
    h = Handlers(cfg)
    with gr.Blocks(title="mmrlhf-lite", analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown(INTRO)
        with gr.Tabs(selected="data") as tabs:
            data = _data_tab(h)
            train = _train_tab(h)
            live = _live_tab(h)
            pg = _playground_tab(h)
            cmp = _compare_tab(h)
            pol = policy.build_tab(cfg.runs_root)

        # a (re)loaded page finds everything again from the folders, running jobs included
        app.load(h.load_data, None, [data.file, data.scores_run, *data.inspect_out], api_name=False)
        train.refresh(app.load(h.load_train, None, [train.recipe, *train.form, train.run_name], api_name=False).then(
            h.remember, [train.recipe, train.run_name, *train.form], [train.loaded, train.load], api_name=False))
        app.load(h.load_live, None, [live.run, *live.outputs], api_name=False)
        app.load(h.load_lists, None, [pg.run, pg.cache_run, cmp.runs], api_name=False)
        train.refresh(data.use.click(h.use_data, data.file, [train.data_path, tabs], api_name="use_data"))
        started = train.start.click(h.start, [train.run_name, *train.form, train.processes, train.sharding],
                                    [train.status, tabs, live.run],
                                    api_name="start")
        started.then(h.view, live.run, live.outputs, api_name=False)
        started.success(h.remember, [train.recipe, train.run_name, *train.form], [train.loaded, train.load],
                        api_name=False)  # what a run started with is kept in its folder: not an edit to guard
        app.load(pol.handlers.choices, None, [pol.run, pol.notice], api_name=False)
        tabs.select(pol.handlers.choices, pol.run, [pol.run, pol.notice], api_name=False)
        tabs.select(h.refresh_lists, None, [live.run, pg.run, pg.cache_run, cmp.runs, data.scores_run],
                    api_name=False)
    return app


# --------------------------------------------------------------------------------------------------
# tabs

def _data_tab(h: Handlers):
    with gr.Tab("1 · Data", id="data"):
        with gr.Row():
            data_file = gr.Dropdown(label="Data file (under the data root)", choices=[], allow_custom_value=True,
                                    elem_id="data-file", scale=3)
            fmt = gr.Dropdown(list(FORMATS), value="auto", label="Format", scale=1)
            media_root = gr.Textbox(label="Media root (folder under the data root; empty = the file's folder)",
                                    scale=2)
        with gr.Row():
            upload = gr.File(label="Upload a data file (.jsonl .json .parquet), or a .zip of one with its images: "
                                   "a bare data file brings no images, so its image rows cannot load",
                             file_types=[".jsonl", ".ndjson", ".json", ".parquet", ".zip"], type="filepath",
                             elem_id="upload", height=120, scale=3)
            with gr.Column(scale=1):
                demo_groups = gr.Number(value=40, precision=0, label="Demo groups")
                demo_btn = gr.Button("Create the demo set", elem_id="make-demo")
                use_btn = gr.Button("Train on this data →", variant="secondary", elem_id="use-data")
        summary = gr.Markdown(elem_id="data-summary")
        with gr.Row():
            kind = gr.Dropdown([datanav.ALL], value=datanav.ALL, label="Show problems of kind", elem_id="problem-kind",
                               scale=2)
            csv_btn = gr.Button("Download the report (CSV)", elem_id="report-csv-make", scale=1)
            csv_file = gr.File(label="Report CSV", interactive=False, elem_id="report-csv", height=80, scale=2)
        problems = gr.Dataframe(pd.DataFrame(columns=["where", "problem", "how to fix"]),
                                label="Validation report: each problem with file:line and what to fix",
                                wrap=True, elem_id="data-problems", max_height=300)
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
    upload.upload(h.upload, upload, data_file, api_name="upload").then(
        h.inspect, inspect_in, inspect_out, api_name=False)
    demo_btn.click(h.make_demo, demo_groups, data_file, api_name="make_demo").then(
        h.inspect, inspect_in, inspect_out, api_name=False)
    data_file.input(h.inspect, inspect_in, inspect_out, api_name="inspect")
    fmt.input(h.inspect, inspect_in, inspect_out, api_name=False)
    media_root.submit(h.inspect, inspect_in, inspect_out, api_name=False)
    index.input(h.group, [data_file, fmt, media_root, index, scores_run], group_out, api_name="group",
                trigger_mode="always_last")  # dragging or typing a number; bursts collapse to the last value
    scores_run.input(h.group, [data_file, fmt, media_root, index, scores_run], group_out, api_name=False)

    def report(name, fmt_, media):
        return databrowser.load_report(h.cfg.data_root, name, fmt_ or "auto", (media or "").strip() or None)

    @readable
    def filters(name, fmt_, media, _scores=None):
        """After every inspect: the filters' choices, no stale CSV, and "Train on this data" primary only
        once a usable file is loaded."""
        if not name:
            return (gr.update(choices=[datanav.ALL], value=datanav.ALL), gr.update(choices=[datanav.ALL], value=datanav.ALL),
                    None, gr.update(variant="secondary"))
        r = report(name, fmt_, media)
        return (gr.update(choices=datanav.problem_kinds(r), value=datanav.ALL),
                gr.update(choices=datanav.categories(r), value=datanav.ALL), None,
                gr.update(variant="primary" if r.ok else "secondary"))

    @readable
    def step(name, fmt_, media, i, cat, delta):
        return datanav.step(report(name, fmt_, media), i, delta, cat) if name else 0

    group_in = [data_file, fmt, media_root, index, scores_run]
    summary.change(filters, inspect_in, [kind, category, csv_file, use_btn], api_name=False, show_progress="hidden")
    for btn, delta in ((prev_btn, -1), (next_btn, 1)):
        btn.click(lambda n, f, m, i, c, d=delta: step(n, f, m, i, c, d), [data_file, fmt, media_root, index, category],
                  index, api_name=False).then(h.group, group_in, group_out, api_name=False)
    # `select`, not `input`: a dropdown fires `input` again when it loses focus (clicking Next would re-jump)
    category.select(readable(lambda n, f, m, c: datanav.first_of(report(n, f, m), c) if n else 0),
                   [data_file, fmt, media_root, category], index, api_name=False).then(h.group, group_in, group_out,
                                                                                      api_name=False)
    kind.select(readable(lambda n, f, m, k: datanav.filtered_problems(report(n, f, m), h.cfg.data_root, k)),
               [data_file, fmt, media_root, kind], problems, api_name=False)
    csv_btn.click(readable(lambda n, f, m: str(datanav.report_csv(report(n, f, m), h.cfg.data_root, h.cfg.upload_dir))
                           if n else None), [data_file, fmt, media_root], csv_file, api_name="report_csv")
    return SimpleNamespace(file=data_file, scores_run=scores_run, use=use_btn, inspect_in=inspect_in,
                           inspect_out=inspect_out)


def _train_tab(h: Handlers):
    inputs: dict[str, gr.components.Component] = {}

    def row_of(keys):
        with gr.Row():
            for key in keys:
                inputs[key] = _input(form.FIELD_BY_KEY[key])

    with gr.Tab("2 · Train", id="train"):
        with gr.Row():
            recipe_dd = gr.Dropdown(label="Recipe (recipes/ or the last one used)", choices=[], elem_id="recipe",
                                    allow_custom_value=True,
                                    scale=2)
            run_name = gr.Textbox(label="Run name (a new folder under the runs root)", elem_id="run-name", scale=2)
            processes = gr.Number(label="Processes (GPUs; > 1 launches torchrun, docs/distributed.md)", value=1,
                                  precision=0, minimum=1, elem_id="processes", scale=1)
            sharding = gr.Radio(SHARDING_CHOICES, value=jobs.NO_SHARDING, label="Sharding (with Processes > 1)",
                                info=SHARDING_HELP, interactive=False, elem_id="sharding", scale=2)
        # the essentials and the pre-flight beside Start; every other setting is folded below
        with gr.Row(equal_height=False):
            with gr.Column(scale=3, elem_id="train-essentials"):
                gr.Markdown("**Essentials** (every other setting is in the closed sections below)")
                row_of(("model.path", "data.path", "data.demo.groups"))
                row_of(("run.stages", "model.lora_r"))
                row_of(("reward.train.max_steps", "reward.train.epochs", "reward.train.learning_rate"))
                row_of(("dpo.train.max_steps", "dpo.train.epochs", "dpo.train.learning_rate"))
            with gr.Column(scale=2, elem_id="train-side"):
                start = gr.Button("Start", variant="primary", elem_id="start")
                with gr.Row():
                    presets = [gr.Button(f"Preset: {name}", size="sm", elem_id=f"preset-{i}")
                               for i, name in enumerate(essentials.PRESETS)]
                status = gr.Markdown(elem_id="train-status")
                load = gr.Button("Load the recipe (discard my edits)", visible=False, variant="stop",
                                 elem_id="recipe-load")
                preset_apply = gr.Button("Apply the preset (discard my edits)", visible=False, variant="stop",
                                         elem_id="preset-apply")
                estimate = gr.Markdown("**Pre-flight**: ...", elem_id="train-estimate")
        preview = gr.Textbox(label="Recipe YAML that Start will run: only the keys whose values differ from the "
                                   "defaults (read-only; updated as the form changes)",
                             interactive=False, lines=12, max_lines=40, elem_id="train-yaml")
        with gr.Row():
            save_name = gr.Textbox(label="Save the form as recipe (name)", elem_id="save-name", scale=3)
            save = gr.Button("Save as recipe", elem_id="save-recipe", scale=1)
        loaded = gr.State(None)  # the form right after the last load/save/start (see Handlers.choose_recipe)
        pending = gr.State(None)  # the preset waiting for "Apply (discard my edits)"
        for section in ("model", "data", "reward", "cache", "dpo", "eval", "run"):
            specs = [s for s in form.FIELDS if s.section == section and s.key not in essentials.ESSENTIALS]
            with gr.Accordion(f"{section} ({len(specs)} more settings)", open=False, elem_id=f"section-{section}"):
                for i in range(0, len(specs), 3):
                    with gr.Row():
                        for spec in specs[i:i + 3]:
                            inputs[spec.key] = _input(spec)
    form_inputs = [inputs[s.key] for s in form.FIELDS]
    # the demo set's settings only matter (and only show) while data.path is `demo`
    demo_inputs = [inputs[s.key] for s in form.FIELDS if s.key.startswith("data.demo.")]
    inputs["data.path"].change(lambda path: [gr.update(visible=(path or "").strip() == "demo")] * len(demo_inputs),
                               inputs["data.path"], demo_inputs, api_name=False, show_progress="hidden")
    remember = ([recipe_dd, run_name, *form_inputs], [loaded, load])
    # only a pick from the list loads (opening the list and clicking elsewhere fires `input`, not `select`)
    chosen = recipe_dd.select(h.choose_recipe, [recipe_dd, loaded, run_name, *form_inputs],
                              [*form_inputs, run_name, loaded, status, load], api_name=False)
    loaded_dep = load.click(h.load_recipe, recipe_dd, [*form_inputs, run_name], api_name="load_recipe")
    loaded_dep.success(
        h.remember, *remember, api_name=False).then(lambda: "", None, status, api_name=False)
    save.click(h.save_recipe, [save_name, *form_inputs], [status, recipe_dd], api_name="save_recipe").success(
        h.remember, *remember, api_name=False)
    # presets set a few keys, and over edits of those keys ask first (like picking another recipe)
    preset_out = [*form_inputs, loaded, status, preset_apply, pending]
    preset_deps = [button.click(lambda *a, n=name: h.preset(n, *a), [loaded, *form_inputs], preset_out,
                                api_name=False) for button, name in zip(presets, essentials.PRESETS)]
    applied = preset_apply.click(h.apply_preset, [pending, loaded, *form_inputs], preset_out, api_name=False)
    # the YAML preview and the pre-flight follow the form: each edit (`input`: typing, picking), and after
    # every change made for the user (a recipe load, a preset, "Train on this data", the page load), chained
    # as `refresh` (`change` events would fire once per field on every recipe load: ~90 round trips)
    def refresh(dep):
        return dep.then(h.recipe_yaml, [run_name, *form_inputs], preview, api_name=False,
                        show_progress="hidden").then(h.estimate, launch_inputs, estimate, api_name=False,
                                                     show_progress="minimal")

    # (a text box's `input` misses text set at once, as by a paste or a browser's autofill: `change` for those)
    def edited(components):
        return [c.change if isinstance(c, gr.Textbox) else c.input for c in components]

    gr.on(edited([run_name, *form_inputs]), h.recipe_yaml, [run_name, *form_inputs], preview,
          api_name="recipe_yaml", trigger_mode="always_last", show_progress="hidden")
    # sharding only means something over several processes: off (and back to "none") with one
    processes.change(lambda n: gr.update(interactive=(n or 1) > 1) if (n or 1) > 1 else
                     gr.update(interactive=False, value=jobs.NO_SHARDING), processes, sharding,
                     api_name=False, show_progress="hidden")
    launch_inputs = [*form_inputs, processes, sharding]
    gr.on([*edited(form_inputs), processes.change, sharding.change], h.estimate, launch_inputs, estimate,
          api_name="estimate", trigger_mode="always_last", show_progress="minimal")
    for dep in (chosen, loaded_dep, applied, *preset_deps):
        refresh(dep)
    return SimpleNamespace(form=form_inputs, data_path=inputs["data.path"], recipe=recipe_dd, run_name=run_name,
                           start=start, status=status, loaded=loaded, load=load, processes=processes, sharding=sharding,
                           refresh=refresh)


def _live_tab(h: Handlers):
    with gr.Tab("3 · Live", id="live"):
        with gr.Row():
            live_run = gr.Dropdown(label="Run", choices=[], allow_custom_value=True, elem_id="live-run", scale=3)
            stop = gr.Button("Stop", variant="stop", interactive=False, elem_id="stop")
            resume = gr.Button("Resume", interactive=False, elem_id="resume")
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
        with gr.Row():
            speed = gr.LinePlot(runview.with_series(runview.curve_table(), runview.SPEED_SERIES), x="step", y="value",
                                color="series", title="DPO tokens/s", height=220, elem_id="plot-tokens")
            gpu = gr.LinePlot(runview.with_series(runview.curve_table(), runview.GPU_SERIES), x="step", y="value",
                              color="series", title="GPU memory (GB)", height=220, visible=False,
                              elem_id="plot-gpu")
        beta_hist = gr.Image(label="Reward margins and the dynamic beta_i of the training pairs (stage score)",
                             type="pil", interactive=False, height=260, elem_id="beta-hist")
        log = gr.Textbox(label="Log (console.log, newest last)", lines=12, max_lines=12, autoscroll=True,
                         elem_id="run-log")
        jobs_table = gr.Dataframe(pd.DataFrame(columns=JOB_COLUMNS), label="All runs", elem_id="jobs", interactive=False)
        timer = gr.Timer(1.5)
        sig = gr.State(None)
        card_sig = gr.State(None)
        hist_sig = gr.State(None)
    outputs = [status, progress, error, points, *plots, speed, gpu, log, jobs_table, stop, resume]
    assert len(outputs) == Handlers.N_VIEW
    live_run.input(h.view, live_run, outputs, api_name="view").then(lambda: "", None, action, api_name=False)
    # the live timer refreshes the histogram only when its file changed (a Timer made here, outside the
    # Tab, became a child of the Tabs and broke the tab bar: a tab drawn twice, the next one gone)
    def hist(run_name, last):
        key = (run_name, h.beta_histogram_mtime(run_name))
        return (gr.skip(), last) if key == last else (h.beta_histogram(run_name), key)

    live_run.change(lambda r: hist(r, None), live_run, [beta_hist, hist_sig], api_name=False, show_progress="hidden")
    timer.tick(hist, [live_run, hist_sig], [beta_hist, hist_sig], api_name=False, show_progress="hidden")
    timer.tick(h.tick, [live_run, sig], [*outputs, sig], api_name=False, show_progress="hidden",
               concurrency_limit=8)
    def card(run_name, last):
        report, mtime = evalcard.report_of(h.cfg.runs_root, run_name)
        key = (run_name, mtime)
        return (gr.skip(), last) if key == last else (evalcard.card_html(report), key)

    live_run.change(lambda r: card(r, None), live_run, [eval_card, card_sig], api_name=False, show_progress="hidden")
    timer.tick(card, [live_run, card_sig], [eval_card, card_sig], api_name=False, show_progress="hidden")
    # the log box shows its newest line after every update (not where the user last scrolled to)
    log.change(None, None, None, js="() => { const t = document.querySelector('#run-log textarea'); "
                                    "if (t) t.scrollTop = t.scrollHeight; }")
    stop.click(h.stop, live_run, action, api_name="stop").then(h.view, live_run, outputs, api_name=False)
    resume.click(h.resume, live_run, action, api_name="resume").then(h.view, live_run, outputs, api_name=False)
    return SimpleNamespace(run=live_run, outputs=outputs)


def _playground_tab(h: Handlers):
    with gr.Tab("4 · Reward playground", id="playground"):
        with gr.Row():
            pg_run = gr.Dropdown(label="Critique reward model (a run whose reward stage finished)", choices=[],
                                 allow_custom_value=True, elem_id="pg-run", scale=3)
            mode = gr.Radio(["generate", "none"], value="generate", label="Critique", scale=2)
            max_tokens = gr.Number(value=48, precision=0, label="Critique length (tokens)", scale=1)
        pg_notice = gr.Markdown(elem_id="pg-notice")  # a tiny random-init base: its critiques are a toy
        with gr.Row():
            image = gr.Image(type="pil", label="Image", sources=["upload", "clipboard"], height=240,
                             elem_id="pg-image", scale=1)
            with gr.Column(scale=2):
                question = gr.Textbox(label="Question", elem_id="pg-question")
                answers = [gr.Textbox(label=f"Answer {i + 1}", elem_id=f"pg-answer-{i + 1}") for i in range(5)]
        score = gr.Button("Score", variant="primary", elem_id="pg-score")
        cards = gr.HTML(elem_id="pg-cards")
        table = gr.Dataframe(pd.DataFrame(columns=["answer #", "rank", "score", "answer", "critique"]), label="Scores",
                             elem_id="pg-table", wrap=True)
        gr.Markdown("### Reward cache: every pair's margin and the dynamic beta it got")
        with gr.Row():
            cache_run = gr.Dropdown(label="Run (its score stage finished)", choices=[], allow_custom_value=True,
                                    elem_id="cache-run", scale=3)
            show = gr.Button("Show pairs", elem_id="cache-show")
        cache_summary = gr.Markdown(elem_id="cache-summary")
        cache_table = gr.Dataframe(pd.DataFrame(columns=["group", "better #", "worse #", "delta", "beta"]),
                                   label="Pairs", elem_id="cache-table", max_height=400)
    pg_run.input(h.warm, pg_run, None, api_name=False, show_progress="hidden")
    pg_run.change(lambda r: policy.toy_notice(h.cfg.runs_root, r), pg_run, pg_notice, api_name=False,
                  show_progress="hidden")
    score.click(h.score, [pg_run, image, question, *answers, mode, max_tokens], [cards, table], api_name="score")
    show.click(h.cache, cache_run, [cache_summary, cache_table], api_name="reward_cache")
    return SimpleNamespace(run=pg_run, cache_run=cache_run)


def _compare_tab(h: Handlers):
    with gr.Tab("5 · Compare runs", id="compare"):
        with gr.Row():
            runs = gr.Dropdown(label="Runs", choices=[], multiselect=True, allow_custom_value=True,
                               elem_id="cmp-runs", scale=3)
            curve = gr.Dropdown([(title, name) for name, (title, _, _) in runview.CURVES.items()],
                                value="dpo_acc", label="Curve", elem_id="cmp-curve", scale=2)
            go = gr.Button("Compare", variant="primary", elem_id="cmp-go")
        table = gr.Dataframe(pd.DataFrame(columns=["run", "status", "critique mode", "Acc", "Acc+"]),
                             label="Final evaluation (held-out)", elem_id="cmp-table", wrap=True)
        plot = gr.LinePlot(runview.curve_table(), x="step", y="value", color="series",
                           title="Overlaid curves", height=300, elem_id="cmp-plot")
        bench = gr.Dataframe(pd.DataFrame(columns=["benchmark", "metric"]), elem_id="cmp-bench", wrap=True,
                             label="Reward-model benchmarks (python -m mmrlhf_lite.evaluate bench RUN --bench ...)")
        diff = gr.Dataframe(pd.DataFrame(columns=["key"]), label="Recipe differences (keys whose values differ)",
                            elem_id="cmp-diff", elem_classes="mm-fit", wrap=True, max_height=400)
    go.click(h.compare_benchmarks, [runs], [bench], api_name="compare_benchmarks")
    compared = go.click(h.compare, [runs, curve], [table, plot], api_name="compare")
    compared.success(lambda names: _fitted_diff(evalcard.recipe_diff(h.cfg.runs_root, list(names or []))), runs, diff,
                     api_name="recipe_diff")
    # a new title makes the plot rebuild its colour scale for these runs' series (it keeps the first one's)
    compared.success(lambda names, c: gr.update(title=f"{runview.CURVES[c][0]}: {', '.join(names or [])}"),
                     [runs, curve], plot, api_name=False)
    return SimpleNamespace(runs=runs)


def _fitted_diff(frame: pd.DataFrame):
    """The recipe differences in the box's width: the key column a fifth, the runs share the rest (long
    values wrap anywhere, CSS `.mm-fit`), so every run's value is in view side by side."""
    runs = max(len(frame.columns) - 1, 1)
    key = 20 if runs > 1 else 30
    return gr.update(value=frame, column_widths=[f"{key}%"] + [f"{(100 - key) / runs:.2f}%"] * runs)


LAUNCH_KWARGS = {"css": CSS, "ssr_mode": False, "mcp_server": False, "footer_links": ["api"]}
