"""Every recipe key invalidates exactly the finished stages whose results it changes, and `--redo` then reruns
those and the stages that read their outputs.

The map comes from each recipe field's `stages` metadata (recipe.stages_fed); these tests walk every key of
every section through the run-folder logic of `run_pipeline` (stage runners swapped for small functions),
and hold the decisions that matter (the keys that shape the reward model's training, the keys that only
change speed or logging) against a table written here.

    python -m pytest -q tests/test_stage_inputs.py
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
import typing
from dataclasses import dataclass, field

import pytest

from mmrlhf_lite import train
from mmrlhf_lite.recipe import STAGES, Recipe, describe_fields, load_recipe, recipe_fields, stages_fed
from mmrlhf_lite.runs import RunDir, RunFolderError

# Which stages read which (the run folder's dependency graph as the stages' code reads it: score loads the
# reward model; dpo reads score's margins and the reference cache; eval loads the reward model and the policy;
# the online rounds load the reward model and start from the policy).
READS = {"reward": set(), "score": {"reward"}, "reference": set(), "dpo": {"score", "reference"},
         "eval": {"reward", "dpo"}, "rounds": {"reward", "dpo"}}
# every recipe of these tests asks for a round, so that the `rounds` stage runs too
ROUNDS_ON = ["rounds.n=1"]


def with_readers(stages) -> list[str]:
    out = set(stages)
    grew = True
    while grew:
        grew = False
        for stage, reads in READS.items():
            if stage not in out and reads & out:
                out.add(stage)
                grew = True
    return [s for s in STAGES if s in out]


@pytest.fixture
def fake_stages(monkeypatch):
    """Stage runners that record which stages ran; the pre-flight's data loading is skipped (not under test)."""
    ran: list[str] = []

    def runner_for(stage):
        def run(ctx):
            ran.append(stage)
            ctx.run.stage_dir(stage).mkdir(parents=True, exist_ok=True)
            # the rounds stage records how many rounds it finished (a larger rounds.n continues from there)
            return {"rounds": ctx.recipe.rounds.n} if stage == "rounds" else {}
        return run

    monkeypatch.setattr(train, "_runner", runner_for)
    monkeypatch.setattr(train, "refuse_over_long", lambda ctx, stages: None)
    return ran


def another_value(key: str, f: dataclasses.Field, t, current, tmp_path):
    """A valid value of `key` other than `current`."""
    special = {"model.path": "tiny:llava_onevision", "model.family": "qwen2_5_vl", "data.path": "other.jsonl",
               "run.stages": ["reward"], "model.lora_target_modules": ["q_proj"], "eval.critique_modes": ["none"],
               "run.report_to": "tensorboard", "cache.dir": str(tmp_path / "shared-cache"),
               "reward.model_from": str(tmp_path / "other-run"), "run.dir": str(tmp_path / "other-dir")}
    if key in special:
        return special[key]
    if f.metadata.get("choices"):
        return next(c for c in f.metadata["choices"] if c != current)
    inner = [a for a in typing.get_args(t) if a is not type(None)] or [t]
    t = inner[0]
    if t is bool:
        return not current
    if t is int:
        return 2 if current is None else current + 1
    if t is float:
        value = current + 0.1
        return value if f.metadata.get("le") is None or value <= f.metadata["le"] else current / 2
    if t is str:
        return f"{current or 'x'}-other"
    raise AssertionError(f"no other value for {key} of type {t}")


def changed_recipe(run_dir, key, value):
    return load_recipe(None, ROUNDS_ON + [f"run.dir={run_dir}", f"{key}={json.dumps(value)}"], check_paths=False)


def redo_named(message: str) -> tuple[str, ...]:
    return tuple(re.search(r"pass --redo (\S+) to recompute", message).group(1).split(","))


