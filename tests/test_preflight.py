"""Pre-flight: token counts from image sizes equal the real encoding on every family's tiny twin; over-long
samples are named by file:line and a run refuses to start before any model loads; hub ids work offline
with `model.family` + a shipped config; every recipe's pre-flight fits the GPU class in its file name.

    python -m pytest -q tests/test_preflight.py
"""
from __future__ import annotations

import importlib
import json
import random
import re
from pathlib import Path

import pytest

from mmrlhf_lite.data.groups import PreferenceGroup, Response, text_to_turn
from mmrlhf_lite.models.encoding import GroupEncoder, SequenceTooLong
from mmrlhf_lite.models.families import FAMILIES, detect_family
from mmrlhf_lite.models.loading import load_processor
from mmrlhf_lite.plan import (CountingProcessor, _count_qwen, _size_only_encoder_class, format_plan, make_plan,
                              offline_processor)
from mmrlhf_lite.recipe import ModelConfig, load_recipe
from mmrlhf_lite.reward.prompt import CritiqueEncoder

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "tests" / "configs"
RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.yaml")
                 if p.name != "demo.yaml" and p.parent.name != "accelerate")  # accelerate configs are not recipes

# (width, height) per image of a group; () = text only. Sizes the processors resize very differently:
# square, wide, tall, tiny (scaled up), large (scaled down / many tiles).
LAYOUTS = [[(56, 56)], [(100, 40)], [(30, 90)], [(12, 12)], [(400, 300)], [(64, 48), (40, 72)], []]


