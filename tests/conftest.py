"""Shared test setup: offline, quiet, 2 threads, seeded, and the tiny models built once per cache.

Everything here runs before any test module imports transformers/gradio, so the environment
variables below take effect (they are read at import time). The tiny-model cache defaults to
`<repo>/.cache/test` (git-ignored) and honours an existing `MMRLHF_LITE_CACHE`, so CI and repeated
local runs build each tiny model once.

    python -m pytest -q tests/test_loading.py
"""
from __future__ import annotations

import os
import random
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("MMRLHF_LITE_CACHE", str(REPO / ".cache" / "test"))
# One intra-op thread (inherited by the app/training subprocesses the tests start): the tiny models' ops
# are too small to gain from two, and when the browser, the app and a training job share 2 cores, two
# spinning OpenMP threads per process made steps 10-80x slower (measured 1.7 s vs 14 s per reward step).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# No TorchDynamo (inherited by every process the tests start): the project never calls torch.compile, but
# bitsandbytes wraps its CPU int8 kernels (unused here) in it at import, which imports inductor: 1.7 of the
# 6.1 CPU s that importing torch + transformers + peft + bitsandbytes takes, paid by each of the ~200
# Python processes a run of the suite starts (torchrun ranks, training jobs, app servers)
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

SEED = 0


