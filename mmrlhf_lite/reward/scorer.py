"""Scoring with the critique reward model (stage `score`, and a Python API for the UI and notebooks).

For each response: generate a critique (greedy; `n_samples > 1` samples several and averages their
scores), append it, score once (`generate`); or use the dataset's critique (`given`); or score without
one (`none`). Results go to the reward cache (`<cache>/reward.jsonl`), keyed by content, written as
they are produced; `<run>/score/margins.jsonl` then lists, per group, the scores and every pair's
margin delta = r(better) - r(worse) that MM-DPO's dynamic beta uses.

In the run folder the stage reads the groups (`data.path`) and the reward model (`reward/final/`, or that of
`reward.model_from`) and writes `<cache>/reward.jsonl` (`cache.dir`, default `cache/`: one line per
response, reused by any run with the same model and content), `score/margins.jsonl`, `score/beta_hist.png`
(the training pairs' beta_i), its progress in `events.jsonl` and, through train.py, `stages/score.json`
(with the held-out Spearman(delta, human rank gap) and the spread of beta_i).

    python -m mmrlhf_lite.train recipes/demo.yaml --stages score
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from .. import distributed
from ..cache.sharded import fill_missing_sharded, open_shared_store
from ..cache.store import JsonlStore, content_key, directory_fingerprint, group_content, model_fingerprint
from ..data.groups import PreferenceGroup, Response, text_to_turn
from ..models.encoding import GroupEncoder
from ..models.generation import generate_after
from ..models.loading import load_model
from ..models.logprobs import use_packing
from ..models.reward_score import TEMPLATE_VERSION, AnswerScore
from ..recipe import ModelConfig, RewardConfig
from ..runs import write_atomic
from .prompt import CritiqueEncoder
from .trainer import compute_rewards, response_logp_weight, reward_model_dir

REWARD_CACHE = "reward.jsonl"
REWARD_FIELDS = {"score": (int, float), "scores": list, "critiques": list}  # the shape a cache line must have


@dataclass
class ScoredResponse:
    """A response's score (the mean over its critique samples) and, apart, the two parts of a hybrid score
    (`reward_score.hybrid_score`): score = head + response_logp_weight * response_logp."""
    score: float
    scores: list[float]
    critiques: list[str]
    empty_critiques: int = 0  # generated critiques that were empty (the model ended its turn at once)
    head: float | None = None           # the head's part, mean over samples
    response_logp: float | None = None  # mean log-prob of the response's tokens (None when the weight is 0)


class RewardScorer:
    """A loaded critique reward model that scores groups in any critique mode."""

    def __init__(self, model, processor, *, max_length: int = 4096, max_frames: int = 8, packing: str = "auto",
                 attn_implementation: str = "sdpa"):
        self.model, self.processor = model, processor
        self.spec = model.mmrlhf.family
        self.packed = use_packing(self.spec, packing, attn_implementation)
        self.encoder = GroupEncoder(processor, self.spec, max_length=max_length, max_frames=max_frames)
        self.crit = CritiqueEncoder(self.encoder)
        model.eval()

    @classmethod
    def from_run(cls, run_dir: str | Path, model_cfg: ModelConfig, max_length: int = 4096, max_frames: int = 8):
        """The reward model trained in a run folder (its `reward/final` adapter + head)."""
        return cls.from_adapter(reward_model_dir(Path(run_dir)), model_cfg, max_length, max_frames)

    @classmethod
    def from_adapter(cls, adapter: str | Path, model_cfg: ModelConfig, max_length: int = 4096, max_frames: int = 8,
                     events=None):
        """`events`: the stage's event stream; with it the model is held as the launch says (sharded under
        FSDP2, `distributed.shard`), without it (UI, notebooks, eval) whole."""
        adapter = Path(adapter)
        if not (adapter / "adapter_config.json").exists():
            raise FileNotFoundError(f"no trained reward model in {adapter}: run the `reward` stage first")
        model, processor = load_model(model_cfg, adapter=adapter, trainable=False, shard=events is not None)
        if events is not None:
            distributed.shard(model, events)
        return cls(model, processor, max_length=max_length, max_frames=max_frames, packing=model_cfg.packing,
                   attn_implementation=model_cfg.attn_implementation)

    # ----- critiques
    def generate_critiques(self, groups: Sequence[PreferenceGroup], *, n_samples: int = 1, temperature: float = 0.7,
                           max_new_tokens: int = 96, batch_size: int = 8, seed: int = 0) -> list[list[list[str]]]:
        """critiques[g][r][s] for group g, response r, sample s."""
        prompts, index = [], []
        for gi, g in enumerate(groups):
            prefix, contexts = self.crit.generation_inputs(g)
            for ri, ctx in enumerate(contexts):
                for si in range(n_samples):
                    prompts.append((prefix, ctx))
                    index.append((gi, ri, si))
        texts = generate_after(self.model, self.spec, self.processor, prompts, end_of_turn=self.encoder.end_of_turn,
                               max_new_tokens=max_new_tokens, do_sample=n_samples > 1, temperature=temperature,
                               batch_size=batch_size, seed=seed, return_ids=True)
        out = [[[""] * n_samples for _ in g.responses] for g in groups]
        ge = self.encoder
        eot = ge.template_tokens(ge.end_of_turn)
        # scored as text + end of turn: count the critiques whose tokens then differ from those generated
        # (a stop by length has no end-of-turn token; whitespace stripped at the ends is not re-added)
        self.retokenized = 0
        for (gi, ri, si), (t, ids) in zip(index, texts):
            out[gi][ri][si] = t
            ended = ids[-len(eot):] == eot if eot else False
            rescored = ge.join(ge.reply_prefix, t, ge.end_of_turn)  # as CritiqueEncoder.encode scores it
            self.retokenized += (rescored != ids) if ended else (rescored[:len(rescored) - len(eot)] != ids)
        return out

    # ----- scores
    @property
    def response_logp_weight(self) -> float:
        """w of the hybrid score (0: the head alone)."""
        return response_logp_weight(self.model)

    @torch.no_grad()
    def score_with(self, groups: Sequence[PreferenceGroup], critiques: list[list[list[str]]] | None,
                   batch_groups: int = 4, generated: bool = False) -> list[list[list[AnswerScore]]]:
        """scores[g][r][s] with their parts; `critiques=None` scores without critique (mode `none`);
        `generated`: the critiques are the model's own (an empty one is its end-of-turn token, see
        CritiqueEncoder.encode)."""
        jobs = []  # expand samples into extra branches of the same group (same prefix, same image)
        for gi, g in enumerate(groups):
            n = len(critiques[gi][0]) if critiques is not None else 1
            for si in range(n):
                crit = [critiques[gi][ri][si] for ri in range(len(g.responses))] if critiques is not None else None
                jobs.append((gi, si, g, crit))
        scores: list[list[list[AnswerScore | None]]] = [
            [[None] * (len(critiques[gi][0]) if critiques is not None else 1) for _ in g.responses]
            for gi, g in enumerate(groups)]
        resp = self.response_logp_weight > 0
        for s in range(0, len(jobs), batch_groups):
            chunk = jobs[s:s + batch_groups]
            encoded = [self.crit.encode(g, critiques=c, with_critique=c is not None, response_targets=resp,
                                        generated=generated)[0] for _, _, g, c in chunk]
            out = distributed.forward(self.model, lambda: compute_rewards(
                self.model, self.spec, encoded, self.packed, with_logps=False))
            off = 0
            for gi, si, g, crit in chunk:
                for ri in range(len(g.responses)):
                    k = off + ri
                    scores[gi][ri][si] = AnswerScore(
                        score=float(out.scores[k]), head=float(out.head[k]),
                        response_logp=None if out.response_logp is None else float(out.response_logp[k]),
                        critique=None if crit is None else crit[ri])
                off += len(g.responses)
        return scores

    def score_groups(self, groups: Sequence[PreferenceGroup], mode: str = "generate", *, n_samples: int = 1,
                     temperature: float = 0.7, max_new_tokens: int = 96, batch_size: int = 8,
                     seed: int = 0, batch_groups: int = 4) -> list[list[ScoredResponse]]:
        """Each group's responses scored in `mode`; `batch_size` critiques per generation call, `batch_groups`
        groups per packed scoring forward."""
        if mode == "generate":
            crits = self.generate_critiques(groups, n_samples=n_samples, temperature=temperature,
                                            max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed)
        elif mode == "given":
            missing = [g.source or g.id for g in groups if any(not r.critique for r in g.responses)]
            if missing:
                raise ValueError(f"critique mode 'given' but {len(missing)} group(s) lack critiques, e.g. {missing[0]}")
            crits = [[[r.critique] for r in g.responses] for g in groups]
        elif mode == "none":
            crits = None
        else:
            raise ValueError(f"unknown critique mode {mode!r}")
        scores = self.score_with(groups, crits, batch_groups=batch_groups, generated=mode == "generate")
        return [[_scored(samples, crits[gi][ri] if crits else [], mode) for ri, samples in enumerate(group_scores)]
                for gi, group_scores in enumerate(scores)]

    def score_answers(self, image, question: str, answers: list[str], mode: str = "generate",
                      max_new_tokens: int = 96) -> list[ScoredResponse]:
        """Playground API: one image (path, bytes or None), a question, 1-5 answers."""
        images = [image] if image is not None else []
        g = PreferenceGroup(id="playground", prompt=[text_to_turn(question, len(images))],
                            responses=[Response(a) for a in answers], images=images)
        return self.score_groups([g], mode, max_new_tokens=max_new_tokens)[0]


def _scored(samples: list[AnswerScore], critiques: list[str], mode: str) -> ScoredResponse:
    """A response's samples as one ScoredResponse: each part averaged over the samples."""
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    logps = [s.response_logp for s in samples]
    return ScoredResponse(score=mean([s.score for s in samples]), scores=[s.score for s in samples],
                          critiques=critiques, empty_critiques=sum(not c for c in critiques) if mode == "generate" else 0,
                          head=mean([s.head for s in samples]), response_logp=None if None in logps else mean(logps))


