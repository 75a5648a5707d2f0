"""Score a public reward-model benchmark with a run's critique reward model; write its own metric table.

Each row of the benchmark is one group of two answers, scored packed (`[prompt + image][answer 1]
[answer 2]` in one sequence, each answer seeing the prompt and itself) in every requested critique
mode. Writes `<out>/report.json`, `<out>/report.md` (the benchmark's table and a leaderboard-style line)
and `<out>/predictions.jsonl` (each row's scores); `<out>` defaults to `RUN/bench/<benchmark>`, where the
UI's Compare tab finds it. Scores are kept in `<out>/scores.jsonl`, keyed by content (reward model +
adapter fingerprint, critique mode and its settings, prompt, image bytes, answer): a stopped command run
again computes only what is missing, and a repeated one loads no model.

    python -m mmrlhf_lite.evaluate bench runs/demo --bench vl-rewardbench --data vl_rewardbench.parquet \
        --critique generate,none
"""
from __future__ import annotations

import dataclasses
import io
import json
import sys
import time
from pathlib import Path

from ..cache.store import JsonlStore
from ..runs import write_atomic
from .benchmarks import BENCHMARKS, bench_result, markdown
from .metrics import ScoredGroup

MODES = ("generate", "given", "none")
CHUNK = 8  # rows scored per step without generation (and per append to the score store)
SHIPPED_FILE = {"vl-rewardbench": "VL-RewardBench: data/test-00000-of-00001.parquet",
                "mm-rewardbench": "Multimodal RewardBench: data/all_data.json",
                "mmrlhf-rewardbench": "MM-RLHF-RewardBench: mm_reward_bench.jsonl"}
SCORES = "scores.jsonl"  # content-keyed scores: a stopped or repeated command computes only what is missing


def bench_dir(run_dir: str | Path, bench: str) -> Path:
    return Path(run_dir) / "bench" / bench


