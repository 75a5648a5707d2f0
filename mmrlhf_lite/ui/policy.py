"""Policy tab: ask a run's aligned policy and its base model side by side; export the trained models.

Answers come from `generate.PolicyChat` (the API the CLI `python -m mmrlhf_lite.generate` uses), streamed
token by token: first the base model's (the LoRA switched off), then the aligned policy's, with the same
sampling settings and seed; then, when the run has a reward model, each answer's critique and score.
Export writes `<runs root>/<run>/export/<policy|reward>-<adapter|merged>/` with `mmrlhf_lite.export`
(an earlier export of the same kind is replaced).

    python app.py            # Policy tab
"""
from __future__ import annotations

import html
import logging
import os
import threading
from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from .jobs import RECIPE_FILE, list_runs, run_path
from .safety import Refused

log = logging.getLogger("mmrlhf_lite.ui")
MAX_IMAGES = 8
_chat: dict = {}
_chat_lock = threading.Lock()


def policy_runs(runs_root: str | os.PathLike) -> list[str]:
    """Runs whose dpo stage saved an aligned policy."""
    return [n for n in list_runs(runs_root) if (Path(runs_root) / n / "dpo" / "final" / "adapter_config.json").exists()]


def toy_notice(runs_root, run_name: str | None) -> str:
    """The tiny-model warning for a run whose base is `tiny:*` (empty otherwise)."""
    import yaml

    from ..generate import TOY_NOTICE, is_toy

    if not run_name:
        return ""
    try:
        tree = yaml.safe_load((run_path(runs_root, run_name) / RECIPE_FILE).read_text()) or {}
    except (OSError, Refused, yaml.YAMLError):
        return ""
    path = str((tree.get("model") or {}).get("path") or "")
    return ("⚠ " + TOY_NOTICE.format(path=html.escape(path))) if is_toy(path) else ""


def _load_chat(run: Path):
    from ..generate import PolicyChat

    adapter = run / "dpo" / "final" / "adapter_model.safetensors"
    if not adapter.exists():
        raise Refused(f"run '{run.name}' has no aligned policy yet (its `dpo` stage has not finished)")
    key = (str(run), adapter.stat().st_mtime_ns)
    with _chat_lock:
        if _chat.get("key") != key:
            _chat.clear()
            _chat.update(key=key, chat=PolicyChat.from_run(run))
        return _chat["chat"]


def scores_html(results: list[dict]) -> str:
    cards = []
    for label, r in zip(("Base model", "Aligned policy"), results):
        crit = html.escape(r["critique"]) if r["critique"] else "<em>(no critique: the run scores without one)</em>"
        cards.append(f"<div class='mm-card'><div class='mm-card-head'><b>{label}</b> · score <b>{r['score']:.4f}</b></div>"
                     f"<div class='mm-card-critique'>Critique: {crit}</div></div>")
    best = max(range(len(results)), key=lambda i: results[i]["score"])
    return (f"<div class='mm-cards' data-best='{best}'>" + "".join(cards) + "</div>"
            "<p style='font-size:13px'>Scores from this run's critique reward model (higher is better).</p>")


