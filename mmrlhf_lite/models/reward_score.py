"""The critique reward model's score function, whole, in one module that needs only torch, transformers,
peft and PIL: the project scores with it, and `python -m mmrlhf_lite.export RUN --what reward` copies this
file verbatim into the exported folder, so an export scores with the same code as the run.

What a score is (REFERENCE.md, "Critique-based reward model"; DESIGN.md, "One score function"):

- The prompt: the image(s), then `INSTRUCTION`, `[Question]: {question}`, `[LMM Response]: {answer}`,
  `[Evaluation]:` in one user turn of the model's own chat template; the model's reply is the critique.
  Answer and critique are tokenised as text (`TemplateText.join`): the ids equal the chat template's own
  rendering, and a special-token string inside an answer stays characters.
- Where the head reads: the hidden state of the last token of [prompt + answer + `[Evaluation]:` +
  assistant header (+ reply prefix + critique + end of turn)]; without a critique (mode `none`) the last
  token of the assistant header.
- The score: `head(h)` + w x mean log p(answer tokens | image, prompt) under the reward model's own LM
  (`reward.response_logp_weight` = w; `hybrid_score`). w = 0 is the paper's head alone; w > 0 a hybrid.
- Critiques: `none` (no critique), `given` (a critique text per answer), `generate` (the model writes one,
  greedy, cut at its end of turn, decoded and stripped: `cut_reply`; an empty generated critique is its
  end-of-turn token alone, read at that position).

The project runs these pieces through its packed forward (`models.packing`: the prompt once per group);
`Scorer` below runs them through a plain forward (one right-padded row per answer) and is what an
exported folder uses. tests/test_reward_export.py checks both give the same scores (relative 1e-4).

    python load_reward_model.py --image a.png --question "What colour is the square?" \
        --answer "It is red." --answer "It is blue." --critique generate     # in an exported folder
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

TEMPLATE_VERSION = "critique-v2"  # v2: template-exact token boundaries, data text never parsed for special tokens
SETTINGS_FILE = "reward_score.json"
HEAD_WEIGHTS = "reward_head.safetensors"
CRITIQUE_MODES = ("none", "given", "generate")

INSTRUCTION = (
    "You are an unbiased and fair evaluator tasked with assessing the quality of answers provided by a Large "
    "Multimodal Model (LMM). Given the following question and the LMM's response, please evaluate the "
    "correctness, clarity, and completeness of the answer. Provide a detailed explanation of your assessment, "
    "including specific points of strength and areas for improvement."
)
READ_AT = ("the last token of [critique prompt + answer + '[Evaluation]:' + assistant header "
           "(+ reply prefix + critique + end of turn)]")
_RESPONSE_MARK = "\x1eMMRLHF_RESPONSE\x1e"
TOKEN_LEVEL_KEYS = ("mm_token_type_ids", "token_type_ids")


# --------------------------------------------------------------------------------------------------
# the head and the score

class RewardHead(nn.Module):
    """The scalar head, read at the branch's last token (see READ_AT).

    The paper's public code: dropout -> Linear(h, h) -> tanh -> dropout -> Linear(h, 1) (`mlp`); `linear` is
    a plain Linear(h, 1). Kept in float32 whatever the compute dtype: it is tiny and the scores feed a
    sigmoid, where bf16 rounding of reward differences is visible. `response_logp_weight` is w of
    `hybrid_score` (0 = the paper's head alone)."""

    def __init__(self, hidden: int, kind: str = "mlp", dropout: float = 0.0, response_logp_weight: float = 0.0):
        super().__init__()
        if kind not in ("mlp", "linear"):
            raise ValueError(f"reward head kind must be 'mlp' or 'linear', got {kind!r}")
        self.kind, self.dropout_p = kind, float(dropout)
        self.response_logp_weight = float(response_logp_weight)
        if kind == "mlp":
            self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.Tanh(), nn.Dropout(dropout),
                                     nn.Linear(hidden, 1))
        else:
            self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, 1))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(..., h) -> (...) rewards."""
        return self.net(hidden_states.to(self.net[-1].weight.dtype)).squeeze(-1)


def hybrid_score(head: torch.Tensor, response_logp: torch.Tensor | None, weight: float) -> torch.Tensor:
    """score = head + w * mean log p(response tokens); the head alone when there is no log-prob term."""
    if response_logp is None or not weight:
        return head
    return head + weight * response_logp.to(head.dtype)


def describe(weight: float) -> str:
    """How a reward model scores, in words: 'hybrid' when the log-prob term counts."""
    if weight:
        return f"hybrid: head on the critique + {weight:g} x the answer's mean log-prob"
    return "head on the critique alone"


# --------------------------------------------------------------------------------------------------
# template-exact tokens

class TemplateText:
    """Ids of chat-template text and of data text inside it.

    Data text (answers, critiques) is tokenised as text: a special-token string in it stays characters, it
    never becomes an image placeholder or ends the turn. Template text keeps its special tokens."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        self.special_strings = sorted({t.content for t in added.values() if t.content}, key=len, reverse=True)

    def tokens(self, text: str) -> list[int]:
        """Ids of data text: special-token strings in it are tokenised as ordinary characters."""
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def template_tokens(self, text: str) -> list[int]:
        """Ids of text the chat template wrote: its special tokens are special."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _special_span(self, text: str, last: bool) -> int:
        """Where the template text's plain part begins (last=True: after its last special token) or
        ends (last=False: at its first special token)."""
        best = 0 if last else len(text)
        for sp in self.special_strings:
            i = text.rfind(sp) if last else text.find(sp)
            if i >= 0:
                best = max(best, i + len(sp)) if last else min(best, i)
        return best

    def join(self, lead: str, data: str, trail: str) -> list[int]:
        """Ids of template text `lead` + data text + template text `trail`, as the tokenizer splits the
        whole rendering: the plain text around the data (up to the nearest special tokens) is tokenised
        with it, so e.g. SmolVLM's reply space merges with the first word, while the data's own
        special-token strings stay text."""
        a, b = self._special_span(lead, last=True), self._special_span(trail, last=False)
        ids = self.template_tokens(lead[:a]) if a else []
        ids += self.tokens(lead[a:] + data + trail[:b])
        return ids + (self.template_tokens(trail[b:]) if b < len(trail) else [])

    def special_string_in(self, text: str) -> str | None:
        """The first special-token string found in `text` (a prompt holding one would be read as that token)."""
        return next((sp for sp in self.special_strings if sp in text), None)


# --------------------------------------------------------------------------------------------------
# the critique prompt

def critique_turn(n_images: int, question: str) -> dict:
    """The critique prompt's user turn: the images first, then the instruction, the question, a marker where
    the answer goes, and `[Evaluation]:`."""
    text = f"{INSTRUCTION}\n[Question]: {question}\n[LMM Response]: {_RESPONSE_MARK}\n[Evaluation]:"
    return {"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}


def split_at_response(processor, turn: dict) -> tuple[str, str, str]:
    """(before, lead, after): the turn rendered with the generation prompt, split at the answer's place.

    The chat template decides every separator exactly as in a full rendering; the whitespace before the
    answer (`lead`) belongs to its first token (`: The` is `:` + ` The`)."""
    rendered = processor.apply_chat_template([turn], add_generation_prompt=True, tokenize=False)
    before, after = rendered.split(_RESPONSE_MARK, 1)
    lead = before[len(before.rstrip()):]
    return before[:len(before) - len(lead)], lead, after


@dataclass
class CritiqueBranchTokens:
    """The tokens after the shared prefix that score one answer."""
    context: list[int]    # answer + "[Evaluation]:" + end of user turn + assistant header
    critique: list[int]   # reply prefix + critique + end of turn ([] without a critique)
    n_response: int       # leading context tokens that are the answer's own (0 unless asked)

    @property
    def ids(self) -> list[int]:
        return self.context + self.critique

    @property
    def target(self) -> list[bool]:
        """Tokens whose log-probs a forward gathers: the answer's (for the log-prob term), the critique's."""
        return ([True] * self.n_response + [False] * (len(self.context) - self.n_response)
                + [True] * len(self.critique))


def critique_branch(text: TemplateText, lead: str, after: str, answer: str, critique: str | None, *,
                    reply_prefix: str, end_of_turn: str, with_critique: bool = True, generated: bool = False,
                    response_targets: bool = False) -> CritiqueBranchTokens:
    """One answer's branch. A critique is used when given non-empty, or when `generated` (the model's own:
    an empty one is the end-of-turn token alone, as generated, so the head reads the end-of-turn position
    as for every other critique, not the no-critique position). `response_targets`: count the answer's
    tokens (`n_response`) for the log-prob term."""
    context = text.join(lead, answer, after)
    use = with_critique and (bool(critique) or (generated and critique is not None))
    crit = text.join(reply_prefix, critique, end_of_turn) if use else []
    n_response = 0
    if response_targets:
        # the whitespace before the answer and its text, up to where tokenising it together with the text
        # after it merges differently
        alone = text.join(lead, answer, "")
        while n_response < min(len(alone), len(context)) and alone[n_response] == context[n_response]:
            n_response += 1
    return CritiqueBranchTokens(context=context, critique=crit, n_response=n_response)


# --------------------------------------------------------------------------------------------------
# decoding a generated reply

def stop_ids(tokenizer, end_of_turn: str) -> list[int]:
    """Token ids that end a generated reply: the end of turn (when one token) and the EOS."""
    ids = set()
    eot = tokenizer(end_of_turn, add_special_tokens=False)["input_ids"]
    if len(eot) == 1:
        ids.add(eot[0])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def cut_reply(tokenizer, generated: list[int], stop: list[int]) -> tuple[str, list[int]]:
    """(text, ids up to and including the first stop token when one was generated): the text is decoded
    without special tokens and stripped at both ends."""
    cut = next((i for i, t in enumerate(generated) if t in stop), len(generated))
    return tokenizer.decode(generated[:cut], skip_special_tokens=True).strip(), generated[:cut + 1]


# --------------------------------------------------------------------------------------------------
# the processor without torchvision

class FramesOnlyVideoProcessor:
    """Stands in for a torchvision video processor: videos are fed as sampled frames (images)."""

    merge_size = 2
    temporal_patch_size = 2

    def __call__(self, *args, **kwargs):
        raise ValueError("native video input needs torchvision; videos are passed as frames")


def image_only_processor_class(base: type) -> type:
    """`base` (a transformers processor class) that accepts `FramesOnlyVideoProcessor` as its video processor."""
    class ImageOnly(base):  # type: ignore[misc, valid-type]
        def check_argument_for_proper_class(self, argument_name, argument):
            if isinstance(argument, FramesOnlyVideoProcessor):
                return FramesOnlyVideoProcessor
            return super().check_argument_for_proper_class(argument_name, argument)

    ImageOnly.__name__ = base.__name__
    return ImageOnly


def processor_without_torchvision(path: str, processor_class: type, image_processor_class: type,
                                  trust_remote_code: bool = False):
    """The processor built from its parts: the tokenizer, the family's PIL image processor, no video
    processor. Without torchvision `AutoProcessor` cannot build Qwen2-VL's (it asks for a video processor).
    The processor's own settings (processor_config.json: LLaVA-OV's `num_image_tokens`, Idefics3's
    `image_seq_len`) are passed as AutoProcessor would: they fix how many image tokens the text gets."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    image_processor = image_processor_class.from_pretrained(path)
    proc_cls = image_only_processor_class(processor_class)
    chat_template = tokenizer.chat_template
    template_file = Path(path) / "chat_template.jinja"
    if chat_template is None and template_file.exists():
        chat_template = template_file.read_text()
    kwargs = {}
    config_file = Path(path) / "processor_config.json"
    if config_file.exists():
        accepted = set(inspect.signature(proc_cls.__init__).parameters) - set(proc_cls.get_attributes()) - {
            "self", "chat_template", "args", "kwargs"}
        kwargs = {k: v for k, v in json.loads(config_file.read_text()).items() if k in accepted}
    if "video_processor" in proc_cls.get_attributes():
        kwargs["video_processor"] = FramesOnlyVideoProcessor()
    return proc_cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs)


