"""Recipe loading: every error names the file and the key path; overrides are YAML; defaults round-trip.

    python -m pytest -q tests/test_recipe.py
"""
from __future__ import annotations

import re

import pytest

from mmrlhf_lite.recipe import (STAGES, Recipe, RecipeError, describe_fields, load_recipe, parse_override,
                                recipe_fields)


@pytest.fixture
def write(tmp_path):
    """write(text) -> path of a recipe file holding `text`."""
    def _write(text: str, name: str = "r.yaml"):
        path = tmp_path / name
        path.write_text(text)
        return path
    return _write


def error_of(path, overrides=(), check_paths=False) -> RecipeError:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides, check_paths=check_paths)
    return info.value


# ------------------------------------------------------------------------------------------------
# unknown keys

def test_unknown_top_level_key_suggests_the_closest(write):
    path = write("modle:\n  path: x\n")
    e = error_of(path)
    assert str(e) == f"{path}, key 'modle': unknown key; did you mean 'model'?"
    assert e.key == "modle" and e.source == str(path)


def test_unknown_key_inside_a_section_suggests_the_full_path(write):
    path = write("dpo:\n  betta: 0.2\n")
    assert str(error_of(path)) == f"{path}, key 'dpo.betta': unknown key; did you mean 'dpo.beta'?"


def test_unknown_key_in_a_nested_section(write):
    path = write("reward:\n  train:\n    learning_rte: 0.1\n")
    assert str(error_of(path)) == (f"{path}, key 'reward.train.learning_rte': unknown key; "
                                   "did you mean 'reward.train.learning_rate'?")


def test_unknown_key_without_a_close_match_lists_the_valid_ones(write):
    path = write("dpo:\n  zzzz: 1\n")
    assert str(error_of(path)) == (f"{path}, key 'dpo.zzzz': unknown key; valid keys: beta, w, k, beta_floor, "
                                   "pairs, loss_type, alpha, gamma, sft_target, label_smoothing, margin_source, reference, "
                                   "train")


# ------------------------------------------------------------------------------------------------
# types

@pytest.mark.parametrize("text, key, message", [
    ("dpo:\n  beta: abc\n", "dpo.beta", "expected float, got str 'abc'"),
    ("model:\n  lora_r: 2.5\n", "model.lora_r", "expected int, got float 2.5"),
    ("model:\n  lora_r: true\n", "model.lora_r", "expected int, got bool True"),
    ("model:\n  load_in_4bit: 1\n", "model.load_in_4bit", "expected bool, got int 1"),
    ("model:\n  path: 7\n", "model.path", "expected str, got int 7"),
    ("model:\n  lora_target_modules: [1, q_proj]\n", "model.lora_target_modules",
     "expected a list of strings, got int 1 in [1, 'q_proj']"),
    ("run:\n  stages: [1]\n", "run.stages", "expected a list of strings, got int 1 in [1]"),
])
def test_wrong_type_names_the_key_and_the_value(write, text, key, message):
    path = write(text)
    e = error_of(path)
    assert str(e) == f"{path}, key '{key}': {message}"
    assert e.key == key


def test_ints_are_accepted_for_floats_and_integral_floats_for_ints(write):
    recipe = load_recipe(write("dpo:\n  beta: 1\nmodel:\n  lora_r: 8.0\n"), check_paths=False)
    assert recipe.dpo.beta == 1.0 and isinstance(recipe.dpo.beta, float)
    assert recipe.model.lora_r == 8 and isinstance(recipe.model.lora_r, int)


def test_scientific_notation_is_a_float(write):
    # PyYAML follows YAML 1.1, where `2e-4` (no dot) is a string; recipes and overrides still mean a number
    recipe = load_recipe(write("reward:\n  train:\n    learning_rate: 2e-4\n"), ["dpo.train.learning_rate=5E-6"],
                         check_paths=False)
    assert (recipe.reward.train.learning_rate, recipe.dpo.train.learning_rate) == (2e-4, 5e-6)
    path = write("dpo:\n  beta: 1e\n")
    assert str(error_of(path)) == f"{path}, key 'dpo.beta': expected float, got str '1e'"