class PolicyHandlers:
    def __init__(self, runs_root: Path):
        self.runs_root = Path(runs_root)

    def choices(self, current: str | None = None):
        runs = policy_runs(self.runs_root)
        value = current if current in runs else (runs[0] if runs else None)
        return gr.update(choices=runs, value=value), toy_notice(self.runs_root, value)

    def notice(self, run_name: str | None) -> str:
        return toy_notice(self.runs_root, run_name)

    def ask(self, run_name, files, question, max_new_tokens, temperature, top_p, seed, with_scores):
        """Generator: (base answer, policy answer, scores) as the tokens arrive."""
        from ..generate import GenerateError, Sampling
        from .handlers import readable

        @readable
        def prepare():
            if not run_name:
                raise Refused("choose a run whose dpo stage finished")
            paths = [f if isinstance(f, str) else getattr(f, "name", None) for f in (files or [])]
            if len(paths) > MAX_IMAGES:
                raise Refused(f"at most {MAX_IMAGES} images per question")
            if not (question or "").strip():
                raise Refused("give a question")
            try:
                sampling = Sampling(int(max_new_tokens or 64), float(temperature or 0), float(top_p or 1),
                                    int(seed or 0)).check()
            except GenerateError as exc:
                raise Refused(str(exc)) from None
            return _load_chat(run_path(self.runs_root, run_name)), paths, sampling

        chat, paths, sampling = prepare()
        answers = {"base": "", "policy": ""}
        try:
            for which in ("base", "policy"):
                for text in chat.stream(paths, question, which=which, sampling=sampling):
                    answers[which] = text
                    yield answers["base"], answers["policy"], ""
            scores = ""
            if with_scores and chat.has_reward_model:
                yield answers["base"], answers["policy"], "<p><em>Critiquing and scoring both answers…</em></p>"
                scores = scores_html(chat.critique(paths, question, [answers["base"], answers["policy"]]))
            elif with_scores:
                scores = "<p><em>This run has no trained reward model: no critiques or scores.</em></p>"
            yield answers["base"], answers["policy"], scores
        except (GenerateError, Refused, ValueError) as exc:
            raise gr.Error(html.escape(str(exc)), print_exception=False) from None
        except Exception as exc:  # noqa: BLE001
            log.exception("policy answer failed")
            raise gr.Error(html.escape(f"{type(exc).__name__}: {exc}"), print_exception=False) from None

    def export(self, run_name: str | None, what: str, merge: bool):
        from ..export import ExportError, export_model
        from .handlers import readable

        @readable
        def run_export():
            if not run_name:
                raise Refused("choose a run")
            if what not in ("policy", "reward"):
                raise Refused("export the policy or the reward model")
            run = run_path(self.runs_root, run_name)
            to = run / "export" / f"{what}-{'merged' if merge else 'adapter'}"
            try:
                out = export_model(run, what, to, merge=bool(merge), overwrite=True, progress=log.info)
            except ExportError as exc:
                raise Refused(str(exc)) from None
            files = ", ".join(sorted(p.name for p in out.iterdir()))
            rel = out.relative_to(self.runs_root).as_posix()
            load = (f'AutoModelForImageTextToText.from_pretrained("<runs root>/{rel}")' if merge else
                    f'PeftModel.from_pretrained(base, "<runs root>/{rel}")')
            return (f"Exported the {what} of **{html.escape(run_name)}** to `<runs root>/{html.escape(rel)}`"
                    f" ({'merged, bf16 safetensors' if merge else 'LoRA adapter'}): {html.escape(files)}.\n\n"
                    f"Load it: `{html.escape(load)}`; see its README.md (model card).")
        return run_export()


def build_tab(runs_root: Path) -> SimpleNamespace:
    h = PolicyHandlers(runs_root)
    with gr.Tab("6 · Policy", id="policy"):
        gr.Markdown("Ask the **aligned policy** of a run and the **base model** it started from the same question "
                    "about your images; answers stream side by side. With a reward model, each answer gets its "
                    "critique and score.")
        with gr.Row():
            run = gr.Dropdown(label="Run (its dpo stage finished)", choices=[], allow_custom_value=True,
                              elem_id="pol-run", scale=3)
        notice = gr.Markdown(elem_id="pol-notice")
        with gr.Row():
            files = gr.File(label=f"Image(s), up to {MAX_IMAGES}", file_count="multiple", file_types=["image"],
                            type="filepath", elem_id="pol-images", height=160, scale=1)
            with gr.Column(scale=2):
                question = gr.Textbox(label="Question", elem_id="pol-question", lines=2)
                with gr.Row():
                    max_new = gr.Number(value=64, precision=0, minimum=1, maximum=4096, label="Max new tokens",
                                        elem_id="pol-max-new")
                    temperature = gr.Slider(0, 2, value=0, step=0.05, label="Temperature (0 = greedy)",
                                            elem_id="pol-temperature")
                    top_p = gr.Slider(0.05, 1, value=1, step=0.05, label="Top-p", elem_id="pol-top-p")
                    seed = gr.Number(value=0, precision=0, label="Seed", elem_id="pol-seed")
                with_scores = gr.Checkbox(value=True, label="Critique and score both answers (the run's reward model)",
                                          elem_id="pol-with-scores")
                ask = gr.Button("Ask both", variant="primary", elem_id="pol-ask")
        with gr.Row():
            base = gr.Textbox(label="Base model", lines=6, interactive=False, elem_id="pol-base")
            aligned = gr.Textbox(label="Aligned policy (MM-DPO)", lines=6, interactive=False, elem_id="pol-policy")
        scores = gr.HTML(elem_id="pol-scores")
        gr.Markdown("### Export this run's model")
        with gr.Row():
            what = gr.Radio(["policy", "reward"], value="policy", label="Model", elem_id="pol-export-what")
            merge = gr.Checkbox(value=True, label="Merge the LoRA into the base (bf16 safetensors, loads with "
                                "transformers alone); off = the adapter (peft)", elem_id="pol-export-merge")
            export = gr.Button("Export", elem_id="pol-export")
        export_out = gr.Markdown(elem_id="pol-export-status")
    run.input(h.notice, run, notice, api_name=False)
    ask.click(h.ask, [run, files, question, max_new, temperature, top_p, seed, with_scores], [base, aligned, scores],
              api_name="ask_policy")
    export.click(h.export, [run, what, merge], export_out, api_name="export")
    return SimpleNamespace(run=run, notice=notice, handlers=h)