def run_benchmark(run_dir: str | Path, bench: str, data: str | Path, *, critique: tuple[str, ...] = ("generate",),
                  media_root: str | None = None, out: str | Path | None = None, max_pairs: int = 0,
                  on_error: str = "raise", n_samples: int = 0, progress: bool = True, scorer=None) -> dict:
    """Read `data` in the benchmark's layout, score it with the run's reward model, write the report.

    `scorer` (a loaded `RewardScorer`) lets a caller score several benchmarks with one model load."""
    from ..data.readers import load_groups
    from ..recipe import load_recipe

    if bench not in BENCHMARKS:
        raise ValueError(f"unknown benchmark '{bench}'; choose one of {', '.join(BENCHMARKS)}")
    for mode in critique:
        if mode not in MODES:
            raise ValueError(f"unknown critique mode '{mode}'; use {', '.join(MODES)}")
    spec = BENCHMARKS[bench]
    run = Path(run_dir)
    recipe_path = run / "recipe.yaml"
    if not recipe_path.exists():
        raise FileNotFoundError(f"{recipe_path} not found: is {run} a run folder?")
    if max_pairs < 0:
        raise ValueError(f"--max-pairs must be 0 (all rows) or more, got {max_pairs}")
    recipe = load_recipe(recipe_path, check_paths=False)
    _check_layout(data, spec)
    loaded = load_groups(data, fmt=spec.fmt, media_root=media_root, on_error=on_error,
                         max_frames=recipe.data.max_frames)
    groups = loaded.groups[:max_pairs] if max_pairs else loaded.groups
    skipped: dict[str, str] = {}
    modes = []
    for mode in critique:
        if mode == "given" and not all(r.critique for g in groups for r in g.responses):
            skipped[mode] = (f"{spec.title} ships no critique per answer" if spec.fmt != "mmrlhf_bench"
                             else "some answers have no critique (`chosen_reason` / `rejected_reason`)")
        else:
            modes.append(mode)
    if not modes:
        raise ValueError(f"no critique mode left to score: {'; '.join(f'{m}: {w}' for m, w in skipped.items())} "
                         "(use --critique generate or none)")
    from ..reward.trainer import reward_model_dir

    rc = recipe.reward
    if n_samples:
        rc = dataclasses.replace(rc, n_samples=n_samples)
    adapter = reward_model_dir(run)
    if scorer is None and not (adapter / "adapter_config.json").exists():
        raise FileNotFoundError(f"no trained reward model in {adapter}: run the `reward` stage first")
    out_dir = Path(out) if out else bench_dir(run, bench)
    label_base = f"mmrlhf-lite RM ({recipe.model.path}, run {run.name})"
    report = {"benchmark": bench, "title": spec.title, "data": str(data), "format": spec.fmt, "run": str(run),
              "model": recipe.model.path, "adapter": str(adapter), "smoke": recipe.model.path.startswith("tiny:"),
              "groups": len(groups), "pairs": sum(len(g.pairs()) for g in groups),
              "rank_ties": sum(len(g.ties()) for g in groups), "skipped_rows": dict(loaded.skipped),
              "warnings": loaded.warnings[:20], "warning_count": len(loaded.warnings), "skipped_modes": skipped, "results": {}}
    store = JsonlStore(out_dir / SCORES)
    loaded_scorer = [scorer]
    predictions = []
    for mode in modes:
        start = time.time()
        scores, computed = _score(loaded_scorer, groups, mode, recipe, rc, adapter, store, progress,
                                  f"{bench} ({mode})")
        scored = [ScoredGroup(g.id, g.category, g.pairs(), s, len(g.ties())) for g, s in zip(groups, scores)]
        report["results"][mode] = {**bench_result(bench, scored, f"{label_base}, critique {mode}"),
                                   "seconds": round(time.time() - start, 1), "computed": computed,
                                   "from_cache": sum(len(g.responses) for g in groups) - computed}
        predictions += [{"id": g.id, "category": g.category, "mode": mode, "scores": s,
                         "pairs": [list(p) for p in g.pairs()], "right": [s[b] > s[w] for b, w in g.pairs()]}
                        for g, s in zip(groups, scores)]
    report["packed"] = None if loaded_scorer[0] is None else bool(loaded_scorer[0].packed)
    write_atomic(out_dir / "predictions.jsonl", "".join(json.dumps(p) + "\n" for p in predictions))
    write_atomic(out_dir / "report.json", json.dumps(report, indent=2))
    write_atomic(out_dir / "report.md", markdown(report))
    report["out"] = str(out_dir)
    return report


def _check_layout(data, spec) -> None:
    """A file in another layout is named as such, with the --bench that reads it (instead of the first
    field the benchmark's reader misses)."""
    from ..data.errors import DataError
    from ..data.formats import detect
    from ..data.sources import iter_rows, list_sources

    readable = {spec.fmt, "mmrlhf"} if spec.fmt == "mmrlhf_bench" else {spec.fmt}
    files = list_sources(data)
    if len(files) > 1:  # e.g. Multimodal RewardBench's data/ also holds all_data_release.json: rows counted twice
        names = ", ".join(Path(f).name for f in files[:6]) + (" ..." if len(files) > 6 else "")
        raise DataError(str(data), f"{len(files)} data files in this folder ({names}); a benchmark is one file: pass "
                        f"it to --data ({SHIPPED_FILE[spec.key]})", reason="bad_source")
    for file in files:
        first = next((raw for raw in iter_rows(file) if raw.row is not None), None)
        found = detect(first.row) if first is not None else None
        if found is None or found in readable:
            continue
        other = next((b.key for b in BENCHMARKS.values() if found in ({b.fmt, "mmrlhf"} if b.fmt == "mmrlhf_bench"
                                                                       else {b.fmt})), None)
        hint = f"use --bench {other}" if other else f"it is not a {spec.title} file"
        raise DataError(first.source, f"this row is in the `{found}` layout, not {spec.title}'s (`{spec.fmt}`): "
                        f"{hint}", reason="unknown_format")


