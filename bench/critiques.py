"""Critique generation side by side: the shared-prompt path against the per-row path, in one run.

`RewardScorer.score_groups(mode="generate")` writes a critique for each response of a group and scores it.
Per-row (`share_prompt=False`, the path before the shared prompt): every critique is its own row through
`generate` (prompt and image repeated K x n times per group) and the scoring pass runs the vision tower
again. Shared (`share_prompt=True`, the product default where groups are packed): the vision tower runs
once per group (`prompt_embeddings`), the prompt is prefilled once and the K x n critiques are decoded
from its key/value states (`generation.generate_branches`), and scoring starts from the same embeddings.

Both paths run on the same loaded reward model (random LoRA and head) and the same groups, alternating,
`--repeats` times each; critiques/s = critiques written and scored / wall seconds (median), and the same
for generation alone. Greedy: the rows say how many critiques the two paths wrote identically.

    python -m bench.critiques --model tiny:qwen2_vl --image-tokens 16 --groups 16 --out results.jsonl
    python -m bench.critiques --model tiny:qwen2_vl --image-tokens 576 --groups 16 --out results.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch


def load_scorer(model: str, image_tokens: int, dtype: str = "auto", device: str = "auto"):
    """A reward scorer on `model` (a model path, `tiny:...`, or a bench shape name, bench/configs.py) whose
    processor makes exactly `image_tokens` image tokens of a square-ish image (min = max pixels)."""
    from mmrlhf_lite.models.loading import load_model
    from mmrlhf_lite.recipe import ModelConfig
    from mmrlhf_lite.reward.scorer import RewardScorer

    from .build import ensure_model
    from .configs import SHAPES
    from .data import image_size

    path = str(ensure_model(model)) if model in SHAPES else model
    w, h = image_size(image_tokens)
    torch.manual_seed(0)
    cfg = ModelConfig(path=path, load_in_4bit=True, compute_dtype=dtype, device=device,
                      min_pixels=w * h, max_pixels=w * h)
    m, processor = load_model(cfg, reward_head={"kind": "mlp", "dropout": 0.0}, trainable=False)
    return RewardScorer(m, processor, max_length=1 << 20)


def measure(scorer, groups, *, share_prompt: bool, max_new_tokens: int, batch_size: int) -> dict:
    """One timed `score_groups(mode="generate")` (and its generation part) on one path."""
    from .measure import now

    scorer.share_prompt = share_prompt
    t0 = now()
    scored = scorer.score_groups(groups, "generate", max_new_tokens=max_new_tokens, batch_size=batch_size)
    total = now() - t0
    return {"seconds": total, "generate_s": scorer.last_generate_s,
            "critiques": [sr.critiques[0] for g in scored for sr in g], "scores": [sr.score for g in scored for sr in g]}


def run(args) -> list[dict]:
    from .data import SyntheticSpec, make_groups

    scorer = load_scorer(args.model, args.image_tokens)
    groups = make_groups(scorer.processor.tokenizer, SyntheticSpec(image_tokens=args.image_tokens, k=args.k,
                                                                   response_tokens=args.response_tokens,
                                                                   question_tokens=args.question_tokens),
                         args.groups)
    image_tokens = scorer.encoder.image_token_count(scorer.crit.generation_inputs(groups[0])[0])
    prompt_len = scorer.crit.generation_inputs(groups[0])[0]["input_ids"].shape[1]
    n = sum(len(g.responses) for g in groups)
    runs = {False: [], True: []}
    measure(scorer, groups[:1], share_prompt=True, max_new_tokens=4, batch_size=args.batch_size)    # warm-up
    for _ in range(args.repeats):
        for share in (False, True):
            runs[share].append(measure(scorer, groups, share_prompt=share, max_new_tokens=args.max_new_tokens,
                                       batch_size=args.batch_size))
    rows = []
    for share, rs in runs.items():
        sec = statistics.median(r["seconds"] for r in rs)
        gen = statistics.median(r["generate_s"] for r in rs)
        rows.append({"kind": "critiques", "path": "shared prompt" if share else "per row", "model": args.model,
                     "image_tokens": image_tokens, "prompt_tokens": prompt_len, "groups": len(groups), "k": args.k,
                     "critiques": n, "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
                     "seconds": [r["seconds"] for r in rs], "critiques_per_s": n / sec,
                     "generate_critiques_per_s": n / gen})
    old, new = runs[False][0], runs[True][0]
    same = sum(a == b for a, b in zip(old["critiques"], new["critiques"]))
    rel = max(abs(a - b) / max(abs(a), 1e-6) for a, b, ca, cb in zip(old["scores"], new["scores"], old["critiques"],
                                                                      new["critiques"]) if ca == cb) if same else None
    rows[1].update(speedup=rows[1]["critiques_per_s"] / rows[0]["critiques_per_s"],
                   generate_speedup=rows[1]["generate_critiques_per_s"] / rows[0]["generate_critiques_per_s"],
                   identical_critiques=same, max_rel_score_diff_same_critique=rel)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.critiques", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny:qwen2_vl", help="model path, tiny:<family>, or a bench shape name")
    p.add_argument("--image-tokens", type=int, default=16)
    p.add_argument("--response-tokens", type=int, default=24)
    p.add_argument("--question-tokens", type=int, default=12)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--groups", type=int, default=16, help="groups per score_groups call (the score stage's batch)")
    p.add_argument("--max-new-tokens", type=int, default=56)
    p.add_argument("--batch-size", type=int, default=64, help="critique rows per generation batch")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="append the rows (JSONL) here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from .measure import environment

    rows = run(args)
    env = {"kind": "env", "command": "python -m bench.critiques " + " ".join(argv if argv is not None else sys.argv[1:]),
           "env": environment()}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as fh:
            for r in [env] + rows:
                fh.write(json.dumps(r, default=str) + "\n")
    for r in rows:
        print(f"{r['path']:14s} {r['model']} {r['image_tokens']} image tokens (prompt {r['prompt_tokens']}), "
              f"{r['critiques']} critiques: {r['critiques_per_s']:.2f} critiques/s "
              f"(generation alone {r['generate_critiques_per_s']:.2f}/s)"
              + (f"  speedup {r['speedup']:.2f}x, identical critiques {r['identical_critiques']}/{r['critiques']}"
                 if "speedup" in r else ""), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
