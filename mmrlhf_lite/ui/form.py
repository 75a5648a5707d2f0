"""The recipe form: one input per recipe field, generated from `recipe.recipe_fields()`.

Types, defaults, choices and help text come from the dataclasses in recipe.py (the same text that
`python -m mmrlhf_lite.train --help-recipe` prints), so the form cannot drift from the CLI. Values go
back through `load_recipe`, which validates them exactly as the CLI would; on top of that the UI
keeps data paths under the data root and the cache under the runs root.

    python app.py            # Train tab
"""
from __future__ import annotations

import os
import tempfile
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..recipe import STAGES, Recipe, RecipeError, load_recipe, recipe_fields
from .safety import Refused, inside, is_inside, safe_name

HIDDEN = {"run.dir"}                      # the UI names the run folder itself
MULTI_CHOICES = {"run.stages": list(STAGES), "eval.critique_modes": ["given", "none", "generate"]}
DATA_PATH_KEYS = ("data.path", "data.eval_path", "data.media_root")   # under the data root
RUN_PATH_KEYS = ("cache.dir", "reward.model_from")                     # under the runs root (if the field exists)
LAST_USED = "@last"


@dataclass(frozen=True)
class FieldSpec:
    key: str
    kind: str                # bool | choice | int | float | str | list | multi
    default: Any
    help: str
    choices: tuple | None
    optional: bool

    @property
    def section(self) -> str:
        return self.key.split(".")[0]

    @property
    def info(self) -> str:
        shown = ", ".join(self.default) if isinstance(self.default, list) else self.default
        return f"{self.help} (default: {'empty' if shown is None else shown})"


def _kind(key: str, f, t) -> tuple[str, bool]:
    optional = typing.get_origin(t) in (typing.Union, types.UnionType) and type(None) in typing.get_args(t)
    if optional:
        t = next(a for a in typing.get_args(t) if a is not type(None))
    if key in MULTI_CHOICES:
        return "multi", optional
    if f.metadata.get("choices"):
        return "choice", optional
    if t is bool:
        return "bool", optional
    if t is int:
        return "int", optional
    if t is float:
        return "float", optional
    if t is list or typing.get_origin(t) is list:
        return "list", optional
    return "str", optional


def form_fields() -> list[FieldSpec]:
    defaults = Recipe()
    out = []
    for key, f, t in recipe_fields():
        if key in HIDDEN:
            continue
        value: Any = defaults
        for part in key.split("."):
            value = getattr(value, part)
        kind, optional = _kind(key, f, t)
        choices = tuple(MULTI_CHOICES[key]) if kind == "multi" else f.metadata.get("choices")
        out.append(FieldSpec(key, kind, value, f.metadata.get("help", ""), choices, optional))
    return out


FIELDS = form_fields()
FIELD_BY_KEY = {f.key: f for f in FIELDS}


class FormValues(Mapping):
    """The recipe form as the page holds it, keyed by recipe key (`form["dpo.beta"]`): one value per field
    of FIELDS, as its input holds it (a list key as its comma-separated text, an empty text box as "").

    Handlers read and change the form by name, so a new recipe field moves nothing. The page's inputs are
    positional (one component per field, in FIELDS order): `from_inputs` and `inputs` convert at the edge.
    """

    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, Any]):
        unknown = [k for k in values if k not in FIELD_BY_KEY]
        missing = [s.key for s in FIELDS if s.key not in values]
        if unknown or missing:
            raise Refused(f"the form has {'unknown keys ' + ', '.join(unknown) if unknown else ''}"
                          f"{'; ' if unknown and missing else ''}"
                          f"{'no value for ' + ', '.join(missing[:5]) if missing else ''}; reload the page")
        self._values = {s.key: values[s.key] for s in FIELDS}

    @classmethod
    def from_inputs(cls, inputs: Sequence) -> "FormValues":
        """The page's inputs, one per field in FIELDS order."""
        inputs = list(inputs)
        if len(inputs) != len(FIELDS):
            raise Refused(f"the form sent {len(inputs)} values, expected {len(FIELDS)}; reload the page")
        return cls(dict(zip(FIELD_BY_KEY, inputs)))

    def inputs(self) -> list:
        """The values in FIELDS order: what the page's inputs take."""
        return list(self._values.values())

    def replace(self, changes: Mapping[str, Any]) -> "FormValues":
        """A copy with some keys set (`form.replace({"data.on_error": "skip"})`)."""
        return FormValues({**self._values, **changes})

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"FormValues({self._values!r})"


def same_value(a, b) -> bool:
    """Two values of one input equal as the form means them (a Number may come back as 3 or 3.0; an empty
    text box as "" or None)."""
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return float(a) == float(b)
    if a in (None, "") and b in (None, ""):
        return True
    return a == b


def edited_keys(before: Mapping[str, Any] | None, now: Mapping[str, Any]) -> list[str]:
    """The keys whose values differ between two forms (both keyed by name; a key missing from `before`
    counts as edited), in `now`'s order."""
    if before is None:
        return []
    return [k for k, v in now.items() if k not in before or not same_value(before[k], v)]


def _get(tree: dict, key: str) -> Any:
    node: Any = tree
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _set(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


# --------------------------------------------------------------------------------------------------
# recipe -> form values

NOT_RECIPES = ("accelerate",)  # recipes/accelerate/: `accelerate launch --config_file` configs


def list_recipes(recipes_root: str | os.PathLike) -> list[str]:
    root = Path(recipes_root)
    if not root.is_dir():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.yaml")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
                  and p.relative_to(root).parts[0] not in NOT_RECIPES)