# --------------------------------------------------------------------------------------------------
# stage `score`

def response_keys(groups: Sequence[PreferenceGroup], fingerprint: str, cfg: RewardConfig, mode: str,
                  seed: int) -> list[list[str]]:
    gen = {"n_samples": cfg.n_samples, "temperature": cfg.temperature if cfg.n_samples > 1 else None,
           "max_new_tokens": cfg.max_new_tokens, "seed": seed} if mode == "generate" else {}
    keys = []
    for g in groups:
        content = group_content(g)
        keys.append([content_key("reward", fingerprint, TEMPLATE_VERSION, mode, gen, content, r.text,
                                 r.critique if mode == "given" else None) for r in g.responses])
    return keys


def reward_fingerprint(model_cfg: ModelConfig, adapter_dir: Path) -> str:
    """Base model + adapter + the resolved settings that change a score (resolution, quantisation, dtype,
    backend, attention, packing: `cache.reference.policy_settings`), so scores made at another resolution
    or precision, e.g. through `reward.model_from` or a shared `cache.dir`, are not reused."""
    from ..cache.reference import policy_settings

    return content_key(model_fingerprint(model_cfg.path),
                       directory_fingerprint(adapter_dir, hash_files=("adapter_model.safetensors",)),
                       policy_settings(model_cfg))


