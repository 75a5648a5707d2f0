"""The Compare runs tab: the final evaluation of several runs side by side (a row per metric, a column per
run), one curve of all of them overlaid, the recipe keys whose values differ, and the reward-model
benchmarks scored into them.

`CompareHandlers` holds the tab's handlers (what its tests call); `build` lays the tab out and wires its own
events. The work is done by ui/compare.py and ui/evalcard.py.

    python app.py            # Compare runs tab
"""
from __future__ import annotations

from types import SimpleNamespace

import gradio as gr
import pandas as pd

from .. import compare, evalcard, runview
from ..base import UIConfig, readable
from ..safety import Refused


class CompareHandlers:
    def __init__(self, cfg: UIConfig, tail: runview.EventTail):
        self.cfg = cfg
        self.tail = tail

    def choices(self):
        return gr.update(choices=compare.comparable_runs(self.cfg.runs_root))

    @readable
    def compare(self, names: list[str] | None, curve: str):
        names = list(names or [])
        if not names:
            raise Refused("pick one or more runs")
        if curve not in runview.CURVES:
            raise Refused(f"unknown curve '{curve}'")
        return (compare.eval_table(self.cfg.runs_root, names),
                compare.overlay(self.cfg.runs_root, names, curve, self.tail))

    @readable
    def compare_benchmarks(self, names: list[str] | None):
        names = list(names or [])
        if not names:
            raise Refused("pick one or more runs")
        return compare.bench_table(self.cfg.runs_root, names)

    @readable
    def recipe_diff(self, names: list[str] | None):
        return fitted(evalcard.recipe_diff(self.cfg.runs_root, list(names or [])), first=20)

    def plot_title(self, names: list[str] | None, curve: str):
        # a new title makes the plot rebuild its colour scale for these runs' series (it keeps the first one's)
        title, ylabel, _ = runview.CURVES[curve]
        shown = ", ".join(names or [])
        return gr.update(title=f"{title}: {shown if len(shown) <= 80 else f'{len(names)} runs'}", y_title=ylabel)


def fitted(frame: pd.DataFrame, first: int):
    """A table in its box's width: the first column `first`% (a little more alone), the runs share the rest,
    long values wrapped (CSS `.mm-fit` / `.mm-words`), so every run's value is in view side by side."""
    runs = max(len(frame.columns) - 1, 1)
    key = first if runs > 1 else first + 10
    return gr.update(value=frame, column_widths=[f"{key}%"] + [f"{(100 - key) / runs:.2f}%"] * runs)


def build(h: CompareHandlers) -> SimpleNamespace:
    with gr.Tab("5 · Compare runs", id="compare") as tab:
        with gr.Row():
            runs = gr.Dropdown(label="Runs", choices=[], multiselect=True, allow_custom_value=True,
                               elem_id="cmp-runs", scale=3)
            curve = gr.Dropdown([(title, name) for name, (title, _, _) in runview.CURVES.items()],
                                value="dpo_acc", label="Curve", elem_id="cmp-curve", scale=2)
            go = gr.Button("Compare", variant="primary", elem_id="cmp-go")
        # a row per metric, a column per run: the whole table in view, words never broken (CSS .mm-words)
        table = gr.Dataframe(pd.DataFrame(columns=["metric"]), label="Final evaluation (held-out)", elem_id="cmp-table",
                             elem_classes=["mm-fit", "mm-words"], wrap=True, max_height=2400)
        plot = gr.LinePlot(runview.curve_table(), x="step", y="value", color="series", title="Overlaid curves",
                           x_title="step", y_title="value", height=300, elem_id="cmp-plot", elem_classes="mm-plot")
        bench = gr.Dataframe(pd.DataFrame(columns=["benchmark", "metric"]), elem_id="cmp-bench", wrap=True,
                             label="Reward-model benchmarks (python -m mmrlhf_lite.evaluate bench RUN --bench ...)")
        diff = gr.Dataframe(pd.DataFrame(columns=["key"]), label="Recipe differences (keys whose values differ)",
                            elem_id="cmp-diff", elem_classes="mm-fit", wrap=True, max_height=400)
    go.click(h.compare_benchmarks, [runs], [bench], api_name="compare_benchmarks")
    compared = go.click(h.compare, [runs, curve], [table, plot], api_name="compare")
    compared.success(h.recipe_diff, runs, diff, api_name="recipe_diff")
    compared.success(h.plot_title, [runs, curve], plot, api_name=False)
    return SimpleNamespace(tab=tab, runs=runs)