def test_a_comma_string_is_a_list(write):
    recipe = load_recipe(write("run:\n  stages: reward, dpo\n"), check_paths=False)
    assert recipe.run.stages == ["reward", "dpo"]


# ------------------------------------------------------------------------------------------------
# ranges, choices, stages

@pytest.mark.parametrize("text, key, message", [
    ("dpo:\n  beta: 0\n", "dpo.beta", "must be > 0, got 0.0"),
    ("dpo:\n  beta: -1\n", "dpo.beta", "must be > 0, got -1.0"),
    ("dpo:\n  k: -0.5\n", "dpo.k", "must be >= 0, got -0.5"),
    ("dpo:\n  train:\n    learning_rate: 0\n", "dpo.train.learning_rate", "must be > 0, got 0.0"),
    ("reward:\n  train:\n    learning_rate: -1e-4\n", "reward.train.learning_rate", "must be > 0, got -0.0001"),
    ("data:\n  eval_fraction: 1.0\n", "data.eval_fraction", "must be < 1, got 1.0"),
    ("data:\n  eval_fraction: -0.1\n", "data.eval_fraction", "must be >= 0, got -0.1"),
    ("data:\n  demo:\n    safety_fraction: 1.5\n", "data.demo.safety_fraction", "must be <= 1, got 1.5"),
    ("dpo:\n  label_smoothing: 0.5\n", "dpo.label_smoothing", "must be < 0.5, got 0.5"),
    ("model:\n  max_pixels: 0\n", "model.max_pixels", "must be > 0, got 0"),
    ("reward:\n  train:\n    grad_accum: 0\n", "reward.train.grad_accum", "must be > 0, got 0"),
])
def test_out_of_range(write, text, key, message):
    path = write(text)
    assert str(error_of(path)) == f"{path}, key '{key}': {message}"


def test_bad_choice_suggests_the_closest(write):
    path = write("model:\n  backend: unslot\n")
    assert str(error_of(path)) == (f"{path}, key 'model.backend': 'unslot' is not one of auto, transformers, "
                                   "unsloth (did you mean 'unsloth'?)")


def test_bad_stage_name(write):
    path = write("run:\n  stages: [reward, dpoo]\n")
    assert str(error_of(path)) == (f"{path}, key 'run.stages': unknown stage 'dpoo' (did you mean 'dpo'?); "
                                   "stages are reward, score, reference, dpo, eval, rounds")


def test_bad_critique_mode(write):
    path = write("eval:\n  critique_modes: [given, foo]\n")
    assert str(error_of(path)) == (f"{path}, key 'eval.critique_modes': unknown critique mode 'foo'; "
                                   "use generate, given or none")


def test_empty_lora_targets(write):
    path = write("model:\n  lora_target_modules: []\n")
    assert str(error_of(path)) == f"{path}, key 'model.lora_target_modules': needs at least one module name"


# ------------------------------------------------------------------------------------------------
# files and YAML structure

def test_missing_recipe_file(tmp_path):
    path = tmp_path / "nope.yaml"
    e = error_of(path)
    assert str(e) == f"{path}: recipe file not found"


def test_missing_data_path_is_checked(write, tmp_path):
    path = write("data:\n  path: missing.jsonl\n")
    e = error_of(path, check_paths=True)
    assert str(e) == f"{path}, key 'data.path': path not found: missing.jsonl"


def test_missing_eval_path_and_model_folder(write):
    path = write("data:\n  eval_path: /nonexistent/eval.jsonl\n")
    assert str(error_of(path, check_paths=True)) == (
        f"{path}, key 'data.eval_path': path not found: /nonexistent/eval.jsonl")
    path = write("model:\n  path: ./no-such-model\n")
    assert str(error_of(path, check_paths=True)) == f"{path}, key 'model.path': path not found: ./no-such-model"


