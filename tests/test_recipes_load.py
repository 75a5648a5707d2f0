"""Every shipped recipe loads and validates (DESIGN.md: no YAML that no test loads); real-model recipes name
their family and run the full pipeline (their pre-flight: tests/test_preflight.py).

    python -m pytest -q tests/test_recipes_load.py
"""
from __future__ import annotations

from pathlib import Path

import pytest

from mmrlhf_lite.recipe import Recipe, load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
ACCELERATE = RECIPES / "accelerate"   # `accelerate launch --config_file` configs, not recipes
FILES = [p for p in sorted(RECIPES.rglob("*.yaml")) + sorted(RECIPES.rglob("*.yml")) if ACCELERATE not in p.parents]
ACCELERATE_FILES = sorted(ACCELERATE.glob("*.yaml"))


def _needs_local_files(recipe: Recipe) -> bool:
    """Recipes for real data name files the CI machine does not have: validate those without the path check."""
    return recipe.data.path != "demo" or recipe.data.eval_path is not None or recipe.data.media_root is not None


def test_the_demo_recipe_is_shipped():
    assert RECIPES / "demo.yaml" in FILES


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(RECIPES)) for p in FILES])
def test_recipe_loads_and_validates(path):
    recipe = load_recipe(path, check_paths=False)
    assert recipe.source == str(path)
    if not _needs_local_files(recipe):
        recipe = load_recipe(path)  # paths too (model folders given as ./ or / paths must exist)
    # the file says something: at least one key differs from the defaults
    assert recipe.to_dict() != Recipe().to_dict()
    if not recipe.model.path.startswith("tiny:"):
        # a hub id must load offline too (pre-flight and loader): the family is named, not detected
        assert recipe.model.family != "auto", f"{path.name}: set model.family for {recipe.model.path}"
        assert recipe.run.stages == ["reward", "score", "reference", "dpo", "eval", "rounds"]  # the full pipeline


def test_accelerate_configs_are_shipped():
    assert ACCELERATE / "ddp.yaml" in ACCELERATE_FILES and ACCELERATE / "fsdp2.yaml" in ACCELERATE_FILES


@pytest.mark.parametrize("path", ACCELERATE_FILES, ids=[p.name for p in ACCELERATE_FILES])
def test_accelerate_config_loads_with_accelerate_and_is_documented(path):
    """accelerate's own loader reads it; DDP, or FSDP version 2 (FSDP1 / DeepSpeed are refused,
    docs/distributed.md)."""
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import DistributedType

    cfg = ClusterConfig.from_yaml_file(str(path))
    assert cfg.num_processes >= 2 and not cfg.use_cpu and cfg.deepspeed_config == {}
    if path.name.startswith("fsdp"):
        assert cfg.distributed_type == DistributedType.FSDP and cfg.fsdp_config["fsdp_version"] == 2
        assert cfg.fsdp_config["fsdp_offload_params"] is False
    else:
        assert cfg.distributed_type == DistributedType.MULTI_GPU and cfg.fsdp_config == {}
    assert f"recipes/accelerate/{path.name}" in (RECIPES.parent / "docs" / "distributed.md").read_text()


def test_demo_recipe_runs_on_cpu_with_the_tiny_model():
    recipe = load_recipe(RECIPES / "demo.yaml")
    assert recipe.model.path.startswith("tiny:")
    assert recipe.model.device == "cpu"
    assert recipe.data.path == "demo"


def test_docs_recipes_lists_every_recipe_and_the_current_key_reference():
    """docs/recipes.md links every shipped recipe, and its key reference is `--help-recipe`'s output as is
    (regenerate the block between its markers with that command when a key changes)."""
    from mmrlhf_lite.recipe import describe_fields

    doc = (RECIPES.parent / "docs" / "recipes.md").read_text()
    for path in FILES:
        if path.name != "demo.yaml":
            assert f"(../recipes/{path.relative_to(RECIPES)})" in doc, path.name
    block = doc.split("tests/test_recipes_load.py checks it is current -->\n", 1)[1].split("<!-- end of key", 1)[0]
    assert block == "```text\n" + describe_fields() + "\n```\n", \
        "docs/recipes.md's key reference is stale: regenerate it with `python tests/test_recipes_load.py`"


if __name__ == "__main__":  # rewrite docs/recipes.md's key reference from the current recipe fields
    from mmrlhf_lite.recipe import describe_fields

    doc_path = RECIPES.parent / "docs" / "recipes.md"
    head, rest = doc_path.read_text().split("tests/test_recipes_load.py checks it is current -->\n", 1)
    tail = rest.split("<!-- end of key", 1)[1]
    doc_path.write_text(f"{head}tests/test_recipes_load.py checks it is current -->\n```text\n{describe_fields()}\n"
                        f"```\n<!-- end of key{tail}")
    print(f"wrote {doc_path}")
