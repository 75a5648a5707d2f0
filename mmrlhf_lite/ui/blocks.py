"""The page: six tabs (Data, Train, Live, Reward playground, Compare, Policy), each built by its module in
`ui/tabs/` with its own handlers, and the wiring between them: the page load, "Train on this data", Start's
switch to the Live tab, the run lists refreshed as tabs are opened, and the Live tab's timer, which runs
only while that tab is shown and the browser tab is visible.

Layout and wiring only. GRADIO_ANALYTICS_ENABLED must be False before this module builds the Blocks
(app.py sets it before importing gradio): then the page and the server make no outside request.
Every event has an `api_name`, so `gradio_client` drives the same actions as the browser.

    python app.py --runs-dir runs --data-dir data
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import gradio as gr

from . import compare, playground
from .base import UIConfig, with_form
from .tabs import compare as compare_tab
from .tabs import data as data_tab
from .tabs import live as live_tab
from .tabs import playground as playground_tab
from .tabs import policy as policy_tab
from .tabs import train as train_tab

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
.mm-words td, .mm-words th, .mm-words td *, .mm-words th * {overflow-wrap:normal; word-break:normal; hyphens:manual}
.mm-plot g.mark-symbol.role-mark path {d: path("M2.5,0A2.5,2.5,0,1,1,-2.5,0A2.5,2.5,0,1,1,2.5,0"); opacity:1 !important}
.mm-offscreen {display:none !important}
"""
# A line through one point is drawn as nothing: every point also gets a small mark (`.mm-plot`: the plot's
# own hover symbols, one per point, shown at all times; CSS `d` sets their size).

# the page tells the server when the browser tab is hidden or shown again (the Live tab's timer stops and
# restarts): a click on one of two buttons kept out of sight
JS = """
() => {
  document.addEventListener('visibilitychange', () => {
    const id = document.visibilityState === 'hidden' ? 'page-hidden' : 'page-shown';
    const button = document.getElementById(id);
    if (button) button.click();
  });
}
"""

INTRO = ("**mmrlhf-lite**: preference data → critique reward model → MM-DPO, on one GPU. "
         "Every job here is `python -m mmrlhf_lite.train` on a recipe written into its run folder; "
         "this page only reads the run folders.")