def groups_per_batch(cfg: RewardConfig, mode: str) -> int:
    """Groups scored per call: about `generation_batch_size` critiques (4 responses a group) in mode
    `generate`, 4 groups otherwise. The score stage's batches and the eval stage's chunks."""
    return max(1, cfg.generation_batch_size // 4) if mode == "generate" else 4


def score_into_cache(ctx, groups: list[PreferenceGroup], mode: str, store: JsonlStore,
                     scorer: Callable[[], RewardScorer]) -> tuple[list[list[dict]], int]:
    """Fill `store` for every response of `groups`; returns (records per group/response, newly computed).
    When the launch shards the reward model (FSDP2, modes given / none) its forwards are collectives: a rank
    with no batch left in a round scores the first group instead (`idle_forward`, its result discarded)."""
    recipe, events = ctx.recipe, ctx.events
    rc = recipe.reward
    fp = reward_fingerprint(recipe.model, ctx.reward_model_dir())
    keys = response_keys(groups, fp, rc, mode, recipe.run.seed)

    def compute(batch: list[PreferenceGroup]) -> list[list[dict]]:
        scored = scorer().score_groups(batch, mode, n_samples=rc.n_samples, temperature=rc.temperature,
                                       max_new_tokens=rc.max_new_tokens, batch_size=rc.generation_batch_size,
                                       seed=recipe.run.seed)
        return [[{"score": sr.score, "scores": sr.scores, "critiques": sr.critiques, "mode": mode} for sr in g]
                for g in scored]

    store, computed = fill_missing_sharded(groups, keys, store, compute, per_batch=groups_per_batch(rc, mode),
                                           events=events, stop_requested=ctx.stop_requested,
                                           idle_forward=lambda: scorer().score_groups(list(groups[:1]), mode))
    return [[store.get(k) for k in ks] for ks in keys], computed


FSDP_GENERATE = ("reward.critique_mode=generate: the score stage cannot run under an FSDP launch (generating "
                 "critiques with the weights sharded is not supported); use reward.critique_mode=given (the "
                 "dataset's critiques) or none, or run `--stages score` without FSDP (one process, or torchrun / "
                 "recipes/accelerate/ddp.yaml: each GPU holds the whole model) and the other stages under FSDP")


def margins_key(group: PreferenceGroup) -> str:
    """What a group's margins belong to: its prompt turns, media bytes and response texts. Group ids are
    not unique across a train file and an `eval_path` file, so margins are found by content."""
    return content_key("margins", group_content(group), [r.text for r in group.responses])


def write_margins(path: Path, groups: list[PreferenceGroup], records: list[list[dict]], split: dict[str, str],
                  splits: Sequence[str] | None = None) -> None:
    """Per group: scores and each ranked pair's margin delta = r(better) - r(worse), with the group's
    content key (`margins_key`). `splits` (one per group) wins over the by-id `split` map."""
    lines = []
    for i, (g, recs) in enumerate(zip(groups, records)):
        scores = [r["score"] for r in recs]
        lines.append(json.dumps({
            "group_id": g.id, "content": margins_key(g),
            "split": splits[i] if splits is not None else split.get(g.id, "train"), "category": g.category,
            "scores": scores,
            "critiques": [r["critiques"] for r in recs],
            "pairs": [{"better": b, "worse": w, "delta": scores[b] - scores[w]} for b, w in g.pairs()],
        }))
    write_atomic(path, "\n".join(lines) + "\n")


def load_margins(run_dir: Path, by: str = "group_id") -> dict[str, dict]:
    """The run's margins records, by group id (browsing: the last record of an id wins) or by content
    (`by="content"`, what DPO uses: a train and an eval group may share an id). A file written before
    records held their content is read by id, and refused when an id repeats in it."""
    path = Path(run_dir) / "score" / "margins.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the `score` stage first (or set dpo.margin_source)")
    from ..runs import RunFolderError

    records = []
    with open(path, "rb") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                ok = isinstance(rec, dict) and isinstance(rec.get("group_id"), str) and isinstance(
                    rec.get("scores"), list) and isinstance(rec.get("pairs"), list)
            except (ValueError, RecursionError):  # not JSON, not UTF-8
                ok = False
            if not ok:
                raise RunFolderError(f"{path}:{n}: damaged margins line (the score stage writes this file whole); "
                                     "rebuild it with --redo score")
            records.append(rec)
    if by == "group_id":
        return {rec["group_id"]: rec for rec in records}
    if all("content" in rec for rec in records):
        return {rec["content"]: rec for rec in records}
    ids = [rec["group_id"] for rec in records]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise ValueError(f"{path}: group id(s) {', '.join(map(repr, repeated[:5]))} appear more than once (train "
                         "and eval groups sharing ids) and the file predates content keys: re-run the `score` "
                         "stage (its cache makes that quick)")
    return {rec["group_id"]: rec for rec in records}


