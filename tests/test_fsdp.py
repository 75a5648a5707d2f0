"""FSDP2 (torchrun, gloo on CPU): with accelerate's FSDP launch variables (ACCELERATE_USE_FSDP=true,
FSDP_VERSION=2, what `accelerate launch --config_file recipes/accelerate/fsdp2.yaml` sets) the reward
and dpo trainers shard the frozen base over the ranks: 2 ranks x B groups train the same LoRA weights and
reward head as 1 rank x 2B, each rank holds about half the base, the saved adapters are normal full
adapters (the next stages load them in one process each and score the same), and a run whose rank was
SIGKILLed resumes from its sharded checkpoint to the weights of one uninterrupted process (the module's FSDP2 run
is that run: one command, killed, then finished). The reference and score
(modes given / none) stages shard the model too and write the one-process cache lines and margins, with
uneven shares (a rank without a batch runs dummy forwards in lockstep). The launches that cannot work are
refused before anything loads, with what to use instead (score generating critiques under FSDP among them),
and eval, not sharded, is warned about.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from test_distributed import (COMMON, NO_COLLECTIVE_TIMEOUT, STAGES, _finish, _kill_rank_1_after_checkpoint, _launch,
                              _per_rank, _recipe, _same_weights, _weights, single)  # noqa: F401 - fixture

FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}


def _launch_fsdp(recipe: Path, stages: str, **kwargs):
    with pytest.MonkeyPatch.context() as mp:   # the launcher's environment, as accelerate launch sets it
        for k, v in FSDP_ENV.items():
            mp.setenv(k, v)
        return _launch(recipe, stages, **kwargs)


def _events(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]


def _launches(events: list[dict]) -> list[list[dict]]:
    """The events of a run folder, split at each launch's run_start."""
    out: list[list[dict]] = []
    for e in events:
        if e["type"] == "run_start" or not out:
            out.append([])
        out[-1].append(e)
    return out


@pytest.fixture(scope="module")
def fsdp_killed(tmp_path_factory) -> dict:
    """torchrun --nproc_per_node 2 with the FSDP2 variables, 1 group per rank per step, the four stages in one
    command launched twice (two launches where the tests once made three): rank 1 SIGKILLed once dpo's
    checkpoint-2 is complete (`killed`; the folder as the kill left it is copied to `at_kill`), then the same
    command resumes from that sharded checkpoint and finishes (`resumed`): the module's FSDP run, `fsdp`."""
    import shutil

    tmp = tmp_path_factory.mktemp("fsdp")
    run_dir, recipe = tmp / "run", _recipe(tmp, "run", 1)
    rc, out = _kill_rank_1_after_checkpoint(_launch_fsdp(recipe, STAGES, env=NO_COLLECTIVE_TIMEOUT), run_dir, 2)
    ckpt = run_dir / "dpo" / "checkpoints" / "checkpoint-2"
    state = {"run": run_dir, "killed": {"rc": rc, "out": out, "checkpoint": sorted(p.name for p in ckpt.iterdir())}}
    at_kill = tmp_path_factory.mktemp("fsdp-at-kill")
    shutil.copytree(run_dir, at_kill / "run")
    (at_kill / "run" / "run.lock").unlink(missing_ok=True)
    state["at_kill"] = at_kill
    offset = len(_events(run_dir))
    rc, out = _finish(_launch_fsdp(recipe, STAGES))      # the same command resumes
    state["resumed"] = {"rc": rc, "out": out, "events": _events(run_dir)[offset:]}
    return state


@pytest.fixture(scope="module")
def fsdp(fsdp_killed) -> Path:
    """The FSDP2 run of `fsdp_killed`, finished."""
    resumed = fsdp_killed["resumed"]
    assert resumed["rc"] == 0, resumed["out"][-4000:]
    assert "terminate called" not in resumed["out"], resumed["out"][-3000:]
    return fsdp_killed["run"]


