"""The Reward playground tab: score answers with a run's critique reward model, side by side; serve that
reward model over HTTP (`python -m mmrlhf_lite.serve`, started and stopped here); browse the run's reward
cache (every pair's margin and the dynamic beta it got).

`PlaygroundHandlers` holds the tab's handlers (what its tests call); `build` lays the tab out and wires its
own events. The work is done by ui/playground.py and ui/serving.py. The service's state is read from its
run folder whenever the run is picked or the tab opened; after Serve, the click's own event follows it,
asking again every SERVE_TICK_S seconds (on the server, streamed to the page) only while it is starting.
(No gr.Timer: with a second one on the page, the Live tab stopped showing a run's progress to its end:
tests/test_ui_browser.py::test_train_watch_stop_resume failed 2 runs of 2, and passed without it.)

    python app.py            # Reward playground tab
"""
from __future__ import annotations

import time
from types import SimpleNamespace

import gradio as gr
import pandas as pd

from .. import databrowser, playground, policy, serving
from ..base import UIConfig, readable
from ..jobs import run_path
from ..safety import Refused

SERVE_TICK_S = 1.5
SERVE_FOLLOW_S = 900.0   # the longest Serve's event follows a service that is starting
SCORE_COLUMNS = ["answer #", "rank", "score", "answer", "critique"]
SCORE_WIDTHS = ["9%", "6%", "9%", "30%", "46%"]


class PlaygroundHandlers:
    def __init__(self, cfg: UIConfig):
        self.cfg = cfg

    def reward_run_choices(self):
        runs = playground.reward_runs(self.cfg.runs_root)
        return gr.update(choices=runs, value=runs[0] if runs else None)

    def cache_run_choices(self):
        runs = playground.cache_runs(self.cfg.runs_root)
        return gr.update(choices=runs, value=runs[0] if runs else None)

    def warm(self, run_name: str | None) -> None:
        playground.warm(self.cfg.runs_root, run_name)

    def notice(self, run_name: str | None) -> str:
        return policy.toy_notice(self.cfg.runs_root, run_name)

    @readable
    def score(self, run_name: str, image, question: str, a1: str, a2: str, a3: str, a4: str, a5: str,
              mode: str, max_new_tokens: float):
        if not run_name:
            raise Refused("choose a run with a trained reward model")
        data = databrowser.image_bytes(image) if image is not None else None
        results = playground.score(self.cfg.runs_root, run_name, data, question, [a1, a2, a3, a4, a5], mode,
                                   int(max_new_tokens or 64))
        return playground.cards_html(results), playground.results_frame(results)

    # serving the reward model: (state line, command and examples, port field) from each handler

    def _serve_out(self, run_name: str | None, port, refused: str = ""):
        if not run_name:
            return "Choose a run with a trained reward model to serve it.", "", gr.skip()
        try:
            run = run_path(self.cfg.runs_root, run_name)
        except Refused as exc:
            return str(exc), "", gr.skip()
        state = serving.service_state(run)
        line = serving.state_markdown(state, run_name)
        if refused:
            line = f"**Refused**: {refused}\n\n{line}"
        if state.active:
            command, port_field = state.command, state.port
        else:
            try:
                command = serving.serve_command(run, serving.check_port(port))
            except Refused:
                command = serving.serve_command(run, serving.DEFAULT_PORT)
            port_field = gr.skip()
        return line, serving.usage_markdown(state, command), port_field

    def serve_view(self, run_name: str | None, port):
        """The service of the picked run as it stands (after a page load, a pick, the tab opened)."""
        return self._serve_out(run_name, port)

    def serve_preview(self, run_name: str | None, port):
        """The port field typed in: the command Serve would run (the field is left as it is)."""
        return self._serve_out(run_name, port)[:2]

    def serve_start(self, run_name: str | None, port):
        """Serve this reward model, then follow it while it starts (a generator: each state as it changes);
        a refusal (no run, a port in use, served already) is said in the state line."""
        try:
            if not run_name:
                raise Refused("choose a run with a trained reward model")
            serving.start_service(self.cfg.runs_root, run_name, port)
        except Refused as exc:
            yield self._serve_out(run_name, port, refused=str(exc))
            return
        run = run_path(self.cfg.runs_root, run_name)
        end = time.monotonic() + SERVE_FOLLOW_S
        yield self._serve_out(run_name, port)
        while serving.service_state(run).status == "starting" and time.monotonic() < end:
            time.sleep(SERVE_TICK_S)
            yield self._serve_out(run_name, port)

    def serve_stop(self, run_name: str | None, port):
        try:
            if not run_name:
                raise Refused("choose a run")
            serving.stop_service(run_path(self.cfg.runs_root, run_name))
        except Refused as exc:
            return self._serve_out(run_name, port, refused=str(exc))
        return self._serve_out(run_name, port)

    @readable
    def cache(self, run_name: str):
        if not run_name:
            raise Refused("choose a run whose score stage has finished")
        frame, summary = playground.cache_pairs(self.cfg.runs_root, run_name)
        return summary, frame