def finished_folder(tmp_path, fake_stages):
    """A run folder with every stage finished on the default recipe, and a run folder `reward.model_from`
    can point at."""
    model = tmp_path / "other-run" / "reward" / "final"
    model.mkdir(parents=True)
    (model / "adapter_config.json").write_text("{}")
    base = tmp_path / "base"
    train.run_pipeline(load_recipe(None, ROUNDS_ON + [f"run.dir={base}"], check_paths=False), list(STAGES), echo=False)
    assert fake_stages == list(STAGES)
    fake_stages.clear()
    return base


def reruns_after(tmp_path, fake_stages, base, key, value) -> tuple[dict, list[str], str | None]:
    """(the finished stages the change marks, with their changed keys; the stages a run with the changed recipe
    then reruns, after the `--redo` its refusal names; the refusal)."""
    run_dir = tmp_path / key
    shutil.copytree(base, run_dir)
    recipe = changed_recipe(run_dir, key, value)
    marked = RunDir(run_dir).changed_stages(recipe)
    refusal, redo = None, ()
    try:
        train.run_pipeline(recipe, list(STAGES), echo=False)
    except RunFolderError as exc:
        refusal = str(exc)
        assert fake_stages == []  # nothing ran, nothing was overwritten
        redo = redo_named(refusal)
        train.run_pipeline(recipe, list(STAGES), redo=redo, echo=False)
    ran = list(fake_stages)
    fake_stages.clear()
    train.run_pipeline(recipe, list(STAGES), echo=False)  # and then all of it is done with these settings
    assert fake_stages == [], key
    return marked, ran, refusal


def test_every_key_says_which_stages_it_feeds():
    fed = stages_fed()
    assert list(fed) == [key for key, _, _ in recipe_fields()]
    for key, f, _ in recipe_fields():
        assert set(fed[key]) <= set(STAGES), key
        if not fed[key]:
            assert f.metadata["why"], f"{key} feeds no stage and does not say why"
    # a section's TrainConfig feeds the stage that trains with it
    assert fed["reward.train.learning_rate"] == ("reward",) and fed["dpo.train.learning_rate"] == ("dpo", "rounds")
    # --help-recipe (and docs/recipes.md) say it per key
    text = describe_fields()
    assert ("  reward.w_response_rank (float, default 1.0)\n      With response_logp_weight > 0: weight of a "
            "Bradley-Terry loss on that log-prob term alone (the joint loss stops teaching it once the head reads "
            "the critiques' verdicts).\n      Feeds: reward.\n") in text
    assert "  dpo.train.logging_steps (int, default 5)\n      Log metrics every N optimizer steps.\n      Feeds no stage " \
           "(how often metrics are logged).\n" in text


@dataclass
class _Section:
    forgotten: int = field(default=0, metadata={"help": "a key added without saying what it feeds"})


@dataclass
class _Top:
    section: _Section = field(default_factory=_Section, metadata={"help": "a section"})


@dataclass
class _Quiet:
    silent: int = field(default=0, metadata={"help": "", "stages": ()})


def test_a_key_without_stages_is_refused():
    with pytest.raises(ValueError, match=r"recipe key 'section.forgotten' does not say which stages it feeds"):
        stages_fed(_Top)
    with pytest.raises(ValueError, match=r"recipe key 'silent' feeds no stage and does not say why"):
        stages_fed(_Quiet)


def test_changing_each_key_marks_exactly_the_stages_it_feeds_and_reruns_their_readers(tmp_path, fake_stages):
    base = finished_folder(tmp_path, fake_stages)
    defaults = Recipe()
    fed = stages_fed()
    for key, f, t in recipe_fields():
        current = defaults
        for part in key.split("."):
            current = getattr(current, part)
        value = another_value(key, f, t, current, tmp_path)
        if key == "run.dir":  # another folder: this one keeps every stage
            assert RunDir(base).changed_stages(changed_recipe(base, key, value)) == {}
            continue
        marked, ran, refusal = reruns_after(tmp_path, fake_stages, base, key, value)
        assert marked == {stage: [key] for stage in fed[key]}, key
        assert ran == with_readers(fed[key]), key
        if fed[key]:
            assert refusal.startswith(f"run folder {tmp_path / key} has finished stage '{fed[key][0]}' with "
                                      f"different settings (changed: {key}); use a new run.dir, or pass --redo ")