def _img(path: Path, size, seed: int) -> str:
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    img = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    ImageDraw.Draw(img).rectangle((1, 1, size[0] // 2, size[1] // 2), fill=(255, 255, 255))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return str(path)


def _groups(tmp_path: Path) -> list[PreferenceGroup]:
    groups = []
    for i, sizes in enumerate(LAYOUTS):
        images = [_img(tmp_path / f"g{i}_{j}.png", s, 10 * i + j) for j, s in enumerate(sizes)]
        groups.append(PreferenceGroup(
            id=f"g{i}", prompt=[text_to_turn("<image>" * len(images) + f"Question {i}: what is shown here?",
                                             len(images))],
            responses=[Response("a red square on the left " * (r + 1), rank=r + 1,
                                critique="correct colour, wrong side " * (r + 1)) for r in range(3)],
            images=images, source=f"pairs.jsonl:{i + 1}"))
    frames = [_img(tmp_path / "video" / f"{k:03d}.png", (80, 60), 100 + k) for k in range(5)]
    groups.append(PreferenceGroup(id="video", prompt=[{"role": "user", "content": [
        {"type": "video"}, {"type": "text", "text": "What happens?"}]}], video=frames,
        responses=[Response("it moves", rank=1, critique="right"), Response("nothing", rank=2, critique="wrong")],
        source="pairs.jsonl:99"))
    return groups


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_twin(request, cache_dir):
    from mmrlhf_lite.models.tiny import ensure_tiny

    path = str(ensure_tiny(f"tiny:{request.param}:xs"))
    family = detect_family(path)
    return path, family, load_processor(path, family)


def test_counts_from_image_sizes_equal_the_real_encoding(family_twin, tmp_path):
    """Policy and critique sequences, image tokens and vision patches: counted == processed, per group."""
    path, family, processor = family_twin
    config = json.loads((Path(path) / "config.json").read_text())
    real = GroupEncoder(processor, family, max_length=10 ** 9, max_frames=3)
    counting = CountingProcessor(processor, family, config)
    sized = _size_only_encoder_class()(counting, family, max_length=10 ** 9, max_frames=3)
    for g in _groups(tmp_path):
        a, b = real.encode_policy(g), sized.encode_policy(g)
        assert (a.prefix_len, [len(x.ids) for x in a.branches]) == (b.prefix_len, [len(x.ids) for x in b.branches]), g.id
        assert real.image_token_count(a.prefix) == sized.image_token_count(b.prefix), g.id
        if g.images or g.video:
            assert sum(counting.last_patches) == _vision_positions(family, a.prefix), g.id
        ca, _ = CritiqueEncoder(real).encode(g)
        cb, _ = CritiqueEncoder(sized).encode(g)
        assert (ca.prefix_len, ca.lengths()) == (cb.prefix_len, cb.lengths()), g.id


def _vision_positions(family, prefix) -> int:
    """Patch positions the vision tower runs on, read off the processor's pixel tensors."""
    pv = prefix["pixel_values"]
    if family.mrope:
        return int(pv.shape[0])                    # (patches, C * T * P * P)
    if family.name == "llava_onevision":           # (images, tiles, 3, H, W); zero tiles are padding
        per_tile = (pv.shape[-1] // 14) ** 2
        return int((pv.flatten(2).abs().sum(-1) > 0).sum()) * per_tile
    per_image = (pv.shape[-1] // 14) ** 2          # idefics3: (rows, images, 3, H, W)
    return int((pv.flatten(2).abs().sum(-1) > 0).sum()) * per_image


def test_offline_formula_equals_the_released_processor_settings():
    """Offline counts for a hub id come from the family's processor class with the released settings."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from PIL import Image

    config = json.loads((CONFIGS / "Qwen--Qwen2-VL-7B-Instruct.json").read_text())
    proc = offline_processor(FAMILIES["qwen2_vl"], config, ModelConfig(max_pixels=802816))
    ref = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=802816)
    for size in ((896, 896), (1920, 1080), (300, 200), (4000, 3000)):
        grid = ref(images=[Image.new("RGB", size)], return_tensors="pt")["image_grid_thw"][0]
        tokens, _, patches = _count_qwen(proc, [size], False, config)[0]
        assert (patches, tokens) == (int(grid.prod()), int(grid.prod()) // 4), size
    assert _count_qwen(proc, [(896, 896)], False, config)[0][0] == 1024
    assert _count_qwen(proc, [(4000, 3000)], False, config)[0][0] <= 1024  # capped by max_pixels


def test_max_pixels_reaches_the_image_processor(tiny_qwen2_vl_xs):
    """model.max_pixels alone (without min_pixels) caps the image tokens (transformers 5 keeps the bounds in a
    SizeDict and reads its pixel attributes only when both are set)."""
    from PIL import Image

    family = FAMILIES["qwen2_vl"]
    img = Image.new("RGB", (560, 560))
    grids = {}
    for mx, mn in ((28 * 28 * 16, None), (28 * 28 * 64, 28 * 28 * 8)):
        p = load_processor(str(tiny_qwen2_vl_xs), family, ModelConfig(max_pixels=mx, min_pixels=mn))
        grids[mx] = p.image_processor(images=[img], return_tensors="pt")["image_grid_thw"][0].tolist()
        assert p.image_processor.get_number_of_image_patches(560, 560) == grids[mx][1] * grids[mx][2]
    assert grids == {28 * 28 * 16: [1, 8, 8], 28 * 28 * 64: [1, 16, 16]}


def test_idefics3_max_pixels_caps_the_longest_edge_in_whole_tiles(cache_dir):
    from mmrlhf_lite.models.tiny import ensure_tiny

    path = str(ensure_tiny("tiny:idefics3:xs"))
    p = load_processor(path, FAMILIES["idefics3"], ModelConfig(max_pixels=200_000))
    tile = p.image_processor.max_image_size["longest_edge"]
    assert p.image_processor.size["longest_edge"] == int(200_000 ** 0.5) // tile * tile


# --------------------------------------------------------------------------------------------------
# over-long samples: reported by file:line, and training refuses to start

def _demo_recipe(tmp_path, *overrides):
    return load_recipe(None, ["model.path=tiny:qwen2_vl:xs", "model.device=cpu", f"run.dir={tmp_path / 'run'}",
                              "data.demo.groups=12", "data.demo.image_size=56", *overrides], check_paths=False)


def _write_ranked(tmp_path: Path, groups: list[PreferenceGroup]) -> Path:
    out = tmp_path / "data" / "pairs.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(g.to_record()) + "\n" for g in groups))
    return out


def test_image_too_large_for_max_length_is_named_and_training_refuses(tmp_path, monkeypatch):
    """A large image under a high max_pixels does not fit max_length: the dry run names file:line (exit 1
    through `errors`) and run_pipeline raises before loading any model; no stage starts."""
    import mmrlhf_lite.models.loading as loading
    from mmrlhf_lite.data import prepare_data
    from mmrlhf_lite.events import EventLog
    from mmrlhf_lite.train import run_pipeline

    small = _img(tmp_path / "data" / "small.png", (56, 56), 1)
    large = _img(tmp_path / "data" / "large.png", (560, 560), 2)
    groups = [PreferenceGroup(id=f"g{i}", prompt=[text_to_turn("<image>What is it?", 1)], images=[img],
                              responses=[Response("a square", rank=1, critique="right"),
                                         Response("a circle", rank=2, critique="wrong")])
              for i, img in enumerate([small, small, large, small])]
    data = _write_ranked(tmp_path, groups)
    recipe = load_recipe(None, ["model.path=tiny:qwen2_vl:xs", "model.device=cpu", f"run.dir={tmp_path / 'run'}",
                                f"data.path={data}", "data.eval_fraction=0", "model.min_pixels=3136",
                                "model.max_pixels=313600", "dpo.train.max_length=300",
                                "reward.train.max_length=600"], check_paths=False)
    train, evals = prepare_data(recipe, tmp_path / "run", EventLog(None, echo=False), dry_run=True)
    plan = make_plan(recipe, ["reward", "score", "reference", "dpo", "eval"], train, evals)
    assert {x["source"] for x in plan["too_long"]} == {f"{data}:3"}
    msg = next(x["message"] for x in plan["too_long"] if x["limit"] == "dpo.train.max_length")
    # 560 x 560 px under max_pixels 313600 = 400 image tokens
    assert re.match(rf"{re.escape(str(data))}:3: prompt \+ response of response 1 is \d+ tokens \(prompt \d+, of "
                    r"which image tokens 400\) > max_length 300", msg), msg
    assert plan["errors"] == [f"{len(plan['too_long'])} sequence(s) longer than max_length (listed above)"]
    assert f"[dpo.train.max_length] {msg}" in format_plan(plan)

    def no_model(*a, **k):
        raise AssertionError("a model was loaded although a sample is too long")
    stage_modules = ("mmrlhf_lite.reward.trainer", "mmrlhf_lite.cache.reference", "mmrlhf_lite.dpo.trainer")
    for module in stage_modules:  # imported before loading.load_model is patched, or they would bind the patch
        importlib.import_module(module)  # (and monkeypatch would "restore" it for the tests after this one)
    monkeypatch.setattr(loading, "load_model", no_model)
    for module in stage_modules:
        monkeypatch.setattr(f"{module}.load_model", no_model)
    with pytest.raises(SequenceTooLong) as info:
        run_pipeline(recipe, echo=False)
    assert f"{data}:3: prompt + response of response 1 is" in str(info.value)
    assert "not starting" in str(info.value)
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert not [e for e in events if e["type"] == "stage_start"]
    assert events[-1]["type"] == "run_end" and events[-1]["status"] == "error"
    # without the large image the same recipe passes the pre-flight
    assert make_plan(recipe, ["dpo"], [g for g in train if g.id != "g2"], evals)["too_long"] == []


def test_cli_dry_run_exits_1_and_run_exits_1_on_the_same_sample(tmp_path):
    import os
    import subprocess
    import sys

    data = _write_ranked(tmp_path, [PreferenceGroup(
        id="g", prompt=[text_to_turn("<image>What?", 1)], images=[_img(tmp_path / "data" / "a.png", (560, 560), 3)],
        responses=[Response("yes", rank=1), Response("no", rank=2)])])
    args = ["model.path=tiny:qwen2_vl:xs", "model.device=cpu", "model.min_pixels=3136", "model.max_pixels=313600",
            f"data.path={data}", "data.eval_fraction=0", "dpo.train.max_length=300", f"run.dir={tmp_path / 'run'}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    recipe = REPO / "recipes" / "demo.yaml"
    dry = subprocess.run([sys.executable, "-m", "mmrlhf_lite.train", str(recipe), "--dry-run", "--stages", "dpo",
                          *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert dry.returncode == 1 and f"[dpo.train.max_length] {data}:1: prompt + response" in dry.stdout
    run = subprocess.run([sys.executable, "-m", "mmrlhf_lite.train", str(recipe), "--stages", "reference,dpo",
                          "-q", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 1, run.stderr
    assert run.stderr.startswith("error: 1 sample(s) longer than max_length; not starting")
    assert f"{data}:1: prompt + response of response 1 is" in run.stderr and "Traceback" not in run.stderr


# --------------------------------------------------------------------------------------------------
# hub ids offline; every recipe's pre-flight

@pytest.fixture
def shipped_configs(monkeypatch):
    monkeypatch.setenv("MMRLHF_LITE_CONFIG_DIRS", str(CONFIGS))


def test_hub_id_without_family_offline_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"not a local model folder .* set model.family"):
        detect_family("Qwen/Qwen2-VL-7B-Instruct")


def worst_case_data(root: Path, frames: int, k: int = 5) -> Path:
    """Groups as long as the real data gets: a large photo, a long video, two images; K responses of
    ~250 tokens with ~150-token critiques (by characters / 4, as the offline count reads them)."""
    rng = random.Random(0)
    words = "the a red blue circle square image shows left right top there are three two answer".split()

    def text(chars: int) -> str:
        out = ""
        while len(out) < chars:
            out += rng.choice(words) + " "
        return out.strip()

    media = {"photo": [_img(root / "photo.jpg", (2304, 2304), 1)],
             "wide": [_img(root / "wide.jpg", (1920, 1080), 2)],
             "two": [_img(root / "a.jpg", (1024, 768), 3), _img(root / "b.jpg", (768, 1024), 4)]}
    video = [_img(root / "video" / f"{i:03d}.jpg", (1280, 720), 10 + i) for i in range(frames + 4)]
    rows = []
    for name, images in media.items():
        rows.append(PreferenceGroup(id=name, prompt=[text_to_turn("<image>" * len(images) + text(300), len(images))],
                                    images=images, responses=[Response(text(1000), rank=r + 1, critique=text(600))
                                                              for r in range(k)]).to_record())
    rows.append(PreferenceGroup(id="video", prompt=[{"role": "user", "content": [{"type": "video"},
                                                                                  {"type": "text", "text": text(300)}]}],
                                video=video, responses=[Response(text(1000), rank=r + 1, critique=text(600))
                                                        for r in range(k)]).to_record())
    path = root / "worst.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def gpu_class_budget(recipe_path: Path) -> str:
    m = re.search(r"-(\d+)gb\.yaml$", recipe_path.name)
    assert m, f"{recipe_path.name}: recipe names end in -<GPU memory>gb.yaml"
    return f"{m.group(1)}GB"


def recipe_preflight(recipe_path: Path, tmp_path: Path) -> dict:
    from mmrlhf_lite.data import prepare_data
    from mmrlhf_lite.events import EventLog

    recipe = load_recipe(recipe_path, check_paths=False)
    data = worst_case_data(tmp_path / "data", recipe.data.max_frames)
    recipe = load_recipe(recipe_path, [f"data.path={data}", "data.media_root=null", "data.eval_fraction=0",
                                       f"run.dir={tmp_path / 'run'}"], check_paths=False)
    train, evals = prepare_data(recipe, tmp_path / "run", EventLog(None, echo=False), dry_run=True)
    return make_plan(recipe, list(recipe.run.stages), train, evals, gpu_mem=gpu_class_budget(recipe_path))


@pytest.mark.parametrize("recipe_path", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_preflight_fits_its_gpu_class(recipe_path, tmp_path, shipped_configs):
    """Offline: the hub id's architecture from tests/configs, token counts by the family's formula; the
    longest sample fits max_length and the estimated peak of every stage fits the GPU class."""
    plan = recipe_preflight(recipe_path, tmp_path)
    m = plan["memory"]
    assert plan["tokens"]["method"] == "formula" and m["available"], plan["tokens"]["note"]
    assert m["config"] == str(CONFIGS / f"{load_recipe(recipe_path, check_paths=False).model.path.replace('/', '--')}.json")
    assert plan["too_long"] == [] and plan["errors"] == [], format_plan(plan)
    assert m["fits"] is True, format_plan(plan)
    assert list(m["stages"]) == ["reward", "score", "reference", "dpo", "eval"]
    assert plan["warnings"] == []
    # the family page quotes this estimate (docs/families/<family>.md)
    family = load_recipe(recipe_path, check_paths=False).model.family
    row = next(line for line in (REPO / "docs" / "families" / f"{family}.md").read_text().splitlines()
               if line.startswith(f"| [{recipe_path.name}]("))
    cells = [c.strip() for c in row.split("|")[4:9]]
    assert cells == [f"{m['stages'][s]['needed_gib']:.1f}" for s in ("reward", "score", "reference", "dpo", "eval")]
    assert f"**{m['peak']['needed_gib']:.1f} GiB** ({m['peak']['stage']})" in row


def test_over_budget_proposes_settings_that_fit(tmp_path, shipped_configs):
    """The 7B recipe with 2 groups per micro-batch on a 12 GB budget does not fit; the proposed overrides
    (one group per micro-batch, then a max_pixels cap) are re-planned and fit."""
    path = REPO / "recipes" / "qwen2_vl_7b-24gb.yaml"
    from mmrlhf_lite.data import prepare_data
    from mmrlhf_lite.events import EventLog

    data = worst_case_data(tmp_path / "data", 4, k=4)
    base = [f"data.path={data}", "data.media_root=null", "data.eval_fraction=0", f"run.dir={tmp_path / 'run'}",
            "dpo.train.groups_per_step=2", "dpo.train.grad_accum=4"]
    recipe = load_recipe(path, base, check_paths=False)
    train, evals = prepare_data(recipe, tmp_path / "run", EventLog(None, echo=False), dry_run=True)
    plan = make_plan(recipe, ["dpo"], train, evals, gpu_mem="12GB")
    m = plan["memory"]
    assert m["fits"] is False and plan["warnings"] and plan["errors"] == []
    fitting = [p for p in m["proposals"] if p["fits"]]
    assert fitting, m["proposals"]
    overrides = fitting[0]["overrides"]
    assert "dpo.train.groups_per_step=1" in overrides and "dpo.train.grad_accum=8" in overrides
    again = make_plan(load_recipe(path, base + overrides, check_paths=False), ["dpo"], train, evals, gpu_mem="12GB")
    assert again["memory"]["fits"] is True, format_plan(again)
    # the proposal is estimated by scaling each group's counts; the re-plan counts again (no worse)
    assert again["memory"]["peak"]["needed_gib"] <= fitting[0]["needed_gib"] + 0.05
    text = format_plan(plan)
    assert "does NOT fit" in text and "  to fit: " + " ".join(overrides) in text
    assert text.endswith("plan OK, 1 warning")  # an estimate warns; only errors stop a run


def test_counts_are_memoized_per_group_and_recounted_when_anything_they_read_changes(tmp_path, monkeypatch):
    """A resumed run does not recount 20k groups: counts live in the cache dir, keyed by the group's text,
    media stamps and source, the model files and the length/pixel settings."""
    import os

    import mmrlhf_lite.plan.tokens as plan_mod  # where the dispatching counter looks the exact counter up
    from mmrlhf_lite.plan import TOKENS_CACHE, preflight_too_long, token_stats

    counted: list[str] = []
    real = plan_mod._processor_counter

    def spying(*a, **k):
        c = real(*a, **k)
        inner = c.count
        c.count = lambda g, wc: (counted.append(g.id), inner(g, wc))[1]
        return c
    monkeypatch.setattr(plan_mod, "_processor_counter", spying)

    groups = _groups(tmp_path / "img")
    stages = ["reward", "score", "reference", "dpo", "eval"]
    args = ["model.path=tiny:qwen2_vl:xs", "model.device=cpu", f"run.dir={tmp_path / 'run'}",
            "dpo.train.max_length=45", "reward.train.max_length=400"]
    recipe = load_recipe(None, args, check_paths=False)
    memo = tmp_path / "cache"
    plain = token_stats(recipe, stages, groups, {g.id for g in groups})
    assert len(counted) == len(groups)
    first = preflight_too_long(recipe, stages, groups, memo_dir=memo)
    assert first and len(counted) == 2 * len(groups)  # some samples exceed 45 tokens
    assert len((memo / TOKENS_CACHE).read_text().splitlines()) == len(groups)
    # the same again: nothing counted, the same answer; token_stats through the memo equals the plain count
    assert preflight_too_long(recipe, stages, groups, memo_dir=memo) == first
    assert len(counted) == 2 * len(groups)
    memoized = token_stats(recipe, stages, groups, {g.id for g in groups}, memo_dir=memo)
    assert memoized[0] == plain[0] and memoized[2] == plain[2]
    # one response edited: that group alone is recounted
    counted.clear()
    groups[1].responses[0].text += " and more words"
    preflight_too_long(recipe, stages, groups, memo_dir=memo)
    assert counted == [groups[1].id]
    # an image replaced by one of another size under the same name: recounted, and the new size is seen
    counted.clear()
    path = groups[0].images[0]
    before = os.stat(path).st_mtime_ns
    _img(Path(path), (300, 300), 7)
    os.utime(path, ns=(before + 10 ** 9, before + 10 ** 9))
    again = token_stats(recipe, stages, groups, {g.id for g in groups}, memo_dir=memo)
    assert counted == [groups[0].id] and again[2][0].image != plain[2][0].image
    # another max_length: every group is checked again
    counted.clear()
    longer = load_recipe(None, args + ["dpo.train.max_length=4000"], check_paths=False)
    assert preflight_too_long(longer, stages, groups, memo_dir=memo) == [
        p for p in preflight_too_long(longer, stages, groups) if p["limit"] != "dpo.train.max_length"]
    assert len(counted) == 2 * len(groups)


def test_llava_onevision_max_pixels_caps_the_anyres_grid_in_processor_and_model(tmp_path):
    """model.max_pixels keeps the anyres resolutions within it, in the processor and in the model config
    alike: fewer image tokens, counted exactly by the pre-flight, and a forward that still runs (with the
    model's full grid it fails: its tile count disagrees with the processor's)."""
    import torch

    from mmrlhf_lite.models.loading import load_model
    from mmrlhf_lite.models.logprobs import group_forward
    from mmrlhf_lite.models.tiny import ensure_tiny

    path = str(ensure_tiny("tiny:llava_onevision:xs"))
    config = json.loads((Path(path) / "config.json").read_text())
    full = config["image_grid_pinpoints"]
    tile = config["vision_config"]["image_size"]
    assert sorted(map(tuple, full)) == [(tile, tile), (tile, 2 * tile), (2 * tile, tile), (2 * tile, 2 * tile)]
    cfg = ModelConfig(path=path, device="cpu", load_in_4bit=False, max_pixels=2 * tile * tile)
    model, processor = load_model(cfg, trainable=False, lora=False)
    capped = [[tile, tile], [tile, 2 * tile], [2 * tile, tile]]
    assert processor.image_processor.image_grid_pinpoints == capped
    assert model.config.image_grid_pinpoints == capped and model.model.config.image_grid_pinpoints == capped
    family = model.mmrlhf.family
    big = _img(tmp_path / "big.png", (300, 280), 3)  # nearly square: 2 x 2 tiles uncapped
    g = PreferenceGroup(id="big", prompt=[text_to_turn("<image>What is it?", 1)], images=[big],
                        responses=[Response("a square", rank=1), Response("a circle", rank=2)], source="x.jsonl:1")
    enc_capped = GroupEncoder(processor, family, max_length=10 ** 9).encode_policy(g)
    uncapped = load_processor(path, family)
    enc_full = GroupEncoder(uncapped, family, max_length=10 ** 9).encode_policy(g)
    enc = GroupEncoder(processor, family, max_length=10 ** 9)
    n_capped, n_full = enc.image_token_count(enc_capped.prefix), enc.image_token_count(enc_full.prefix)
    assert n_capped < n_full
    # the pre-flight's count from the image size agrees with the capped processor
    counting = CountingProcessor(processor, family, config)
    sized = _size_only_encoder_class()(counting, family, max_length=10 ** 9)
    assert sized.image_token_count(sized.encode_policy(g).prefix) == n_capped
    with torch.no_grad():
        out = group_forward(model, family, [enc_capped], packed=True)
        assert all(torch.isfinite(lp) for lp in out.logps)
        for m in (model, model.model):
            m.config.image_grid_pinpoints = full
        with pytest.raises((ValueError, RuntimeError)):  # tiles per image disagree with the processor's
            group_forward(model, family, [enc_capped], packed=True)


def test_anyres_fit_proposal_by_hand():
    """7B LLaVA-OV (384 px tiles of 27 x 27 = 729 tokens): capping its largest image (7371 tokens) at 0.3
    allows the base tile + a grid of int(2211 / 729) - 1 = 2 tiles: max_pixels 2 x 384^2, at most
    3 x 729 + 2 x 27 image tokens."""
    from mmrlhf_lite.models.families import FAMILIES, capped_grid_pinpoints
    from mmrlhf_lite.plan import _max_pixels_for

    config = json.loads((CONFIGS / "llava-hf--llava-onevision-qwen2-7b-ov-hf.json").read_text())
    assert _max_pixels_for(FAMILIES["llava_onevision"], config, 7371, 0.3) == (294912, 2241)
    pins = capped_grid_pinpoints(config["image_grid_pinpoints"], 294912)
    assert sorted(map(tuple, pins)) == [(384, 384), (384, 768), (768, 384)]
    assert capped_grid_pinpoints(config["image_grid_pinpoints"], 1000) == [[384, 384]]  # never empty


def test_over_budget_llava_onevision_gets_a_max_pixels_cap_that_fits(tmp_path, shipped_configs):
    """LLaVA-OV 7B with full anyres tiles (one group per micro-batch already) on a 13 GB budget (12.1 GiB):
    12.7 GiB estimated; the proposal caps the anyres grid with model.max_pixels (1032192, 7 tiles), and the
    re-plan with it fits (11.7 GiB, largest image 7371 -> 4501 tokens)."""
    path = REPO / "recipes" / "llava_onevision_7b-24gb.yaml"
    from mmrlhf_lite.data import prepare_data
    from mmrlhf_lite.events import EventLog

    data = worst_case_data(tmp_path / "data", 4, k=4)
    base = [f"data.path={data}", "data.media_root=null", "data.eval_fraction=0", f"run.dir={tmp_path / 'run'}"]
    recipe = load_recipe(path, base, check_paths=False)
    train, evals = prepare_data(recipe, tmp_path / "run", EventLog(None, echo=False), dry_run=True)
    plan = make_plan(recipe, ["dpo"], train, evals, gpu_mem="13GB")
    m = plan["memory"]
    assert m["fits"] is False, format_plan(plan)
    fitting = [p for p in m["proposals"] if p["fits"]]
    assert fitting and any(o.startswith("model.max_pixels=") for o in fitting[0]["overrides"]), m["proposals"]
    again = make_plan(load_recipe(path, base + fitting[0]["overrides"], check_paths=False), ["dpo"], train, evals,
                      gpu_mem="13GB")
    assert again["memory"]["fits"] is True, format_plan(again)
    assert again["tokens"]["longest"]["largest_image"] < plan["tokens"]["longest"]["largest_image"]
    # 12 GB: even one tile per image is not enough (video frames keep their base tile), so the proposal adds
    # fewer frames; it is estimated at the cap max_pixels really gives, so the re-plan agrees (it once
    # claimed 11.03 GiB for a cap whose re-plan needed 11.70)
    tight = make_plan(recipe, ["dpo"], train, evals, gpu_mem="12GB")["memory"]
    proposal = next(p for p in tight["proposals"] if p["fits"])
    assert proposal["overrides"][0] == "model.max_pixels=147456" and proposal["overrides"][1].startswith("data.max_frames=")
    replan = make_plan(load_recipe(path, base + proposal["overrides"], check_paths=False), ["dpo"], train, evals,
                       gpu_mem="12GB")["memory"]
    assert replan["fits"] is True and replan["peak"]["needed_gib"] <= proposal["needed_gib"] + 0.05


@pytest.mark.parametrize("n_images", [1, 2])
def test_reward_model_and_policy_see_llava_images_at_the_same_resolution(tmp_path, n_images):
    """LLaVA-OV gives a lone image anyres tiles and each image of a multi-image sample its base tile only:
    the critique prompt passes images nested per sample as the policy prompt does, so both see the same."""
    from mmrlhf_lite.models.tiny import ensure_tiny

    path = str(ensure_tiny("tiny:llava_onevision:xs"))
    family = detect_family(path)
    enc = GroupEncoder(load_processor(path, family), family, max_length=10 ** 9)
    images = [_img(tmp_path / f"{i}.png", (120, 90), i) for i in range(n_images)]
    g = PreferenceGroup(id="g", prompt=[text_to_turn("<image>" * n_images + "Compare.", n_images)], images=images,
                        responses=[Response("same", rank=1), Response("different", rank=2)])
    policy = enc.image_token_count(enc.encode_policy(g).prefix)
    critique = enc.image_token_count(CritiqueEncoder(enc).encode(g)[0].prefix)
    assert policy == critique
    if n_images == 2:  # base tiles only: fewer tokens than one image with its anyres grid, twice
        single = PreferenceGroup(id="s", prompt=[text_to_turn("<image>Compare.", 1)], images=images[:1],
                                 responses=g.responses)
        assert policy < 2 * enc.image_token_count(enc.encode_policy(single).prefix)
