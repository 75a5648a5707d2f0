"""A base loaded under FSDP2 goes straight into its shards (models/sharded_loading.py): two ranks (torchrun,
gloo) hold the same shards, LoRA and reward head as a normal load sharded after (bit for bit, fp32, bf16 and
4-bit), the ranks' peak resident memory while loading a ~100M-parameter base adds up to about one process's
or less (each rank once held the whole base), and the dry run under FSDP2 counts the load's peak.

Every launcher runs in its own process group with a hard timeout, and the group is killed afterwards.

    python -m pytest tests/test_fsdp_loading.py -q
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_distributed import REPO, _env, _finish, _free_port

FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}


def _torchrun(script: Path, *args: str, nproc: int = 2, fsdp: bool = True, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(script), *args]
    env = {**_env(), **(FSDP_ENV if fsdp else {}), **(env or {})}
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


LOADS_SCRIPT = '''
# Under torchrun (2 ranks, FSDP2):  load_rss.py OUT_DIR OPTIONS [VARIANT ...]
#   each rank's peak memory growth while it loads the size-m base with OPTIONS straight into its shards, then for
#   each VARIANT (tiny size xs) the straight-to-shards load against the whole load sharded after.
# One process:                      load_rss.py --alone OUT_DIR OPTIONS [OPTIONS ...]
#   the peak growth of one process loading the base whole, in a fresh child (fork) per OPTIONS, after the imports.
import json, os, sys
import torch
from mmrlhf_lite import distributed
from mmrlhf_lite.events import EventLog
from mmrlhf_lite.models.loading import load_model
from mmrlhf_lite.recipe import load_recipe
import bitsandbytes, peft  # noqa: F401,E401 - imported before the baseline, as any load imports them
import transformers.models.qwen2_vl.modeling_qwen2_vl  # noqa: F401


def status(field):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def growth(launch, options, out):
    cfg = load_recipe(None, ["model.path=tiny:qwen2_vl:m", "model.device=cpu", *options.split(",")]).model
    distributed.barrier("ready")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")   # VmHWM, the peak, starts again from the resident set now
    before = status("VmRSS")
    model, _ = load_model(cfg, shard=True)             # one process, or DDP: the normal load
    distributed.shard(model, EventLog(None, echo=False))
    # one file per rank: the ranks share torchrun's stdout, where two unbuffered prints can interleave mid-line
    os.makedirs(out, exist_ok=True)
    with open(f"{out}/rank{launch.rank}.json", "w") as fh:
        json.dump({"rank": launch.rank, "world": launch.world, "growth": status("VmHWM") - before}, fh)


def same_shards(launch, variants):
    from torch.distributed.tensor import DTensor

    assert launch.sharded
    full = lambda t: (t.full_tensor() if isinstance(t, DTensor) else t).detach().contiguous()
    bits = lambda t: full(t).view(torch.uint8)   # packed 4-bit bytes seen as floats can be NaNs: compare bytes
    for variant in variants:
        cfg = load_recipe(None, ["model.path=tiny:qwen2_vl:xs", "model.device=cpu", *variant.split(",")]).model
        torch.manual_seed(0)
        whole, _ = load_model(cfg, reward_head={"kind": "mlp", "dropout": 0.0})    # one whole copy per rank ...
        distributed.shard_model(whole)                                                # ... sharded after
        torch.manual_seed(0)
        straight, _ = load_model(cfg, reward_head={"kind": "mlp", "dropout": 0.0}, shard=True)
        a, b = dict(whole.named_parameters()), dict(straight.named_parameters())
        assert a.keys() == b.keys()
        differ = [n for n in a if not torch.equal(bits(a[n]), bits(b[n]))]
        buffers = dict(straight.named_buffers())
        differ += [n for n, t in whole.named_buffers() if not torch.equal(t, buffers[n])]
        qa = {n: m.quant_state for n, m in whole.named_modules() if getattr(m, "quant_state", None) is not None}
        qb = {n: m.quant_state for n, m in straight.named_modules() if getattr(m, "quant_state", None) is not None}
        assert qa.keys() == qb.keys()
        differ += [n for n in qa if not (torch.equal(qa[n].absmax, qb[n].absmax) and qa[n].offset == qb[n].offset
                                         and torch.equal(qa[n].state2.absmax, qb[n].state2.absmax))]
        sharded = sum(isinstance(p, DTensor) for p in b.values())
        trainable = sum(p.requires_grad for p in b.values())
        print(f"[{variant}] rank {launch.rank}: {len(a)} parameters ({sharded} sharded, {trainable} trainable), "
              f"{len(qa)} 4-bit; differ: {differ[:3]}", flush=True)


launch = distributed.start("transformers", "cpu")
if sys.argv[1] == "--alone":
    for i, options in enumerate(sys.argv[3:]):
        pid = os.fork()
        if pid == 0:
            try:
                growth(launch, options, f"{sys.argv[2]}/{i}")
            finally:
                os._exit(0)
        assert os.waitpid(pid, 0)[1] == 0
else:
    growth(launch, sys.argv[2], sys.argv[1])
    same_shards(launch, sys.argv[3:])
distributed.destroy()
'''

VARIANTS = ["model.load_in_4bit=false", "model.load_in_4bit=false,model.compute_dtype=bfloat16",
            "model.load_in_4bit=true", "model.load_in_4bit=true,model.compute_dtype=bfloat16"]
DTYPES = {"bf16": "model.compute_dtype=bfloat16,model.load_in_4bit=false",
          "4bit": "model.compute_dtype=float32,model.load_in_4bit=true"}


@pytest.fixture(scope="module")
def loads(tmp_path_factory) -> dict:
    """One process loading the ~100M-parameter base whole (a fork per dtype, after one set of imports), and two
    FSDP2 launches of 2 ranks loading it straight into their shards, one per dtype (the bf16 one then runs the
    same-shards variants: two launches where the tests once made three, and one process where they made two)."""
    from mmrlhf_lite.models.tiny import ensure_tiny

    ensure_tiny("tiny:qwen2_vl:m")
    tmp = tmp_path_factory.mktemp("loads")
    script = tmp / "loads.py"
    script.write_text(LOADS_SCRIPT)
    one = subprocess.run([sys.executable, str(script), "--alone", str(tmp / "one"), *DTYPES.values()], env=_env(),
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    state = {}
    for i, (name, options) in enumerate(DTYPES.items()):
        rc, out = _finish(_torchrun(script, str(tmp / name), options, *(VARIANTS if name == "bf16" else ())),
                          timeout=300)
        assert rc == 0, out[-4000:]
        state[name] = {"one": _growths(tmp / "one" / str(i)), "ranks": _growths(tmp / name), "out": out}
    return state


def test_a_base_loaded_into_its_shards_equals_a_normal_load_sharded_after(loads):
    """fp32, bf16, 4-bit with fp32 and bf16 storage: every parameter (base shards, LoRA, reward head), buffer and
    4-bit quantisation state of the straight-to-shards load equals the whole load sharded after, bit for bit
    (the LoRA and the head draw the same random numbers as one process does)."""
    out = loads["bf16"]["out"]
    said = {(v, int(r)): rest for v, r, rest in re.findall(r"\[([^\]]+)\] rank (\d): (.*?differ: \[[^\]]*\])", out)}
    for variant in VARIANTS:
        for rank in (0, 1):
            four_bit = 14 if "4bit=true" in variant else 0
            # 28 LoRA matrices and the reward head's 4 parameters train; every parameter is sharded
            assert said.get((variant, rank)) == (f"82 parameters (82 sharded, 32 trainable), {four_bit} 4-bit; "
                                                 "differ: []"), (variant, rank, out[-3000:])


def _growths(folder: Path) -> list[int]:
    rows = [json.loads(f.read_text()) for f in sorted(folder.glob("rank*.json"))]
    return [r["growth"] for r in sorted(rows, key=lambda r: r["rank"])]


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_two_fsdp2_ranks_loading_a_base_hold_about_one_process_worth_of_memory(loads, dtype):
    """A ~100M-parameter base (tiny kit size m: 388 MB in fp32 on disk): each rank's peak resident memory while
    it loads and shards the base, above what it held before, summed over 2 ranks, stays under 1.3x that of one
    process loading it whole. When every rank loaded the whole base first, the sum was 2x or more."""
    (single,), ranks = loads[dtype]["one"], loads[dtype]["ranks"]
    mib = lambda b: f"{b / 2**20:.0f} MiB"  # noqa: E731
    print(f"{dtype}: one process {mib(single)}; ranks {', '.join(map(mib, ranks))} (sum {mib(sum(ranks))}, "
          f"{sum(ranks) / single:.2f}x)")
    assert len(ranks) == 2 and single > 100 * 2**20
    assert sum(ranks) < 1.3 * single, (single, ranks)


# ---- pre-flight: --dry-run under FSDP2 counts the load's peak

def test_fsdp_load_estimate_by_hand():
    from mmrlhf_lite.memory import CUDA_CONTEXT_BYTES, GIB, NF4_BYTES_PER_PARAM, fsdp_load_estimate, \
        fsdp_training_estimate

    one_gpu = {"components_gib": {"decoder linears (nf4)": 4.0, "embeddings, norms, LM head": 2.0,
                                  "vision tower + projector": 1.0, "LoRA + AdamW": 0.4,
                                  "dequantised weight (transient)": 0.25, "stored: inputs": 0.5},
               "allocated_gib": 8.15, "needed_gib": 8.65}
    load = fsdp_load_estimate(one_gpu, processes=4, largest_linear=2**26, weight_bytes=2, load_in_4bit=True)
    # (4 + 0.4 + 2 + 1) / 4 = 1.85; one linear of 2^26 parameters read whole in bf16 and packed: 2^26 x 2.5157 B
    linear = 2 ** 26 * (2 + NF4_BYTES_PER_PARAM) / GIB
    assert load["allocated_gib"] == pytest.approx(1.85 + linear, abs=0.005)
    assert load["needed_gib"] == pytest.approx(1.85 + linear + CUDA_CONTEXT_BYTES / GIB, abs=0.005)
    assert load["whole_base_gib"] == pytest.approx(7.4 + 0.5)      # every weight and the LoRA, on each GPU
    bf16 = fsdp_load_estimate(one_gpu, processes=4, largest_linear=2**26, weight_bytes=2, load_in_4bit=False)
    assert bf16["allocated_gib"] == pytest.approx(1.85, abs=0.005)  # rows only, read on the CPU
    steady = fsdp_training_estimate(one_gpu, 4, 8, load={"largest_linear": 2**26, "weight_bytes": 2,
                                                         "load_in_4bit": True})
    assert steady["load"] == load and steady["needed_gib"] == max(steady["needed_gib"], load["needed_gib"])


REPO_ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_under_fsdp2_shows_the_load_peak_of_each_training_stage(tmp_path, monkeypatch, capsys):
    """The 7B recipe (4-bit) on 4 GPUs: after the training stages' lines, the loading line: 1/4 of the weights,
    LoRA and head plus the largest decoder linear (18944 x 3584) read whole in bf16 and packed, against the whole
    base a rank loading it before sharding would hold."""
    import re

    from mmrlhf_lite.memory import GIB, NF4_BYTES_PER_PARAM
    from mmrlhf_lite.recipe import load_recipe
    from mmrlhf_lite.train import dry_run

    monkeypatch.setenv("MMRLHF_LITE_CONFIG_DIRS", str(REPO_ROOT / "tests" / "configs"))
    recipe = load_recipe(REPO_ROOT / "recipes" / "qwen2_vl_7b-24gb.yaml",
                         ["data.path=demo", "data.media_root=null", f"run.dir={tmp_path / 'run'}"], check_paths=False)
    plan = dry_run(recipe, list(recipe.run.stages), "24GB", 4, fsdp=True)
    out = capsys.readouterr().out
    keys = ("decoder linears (nf4)", "embeddings, norms, LM head", "vision tower + projector", "LoRA + AdamW",
            "reward head + AdamW")
    stages = [plan["memory"]["stages"][s]["components_gib"] for s in ("reward", "dpo")]
    shards = max(sum(c.get(k, 0.0) for k in keys) for c in stages) / 4          # the reward model's: the head
    linear = 18944 * 3584 * (2 + NF4_BYTES_PER_PARAM) / GIB
    line = re.search(r"\n  loading\s+[\d.]+ GiB allocated\s+([\d.]+) GiB needed \(each rank reads only its shards; "
                     r"loaded whole first: ([\d.]+) GiB\)", out)
    assert line, out[-2500:]
    assert float(line.group(1)) == pytest.approx(shards + linear + 0.5, abs=0.05)   # printed to 0.1 GiB
    whole = max(sum(c.get(k, 0.0) for k in keys) for c in stages) + 0.5
    assert float(line.group(2)) == pytest.approx(whole, abs=0.01)
    assert "one linear read whole + packed" in out and out.count("loading ") == 1


# ---- the checkpoint reader and what it refuses (one process)

def test_checkpoint_rows_are_the_stored_tensor_rows(tmp_path):
    from safetensors.torch import save_file

    from mmrlhf_lite.models.sharded_loading import Checkpoint

    tensors = {"a": torch.randn(7, 3), "b": torch.randn(5).to(torch.bfloat16), "c": torch.arange(12).reshape(3, 2, 2),
               "s": torch.tensor(2.5)}
    save_file({k: tensors[k] for k in ("a", "b")}, tmp_path / "model-1.safetensors")
    save_file({k: tensors[k] for k in ("c", "s")}, tmp_path / "model-2.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-1.safetensors", "b": "model-1.safetensors", "c": "model-2.safetensors", "s": "model-2.safetensors"}}))
    ck = Checkpoint(tmp_path)
    assert torch.equal(ck.read("a", 2, 5), tensors["a"][2:5]) and torch.equal(ck.read("b"), tensors["b"])
    assert torch.equal(ck.read("c", 1, 3), tensors["c"][1:3]) and ck.read("a", 7, 7).shape == (0, 3)
    assert torch.equal(ck.read("s"), tensors["s"])
    data = (tmp_path / "model-2.safetensors").read_bytes()
    (tmp_path / "model-2.safetensors").write_bytes(data[:-8])     # cut inside the last tensor
    with pytest.raises(Exception, match="ends inside tensor"):
        Checkpoint(tmp_path).read("s")


def test_a_checkpoint_missing_a_weight_is_refused_naming_it(tmp_path):
    from safetensors.torch import load_file, save_file

    from mmrlhf_lite.models.loading import resolve_model_path
    from mmrlhf_lite.models.sharded_loading import Checkpoint, ShardedLoadError, base_weights
    from transformers import AutoModelForImageTextToText

    src = Path(resolve_model_path("tiny:qwen2_vl:xs"))
    weights = load_file(src / "model.safetensors")
    weights.pop("model.layers.1.mlp.up_proj.weight")
    save_file(weights, tmp_path / "model.safetensors")
    skeleton = AutoModelForImageTextToText.from_pretrained(src, device_map="meta")
    names = {w.key for w in base_weights(skeleton, Checkpoint(src))}
    assert "model.layers.1.mlp.up_proj.weight" in names and "model.embed_tokens.weight" in names  # stored names
    with pytest.raises(ShardedLoadError, match=r"no tensor for model\.language_model\.layers\.1\.mlp\.up_proj\.weight"):
        base_weights(skeleton, Checkpoint(tmp_path))