def seed_everything(seed: int = SEED) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with torch/transformers
        return
    np.random.seed(seed)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same RNG state, whatever ran before it."""
    seed_everything()
    yield


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """The tiny-model/test cache folder of this session (MMRLHF_LITE_CACHE)."""
    path = Path(os.environ["MMRLHF_LITE_CACHE"])
    path.mkdir(parents=True, exist_ok=True)
    return path


def _tiny(spec: str) -> Path:
    from mmrlhf_lite.models.tiny import ensure_tiny
    return ensure_tiny(spec)


@pytest.fixture(scope="session")
def tiny_qwen2_vl_xs(cache_dir) -> Path:
    """Folder of the tiny random-init Qwen2-VL (size xs), built once per cache."""
    return _tiny("tiny:qwen2_vl:xs")


@pytest.fixture(scope="session")
def tiny_qwen2_5_vl_xs(cache_dir) -> Path:
    """Folder of the tiny random-init Qwen2.5-VL (size xs), built once per cache."""
    return _tiny("tiny:qwen2_5_vl:xs")


def make_reward_run(root: Path, weight: float) -> Path:
    """A run folder `root/run` whose reward model is the tiny Qwen2-VL (xs, fp32, CPU) with random non-zero
    LoRA B and head (a fresh LoRA is a no-op), saved by `save_adapter` with `response_logp_weight` = weight
    as the reward stage saves it; generation batch size 1, critiques of at most 8 tokens."""
    import yaml

    from mmrlhf_lite.models.loading import load_model, save_adapter
    from mmrlhf_lite.recipe import load_recipe

    run = root / "run"
    run.mkdir(parents=True)
    tree = yaml.safe_load((REPO / "recipes" / "demo.yaml").read_text())
    tree["model"].update(path="tiny:qwen2_vl:xs", load_in_4bit=False, device="cpu", lora_vision=False)
    tree["reward"].update(response_logp_weight=weight, generation_batch_size=1, max_new_tokens=8, n_samples=1,
                          critique_mode="generate")
    (run / "recipe.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    recipe = load_recipe(run / "recipe.yaml", check_paths=False)
    model, _ = load_model(recipe.model, reward_head={"kind": "mlp", "dropout": 0.0, "response_logp_weight": weight})
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "reward_head" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    save_adapter(model, run / "reward" / "final", kind="reward")
    return run


@pytest.fixture(scope="session")
def reward_run_factory():
    """`make_reward_run(root, weight)`: a run folder with a tiny (random) critique reward model."""
    return make_reward_run


@pytest.fixture(scope="session")
def tiny_reward_run(tmp_path_factory) -> Path:
    """A run folder with a tiny hybrid reward model (response_logp_weight 2), built once per session."""
    return make_reward_run(tmp_path_factory.mktemp("tiny-reward"), 2.0)


# (name, size, colour): distinct content and two aspect ratios (the processor resizes both)
IMAGE_SPECS = (("red.png", (56, 56), (220, 40, 40)), ("blue.png", (64, 48), (40, 80, 220)),
               ("green.jpg", (40, 72), (40, 170, 60)))


@pytest.fixture
def images(tmp_path) -> list[Path]:
    """A few small RGB images on disk (PNG and JPEG), each with a white square so they are not flat."""
    from PIL import Image, ImageDraw

    out = []
    for name, size, colour in IMAGE_SPECS:
        img = Image.new("RGB", size, colour)
        ImageDraw.Draw(img).rectangle((4, 4, 16, 16), fill=(255, 255, 255))
        path = tmp_path / "images" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path)
        out.append(path)
    return out


def pytest_collection_modifyitems(config, items):
    """Longest first (wall seconds of a clean-clone run): the files that take minutes start at once, so with
    `-n 2 --dist loadfile --no-loadscope-reorder` (scripts/test.sh; without the last flag, pytest-xdist
    reorders the files by their number of tests, and the five tests of test_demo_e2e.py started late) the many
    short files fill the other worker around them. (Not `--dist loadgroup`: with
    pytest 9.2 a node id no longer reads `_nodeid`, where pytest-xdist 3.8 writes a test's group, so groups are
    ignored and a module's shared fixture is built on both workers.)"""
    first = ("test_ui_browser.py", "test_demo_e2e.py", "test_distributed.py", "test_fsdp.py", "test_notebooks.py",
             "test_rounds.py", "test_ui_essentials.py", "test_bench.py", "test_ui_api.py", "test_fsdp_loading.py",
             "test_gpu_smoke.py", "test_collation_workers.py", "test_disk_full.py", "test_fuzz.py", "test_runs.py")
    rank = {name: i for i, name in enumerate(first)}
    items.sort(key=lambda item: rank.get(item.path.name, len(first)))


# one id per pytest session, inherited by xdist workers: the fuzz counts file of this session is told apart
os.environ.setdefault("MMRLHF_LITE_TEST_SESSION", f"{os.getpid()}-{random.random()}")


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and of the child processes it has waited for (torchrun's ranks,
    training subprocesses, the app): load-independent, unlike wall time on a shared machine."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Each test's wall and CPU seconds (setup, call and teardown, waited-for subprocesses included), appended to
    `$MMRLHF_LITE_CACHE/test_costs.<session>.<worker>.jsonl`; the terminal summary ranks the files by CPU."""
    import json
    import time

    wall0, cpu0 = time.perf_counter(), _cpu_seconds()
    yield
    record = {"test": item.nodeid, "wall_s": round(time.perf_counter() - wall0, 3),
              "cpu_s": round(_cpu_seconds() - cpu0, 3)}
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    path = Path(os.environ["MMRLHF_LITE_CACHE"]) / f"test_costs.{os.environ['MMRLHF_LITE_TEST_SESSION']}.{worker}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(json.dumps(record) + "\n")


def _cost_summary(terminalreporter) -> None:
    import json

    per_file: dict[str, list[float]] = {}
    per_worker: dict[str, float] = {}
    for path in Path(os.environ["MMRLHF_LITE_CACHE"]).glob(f"test_costs.{os.environ['MMRLHF_LITE_TEST_SESSION']}.*.jsonl"):
        worker = path.name.rsplit(".", 2)[-2]
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            wall, cpu = per_file.setdefault(record["test"].split("::")[0], [0.0, 0.0])
            per_file[record["test"].split("::")[0]] = [wall + record["wall_s"], cpu + record["cpu_s"]]
            per_worker[worker] = per_worker.get(worker, 0.0) + record["wall_s"]
    if not per_file:
        return
    terminalreporter.write_sep("-", f"test cost: {sum(v[1] for v in per_file.values()):.0f} CPU s in "
                               f"{len(per_file)} files; busy wall per worker: "
                               + ", ".join(f"{w} {s:.0f} s" for w, s in sorted(per_worker.items())))
    for name, (wall, cpu) in sorted(per_file.items(), key=lambda kv: -kv[1][1])[:25]:
        terminalreporter.write_line(f"  {cpu:8.1f} CPU s {wall:8.1f} wall s  {name}")


def pytest_terminal_summary(terminalreporter):
    """Per-file CPU and wall costs of this session. The fuzz suite's number of generated cases per target (tests/test_fuzz.py writes them)."""
    import json

    _cost_summary(terminalreporter)

    counts: dict[str, int] = {}
    for path in Path(os.environ["MMRLHF_LITE_CACHE"]).glob("fuzz_counts.*.json"):
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if saved.get("session") == os.environ["MMRLHF_LITE_TEST_SESSION"]:
            for target, n in saved["counts"].items():
                counts[target] = counts.get(target, 0) + n
    if not counts:
        return
    terminalreporter.write_sep("-", f"fuzz cases generated: {sum(counts.values())} in {len(counts)} targets")
    for target, n in sorted(counts.items()):
        terminalreporter.write_line(f"  {target}: {n}")
