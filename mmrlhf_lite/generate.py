"""Ask a run's aligned policy (and the base model it started from) about images.

    python -m mmrlhf_lite.generate runs/demo --image cat.png --question "What colour is the square?"
    python -m mmrlhf_lite.generate runs/demo --image a.png --image b.png --question "What differs?" \
        --temperature 0.7 --top-p 0.9 --max-new-tokens 128 --score

Prints the base model's and the aligned policy's answers (tokens streamed as they come), and with
`--score` each answer's critique and score from the run's critique reward model. From Python:

    from mmrlhf_lite.generate import PolicyChat
    chat = PolicyChat.from_run("runs/demo")
    chat.compare(["cat.png"], "What colour is the square?")   # {"base": "...", "policy": "..."}
    for text in chat.stream(["cat.png"], "What colour?", which="policy"):
        print(text)                                          # the answer so far

The base answers are the same model with the LoRA adapter switched off (`disable_adapter`), so only one
model is in memory. The model settings (family, 4-bit, device, pixel limits) are the run's recipe's.
"""
from __future__ import annotations

import argparse
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

WHICH = ("base", "policy")


class GenerateError(ValueError):
    """The request cannot be served; the message says what to do."""


@dataclass
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.0      # 0 = greedy
    top_p: float = 1.0
    seed: int = 0

    def check(self) -> "Sampling":
        if not 1 <= int(self.max_new_tokens) <= 4096:
            raise GenerateError("max_new_tokens must be between 1 and 4096")
        if not 0.0 <= float(self.temperature) <= 5.0:
            raise GenerateError("temperature must be between 0 (greedy) and 5")
        if not 0.0 < float(self.top_p) <= 1.0:
            raise GenerateError("top_p must be in (0, 1]")
        return self


def _token_streamer(base):
    """A `TextIteratorStreamer` that releases the text after every token. transformers' streamers hold text
    back to the next space (a word may still change), so an answer without spaces arrived whole at its end;
    byte-level BPE text only changes at an incomplete UTF-8 character, which is held back ("\ufffd"), as
    is any text that a later token rewrote (released only once it is stable again, or at the end)."""
    class TokenStreamer(base):
        def put(self, value):
            if len(value.shape) > 1 and value.shape[0] > 1:
                raise ValueError("the streamer takes one sequence at a time")
            if len(value.shape) > 1:
                value = value[0]
            if self.skip_prompt and self.next_tokens_are_prompt:
                self.next_tokens_are_prompt = False
                return
            self.token_cache.extend(value.tolist())
            text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
            released = getattr(self, "_released", "")
            if text.endswith("\ufffd") or not text.startswith(released) or len(text) == len(released):
                return
            self._released = text
            self.print_len = len(text)
            self.on_finalized_text(text[len(released):])

        def end(self):
            self._released = ""
            super().end()

    return TokenStreamer


def is_toy(model_path: str) -> bool:
    return str(model_path).startswith("tiny:")


TOY_NOTICE = ("This run's base model is a tiny random-init demo model (`{path}`): its answers and critiques are "
              "a toy, not meaningful text. Train on a real model for real answers.")