# --------------------------------------------------------------------------------------------------
# a standalone scorer: an exported folder (plain forward, one row per answer)

@dataclass
class AnswerScore:
    """One answer's score and its parts: score = head + response_logp_weight * response_logp."""
    score: float
    head: float
    response_logp: float | None   # mean log-prob of the answer's tokens (None when the weight is 0)
    critique: str | None          # the critique scored with (None in mode none)


def open_image(image):
    """A path, bytes or PIL image as an RGB PIL image, fully decoded."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (bytes, bytearray)):
        img = Image.open(io.BytesIO(bytes(image)))
    else:
        if not os.path.exists(image):
            raise FileNotFoundError(f"image not found: {image}")
        img = Image.open(image)
    img.load()
    return img.convert("RGB")


def auto_dtype(device) -> str:
    """The run's `compute_dtype: auto` on `device`, as the project picks it (models/precision.py): bfloat16 on
    a GPU that computes it natively (compute capability 8.0 and up), float16 below (a T4 passes
    `torch.cuda.is_bf16_supported()` through emulation), float32 on the CPU."""
    if not str(device).startswith("cuda"):
        return "float32"
    return "bfloat16" if tuple(torch.cuda.get_device_capability(torch.device(device))) >= (8, 0) else "float16"


def _base_module(model):
    """The transformers `...ForConditionalGeneration` under a peft wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class Scorer:
    """The reward model of an exported folder (`reward_score.json`, the head, an adapter or merged weights),
    scoring answers to one question about its images in mode none, given or generate."""

    def __init__(self, model, processor, head: RewardHead, settings: dict):
        self.model, self.processor, self.head, self.settings = model.eval(), processor, head.eval(), settings
        self.text = TemplateText(processor.tokenizer)
        self.weight = float(settings["response_logp_weight"])
        self.reply_prefix, self.end_of_turn = settings["reply_prefix"], settings["end_of_turn"]
        self.device = next(p for p in model.parameters()).device

    @classmethod
    def load(cls, folder, device: str = "auto", dtype: str | None = None) -> "Scorer":
        """Load an exported folder: the base (from `adapter_config.json`'s `base_model_name_or_path`) with
        its LoRA adapter, or the merged weights; in 4-bit when the run trained in 4-bit and bitsandbytes
        is installed. `dtype`: the compute dtype (default: the run's)."""
        from safetensors.torch import load_file
        from transformers import AutoModelForImageTextToText, AutoProcessor

        folder = Path(folder)
        settings = json.loads((folder / SETTINGS_FILE).read_text())
        if settings.get("template_version") != TEMPLATE_VERSION:
            raise ValueError(f"{folder / SETTINGS_FILE}: critique template {settings.get('template_version')!r}, this "
                             f"scorer writes {TEMPLATE_VERSION!r}: export the run again")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = dtype or settings.get("compute_dtype")
        if dtype is None:  # the run's `auto`
            dtype = auto_dtype(device)
        dtype = getattr(torch, dtype)
        adapter = (folder / "adapter_config.json").exists()
        source = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] if adapter \
            else str(folder)
        kwargs = {"dtype": dtype, "attn_implementation": settings.get("attn_implementation", "sdpa"),
                  "trust_remote_code": bool(settings.get("trust_remote_code"))}
        quantised = settings.get("load_in_4bit") and adapter and _bitsandbytes()
        if quantised:
            from transformers import BitsAndBytesConfig
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=list(settings.get("skip_4bit") or []))
            kwargs["device_map"] = {"": device}
        elif settings.get("load_in_4bit") and adapter:
            print("note: the run trained on a 4-bit (nf4) base but bitsandbytes is not installed: scores are "
                  "computed on the full-precision base and differ slightly", file=sys.stderr)
        model = AutoModelForImageTextToText.from_pretrained(source, **kwargs)
        if not quantised:
            model.to(device)
        pins = settings.get("image_grid_pinpoints")
        if pins:  # the anyres resolutions the run capped (model.max_pixels): processor and model must agree
            for module in model.modules():
                if getattr(getattr(module, "config", None), "image_grid_pinpoints", None):
                    module.config.image_grid_pinpoints = pins
        if adapter:
            from peft import PeftModel
            model = PeftModel.from_pretrained(model, str(folder), is_trainable=False)
        _portable_4bit_kernel(model)
        head_info = settings["head"]
        head = RewardHead(head_info["hidden_size"], head_info["kind"], head_info.get("dropout", 0.0),
                          settings["response_logp_weight"])
        head.load_state_dict(load_file(str(folder / HEAD_WEIGHTS)))
        try:
            processor = AutoProcessor.from_pretrained(str(folder), trust_remote_code=kwargs["trust_remote_code"])
        except (ImportError, ValueError, OSError, TypeError):
            import transformers
            fam = settings["processor"]
            processor = processor_without_torchvision(
                str(folder), getattr(transformers, fam["processor_class"]),
                getattr(importlib.import_module(fam["image_processor_module"]), fam["image_processor_class"]),
                kwargs["trust_remote_code"])
        if processor.tokenizer.pad_token is None:
            processor.tokenizer.pad_token = processor.tokenizer.eos_token
        return cls(model, processor, head.to(device=device, dtype=torch.float32), settings)

    # ----- the prompt
    def _prompt(self, images: list, question: str) -> tuple[dict, str, str]:
        """(prefix inputs, lead, after) of the critique prompt for `question` about `images`."""
        found = self.text.special_string_in(question)
        if found:
            raise ValueError(f"the question contains {found!r}, a special token of this model's tokenizer: the chat "
                             "template would read it as that token, not as text; remove or rewrite it")
        opened = [open_image(i) for i in images]
        before, lead, after = split_at_response(self.processor, critique_turn(len(opened), question))
        # images nested per sample (LLaVA-OV multi-image rules), as the project's encoder does
        full = self.processor(text=[before], images=[opened] if opened else None, return_tensors="pt")
        prefix = {k: v for k, v in full.items() if hasattr(v, "shape") and k != "attention_mask"}
        return prefix, lead, after

    def _branches(self, lead: str, after: str, answers: list[str], critiques: list | None,
                  generated: bool) -> list[CritiqueBranchTokens]:
        out = []
        for i, answer in enumerate(answers):
            crit = critiques[i] if critiques is not None else None
            out.append(critique_branch(self.text, lead, after, answer, crit, reply_prefix=self.reply_prefix,
                                       end_of_turn=self.end_of_turn, with_critique=critiques is not None,
                                       generated=generated, response_targets=self.weight > 0))
        return out

    # ----- forward
    @torch.no_grad()
    def _forward(self, prefix: dict, branches: list[CritiqueBranchTokens], batch_size: int) -> list[AnswerScore]:
        """One right-padded row per answer: [prefix][branch]; the head reads the row's last token, the
        log-prob term the answer's tokens (token t predicted at position prefix_len + t - 1)."""
        base = _base_module(self.model)
        prefix_ids = prefix["input_ids"][0].tolist()
        p = len(prefix_ids)
        max_length = self.settings.get("max_length")
        for i, b in enumerate(branches):
            if max_length and p + len(b.ids) > max_length:
                raise ValueError(f"answer {i + 1}: critique prompt + answer + critique is {p + len(b.ids)} tokens > "
                                 f"max_length {max_length} of the run (never truncated)")
        media = {k: v for k, v in prefix.items() if k not in ("input_ids",) + TOKEN_LEVEL_KEYS}
        out = []
        for s in range(0, len(branches), batch_size):
            chunk = branches[s:s + batch_size]
            rows = [prefix_ids + b.ids for b in chunk]
            n, width = len(rows), max(len(r) for r in rows)
            input_ids = torch.zeros((n, width), dtype=torch.long)
            attention = torch.zeros((n, width), dtype=torch.long)
            token_keys = {k: torch.zeros((n, width), dtype=torch.long) for k in TOKEN_LEVEL_KEYS if k in prefix}
            for i, row in enumerate(rows):
                input_ids[i, :len(row)] = torch.tensor(row)
                attention[i, :len(row)] = 1
                for k in token_keys:
                    token_keys[k][i, :p] = prefix[k][0]
            kwargs = {k: torch.cat([v] * n).to(self.device) for k, v in media.items()}
            kwargs.update({k: v.to(self.device) for k, v in token_keys.items()})
            if hasattr(base.model, "rope_deltas"):
                base.model.rope_deltas = None  # stale deltas from a previous generate() must not leak in
            hidden = base.model(input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device),
                                use_cache=False, **kwargs).last_hidden_state
            last = hidden[torch.arange(n), torch.tensor([len(r) - 1 for r in rows])]
            heads = self.head(last)
            logps = None
            if self.weight > 0:
                lm_head = base.get_output_embeddings()
                means = []
                for i, b in enumerate(chunk):
                    if not b.n_response:  # no answer token (an empty answer): the term is 0, as in the project
                        means.append(torch.zeros((), device=self.device))
                        continue
                    pos = torch.arange(p - 1, p - 1 + b.n_response)
                    logits = lm_head(hidden[i, pos.to(self.device)]).float()
                    target = torch.tensor(b.context[:b.n_response], device=self.device)
                    means.append(logits.log_softmax(-1).gather(1, target[:, None]).squeeze(1).mean())
                logps = torch.stack(means)
            scores = hybrid_score(heads, logps, self.weight)
            for i in range(n):
                out.append(AnswerScore(score=float(scores[i]), head=float(heads[i]),
                                       response_logp=None if logps is None else float(logps[i]), critique=None))
        return out

    @torch.no_grad()
    def _generate(self, prefix: dict, contexts: list[list[int]], max_new_tokens: int, batch_size: int) -> list[str]:
        """Greedy critiques after prefix + context, left-padded rows, cut at the end of turn (`cut_reply`)."""
        tok = self.processor.tokenizer
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        stop = stop_ids(tok, self.end_of_turn)
        prefix_ids = prefix["input_ids"][0].tolist()
        media = {k: v for k, v in prefix.items() if k not in ("input_ids",) + TOKEN_LEVEL_KEYS}
        texts = []
        for s in range(0, len(contexts), batch_size):
            rows = [prefix_ids + list(c) for c in contexts[s:s + batch_size]]
            n, width = len(rows), max(len(r) for r in rows)
            input_ids = torch.full((n, width), pad_id, dtype=torch.long)
            attention = torch.zeros((n, width), dtype=torch.long)
            token_keys = {k: torch.zeros((n, width), dtype=torch.long) for k in TOKEN_LEVEL_KEYS if k in prefix}
            for i, row in enumerate(rows):
                input_ids[i, width - len(row):] = torch.tensor(row)
                attention[i, width - len(row):] = 1
                for k in token_keys:
                    token_keys[k][i, width - len(row):width - len(row) + len(prefix_ids)] = prefix[k][0]
            kwargs = {k: torch.cat([v] * n).to(self.device) for k, v in media.items()}
            kwargs.update({k: v.to(self.device) for k, v in token_keys.items()})
            gen = self.model.generate(input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device),
                                      **kwargs, max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                                      top_p=None, top_k=None, eos_token_id=stop, pad_token_id=pad_id, use_cache=True)
            texts += [cut_reply(tok, row, stop)[0] for row in gen[:, width:].tolist()]
        return texts

    # ----- public API
    def default_mode(self) -> str:
        """The run's critique mode; `given` (the data's critiques) becomes `generate` for new answers."""
        mode = self.settings.get("critique_mode") or "generate"
        return "generate" if mode == "given" else mode

    def score_answers(self, images, question: str, answers: list[str], critique: str | None = None,
                      critiques: list[str] | None = None, *, max_new_tokens: int | None = None,
                      batch_size: int = 8, generation_batch_size: int | None = None) -> list[AnswerScore]:
        """Each answer's score and parts. `critique`: none | given (then `critiques`, one per answer) |
        generate (greedy; `max_new_tokens` and `generation_batch_size` default to the run's: left-padded
        batches can change a greedy critique, so batch size 1 reproduces the project's batch-1 critiques
        token for token); default: the run's mode (`default_mode`). `batch_size`: answers per scoring forward."""
        mode = critique or self.default_mode()
        if mode not in CRITIQUE_MODES:
            raise ValueError(f"critique must be one of {', '.join(CRITIQUE_MODES)}, not {mode!r}")
        if isinstance(images, (str, bytes, os.PathLike)) or hasattr(images, "convert"):
            images = [images]
        images = list(images or [])
        answers = list(answers)
        if mode == "given" and (critiques is None or len(critiques) != len(answers)):
            raise ValueError("critique 'given' needs one critique per answer (critiques=[...])")
        prefix, lead, after = self._prompt(images, question)
        if mode == "generate":
            contexts = [b.context for b in self._branches(lead, after, answers, None, False)]
            critiques = self._generate(prefix, contexts, max_new_tokens or int(self.settings.get("max_new_tokens", 96)),
                                       generation_batch_size or int(self.settings.get("generation_batch_size", 8)))
        elif mode == "none":
            critiques = None
        scored = self._forward(prefix, self._branches(lead, after, answers, critiques, mode == "generate"), batch_size)
        for i, s in enumerate(scored):
            s.critique = critiques[i] if critiques is not None else None
        return scored

    def score(self, images, question: str, answers: list[str], critique: str | None = None,
              critiques: list[str] | None = None) -> list[float]:
        """One score per answer (see `score_answers`)."""
        return [s.score for s in self.score_answers(images, question, answers, critique, critiques)]