def test_fsdp_two_ranks_train_the_same_weights_as_one_rank_and_hold_half_the_base(single, fsdp):
    launches = _launches(_events(fsdp))
    assert len(launches) == 2                       # the killed one, the resumed one (test_fsdp_sigkill...)
    sharded = [e for events in launches for e in events if e["type"] == "log" and e["message"].startswith("FSDP2:")]
    # both trainers sharded the base, and so did the score and reference stages; dpo again when resumed
    assert [e["stage"] for e in sharded] == ["reward", "score", "reference", "dpo", "dpo"]
    for e in sharded:
        held = e["sharded_params"]
        assert len(held) == 2
        total = held[0]["frozen_total"]
        assert total > 100_000 and sum(h["frozen_local"] for h in held) >= total
        for h in held:  # each rank holds about half the frozen base (shards are padded to equal rows)
            assert abs(h["frozen_local"] / total - 0.5) < 0.02, h
    for stage in ("reward", "dpo"):
        _same_weights(_weights(single, stage), _weights(fsdp, stage))
    assert any(k.endswith("reward_head.net.4.weight") for k in _weights(fsdp, "reward"))  # the head, gathered
    b = {k: v for k, v in _weights(fsdp, "dpo").items() if "lora_B" in k}
    assert max(v.abs().max().item() for v in b.values()) > 1e-4   # the weights did move