class _Progress:
    """`fill_missing`'s progress events as a tqdm bar on stderr."""

    def __init__(self, desc: str, enabled: bool):
        self.desc, self.enabled, self.bar = desc, enabled, None

    def progress(self, done: int, total: int, **_) -> None:
        from tqdm.auto import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.desc, unit="row", disable=not self.enabled, file=sys.stderr)
        self.bar.update(done - self.bar.n)

    def metrics(self, **_) -> None:   # throughput events: the bar shows the rate itself
        pass

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _score(loaded: list, groups, mode: str, recipe, rc, adapter: Path, store, progress: bool,
           desc: str) -> tuple[list[list[float]], int]:
    """Scores per group and response, from `store` where already computed (a stopped or repeated command
    resumes), else with the reward model (loaded on first need, into `loaded[0]`)."""
    from ..cache.store import fill_missing
    from ..reward.scorer import RewardScorer, response_keys, reward_fingerprint

    keys = response_keys(groups, reward_fingerprint(recipe.model, adapter), rc, mode, recipe.run.seed)

    def compute(batch):
        if loaded[0] is None:
            loaded[0] = RewardScorer.from_adapter(adapter, recipe.model, max_length=rc.train.max_length,
                                                  max_frames=recipe.data.max_frames)
        scored = loaded[0].score_groups(batch, mode, n_samples=rc.n_samples, temperature=rc.temperature,
                                        max_new_tokens=rc.max_new_tokens, batch_size=rc.generation_batch_size,
                                        seed=recipe.run.seed)
        return [[{"score": r.score, "scores": r.scores, "critiques": r.critiques, "mode": mode} for r in g]
                for g in scored]

    bar = _Progress(desc, progress)
    try:
        # generation batches of `generation_batch_size` critiques: two answers per benchmark row
        per_batch = max(1, rc.generation_batch_size // 2) if mode == "generate" else CHUNK
        computed = fill_missing(groups, keys, store, compute, per_batch=per_batch, events=bar)
    finally:
        bar.close()
    return [[store.get(k)["score"] for k in ks] for ks in keys], computed


# id prefixes of one source set of each domain (general, hallucination, reasoning), as the released ids start
SMOKE_ID_PREFIXES = ("wildvision-battle-", "RLAIF-V-", "mathverse_")


def write_vl_rewardbench_layout(groups, path: str | Path) -> Path:
    """Write held-out groups as a VL-RewardBench-layout Parquet (image bytes inside), one row per group:
    its best vs worst answer, in alternating order, its id prefixed in turn so that every domain appears
    (the domain comes from the id). A smoke file to check the benchmark path end to end: its domain
    numbers mean nothing."""
    import datasets

    from ..data.media import load_image

    feats = datasets.Features({"id": datasets.Value("string"), "query": datasets.Value("string"),
                               "response": datasets.Sequence(datasets.Value("string")), "image": datasets.Image(),
                               "human_ranking": datasets.Sequence(datasets.Value("int64"))})
    rows = {k: [] for k in feats}
    for g in groups:
        pairs = g.best_vs_worst()
        if len(g.images) != 1 or not pairs:
            continue  # the layout holds one image and one strictly ranked pair per row
        best, worst = pairs[0]
        n = len(rows["id"])
        flip = n % 2 == 1
        buf = io.BytesIO()
        load_image(g.images[0]).save(buf, format="PNG")
        prefix = SMOKE_ID_PREFIXES[n % len(SMOKE_ID_PREFIXES)]
        for key, value in (("id", prefix + g.id), ("query", g.question_text()),
                           ("response", [g.responses[i].text for i in ((worst, best) if flip else (best, worst))]),
                           ("image", {"bytes": buf.getvalue(), "path": None}),
                           ("human_ranking", [1, 0] if flip else [0, 1])):
            rows[key].append(value)
    if not rows["id"]:
        raise ValueError("no group with one image and a ranked pair to write in the VL-RewardBench layout")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(rows, features=feats).to_parquet(str(path))
    return path


def load_bench_reports(run_dir: str | Path) -> dict[str, dict]:
    """{benchmark: report.json} of the benchmarks scored into a run folder (RUN/bench/*/report.json)."""
    out = {}
    root = Path(run_dir) / "bench"
    for bench in BENCHMARKS:
        p = root / bench / "report.json"
        if p.is_file():
            try:
                out[bench] = json.loads(p.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
    return out