# The decisions that matter, written out: stages rerun (the changed ones and their readers) per key.
ALL = list(STAGES)
REWARD_ON = ["reward", "score", "dpo", "eval", "rounds"]
EXPECTED_RERUNS = {
    # shape the reward model's training (and are saved with it, so score applies them)
    "reward.response_logp_weight": (10.0, REWARD_ON),
    "reward.w_response_rank": (0.5, REWARD_ON),
    "reward.head_dropout": (0.1, REWARD_ON),
    "reward.train.learning_rate": (1e-3, REWARD_ON),
    "model.lora_r": (8, REWARD_ON),
    # how the scores are made (the rounds score their answers the same way)
    "reward.critique_mode": ("given", ["score", "dpo", "eval", "rounds"]),
    "reward.n_samples": (3, ["score", "dpo", "eval", "rounds"]),
    # score reports beta_i at these; dpo and the rounds train with them
    "dpo.beta": (0.2, ["score", "dpo", "eval", "rounds"]),
    "dpo.gamma": (0.5, ["dpo", "eval", "rounds"]),
    "dpo.train.learning_rate": (1e-4, ["dpo", "eval", "rounds"]),
    "dpo.reference": ("initial", ["rounds"]),
    "eval.max_groups": (5, ["eval", "rounds"]),
    # what a round samples and trains with; when they stop early changes no finished round
    "rounds.temperature": (0.7, ["rounds"]),
    "rounds.steps": (20, ["rounds"]),
    "rounds.patience": (5, []),
    "run.seed": (1, REWARD_ON),
    "data.label_noise": (0.25, REWARD_ON),
    "data.eval_fraction": (0.3, ALL),
    "model.max_pixels": (50176, ALL),
    # speed, memory, logging, checkpoint cadence, where files go: nothing reruns
    "reward.generation_batch_size": (2, []),
    "reward.train.max_length": (8192, []),
    "dpo.train.logging_steps": (1, []),
    "dpo.train.save_steps": (7, []),
    "dpo.train.save_total_limit": (5, []),
    "model.gradient_checkpointing": (False, []),
    "run.report_to": ("tensorboard", []),
    "data.on_error": ("skip", []),
}


@pytest.mark.parametrize("key", list(EXPECTED_RERUNS))
def test_a_changed_key_reruns_what_it_changes(tmp_path, fake_stages, key):
    value, expected = EXPECTED_RERUNS[key]
    base = finished_folder(tmp_path, fake_stages)
    _, ran, refusal = reruns_after(tmp_path, fake_stages, base, key, value)
    assert ran == expected
    assert (refusal is None) == (not expected)


def test_more_rounds_continue_without_a_refusal_and_fewer_rerun_nothing(tmp_path, fake_stages):
    """rounds.n feeds no stage: raising it runs the rounds stage again (it continues after its last finished
    round), with no refusal and nothing else rerun; lowering it reruns nothing."""
    base = finished_folder(tmp_path, fake_stages)
    _, ran, refusal = reruns_after(tmp_path, fake_stages, base, "rounds.n", 3)
    assert (ran, refusal) == (["rounds"], None)
    _, ran, refusal = reruns_after(tmp_path / "fewer", fake_stages, base, "rounds.n", 0)
    assert (ran, refusal) == ([], None)


def test_a_change_that_needs_two_redos_names_both(tmp_path, fake_stages):
    base = finished_folder(tmp_path, fake_stages)
    _, ran, refusal = reruns_after(tmp_path, fake_stages, base, "data.max_groups", 10)
    assert refusal == (f"run folder {tmp_path / 'data.max_groups'} has finished stage 'reward' with different "
                       "settings (changed: data.max_groups); use a new run.dir, or pass --redo reward,reference to "
                       "recompute them (their outputs are deleted)")
    assert ran == ALL