def test_relative_data_path_resolves_against_the_recipe_folder(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.jsonl").write_text("")
    recipe_path = tmp_path / "sub" / "r.yaml"
    recipe_path.write_text("data:\n  path: d.jsonl\n")
    monkeypatch.chdir(tmp_path)  # d.jsonl is not in the working directory
    assert load_recipe(recipe_path).data.path == str(tmp_path / "sub" / "d.jsonl")


def test_hub_ids_and_tiny_paths_are_not_checked(write):
    recipe = load_recipe(write("model:\n  path: Qwen/Qwen2-VL-2B-Instruct\n"))
    assert recipe.model.path == "Qwen/Qwen2-VL-2B-Instruct"
    assert load_recipe(write("model:\n  path: tiny:qwen2_vl:xs\n")).model.path == "tiny:qwen2_vl:xs"


def test_invalid_yaml_names_file_and_line(write):
    path = write("model:\n  path: x\n  lora_r: [1\ndata:\n  path: demo\n")
    e = error_of(path)  # the line where the bracket opened, not where the parser gave up (line 4)
    assert re.fullmatch(rf"{re.escape(str(path))}:3: not valid YAML: .+ never closed: .+ at line 4 .+", str(e)), str(e)


def test_invalid_yaml_tab_indentation_line(write):
    path = write("model:\n  path: x\n\tlora_r: 4\n")
    assert str(error_of(path)).startswith(f"{path}:3: not valid YAML: ")


@pytest.mark.parametrize("text, key, got", [
    ("model: 5\n", "model", "int"),
    ("model: []\n", "model", "list"),
    ("dpo:\n  train: 3\n", "dpo.train", "int"),
])
def test_non_mapping_section(write, text, key, got):
    path = write(text)
    assert str(error_of(path)) == f"{path}, key '{key}': expected a mapping (section), got {got}"


def test_top_level_must_be_a_mapping(write):
    path = write("- model\n- data\n")
    assert str(error_of(path)) == f"{path}: a recipe is a mapping of sections (model, data, reward, ...)"


def test_empty_file_and_empty_section_give_defaults(write):
    assert load_recipe(write(""), check_paths=False).to_dict() == Recipe().to_dict()
    assert load_recipe(write("dpo:\n"), check_paths=False).dpo.beta == 0.1


# ------------------------------------------------------------------------------------------------
# overrides

@pytest.mark.parametrize("text, expected", [
    ("dpo.beta=0.2", ("dpo.beta", 0.2)),
    ("data.max_groups=null", ("data.max_groups", None)),
    ("model.lora_vision=true", ("model.lora_vision", True)),
    ("model.lora_target_modules=[q_proj, v_proj]", ("model.lora_target_modules", ["q_proj", "v_proj"])),
    ("run.dir=runs/x", ("run.dir", "runs/x")),
    ("run.dir=a=b", ("run.dir", "a=b")),
    ("model.path=", ("model.path", "")),
    ("model.path=[unclosed", ("model.path", "[unclosed")),
])
def test_override_values_are_yaml(text, expected):
    assert parse_override(text) == expected


def test_overrides_apply_and_validate(write):
    recipe = load_recipe(write("dpo:\n  beta: 0.3\n"), ["dpo.beta=0.2", "reward.train.max_steps=7",
                                                        "run.stages=[reward, score]"], check_paths=False)
    assert (recipe.dpo.beta, recipe.reward.train.max_steps, recipe.run.stages) == (0.2, 7, ["reward", "score"])
    # the DPO section's own TrainConfig keeps its default learning rate
    assert (recipe.reward.train.learning_rate, recipe.dpo.train.learning_rate) == (2e-4, 5e-5)


def test_bad_override_syntax():
    with pytest.raises(RecipeError) as info:
        load_recipe(None, ["dpo.beta"])
    assert str(info.value) == "command line: override 'dpo.beta' is not of the form key.path=value"


def test_override_of_an_unknown_key(write):
    path = write("")
    assert str(error_of(path, ["dpo.betta=1"])) == (
        f"{path} (override dpo.betta=1), key 'dpo.betta': unknown key; did you mean 'dpo.beta'?")


def test_override_of_a_section_or_through_a_leaf(write):
    path = write("")
    assert str(error_of(path, ["dpo=1"])) == f"{path} (override dpo=1), key 'dpo': is a section; override one of its keys"
    assert str(error_of(path, ["dpo.beta.x=1"])) == (
        f"{path} (override dpo.beta.x=1), key 'dpo.beta.x': 'dpo.beta' is not a section")


def test_bad_override_value_blames_the_override_not_the_file(write):
    path = write("dpo:\n  k: 0.5\n")
    assert str(error_of(path, ["dpo.beta=abc"])) == (
        f"{path} (override dpo.beta=abc), key 'dpo.beta': expected float, got str 'abc'")
    assert str(error_of(path, ["dpo.beta=0"])) == f"{path} (override dpo.beta=0), key 'dpo.beta': must be > 0, got 0.0"
    # a bad value in the file is still the file's
    path = write("dpo:\n  beta: 0\n")
    assert str(error_of(path, ["dpo.k=1"])) == f"{path}, key 'dpo.beta': must be > 0, got 0.0"


def test_override_into_a_section_the_file_leaves_empty(write):
    recipe = load_recipe(write("dpo:\n"), ["dpo.train.grad_accum=2"], check_paths=False)
    assert recipe.dpo.train.grad_accum == 2


@pytest.mark.parametrize("text, overrides", [("", ["dpo.train.epochs=2"]), ("dpo:\n  train:\n    epochs: 2\n", [])])
def test_a_section_given_in_part_keeps_its_own_defaults(write, text, overrides):
    """dpo.train's learning rate defaults to 5e-5 (a bare TrainConfig's is 2e-4): setting another key of the
    section, in the file or on the command line, keeps it."""
    recipe = load_recipe(write(text), overrides, check_paths=False)
    assert (recipe.dpo.train.epochs, recipe.dpo.train.learning_rate) == (2.0, 5e-5)
    assert recipe.to_dict()["dpo"] == {**Recipe().to_dict()["dpo"], "train": {**Recipe().to_dict()["dpo"]["train"],
                                                                           "epochs": 2.0}}


# ------------------------------------------------------------------------------------------------
# defaults, help, round trip

def test_defaults_round_trip(tmp_path):
    recipe = Recipe()
    recipe.save(tmp_path / "saved.yaml")
    loaded = load_recipe(tmp_path / "saved.yaml")
    assert loaded.to_dict() == recipe.to_dict()
    assert loaded.source == str(tmp_path / "saved.yaml")


def test_changed_recipe_round_trips(tmp_path):
    recipe = load_recipe(None, ["dpo.beta=0.25", "model.lora_target_modules=[q_proj]", "data.max_groups=12",
                                "run.stages=[dpo]"], check_paths=False)
    recipe.save(tmp_path / "saved.yaml")
    assert load_recipe(tmp_path / "saved.yaml").to_dict() == recipe.to_dict()


def test_every_field_has_help_and_describe_lists_it():
    text = describe_fields()
    keys = [key for key, f, _ in recipe_fields()]
    assert len(keys) == len(set(keys))
    for key, f, _ in recipe_fields():
        assert f.metadata["help"], key
        assert f"  {key} (" in text
    assert "  dpo.beta (float, default 0.1)\n      beta_0 of MM-DPO." in text
    assert "  model.backend (str [auto|transformers|unsloth], default 'auto')" in text
    assert "  data.max_groups (int or null, default None)" in text


def test_default_stages_are_all_stages_in_order():
    assert Recipe().run.stages == list(STAGES) == ["reward", "score", "reference", "dpo", "eval", "rounds"]