def _display_path(value: Any, data_root: Path, base_dirs: list[Path]) -> Any:
    """Data paths as the form shows them: relative to the data root when they lie inside it."""
    if not isinstance(value, str) or value == "demo" or not value:
        return value
    p = Path(os.path.expanduser(value))
    candidates = [p] if p.is_absolute() else [b / p for b in base_dirs] + [data_root / p]
    for c in candidates:
        if c.exists() and is_inside(data_root, c):
            return c.resolve().relative_to(data_root.resolve()).as_posix()
    return value


def recipe_tree(path: str | os.PathLike) -> dict:
    """The recipe file validated and completed with defaults (no path checks), as a nested dict."""
    return load_recipe(path, check_paths=False).to_dict()


def form_values(tree: dict, data_root: str | os.PathLike, recipe_dir: str | os.PathLike | None = None,
                runs_root: str | os.PathLike | None = None) -> FormValues:
    """The form of a recipe tree (`recipe_tree`): data paths shown relative to the data root."""
    data_root = Path(data_root)
    bases = [Path.cwd()] + ([Path(recipe_dir)] if recipe_dir else [])
    values = {}
    for spec in FIELDS:
        v = _get(tree, spec.key)
        if spec.key in DATA_PATH_KEYS:
            v = _display_path(v, data_root, bases)
        elif spec.key in RUN_PATH_KEYS and runs_root is not None:
            v = _display_path(v, Path(runs_root), bases)
        if spec.kind == "list":
            v = ", ".join(v or [])
        elif spec.kind == "str" and v is None:
            v = ""
        values[spec.key] = v
    return FormValues(values)


# --------------------------------------------------------------------------------------------------
# form values -> recipe

def _from_input(spec: FieldSpec, value: Any) -> Any:
    if spec.kind in ("int", "float"):
        if value is None or value == "":
            if spec.optional:
                return None
            raise Refused(f"{spec.key}: a number is required")
        if spec.kind == "int":
            if float(value) != int(float(value)):
                raise Refused(f"{spec.key}: expected a whole number, got {value}")
            return int(float(value))
        return float(value)
    if spec.kind == "str":
        text = "" if value is None else str(value).strip()
        return None if (not text and spec.optional) else text
    if spec.kind == "list":
        return [v.strip() for v in str(value or "").split(",") if v.strip()]
    if spec.kind == "multi":
        return [v for v in spec.choices if v in (value or [])]  # keep the canonical order
    if spec.kind == "bool":
        return bool(value)
    return value


def values_tree(form: FormValues) -> dict:
    """The recipe tree of a form (values typed as the recipe takes them; not yet validated)."""
    if not isinstance(form, FormValues):
        raise TypeError(f"values_tree takes a FormValues, got {type(form).__name__}")
    tree: dict = {}
    for spec in FIELDS:
        _set(tree, spec.key, _from_input(spec, form[spec.key]))
    return tree


def keep_under_roots(tree: dict, data_root: Path, runs_root: Path) -> None:
    """Data under the data root, the cache under the runs root (absolute paths stored in the recipe)."""
    data = tree["data"]
    if data.get("path") != "demo":
        p = inside(data_root, data.get("path"), what="data.path", allow_absolute=True)
        if not p.exists():
            raise Refused(f"data.path '{data.get('path')}' does not exist under the data root")
        data["path"] = str(p)
    for key in ("eval_path", "media_root"):
        if data.get(key):
            p = inside(data_root, data[key], what=f"data.{key}", allow_absolute=True)
            if not p.exists():
                raise Refused(f"data.{key} '{data[key]}' does not exist under the data root")
            data[key] = str(p)
    for key in RUN_PATH_KEYS:
        value = _get(tree, key)
        if value:
            p = inside(runs_root, value, what=key, allow_absolute=True)
            if key == "reward.model_from" and not p.is_dir():
                raise Refused(f"{key} '{value}' is not a run folder under the runs root")
            _set(tree, key, str(p))


def validated_yaml(tree: dict) -> str:
    """Validate through `load_recipe` (the CLI's own checks) and return the YAML to write."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recipe.yaml"
        path.write_text(yaml.safe_dump(tree, sort_keys=False))
        try:
            recipe = load_recipe(path, check_paths=False)
        except RecipeError as exc:
            raise Refused(f"recipe problem: key '{exc.key}': {exc.message}" if exc.key else str(exc)) from None
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)


def run_recipe(form: FormValues, *, data_root, runs_root, run_dir: Path) -> str:
    """The YAML that Start writes into the new run folder."""
    tree = values_tree(form)
    keep_under_roots(tree, Path(data_root), Path(runs_root))
    if not tree["run"]["stages"]:
        raise Refused("choose at least one stage to run")
    tree["run"]["dir"] = str(run_dir)
    return validated_yaml(tree)


def save_recipe(form: FormValues, name: str, *, recipes_root, data_root, runs_root) -> Path:
    """'Save as recipe': recipes/<name>.yaml; never overwrites an existing file."""
    stem = safe_name(name.removesuffix(".yaml"), what="recipe name")
    path = inside(recipes_root, f"{stem}.yaml", what="recipe file")
    if path.exists():
        raise Refused(f"recipe '{stem}.yaml' already exists; choose another name")
    tree = values_tree(form)
    keep_under_roots(tree, Path(data_root), Path(runs_root))
    tree["run"]["dir"] = f"runs/{stem}"
    text = validated_yaml(tree)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# saved from the web UI\n{text}")
    return path