def test_a_record_of_an_earlier_version_is_read_by_its_sections(tmp_path, fake_stages):
    """Records written before this version held whole sections and fewer keys: a key one record lacks is
    taken from another record of the folder, else from its default, so an unchanged recipe is not refused."""
    recipe = load_recipe(None, [f"run.dir={tmp_path / 'run'}", "reward.response_logp_weight=10",
                                "model.lora_r=8"], check_paths=False)
    run = RunDir(recipe.run.dir)
    tree = recipe.to_dict()
    earlier = {  # the hand list of the version before: whole sections, and reward without the log-prob keys
        "reward": {"model": tree["model"], "data": tree["data"], "reward.head": "mlp", "run.seed": 0,
                   "reward.train": tree["reward"]["train"]},
        "score": {"reward": tree["reward"]},
        "reference": {"model": tree["model"], "data": tree["data"]},
        "dpo": {"model": tree["model"], "data": tree["data"], "dpo": tree["dpo"], "run.seed": 0},
        "eval": {"eval": {k: v for k, v in tree["eval"].items() if k != "min_well_formed"},  # a newer key
                 "reward.critique_mode": "generate", "reward.n_samples": 1, "reward.max_new_tokens": 96},
    }
    for stage, inputs in earlier.items():
        run.status_file(stage).parent.mkdir(parents=True, exist_ok=True)
        run.status_file(stage).write_text(json.dumps({"status": "done", "id": stage, "inputs": inputs}))
    assert run.changed_stages(recipe) == {}
    # reward's record lacks the weight: score's record holds the value the folder ran with
    lower = load_recipe(None, [f"run.dir={run.path}", "reward.response_logp_weight=5", "model.lora_r=8"],
                        check_paths=False)
    assert run.changed_stages(lower) == {"reward": ["reward.response_logp_weight"],
                                         "eval": ["reward.response_logp_weight"]}
    # a key no record holds (newer than every record) is compared with its default
    assert run.changed_stages(load_recipe(None, [f"run.dir={run.path}", "reward.response_logp_weight=10",
                                                 "model.lora_r=8", "eval.min_well_formed=0.9"],
                                          check_paths=False)) == {"eval": ["eval.min_well_formed"]}


@pytest.mark.parametrize("inputs", [None, [1, 2], "text", {"model": {"lora_r": {"deeper": 1}}},
                                    {"a": 1}, json.loads("[" * 900 + "]" * 900)])
def test_a_damaged_record_reads_as_changed_never_as_a_crash(tmp_path, inputs):
    """A record whose `inputs` are not what this version writes: every key falls back to the default or to
    another record, so the stage counts as changed where a value differs, and nothing raises."""
    recipe = load_recipe(None, [f"run.dir={tmp_path / 'run'}", "model.lora_r=8"], check_paths=False)
    run = RunDir(recipe.run.dir)
    run.status_file("reward").parent.mkdir(parents=True)
    run.status_file("reward").write_text(json.dumps({"status": "done", "inputs": inputs}))
    assert run.changed_stages(recipe) == {"reward": ["model.lora_r"]}


def test_a_changed_stage_already_out_of_date_does_not_block_a_run_of_the_stages_before_it(tmp_path, fake_stages):
    """reward.critique_mode feeds score and eval. `--redo score --stages score` makes dpo and eval out of date
    (they read score): they are recomputed when next asked for, so eval's changed key no longer refuses."""
    base = finished_folder(tmp_path, fake_stages)
    recipe = changed_recipe(base, "reward.critique_mode", "given")
    train.run_pipeline(recipe, ["score"], redo=("score",), echo=False)
    assert fake_stages == ["score"]
    assert RunDir(base).stale_stages() == {"dpo": "'score' was recomputed after it finished",
                                           "eval": "'dpo' is out of date", "rounds": "'dpo' is out of date"}
    train.run_pipeline(recipe, list(STAGES), echo=False)
    assert fake_stages == ["score", "dpo", "eval", "rounds"]
