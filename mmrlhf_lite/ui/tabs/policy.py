"""The Policy tab: chat with a run's aligned policy and the base model it started from, side by side, over
several turns (each keeps its own side of the conversation); each turn's critique and score from the run's
reward model; export the trained models (an adapter also as a download).

`PolicyHandlers` holds the tab's handlers (what its tests call); `build` lays the tab out and wires its own
events. The work is done by ui/policy.py and `generate.PolicyChat`.

    python app.py            # Policy tab
"""
from __future__ import annotations

import html
from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from .. import policy
from ..base import log, readable
from ..jobs import run_path
from ..safety import Refused


class PolicyHandlers:
    def __init__(self, runs_root: Path, download_dir: Path):
        self.runs_root = Path(runs_root)
        self.download_dir = Path(download_dir)

    def choices(self, current: str | None = None):
        runs = policy.policy_runs(self.runs_root)
        value = current if current in runs else (runs[0] if runs else None)
        return gr.update(choices=runs, value=value), policy.toy_notice(self.runs_root, value)

    def notice(self, run_name: str | None) -> str:
        return policy.toy_notice(self.runs_root, run_name)

    def new_conversation(self):
        """An empty conversation: both chats cleared, no scores."""
        return [], [], "", {"run": None, "turns": []}

    def ask(self, run_name, message, max_new_tokens, temperature, top_p, seed, with_scores, conversation):
        """Generator, one turn of the conversation: (base chat, policy chat, scores, conversation, the message
        box) as the tokens arrive; first the base model's answer, then the aligned policy's, each after its own
        earlier answers. A conversation of another run starts over."""
        from ...generate import GenerateError, Sampling

        @readable
        def prepare():
            if not run_name:
                raise Refused("choose a run whose dpo stage finished")
            text = (message or {}).get("text", "") if isinstance(message, dict) else str(message or "")
            files = (message or {}).get("files", []) if isinstance(message, dict) else []
            paths = [f if isinstance(f, str) else (f.get("path") if isinstance(f, dict) else getattr(f, "path", None))
                     for f in files or []]
            paths = [p for p in paths if p]
            if not text.strip():
                raise Refused("give a question")
            turns = list((conversation or {}).get("turns") or []) if (conversation or {}).get("run") == run_name else []
            if len(paths) + sum(len(t["images"]) for t in turns) > policy.MAX_IMAGES:
                raise Refused(f"at most {policy.MAX_IMAGES} images in a conversation: start a new conversation")
            try:
                sampling = Sampling(int(max_new_tokens or 64), float(temperature or 0), float(top_p or 1),
                                    int(seed or 0)).check()
            except GenerateError as exc:
                raise Refused(str(exc)) from None
            return policy.load_chat(run_path(self.runs_root, run_name)), turns, paths, text.strip(), sampling

        chat, turns, paths, question, sampling = prepare()
        turn = {"images": paths, "question": question, "base": "", "policy": ""}
        earlier = {w: policy.history(turns, w) for w in ("base", "policy")}
        state = {"run": run_name, "turns": turns}

        cleared = []

        def shown(scores=""):
            """What the page shows now; the question box is emptied once (the user may type the next one)."""
            now = [*turns, turn]
            box = gr.skip() if cleared else gr.update(value=None)
            cleared.append(True)
            return policy.chat_messages(now, "base"), policy.chat_messages(now, "policy"), scores, state, box

        try:
            for which in ("base", "policy"):
                for text in chat.stream(paths, question, which=which, sampling=sampling, history=earlier[which]):
                    turn[which] = text
                    yield shown()
            state = {"run": run_name, "turns": [*turns, turn]}
            scores = ""
            n = len(turns) + 1
            if with_scores and chat.has_reward_model:
                yield shown("<p><em>Critiquing and scoring both answers…</em></p>")
                results = [chat.critique(paths, question, [turn[w]], history=earlier[w])[0] for w in ("base", "policy")]
                scores = policy.scores_html(results, n)
            elif with_scores:
                scores = "<p><em>This run has no trained reward model: no critiques or scores.</em></p>"
            yield shown(scores)
        except (GenerateError, Refused, ValueError) as exc:
            raise gr.Error(html.escape(str(exc)), print_exception=False) from None
        except Exception as exc:  # noqa: BLE001
            log.exception("policy answer failed")
            raise gr.Error(html.escape(f"{type(exc).__name__}: {exc}"), print_exception=False) from None

    @readable
    def export(self, run_name: str | None, what: str, merge: bool):
        """The export's message (the real path, as code to copy) and its download (an adapter only)."""
        if not run_name:
            raise Refused("choose a run")
        message, files = policy.export(self.runs_root, run_name, what, bool(merge), self.download_dir,
                                       progress=log.info)
        return message, gr.update(value=[str(f) for f in files] or None, visible=bool(files))


def build(h: PolicyHandlers) -> SimpleNamespace:
    with gr.Tab("6 · Policy", id="policy") as tab:
        gr.Markdown("Chat with the **aligned policy** of a run and the **base model** it started from: the same "
                    "questions about your images, answers streamed side by side, each model keeping its own side "
                    "of the conversation. With a reward model, each turn's answers get a critique and a score.")
        with gr.Row():
            run = gr.Dropdown(label="Run (its dpo stage finished)", choices=[], allow_custom_value=True,
                              elem_id="pol-run", scale=3)
            new_chat = gr.Button("New conversation", elem_id="pol-new", scale=1)
        notice = gr.Markdown(elem_id="pol-notice")
        with gr.Row():
            base = gr.Chatbot(label="Base model", elem_id="pol-base", height=380, buttons=["copy"])
            aligned = gr.Chatbot(label="Aligned policy (MM-DPO)", elem_id="pol-policy", height=380, buttons=["copy"])
        message = gr.MultimodalTextbox(label="Question (attach images with the clip; they show in the chat)",
                                       placeholder="Ask about your images…", file_types=["image"],
                                       file_count="multiple", sources=["upload"], elem_id="pol-message")
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
        scores = gr.HTML(elem_id="pol-scores")
        conversation = gr.State({"run": None, "turns": []})
        gr.Markdown("### Export this run's model")
        with gr.Row():
            what = gr.Radio(["policy", "reward"], value="policy", label="Model", elem_id="pol-export-what")
            merge = gr.Checkbox(value=True, label="Merge the LoRA into the base (bf16 safetensors, loads with "
                                "transformers alone); off = the adapter (peft), also offered as a download",
                                elem_id="pol-export-merge")
            export = gr.Button("Export", elem_id="pol-export")
        export_out = gr.Markdown(elem_id="pol-export-status")
        export_file = gr.File(label="Download", interactive=False, visible=False, elem_id="pol-export-file", height=80)
    run.input(h.notice, run, notice, api_name=False)
    turn_in = [run, message, max_new, temperature, top_p, seed, with_scores, conversation]
    turn_out = [base, aligned, scores, conversation, message]
    ask.click(h.ask, turn_in, turn_out, api_name="ask_policy")
    message.submit(h.ask, turn_in, turn_out, api_name=False)
    new_chat.click(h.new_conversation, None, [base, aligned, scores, conversation], api_name="new_conversation")
    run.change(h.new_conversation, None, [base, aligned, scores, conversation], api_name=False,
               show_progress="hidden")
    export.click(h.export, [run, what, merge], [export_out, export_file], api_name="export")
    return SimpleNamespace(tab=tab, run=run, notice=notice, handlers=h)