def run_stage(ctx) -> dict:
    recipe, events = ctx.recipe, ctx.events
    rc = recipe.reward
    train, evals = ctx.data()
    groups = train + evals
    mode = rc.critique_mode
    if mode == "given" and any(not r.critique for g in groups for r in g.responses):
        events.warning("critique_mode 'given' but some responses lack critiques; those are scored without one")
    store = open_shared_store(ctx.cache_dir / REWARD_CACHE, REWARD_FIELDS)
    if store.problems:
        events.warning(store.warning("reward cache"), stage="score")

    if distributed.shards_base() and mode == "generate":   # (the pre-flight refuses it before anything loads)
        raise distributed.RankFailure(FSDP_GENERATE)
    loaded: list[RewardScorer] = []

    def scorer() -> RewardScorer:   # loaded on first need: both parts of mode given share it
        if not loaded:
            loaded.append(RewardScorer.from_adapter(ctx.reward_model_dir(), recipe.model, events=events,
                                                    max_length=rc.train.max_length, max_frames=recipe.data.max_frames))
        return loaded[0]

    if mode == "given":
        with_crit = [g for g in groups if all(r.critique for r in g.responses)]
        without = [g for g in groups if not all(r.critique for r in g.responses)]
        rec_a, n_a = score_into_cache(ctx, with_crit, "given", store, scorer)
        rec_b, n_b = score_into_cache(ctx, without, "none", store, scorer)
        by_index = {id(g): r for g, r in zip(with_crit + without, rec_a + rec_b)}  # ids may repeat across splits
        records, computed = [by_index[id(g)] for g in groups], n_a + n_b
    else:
        records, computed = score_into_cache(ctx, groups, mode, store, scorer)
    empty = sum(c == "" for recs in records for r in recs if r.get("mode") == "generate" for c in r["critiques"])
    if empty:
        events.warning(f"{empty} generated critique(s) are empty (the model ended its turn at once); they are "
                       "scored at their end-of-turn token, like every other critique")
    n = sum(len(g.responses) for g in groups)
    events.info(f"scored {n} responses ({computed} computed, {n - computed} from cache) in mode {mode}")
    result = {"responses": n, "computed": computed, "reused": n - computed, "mode": mode}
    if mode == "generate":
        result["empty_critiques"] = empty
    out_dir = ctx.run.stage_dir("score")
    is_eval = [False] * len(train) + [True] * len(evals)  # by position: a train and an eval group may share an id

    def write() -> dict:   # every rank holds all records; the margins and the histogram are written once
        write_margins(out_dir / "margins.jsonl", groups, records, {g.id: "eval" for g in evals},
                      splits=["train"] * len(train) + ["eval"] * len(evals))
        return margin_summary(recipe, groups, records, is_eval, out_dir / BETA_HISTOGRAM)

    result.update(distributed.on_main("score: margins", write))
    if result.get("eval_delta_rank_spearman") is not None:
        events.metrics(eval_delta_rank_spearman=result["eval_delta_rank_spearman"])
    return result