class PolicyChat:
    """A run's policy (base + DPO LoRA) loaded once; answers from the aligned policy or the base."""

    def __init__(self, run_dir: str | Path, model, processor, recipe):
        from .models.encoding import GroupEncoder

        self.run_dir, self.model, self.processor, self.recipe = Path(run_dir), model, processor, recipe
        self.spec = model.mmrlhf.family
        self.encoder = GroupEncoder(processor, self.spec, max_length=recipe.dpo.train.max_length,
                                    max_frames=recipe.data.max_frames)
        self._lock = threading.Lock()  # one generation at a time on the shared model
        self._scorer = None

    @classmethod
    def from_run(cls, run_dir: str | Path) -> "PolicyChat":
        from .dpo.trainer import policy_dir
        from .models.loading import load_model
        from .recipe import load_recipe

        run = Path(run_dir)
        if not (run / "recipe.yaml").exists():
            raise GenerateError(f"{run / 'recipe.yaml'} not found: is {run} a run folder?")
        adapter = policy_dir(run)
        if not (adapter / "adapter_config.json").exists():
            raise GenerateError(f"run {run} has no aligned policy yet ({adapter} is missing): run its `dpo` stage first")
        recipe = load_recipe(run / "recipe.yaml", check_paths=False)
        model, processor = load_model(recipe.model, adapter=adapter, trainable=False)
        return cls(run, model, processor, recipe)

    @property
    def toy(self) -> bool:
        return is_toy(self.recipe.model.path)

    @property
    def has_reward_model(self) -> bool:
        from .reward.trainer import reward_model_dir

        return (reward_model_dir(self.run_dir) / "adapter_config.json").exists()

    # ----- prompts
    def _group(self, images: Sequence, question: str):
        from .data.groups import PreferenceGroup, text_to_turn

        question = (question or "").strip()
        if not question:
            raise GenerateError("give a question")
        images = list(images or [])
        return PreferenceGroup(id="ask", prompt=[text_to_turn(question, len(images))], responses=[], images=images)

    def _inputs(self, images: Sequence, question: str) -> dict:
        from .data.media import MediaError
        from .models.packing import TOKEN_LEVEL_KEYS, forward_keys

        try:
            prefix = self.encoder.policy_prompt(self._group(images, question))
        except MediaError as exc:
            raise GenerateError(f"cannot read an image: {exc}") from None
        device = next(p for p in self.model.parameters()).device
        keys = [k for k in forward_keys(self.spec, [prefix]) if k in prefix] + [k for k in TOKEN_LEVEL_KEYS if k in prefix]
        out = {k: prefix[k].to(device) for k in dict.fromkeys(keys)}
        out["input_ids"] = prefix["input_ids"].to(device)
        out["attention_mask"] = out["input_ids"].new_ones(out["input_ids"].shape)
        return out

    # ----- generation
    def stream(self, images: Sequence, question: str, *, which: str = "policy", sampling: Sampling | None = None,
               **kw) -> Iterator[str]:
        """Yield the answer so far after each new piece of text (the last one is the whole answer)."""
        import torch
        from transformers import TextIteratorStreamer

        from .models.reward_score import stop_ids

        if which not in WHICH:
            raise GenerateError(f"which must be 'base' or 'policy', not {which!r}")
        s = (sampling or Sampling(**kw)).check()
        inputs = self._inputs(images, question)
        tok = self.processor.tokenizer
        streamer = _token_streamer(TextIteratorStreamer)(tok, skip_prompt=True, skip_special_tokens=True, timeout=600)
        sample = float(s.temperature) > 0
        gen_kw = dict(**inputs, max_new_tokens=int(s.max_new_tokens), min_new_tokens=1, do_sample=sample,
                      temperature=float(s.temperature) if sample else None, top_p=float(s.top_p) if sample else None,
                      top_k=None, eos_token_id=stop_ids(self.processor.tokenizer, self.encoder.end_of_turn),
                      pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0, use_cache=True,
                      streamer=streamer)
        error: list[BaseException] = []
        generated: list = []

        def run():
            try:
                with self._lock, torch.no_grad():
                    torch.manual_seed(int(s.seed))
                    if which == "base":
                        with self.model.disable_adapter():
                            generated.append(self.model.generate(**gen_kw))
                    else:
                        generated.append(self.model.generate(**gen_kw))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                error.append(exc)
                streamer.end()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        text, shown = "", None
        for piece in streamer:
            text += piece
            if text.strip() and text.strip() != shown:  # no empty or repeated updates
                shown = text.strip()
                yield shown
        worker.join()
        if error:
            raise error[0]
        # the whole answer decoded at once (the pieces are the same text, unless a tokenizer's clean-up
        # changed earlier text as later tokens came)
        n = inputs["input_ids"].shape[1]
        yield tok.decode(generated[0][0, n:], skip_special_tokens=True).strip()

    def answer(self, images: Sequence, question: str, *, which: str = "policy", **kw) -> str:
        out = ""
        for out in self.stream(images, question, which=which, **kw):
            pass
        return out

    def compare(self, images: Sequence, question: str, **kw) -> dict[str, str]:
        """{"base": answer, "policy": answer} with the same sampling settings and seed."""
        return {w: self.answer(images, question, which=w, **kw) for w in WHICH}

    # ----- reward model
    def critique(self, images: Sequence, question: str, answers: Sequence[str], *, mode: str | None = None,
                 max_new_tokens: int | None = None) -> list[dict]:
        """Each answer's critique and score from the run's critique reward model."""
        from .data.groups import Response
        from .reward.scorer import RewardScorer
        from .reward.trainer import reward_model_dir

        if not self.has_reward_model:
            raise GenerateError(f"run {self.run_dir} has no trained reward model (its `reward` stage has not finished)")
        rc = self.recipe.reward
        if self._scorer is None:
            self._scorer = RewardScorer.from_adapter(reward_model_dir(self.run_dir), self.recipe.model,
                                                     max_length=rc.train.max_length, max_frames=self.recipe.data.max_frames)
        group = self._group(images, question)
        group.responses = [Response(a or " ") for a in answers]
        mode = mode or ("generate" if rc.critique_mode == "given" else rc.critique_mode)
        with self._lock:
            scored = self._scorer.score_groups([group], mode, max_new_tokens=int(max_new_tokens or rc.max_new_tokens))[0]
        return [{"answer": a, "score": s.score, "critique": " | ".join(s.critiques)} for a, s in zip(answers, scored)]


# --------------------------------------------------------------------------------------------------
# CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mmrlhf_lite.generate", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="the run folder (runs/<name>); its dpo stage must have finished")
    p.add_argument("--image", action="append", default=[], help="an image file (repeat for several)")
    p.add_argument("--question", required=True)
    p.add_argument("--which", choices=["both", *WHICH], default="both", help="whose answers (default both)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--score", action="store_true", help="add each answer's critique and score (run's reward model)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for img in args.image:
        if not Path(img).is_file():
            print(f"error: --image {img}: no such file", file=sys.stderr)
            return 2
    try:
        sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed).check()
        chat = PolicyChat.from_run(args.run)
        if chat.toy:
            print("note: " + TOY_NOTICE.format(path=chat.recipe.model.path), file=sys.stderr)
        answers = {}
        for which in (WHICH if args.which == "both" else [args.which]):
            label = "base model" if which == "base" else "aligned policy"
            print(f"{label}: ", end="", flush=True)
            shown = ""
            for text in chat.stream(args.image, args.question, which=which, sampling=sampling):
                print(text[len(shown):] if text.startswith(shown) else "\n" + text, end="", flush=True)
                shown = text
            print()
            answers[which] = shown
        if args.score:
            for which, r in zip(answers, chat.critique(args.image, args.question, list(answers.values()))):
                print(f"{which}: score {r['score']:.4f}" + (f"; critique: {r['critique']}" if r["critique"] else ""))
    except GenerateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