def test_fsdp_adapters_are_full_adapters_the_next_stages_load_and_score_the_same(single, fsdp):
    """The score stage loads rank 0's saved reward adapter in one process per rank: the margins agree with
    the single-process run's; the dpo adapter loads in one process with every saved tensor in place."""
    ma = [json.loads(x) for x in (single / "score" / "margins.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (fsdp / "score" / "margins.jsonl").read_text().splitlines()]
    assert [m["group_id"] for m in ma] == [m["group_id"] for m in mb] and len(ma) == 8
    for x, y in zip(ma, mb):
        assert y["scores"] == pytest.approx(x["scores"], rel=1e-4, abs=1e-4)
    from mmrlhf_lite.models.loading import load_model
    from mmrlhf_lite.recipe import load_recipe
    model, _ = load_model(load_recipe(fsdp / "recipe.yaml").model, adapter=fsdp / "dpo" / "final", trainable=False)
    saved = _weights(fsdp, "dpo")
    loaded = {n.replace(".default", ""): p for n, p in model.named_parameters() if "lora_" in n}
    assert loaded.keys() == saved.keys()
    for k, v in saved.items():
        assert torch.equal(loaded[k].detach().cpu(), v), k


def test_fsdp_sigkill_of_one_rank_then_the_same_command_resumes_to_the_same_weights(fsdp_killed, single, capsys):
    killed = fsdp_killed["killed"]
    assert "rank      : 1 (local_rank: 1)" in killed["out"], killed["out"][-3000:]
    # the checkpoint holds a normal adapter, one full optimizer state and the trainable parameters by name
    assert {"adapter_model.safetensors", "optimizer.pt", "sharded_trainable.safetensors"} <= set(killed["checkpoint"])
    # resuming that checkpoint without FSDP (one process here, on the folder as the kill left it) is refused,
    # naming what to do
    from mmrlhf_lite.train import main
    at_kill = fsdp_killed["at_kill"]
    assert main([str(_recipe(at_kill, "run", 1)), "--stages", "dpo", "-q"]) == 1
    err = capsys.readouterr().err
    assert "was written by an FSDP launch and this run is without FSDP" in err and "--redo dpo" in err, err
    assert "Traceback" not in err
    # the same command resumes (the module's `fsdp` run) to the weights of the uninterrupted single process
    resumed = fsdp_killed["resumed"]
    assert resumed["rc"] == 0, resumed["out"][-4000:]
    assert any(e["type"] == "log" and e["message"].startswith("resuming from") for e in resumed["events"])
    _same_weights(_weights(single, "dpo"), _weights(fsdp_killed["run"], "dpo"))


# ---- refusals (in-process: they come before anything loads)

def _refused(tmp_path, monkeypatch, capsys, env: dict, extra: list[str] = ()) -> str:
    from mmrlhf_lite.train import main

    for k in ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "FSDP_OFFLOAD_PARAMS", "ACCELERATE_USE_DEEPSPEED",
              "ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    recipe = _recipe(tmp_path, "run", 1)
    assert main([str(recipe), *extra, "--stages", "dpo", "-q"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and not (tmp_path / "run" / "events.jsonl").exists()
    return err


@pytest.mark.parametrize("env, extra, says", [
    ({"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, [],
     "FSDP version 1 is not supported"),
    ({"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true"}, [], "FSDP version 1 is not supported"),  # accelerate's default
    ({"WORLD_SIZE": "2", **FSDP_ENV, "FSDP_OFFLOAD_PARAMS": "true"}, [], "fsdp_offload_params is not supported"),
    ({"WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true"}, [], "DeepSpeed (ZeRO) is not supported"),
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, [], "DeepSpeed (ZeRO) is not supported"),          # one process too
    ({"WORLD_SIZE": "2", "ACCELERATE_DEEPSPEED_CONFIG_FILE": "ds.json"}, [], "DeepSpeed (ZeRO) is not supported"),
    ({"WORLD_SIZE": "2", **FSDP_ENV}, ["model.backend=unsloth"], "model.backend=unsloth cannot be sharded (FSDP)"),
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, ["model.backend=unsloth"], "unsloth cannot be sharded (DeepSpeed)"),
])
def test_launches_that_cannot_work_are_refused_naming_what_to_use(tmp_path, monkeypatch, capsys, env, extra, says):
    err = _refused(tmp_path, monkeypatch, capsys, {"RANK": "0", **env}, extra)
    assert says in err, err
    assert "recipes/accelerate/ddp.yaml" in err and "recipes/accelerate/fsdp2.yaml" in err


def test_the_fsdp_choice_does_not_reach_accelerate(monkeypatch):
    """The trainers shard the base themselves: accelerate must not see ACCELERATE_USE_FSDP (it would wrap the
    model again); the choice is kept in `distributed.sharding()`; one process shards nothing."""
    from mmrlhf_lite import distributed

    for k, v in FSDP_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("WORLD_SIZE", "2")
    distributed.check_launch("transformers")
    assert distributed.sharding() == "fsdp2" and "ACCELERATE_USE_FSDP" not in os.environ
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("WORLD_SIZE", "1")
    distributed.check_launch("transformers")
    assert distributed.sharding() is None and "ACCELERATE_USE_FSDP" not in os.environ


def test_shipped_fsdp2_config_sets_what_the_trainers_read():
    """accelerate's own launcher code turns the shipped config into ACCELERATE_USE_FSDP=true, FSDP_VERSION=2."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    config = Path(__file__).resolve().parents[1] / "recipes" / "accelerate" / "fsdp2.yaml"
    args = launch_command_parser().parse_args(["--config_file", str(config), "-m", "mmrlhf_lite.train", "r.yaml"])
    args, _, _ = _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    assert env["FSDP_OFFLOAD_PARAMS"] == "false"


# ---- pre-flight

def test_fsdp_memory_estimate_by_hand():
    from mmrlhf_lite.memory import fsdp_training_estimate

    one_gpu = {"components_gib": {"decoder linears": 8.0, "embeddings, norms, LM head": 2.0,
                                  "vision tower + projector": 1.0, "LoRA + AdamW": 0.4, "stored: inputs": 0.5},
               "allocated_gib": 11.9, "needed_gib": 12.4}
    e = fsdp_training_estimate(one_gpu, processes=4, layers=8)
    # 8/4 + root (2 + 2/4) + vision tower in the root (1 + 1/4) + 0.4/4 + 0.5 + two gathered blocks of 8/8
    # = 8.35; + the same 0.5 slack/context
    assert e["allocated_gib"] == pytest.approx(8.35) and e["needed_gib"] == pytest.approx(8.85)


REPO = Path(__file__).resolve().parents[1]


def _dry_run(tmp_path, monkeypatch, overrides: list[str], fsdp: bool) -> dict:
    """The dry run of the 7B recipe on the demo data, offline (its architecture from tests/configs)."""
    from mmrlhf_lite.recipe import load_recipe
    from mmrlhf_lite.train import dry_run

    monkeypatch.setenv("MMRLHF_LITE_CONFIG_DIRS", str(REPO / "tests" / "configs"))
    recipe = load_recipe(REPO / "recipes" / "qwen2_vl_7b-24gb.yaml",
                         ["data.path=demo", "data.media_root=null", f"run.dir={tmp_path / 'run'}", *overrides],
                         check_paths=False)
    return dry_run(recipe, list(recipe.run.stages), "24GB", 4, fsdp=fsdp)


def test_dry_run_shows_the_per_gpu_memory_with_the_base_sharded(tmp_path, monkeypatch, capsys):
    import re

    plan = _dry_run(tmp_path, monkeypatch, ["model.load_in_4bit=false"], fsdp=True)
    out = capsys.readouterr().out
    assert "memory per GPU with FSDP2 over 4 GPUs" in out
    assert "accelerate launch --config_file recipes/accelerate/fsdp2.yaml --num_processes 4" in out
    assert "dpo 1 x 8 x 4 = 32 groups per optimizer step" in out
    one = plan["memory"]["stages"]["reward"]["needed_gib"]
    sharded = re.search(r"\n  reward\s+([\d.]+) GiB allocated\s+([\d.]+) GiB needed \(one GPU: ([\d.]+) GiB\)", out)
    assert sharded, out
    assert float(sharded.group(3)) == pytest.approx(one, abs=0.01)
    # a bf16 7B over 4 GPUs: 1/4 of the decoder plus the gathered root (with the vision tower): 9.1 of 17.15
    assert float(sharded.group(2)) < one * 0.6
    assert "score, reference: the base sharded too" in out
    assert "eval: NOT sharded, each GPU holds the whole model" in out
    assert "reward.critique_mode=generate: the score stage cannot run under an FSDP launch" in out  # the recipe's mode


def test_dry_run_with_fsdp_shards_a_4bit_base_too(tmp_path, monkeypatch, capsys):
    plan = _dry_run(tmp_path, monkeypatch, [], fsdp=True)
    out = capsys.readouterr().out
    nf4 = plan["memory"]["stages"]["dpo"]["components_gib"]["decoder linears (nf4)"]
    assert f"decoder linears (nf4) / 4 {nf4 / 4:.2f}" in out, out[-2500:]
    from mmrlhf_lite.reward.scorer import FSDP_GENERATE   # the recipe generates critiques: refused under FSDP
    assert FSDP_GENERATE in plan["errors"]
    assert not any("FSDP" in e or "4-bit" in e for e in plan["errors"] if e != FSDP_GENERATE)  # (the hub id is one)


# ---- the precompute stages with the base sharded

def _cache(run_dir: Path, name: str) -> dict[str, dict]:
    lines = [json.loads(x) for x in (run_dir / "cache" / name).read_text().splitlines() if x.strip()]
    return {x["key"]: x for x in lines}


def _shares(recipe, run_dir: Path) -> list[int]:
    """Groups of each of 2 ranks (cache/sharded.py's split by content)."""
    from mmrlhf_lite.cache.reference import reference_keys
    from mmrlhf_lite.distributed import rank_of
    from mmrlhf_lite.data import prepare_data
    from mmrlhf_lite.events import EventLog

    train, evals = prepare_data(recipe, run_dir, EventLog(None, echo=False))
    owners = [rank_of(ks, 2) for ks in reference_keys(train + evals, recipe.model, recipe.data.max_frames)]
    return [owners.count(0), owners.count(1)]


def _half_each(run_dir: Path, stage: str) -> None:
    held = [e for e in _events(run_dir) if e["type"] == "log" and e["message"].startswith("FSDP2:")
            and e["stage"] == stage]
    assert len(held) == 1, [e.get("message") for e in _events(run_dir)][-20:]
    held = held[0]["sharded_params"]
    total = held[0]["frozen_total"]
    assert len(held) == 2 and total > 100_000
    for h in held:   # decoder layers sharded; the root (embeddings, LM head, vision tower) is too, by rows
        assert abs(h["frozen_local"] / total - 0.5) < 0.02, h


def test_fsdp_reference_stage_shards_the_base_and_writes_the_single_process_log_probs(tmp_path, single, fsdp):
    """2 ranks under the FSDP2 variables (the module's launch), uneven shares (the rank with fewer groups runs
    dummy forwards in the lockstep steps it has no batch for, in lockstep with the other): each rank holds about
    half the base, and every cache line equals the one-process run's within fp32 tolerance."""
    from mmrlhf_lite.recipe import load_recipe

    shares = _shares(load_recipe(fsdp / "recipe.yaml"), tmp_path / "data")   # the module's 8 demo groups
    assert sum(shares) == 8 and shares[0] != shares[1], shares
    _half_each(fsdp, "reference")
    one, two = _cache(single, "reference.jsonl"), _cache(fsdp, "reference.jsonl")
    assert one.keys() == two.keys() and len(one) >= 10
    diff = max(abs(one[k]["logp"] - two[k]["logp"]) for k in one)
    print(f"max |logp diff| FSDP2 2 ranks vs 1 process: {diff:.3g}")
    assert diff < 1e-3, diff
    assert all(one[k]["n_tokens"] == two[k]["n_tokens"] for k in one)


def _score_owners(recipe, run_dir: Path, reward_dir: Path) -> dict[str, int]:
    """The rank (of 2) owning each response's reward-cache key (mode given: every demo group has critiques)."""
    from mmrlhf_lite.distributed import rank_of
    from mmrlhf_lite.data import prepare_data
    from mmrlhf_lite.events import EventLog
    from mmrlhf_lite.reward.scorer import response_keys, reward_fingerprint

    train, evals = prepare_data(recipe, run_dir, EventLog(None, echo=False))
    groups = train + evals
    assert all(r.critique for g in groups for r in g.responses)
    keys = response_keys(groups, reward_fingerprint(recipe.model, reward_dir), recipe.reward, "given",
                         recipe.run.seed)
    return {k: rank_of(ks, 2) for ks in keys for k in ks}


def test_fsdp_score_stage_shards_the_reward_model_and_gives_the_single_process_margins(tmp_path, single):
    """Mode given with the reward model of the one-process run (`single`), under the FSDP2 variables on 2 ranks,
    rank 0's share already in the cache (it has no batch at all: a dummy forward in every round, in lockstep with
    rank 1's real ones): each rank holds about half the base, and rank 1's scores, hence every margin,
    equal the one-process run's within fp32 tolerance."""
    from mmrlhf_lite.recipe import load_recipe

    recipe = load_recipe(None, COMMON + _per_rank(2) + [f"run.dir={tmp_path / 'fsdp'}", f"reward.model_from={single}"])
    owner = _score_owners(recipe, tmp_path / "fsdp", single / "reward" / "final")
    cached = _cache(single, "reward.jsonl")
    assert set(owner) == set(cached) and sum(owner.values()) >= 4, owner   # rank 1 has a group or more to score
    (tmp_path / "fsdp" / "cache").mkdir(parents=True)
    (tmp_path / "fsdp" / "cache" / "reward.jsonl").write_text(
        "".join(json.dumps(cached[k]) + "\n" for k, r in owner.items() if r == 0))
    path = tmp_path / "fsdp.yaml"
    recipe.save(path)
    rc, out = _finish(_launch_fsdp(path, "score"), timeout=180)
    assert rc == 0, out[-4000:]
    assert "terminate called" not in out, out[-3000:]
    _half_each(tmp_path / "fsdp", "score")
    two = _cache(tmp_path / "fsdp", "reward.jsonl")
    assert two.keys() == cached.keys()
    diff = max(abs(cached[k]["score"] - two[k]["score"]) for k, r in owner.items() if r == 1)
    print(f"responses per rank {sum(r == 0 for r in owner.values())}/{sum(owner.values())} (rank 0 cached); "
          f"max |score diff| FSDP2 vs 1 process: {diff:.3g}")
    assert diff < 1e-4, diff
    ma = [json.loads(x) for x in (single / "score" / "margins.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (tmp_path / "fsdp" / "score" / "margins.jsonl").read_text().splitlines()]
    assert [m["group_id"] for m in ma] == [m["group_id"] for m in mb] and len(ma) == 8
    da = [p["delta"] for m in ma for p in m["pairs"]]
    assert len(da) >= 8 and [p["delta"] for m in mb for p in m["pairs"]] == pytest.approx(da, abs=1e-4)


def test_fsdp_launch_refuses_generated_critiques_and_warns_that_eval_is_not_sharded(tmp_path):
    """Before anything loads: mode generate in the score stage is refused naming what to use, and eval in the
    stages gets a warning that each GPU loads the whole model."""
    from mmrlhf_lite.recipe import load_recipe

    path = tmp_path / "gen.yaml"
    load_recipe(None, COMMON + _per_rank(1) + ["reward.critique_mode=generate", "data.eval_fraction=0.25",
                                               f"run.dir={tmp_path / 'run'}"]).save(path)
    rc, out = _finish(_launch_fsdp(path, "score,eval"), timeout=120)
    assert rc == 1, out[-3000:]
    assert "not starting" in out and "reward.critique_mode=generate: the score stage cannot run under an FSDP" in out
    assert "reward.critique_mode=given" in out and "recipes/accelerate/ddp.yaml" in out
    assert "mmrlhf_lite/" not in out.split("torch.distributed.elastic")[0], out[-3000:]  # no traceback of ours
    warned = [e["message"] for e in _events(tmp_path / "run") if e["type"] == "warning"]
    assert any(m.startswith("eval is not sharded under FSDP") for m in warned), warned
    assert not (tmp_path / "run" / "score").exists()


def _mixed_media_data(tmp: Path, groups: int) -> Path:
    """The demo set with every other group made text-only (no image in its prompt), beside the demo's images."""
    from mmrlhf_lite.data.demo import write_demo

    src = write_demo(tmp / "demo", groups=groups, image_size=56, safety_fraction=0)
    rows = [json.loads(x) for x in src.read_text().splitlines()]
    for row in rows[1::2]:
        row["images"] = []
        for turn in row["prompt"]:
            if isinstance(turn["content"], list):
                turn["content"] = [c for c in turn["content"] if c.get("type") != "image"]
    out = src.parent / "mixed.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


QLORA = ["model.load_in_4bit=true", "data.eval_fraction=0.25", "reward.train.max_steps=4"]


def test_qlora_fsdp_trains_what_one_process_trains_with_an_image_group_on_one_rank_and_a_text_only_one_on_the_other(
        tmp_path):
    """QLoRA + FSDP2 (nf4 storage in the compute dtype), on data where every other group is text-only: 2 ranks x 1
    group give the reward model of 1 rank x 2 groups, each rank holds about half the packed 4-bit base, and the
    held-out accuracy after training (every rank runs the forwards through the sharded model) is the single
    process's. At a step where one rank's group has an image and the other's is text-only, only one rank runs the
    vision tower: the sharded units must not include vision blocks (their gathers would be collectives made by one
    rank only: gloo's 'collective mismatch'). (One launch where a QLoRA test and a mixed-media test made two.)"""
    from mmrlhf_lite.recipe import load_recipe
    from mmrlhf_lite.train import run_pipeline

    data = _mixed_media_data(tmp_path, groups=16)
    opts = [o for o in COMMON if not o.startswith("data.demo.")] + [f"data.path={data}", *QLORA]
    run_pipeline(load_recipe(None, opts + _per_rank(2) + [f"run.dir={tmp_path / 'one'}"]), ["reward"], echo=False)
    path = tmp_path / "two.yaml"
    load_recipe(None, opts + _per_rank(1) + [f"run.dir={tmp_path / 'fsdp'}"]).save(path)
    rc, out = _finish(_launch_fsdp(path, "reward"), timeout=180)
    assert rc == 0, out[-4000:]
    held = next(e for e in _events(tmp_path / "fsdp") if "sharded_params" in e)["sharded_params"]
    for h in held:
        assert abs(h["frozen_local_bytes"] / h["frozen_total_bytes"] - 0.5) < 0.02, h
    _same_weights(_weights(tmp_path / "one", "reward"), _weights(tmp_path / "fsdp", "reward"))
    a, b = (json.loads((tmp_path / r / "reward" / "train_result.json").read_text()) for r in ("one", "fsdp"))
    assert "eval_pair_accuracy_given" in a and b["eval_pair_accuracy_given"] == a["eval_pair_accuracy_given"]