def build_app(cfg: UIConfig) -> gr.Blocks:
    if os.environ.get("GRADIO_ANALYTICS_ENABLED") != "False":
        raise RuntimeError("set GRADIO_ANALYTICS_ENABLED=False before building the UI (app.py does)")
    handlers = SimpleNamespace(data=data_tab.DataHandlers(cfg), train=train_tab.TrainHandlers(cfg),
                               live=live_tab.LiveHandlers(cfg), playground=playground_tab.PlaygroundHandlers(cfg))
    handlers.compare = compare_tab.CompareHandlers(cfg, handlers.live.tail)
    handlers.policy = policy_tab.PolicyHandlers(cfg.runs_root, cfg.upload_dir)
    with gr.Blocks(title="mmrlhf-lite", analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown(INTRO)
        with gr.Tabs(selected="data") as tabs:
            data = data_tab.build(handlers.data)
            train = train_tab.build(handlers.train)
            live = live_tab.build(handlers.live)
            pg = playground_tab.build(handlers.playground)
            cmp = compare_tab.build(handlers.compare)
            pol = policy_tab.build(handlers.policy)
        with gr.Row(elem_classes="mm-offscreen"):  # out of sight: clicked by the page's script, or API only
            page_hidden = gr.Button("page hidden", elem_id="page-hidden", elem_classes="mm-offscreen")
            page_shown = gr.Button("page shown", elem_id="page-shown", elem_classes="mm-offscreen")
            api_start = gr.Button("start (API)", elem_id="api-start", elem_classes="mm-offscreen")
        _wire(app, tabs, handlers, data, train, live, pg, cmp, pol, page_hidden, page_shown, api_start)
    check_one_always_last(app)
    return app


def check_one_always_last(app: gr.Blocks) -> None:
    """Refuse a trigger (a component's event) that two `always_last` handlers listen to. Gradio's page runs such
    a handler again after it finishes when its trigger fired meanwhile, by dispatching the trigger itself once
    more: every handler of that trigger runs, and one still busy is marked to run again when it is done. Two of
    them whose runs overlap re-fire each other without end (seen in CI: the Train tab's YAML preview and
    pre-flight, about 5 events a second for 120 s; docs/ui.md, "Event loops"). Chain the second (`.then`), or
    give it another trigger mode."""
    names = {b._id: getattr(b, "elem_id", None) or getattr(b, "label", None) or type(b).__name__
             for b in app.blocks.values()}
    listeners: dict = {}
    for fn in app.fns.values():
        if fn.trigger_mode != "always_last":
            continue
        for block_id, event in fn.targets:
            if block_id is not None:
                listeners.setdefault((block_id, event), []).append(fn.name)
    shared = {f"{names.get(b, b)}.{event}": fns for (b, event), fns in listeners.items() if len(fns) > 1}
    if shared:
        raise RuntimeError("these triggers each have several `always_last` handlers, which re-fire each other "
                           f"without end in the page (chain them with .then): {shared}")


def _wire(app, tabs, h, data, train, live, pg, cmp, pol, page_hidden, page_shown, api_start) -> None:
    # a (re)loaded page finds everything again from the folders, running jobs included
    app.load(h.data.load, None, [data.file, data.scores_run, *data.inspect_out], api_name=False)
    loaded = app.load(with_form(h.train.load), None, [train.recipe, *train.form, train.run_name], api_name=False)
    train.refresh(loaded.then(*train.remember, api_name=False))
    train.relabel(loaded)
    app.load(h.live.choices, None, live.run, api_name=False)
    app.load(lambda: (h.playground.reward_run_choices(), h.playground.cache_run_choices(), h.compare.choices()),
             None, [pg.run, pg.cache_run, cmp.runs], api_name=False)
    app.load(h.policy.choices, None, [pol.run, pol.notice], api_name=False)

    # "Train on this data": the file, its format and media root, and the Data tab's choice about bad rows
    data_keys = ("data.path", "data.format", "data.media_root", "data.on_error")
    data_inputs = [train.inputs[k] for k in data_keys]
    used = data.use.click(lambda *a: (*(h.data.use_data(*a)[k] for k in data_keys), gr.update(selected="train")),
                          [data.file, data.fmt, data.media_root, data.skip_bad], [*data_inputs, tabs],
                          api_name="use_data")

    # Start: launch, switch to the Live tab and follow the run (the action message of another run goes). The
    # page's button says a refusal in the status line; the API's /start (a button kept out of sight) raises it
    current = gr.State("data")  # the tab open now (the Live tab's timer runs only there)
    started_run = gr.State(None)
    started = train.start.click(with_form(h.train.start_from_page, form_at=1), train.launch_inputs,
                                [train.status, tabs, live.run, started_run], api_name=False)
    started.then(_if_started(lambda: ("", "live")), started_run, [live.action, current], api_name=False,
                 show_progress="hidden")
    started.then(_if_started(h.live.view, n=len(live.outputs) + 1, pass_run=True), started_run,
                 [*live.outputs, live.sig], api_name=False).then(h.live.follow, live.sig, live.timer, api_name=False)
    # what a run started with is kept in its folder: not an edit to guard; the name is now taken
    remember, remember_in, remember_out = train.remember
    train.refresh(started.then(_if_started(remember, n=2, pass_all=True), [started_run, *remember_in], remember_out,
                               api_name=False))
    api_start.click(with_form(h.train.start, form_at=1), train.launch_inputs, [train.status, tabs, live.run],
                    api_name="start")

    # opening a tab: fresh run lists; the Live tab's view and timer on, every other tab's timer off
    tabs.select(h.policy.choices, pol.run, [pol.run, pol.notice], api_name=False)
    tabs.select(_refresh_lists(h), [live.run, pg.run, pg.cache_run, cmp.runs, data.scores_run],
                [live.run, pg.run, pg.cache_run, cmp.runs, data.scores_run], api_name=False, show_progress="hidden")
    live.tab.select(h.live.view, live.run, [*live.outputs, live.sig], api_name=False).then(
        h.live.follow, live.sig, live.timer, api_name=False)
    for other in (data.tab, train.tab, pg.tab, cmp.tab, pol.tab):
        other.select(lambda: gr.Timer(active=False), None, live.timer, api_name=False, show_progress="hidden")
    # the browser tab hidden: no polling; shown again: the Live tab (if it is the one open) catches up
    for tab_id, block in (("data", data.tab), ("train", train.tab), ("live", live.tab), ("playground", pg.tab),
                          ("compare", cmp.tab), ("policy", pol.tab)):
        block.select(lambda t=tab_id: t, None, current, api_name=False, show_progress="hidden")
    train.refresh(used.then(lambda: "train", None, current, api_name=False, show_progress="hidden"))  # (set by hand)
    page_hidden.click(lambda: gr.Timer(active=False), None, live.timer, api_name=False, show_progress="hidden")
    page_shown.click(h.live.shown_again, [current, live.run, live.sig], [*live.outputs, live.sig, live.timer],
                     api_name=False, show_progress="hidden")


def _if_started(fn, n: int = 2, pass_run: bool = False, pass_all: bool = False):
    """A follow-up of the page's Start that runs only when a run was started (its first input: the run's name,
    None when Start refused); otherwise it changes none of its `n` outputs."""
    def call(started, *rest):
        if not started:
            return tuple(gr.skip() for _ in range(n))
        return fn(*rest) if pass_all else fn()

    def call_run(started, request: gr.Request = None):  # (the page's request: the Live view orders its views)
        if not started:
            return tuple(gr.skip() for _ in range(n))
        return fn(started, request=request)
    return call_run if pass_run else call


def _refresh_lists(h):
    """Run lists change while a page is open (a job started in another tab, a run renamed or deleted): new
    choices, the same values where they still exist."""
    def refresh(live_run, pg_run, cache_run, cmp_runs, scores_run):
        rewards, cached = playground.reward_runs(h.live.cfg.runs_root), playground.cache_runs(h.live.cfg.runs_root)
        runs = compare.comparable_runs(h.live.cfg.runs_root)
        # the Live tab's value only where its run is gone (an answer that comes late never undoes a pick)
        live = gr.update(choices=runs) if live_run in runs else h.live.choices(None)
        return (live, gr.update(choices=rewards), gr.update(choices=cached),
                gr.update(choices=runs), gr.update(choices=[""] + cached))
    return refresh


LAUNCH_KWARGS = {"css": CSS, "js": JS, "ssr_mode": False, "mcp_server": False, "footer_links": ["api"]}
# gradio's queue re-summarises every event it recorded (a pandas group-by over up to 10,000 of them) after each
# event, for its monitoring dashboard, which this app never turns on: about 25 ms of CPU per event, every
# Live-tab tick included (measured: 22-27 ms with 500-5,000 records). Summarised once per 10**9 events: never.
QUEUE_ENV = {"GRADIO_ANALYTICS_CACHE_FREQUENCY": str(10**9)}


def queue(app: gr.Blocks) -> gr.Blocks:
    """The app's queue: two events at a time by default, and no per-event monitoring summary (QUEUE_ENV, read
    when the queue is made; a value set in the environment wins)."""
    for key, value in QUEUE_ENV.items():
        os.environ.setdefault(key, value)
    return app.queue(default_concurrency_limit=2)
