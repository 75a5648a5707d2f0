"""The device's measured matmul peak, taken in the same run as the measurements it normalises.

MFU against a data-sheet number says little on a CPU (clocks, the threads torch uses, other jobs on the
machine): the CPU side-by-side (bench/cpu.sh) divides by what this machine's own dense matmul reaches,
measured here: square `torch.mm` in the compute dtype the systems use (float32 on CPU, bfloat16 on
CUDA), several sizes, best median rate. 2 n^3 FLOPs per n x n product.

    python -m bench.peak          # prints GFLOP/s on this machine
"""
from __future__ import annotations

import statistics
import time

import torch

from .measure import cuda, sync

CPU_SIZES = (512, 1024, 2048)
CUDA_SIZES = (4096, 8192)       # a GPU needs large products to reach its peak


def matmul_peak(sizes=None, repeats: int = 5, dtype: torch.dtype | None = None) -> dict:
    """{"peak_gflops", "dtype", "device", "threads", "by_size": {n: median GFLOP/s}}; the peak is the best
    size's median over `repeats` timed products (one untimed product first per size)."""
    device = "cuda" if cuda() else "cpu"
    sizes = sizes or (CUDA_SIZES if cuda() else CPU_SIZES)
    dtype = dtype or (torch.bfloat16 if cuda() else torch.float32)
    gen = torch.Generator(device="cpu").manual_seed(0)
    by_size = {}
    for n in sizes:
        a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
        b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
        torch.mm(a, b)
        rates = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            torch.mm(a, b)
            sync()
            rates.append(2 * n ** 3 / (time.perf_counter() - t0) / 1e9)
        by_size[n] = statistics.median(rates)
    return {"peak_gflops": max(by_size.values()), "dtype": str(dtype).replace("torch.", ""), "device": device,
            "threads": torch.get_num_threads(), "by_size": by_size}


if __name__ == "__main__":
    r = matmul_peak()
    print(f"{r['device']} {r['dtype']} matmul, {r['threads']} threads: {r['peak_gflops']:.1f} GFLOP/s "
          + " ".join(f"n={n}:{v:.1f}" for n, v in r["by_size"].items()))