def _bitsandbytes() -> bool:
    try:
        importlib.import_module("bitsandbytes")
        return True
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return False


def _portable_4bit_kernel(model) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes switches eval-mode no-grad 4-bit matmuls to a packed kernel
    that needs a hub download and crashes offline; keep the portable kernel."""
    for module in model.modules():
        if type(module).__name__ == "Linear4bit" and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


# --------------------------------------------------------------------------------------------------
# command line (an exported folder's load_reward_model.py)

def main(argv: list[str] | None = None, folder: str | os.PathLike | None = None) -> int:
    p = argparse.ArgumentParser(prog="python load_reward_model.py",
                                description="Score answers to a question about an image with this critique reward "
                                            "model; prints any critiques, then one line per answer: score<TAB>answer.")
    p.add_argument("--image", action="append", default=[], help="an image file (repeat for several)")
    p.add_argument("--question", required=True)
    p.add_argument("--answer", action="append", required=True, help="an answer (repeat for several)")
    p.add_argument("--critique", choices=("none", "generate"), default=None,
                   help="none: score without a critique; generate: the model writes one first (default: the run's mode)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="critique length (default: the run's)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when there is one)")
    p.add_argument("--folder", default=str(folder or Path(__file__).resolve().parent),
                   help="the exported folder (default: this script's)")
    args = p.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # stdout/stderr hold only the critiques, the scores and errors
    try:
        scorer = Scorer.load(args.folder, device=args.device)
        scored = scorer.score_answers(args.image, args.question, args.answer, args.critique,
                                      max_new_tokens=args.max_new_tokens)
    except (ValueError, FileNotFoundError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for i, s in enumerate(scored):
        if s.critique is not None:
            print(f"critique {i + 1}: {s.critique}")
    for answer, s in zip(args.answer, scored):
        print(f"{s.score:.7g}\t{answer}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