def build(h: PlaygroundHandlers) -> SimpleNamespace:
    with gr.Tab("4 · Reward playground", id="playground") as tab:
        with gr.Row(elem_id="pg-head"):  # the run, and what to do with its reward model
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
        table = gr.Dataframe(pd.DataFrame(columns=SCORE_COLUMNS), label="Scores", elem_id="pg-table", wrap=True,
                             elem_classes="mm-fit", column_widths=SCORE_WIDTHS)
        gr.Markdown("### Serve this reward model: an HTTP scoring service on this machine (docs/serve.md)")
        with gr.Row(elem_id="pg-serve-row"):
            serve_port = gr.Number(value=serving.DEFAULT_PORT, precision=0, label="Port", elem_id="pg-serve-port",
                                   minimum=serving.MIN_PORT, maximum=serving.MAX_PORT, scale=1)
            serve = gr.Button("Serve this reward model", variant="primary", elem_id="pg-serve", scale=2)
            serve_stop = gr.Button("Stop serving", elem_id="pg-serve-stop", scale=1)
        serve_state = gr.Markdown(elem_id="pg-serve-state")
        serve_usage = gr.Markdown(elem_id="pg-serve-usage")
        gr.Markdown("### Reward cache: every pair's margin and the dynamic beta it got")
        with gr.Row():
            cache_run = gr.Dropdown(label="Run (its score stage finished)", choices=[], allow_custom_value=True,
                                    elem_id="cache-run", scale=3)
            show = gr.Button("Show pairs", elem_id="cache-show")
        cache_summary = gr.Markdown(elem_id="cache-summary")
        cache_table = gr.Dataframe(pd.DataFrame(columns=["group", "better #", "worse #", "delta", "beta"]),
                                   label="Pairs", elem_id="cache-table", max_height=400)
    pg_run.input(h.warm, pg_run, None, api_name=False, show_progress="hidden")
    score.click(h.score, [pg_run, image, question, *answers, mode, max_tokens], [cards, table], api_name="score")
    show.click(h.cache, cache_run, [cache_summary, cache_table], api_name="reward_cache")
    serve_out = [serve_state, serve_usage, serve_port]
    quiet = {"api_name": False, "show_progress": "hidden"}
    # a page load's pick too; one chain, not two handlers of the same change (blocks.check_one_always_last)
    pg_run.change(h.notice, pg_run, pg_notice, **quiet).then(h.serve_view, [pg_run, serve_port], serve_out,
                                                            trigger_mode="always_last", **quiet)
    tab.select(h.serve_view, [pg_run, serve_port], serve_out, **quiet)
    serve_port.input(h.serve_preview, [pg_run, serve_port], [serve_state, serve_usage], **quiet)
    serve.click(h.serve_start, [pg_run, serve_port], serve_out, api_name="serve_reward_model")
    serve_stop.click(h.serve_stop, [pg_run, serve_port], serve_out, api_name="stop_serving")
    return SimpleNamespace(tab=tab, run=pg_run, cache_run=cache_run)