BETA_HISTOGRAM = "beta_hist.png"


def margin_summary(recipe, groups, records, is_eval: list[bool], png: Path | None) -> dict:
    """Held-out Spearman(delta, human rank gap), the spread of the training pairs' beta_i, and their
    histogram written to `png` (None: not drawn; under several processes rank 0 draws it)."""
    from ..evaluate.margins import beta_spread, delta_rank_correlation, write_beta_histogram

    dc = recipe.dpo
    scores = [[r["score"] for r in recs] for recs in records]
    held = [(g, s) for g, s, ev in zip(groups, scores, is_eval) if ev]
    out = {}
    if held:
        corr = delta_rank_correlation([g for g, _ in held], [s for _, s in held])
        out["eval_delta_rank_spearman"] = corr["spearman"]
        out["eval_delta_rank_pairs"] = corr["pairs"]
    train_deltas = [s[b] - s[w] for g, s, ev in zip(groups, scores, is_eval) if not ev for b, w in g.pairs()]
    if train_deltas:
        out["beta"] = beta_spread(train_deltas, dc.beta, dc.w, dc.k, dc.beta_floor)
        if png is not None:
            write_beta_histogram(png, train_deltas, dc.beta, dc.w, dc.k, dc.beta_floor,
                                 title=f"{len(train_deltas)} training pairs, critique mode {recipe.reward.critique_mode}")
    return out
