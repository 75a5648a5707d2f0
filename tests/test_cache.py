"""Content-keyed caches: interrupted + resumed == uninterrupted; one changed response -> one new entry;
a torn last line is ignored; DPO reads reference log-probs from the cache without a reference pass."""
import json

import pytest

from mmrlhf_lite.cache import reference as reference_mod
from mmrlhf_lite.cache.store import JsonlStore, content_key
from mmrlhf_lite.events import StageStopped
from mmrlhf_lite.recipe import load_recipe
from mmrlhf_lite.train import run_pipeline

TINY = ["model.path=tiny:qwen2_vl:xs", "model.load_in_4bit=false", "model.device=cpu",
        "data.demo.groups=10", "data.demo.image_size=56", "data.eval_fraction=0.2", "run.seed=0",
        "dpo.train.groups_per_step=2", "dpo.train.grad_accum=1"]


def _recipe(tmp_path, name, extra=()):
    return load_recipe(None, TINY + [f"run.dir={tmp_path / name}", f"cache.dir={tmp_path / name / 'cache'}",
                                     *extra])


def _records(path):
    return {r["key"]: round(r["logp"], 5) for r in JsonlStore(path).records.values()}


def test_store_ignores_torn_line_and_appends_cleanly(tmp_path):
    p = tmp_path / "c.jsonl"
    s = JsonlStore(p)
    s.put_many([{"key": "a", "v": 1}, {"key": "b", "v": 2}])
    with open(p, "a") as fh:
        fh.write('{"key": "c", "v"')                        # killed mid-write
    s2 = JsonlStore(p)
    assert sorted(s2.records) == ["a", "b"] and s2.torn_lines == 1
    s2.put_many([{"key": "c", "v": 3}])
    assert sorted(JsonlStore(p).records) == ["a", "b", "c"]


def test_content_key_is_canonical():
    assert content_key({"b": 1, "a": [1, 2]}) == content_key({"a": [1, 2], "b": 1})
    assert content_key("x", 1) != content_key("x", 2)


def test_interrupted_reference_resumes_to_the_same_cache(tmp_path, monkeypatch):
    full = _recipe(tmp_path, "full")
    run_pipeline(full, ["reference"], echo=False)
    want = _records(tmp_path / "full" / "cache" / "reference.jsonl")
    assert len(want) == 40  # 10 groups x 4 responses

    real = reference_mod.compute_reference
    calls = {"n": 0}

    def crash_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated kill")
        return real(*args, **kwargs)

    monkeypatch.setattr(reference_mod, "compute_reference", crash_on_third)
    part = _recipe(tmp_path, "part")
    with pytest.raises(RuntimeError, match="simulated kill"):
        run_pipeline(part, ["reference"], echo=False)
    partial = _records(tmp_path / "part" / "cache" / "reference.jsonl")
    assert len(partial) == 16  # two batches of 2 groups were written before the kill
    monkeypatch.setattr(reference_mod, "compute_reference", real)
    ctx = run_pipeline(part, ["reference"], echo=False)
    assert ctx.run.status("reference")["computed"] == 24 and ctx.run.status("reference")["reused"] == 16
    got = _records(tmp_path / "part" / "cache" / "reference.jsonl")
    assert got == want


def test_changing_one_response_recomputes_exactly_one_entry(tmp_path):
    r = _recipe(tmp_path, "one")
    ctx = run_pipeline(r, ["reference"], echo=False)
    data = ctx.run_dir / "data" / "demo" / "demo.jsonl"
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    rows[3]["responses"][2]["text"] += " Also"
    edited = tmp_path / "edited.jsonl"
    edited.write_text("".join(json.dumps(x) + "\n" for x in rows))
    r2 = _recipe(tmp_path, "one2", [f"data.path={edited}", f"data.media_root={data.parent}",
                                    f"cache.dir={tmp_path / 'one' / 'cache'}"])
    ctx2 = run_pipeline(r2, ["reference"], echo=False)
    st = ctx2.run.status("reference")
    assert st["computed"] == 1 and st["reused"] == 39
    # and nothing changed: nothing is computed
    r3 = _recipe(tmp_path, "one3", [f"data.path={edited}", f"data.media_root={data.parent}",
                                    f"cache.dir={tmp_path / 'one' / 'cache'}"])
    assert run_pipeline(r3, ["reference"], echo=False).run.status("reference")["computed"] == 0


def test_stop_request_keeps_partial_cache(tmp_path, monkeypatch):
    r = _recipe(tmp_path, "stop")
    from mmrlhf_lite import train as train_mod

    calls = {"n": 0}

    def stop_after_two(self):
        calls["n"] += 1
        return calls["n"] > 2
    monkeypatch.setattr(train_mod.RunContext, "stop_requested", stop_after_two)
    with pytest.raises(StageStopped):
        run_pipeline(r, ["reference"], echo=False)
    assert len(_records(tmp_path / "stop" / "cache" / "reference.jsonl")) == 16


def _hub_snapshot(cache, repo_id, commit, config):
    """A model as huggingface_hub lays it out in its cache: refs/main -> snapshots/<commit>/..."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(config))
    (snap / "model.safetensors").write_bytes(b"\0" * 64)


def test_hub_model_keys_follow_the_cached_revision(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    from mmrlhf_lite.cache.store import model_fingerprint
    from mmrlhf_lite.models.loading import ModelLoadError, in_hub_cache

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    _hub_snapshot(tmp_path / "hub", "org/vlm", "a" * 40, {"model_type": "qwen2_vl"})
    first = model_fingerprint("org/vlm")
    assert first == model_fingerprint("org/vlm") and in_hub_cache("org/vlm")
    # the same id at a new revision (same config, same sizes): new keys
    _hub_snapshot(tmp_path / "hub", "org/vlm", "b" * 40, {"model_type": "qwen2_vl"})
    second = model_fingerprint("org/vlm")
    assert second != first
    # not cached and offline: a clear error naming the key, not a key made from the id alone
    with pytest.raises(ModelLoadError, match=r"model.path 'org/other' is not a local folder, and its hub "
                                             r"revision could not be resolved"):
        model_fingerprint("org/other")
    assert not in_hub_cache("org/other")


def _demo_rows(tmp_path):
    """The 10-group demo set of the TINY recipe, written once: (rows, folder its image paths are relative to)."""
    from mmrlhf_lite.data.demo import write_demo

    data = write_demo(tmp_path / "demo", groups=10, seed=0, image_size=56)
    return [json.loads(line) for line in data.read_text().splitlines()], data.parent


def _write(path, rows):
    path.write_text("".join(json.dumps(x) + "\n" for x in rows))
    return path


def test_groups_with_the_same_content_are_computed_once(tmp_path):
    """Three groups repeated under other ids (real preference sets contain such repeats): the reference
    stage computes each distinct response once and serves every group that has it."""
    from mmrlhf_lite.events import read_events

    rows, root = _demo_rows(tmp_path)
    dupes = [dict(rows[i], id=f"{rows[i]['id']}-again") for i in (1, 4, 7)]
    data = _write(tmp_path / "dupes.jsonl", rows + dupes)
    r = _recipe(tmp_path, "dupes", [f"data.path={data}", f"data.media_root={root}", "data.eval_fraction=0",
                                    "dpo.train.groups_per_step=3"])
    ctx = run_pipeline(r, ["reference"], echo=False)
    st = ctx.run.status("reference")
    assert (st["responses"], st["computed"], st["repeated_groups"]) == (52, 40, 3)
    ref = reference_mod.load_reference(ctx.cache_dir, ctx.data()[0], r.model, r.data.max_frames)
    by_id = {g.id: lp for g, lp in zip(ctx.data()[0], ref)}
    assert all(by_id[d["id"]] == by_id[d["id"][:-len("-again")]] for d in dupes)
    evs, _ = read_events(ctx.run_dir)
    assert any("3 group(s) repeat the whole content of another" in e.get("message", "") for e in evs)


def test_eval_file_repeating_training_groups_is_computed_once_and_reported(tmp_path):
    from mmrlhf_lite.events import read_events

    rows, root = _demo_rows(tmp_path)
    train = _write(tmp_path / "train.jsonl", rows)
    evals = _write(tmp_path / "eval.jsonl", [dict(rows[i], id=f"e{i}") for i in (0, 2, 5, 9)])
    r = _recipe(tmp_path, "leak", [f"data.path={train}", f"data.eval_path={evals}", f"data.media_root={root}"])
    ctx = run_pipeline(r, ["reference"], echo=False)
    st = ctx.run.status("reference")
    assert (st["responses"], st["computed"], st["eval_repeats_train"]) == (56, 40, 4)
    evs, _ = read_events(ctx.run_dir)
    [warning] = [e["message"] for e in evs if "leaks into training" in e.get("message", "")]
    assert warning.startswith(f"4 of 4 eval groups repeat a training prompt and images (eval {evals}:1 = train "
                              f"{train}:1, eval {evals}:2 = train {train}:3, eval {evals}:3 = train {train}:6, ...)")


def test_reference_keys_hold_the_resolved_settings(tmp_path):
    """Reference keys hold what `auto` resolves to (float32 on this CPU: the same entries as an explicit
    float32, never shared with a bfloat16 run), and the packing / attention kernel. Reward keys (next test)
    also hold resolution and quantisation, so scores made at another max_pixels or precision are not reused."""
    import dataclasses

    from mmrlhf_lite.data.demo import write_demo
    from mmrlhf_lite.data.readers import load_groups

    if __import__("torch").cuda.is_available():
        pytest.skip("checks what auto resolves to on CPU")
    groups = load_groups(str(write_demo(tmp_path / "demo", groups=2, seed=0, image_size=56))).groups
    base = _recipe(tmp_path, "keys").model
    ref = lambda **kw: reference_mod.reference_keys(groups, dataclasses.replace(base, **kw), 8)  # noqa: E731
    assert ref(compute_dtype="auto") == ref(compute_dtype="float32")
    assert ref(compute_dtype="auto") != ref(compute_dtype="bfloat16")
    assert ref(packing="unpacked") != ref() != ref(attn_implementation="eager")


def test_reward_keys_hold_resolution_quantisation_and_dtype(tmp_path):
    import dataclasses

    from mmrlhf_lite.data.demo import write_demo
    from mmrlhf_lite.data.readers import load_groups
    from mmrlhf_lite.reward.scorer import response_keys, reward_fingerprint

    groups = load_groups(str(write_demo(tmp_path / "demo", groups=2, seed=0, image_size=56))).groups
    base = _recipe(tmp_path, "keys").model
    cfg = _recipe(tmp_path, "keys").reward
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    rew = lambda **kw: response_keys(groups, reward_fingerprint(dataclasses.replace(base, **kw), adapter),  # noqa: E731
                                     cfg, "none", 0)
    if not __import__("torch").cuda.is_available():
        assert rew(compute_dtype="auto") == rew(compute_dtype="float32")
    keys = [rew(), rew(max_pixels=3136), rew(min_pixels=784), rew(load_in_4bit=True), rew(compute_dtype="bfloat16")]
    assert len({k[0][0] for k in keys}) == 5
