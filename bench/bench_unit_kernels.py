"""Throughput of the per-unit kernels against a plain reduction and the torch fallback, measured
in one run on one device.

For each (shape, unit dim, dtype): GB/s of ``unit_summary_out`` (activations), of
``unit_grad_summary_out`` with attribution (reads g and x), of ``torch.sum`` over the same tensor
(a bandwidth reference), and the time of the torch-op fallback that non-native devices use
(``stats.units.unit_summary_torch``), as a speed-up. Then the top-k merge against its torch
fallback. CUDA times come from events around repeated launches, CPU times from perf_counter.

    python bench/bench_unit_kernels.py                 # CPU, small shapes
    python bench/bench_unit_kernels.py --device cuda   # GPT-2-size and ResNet-size maps
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable

import torch

from dnntrace import ops_units
from dnntrace.stats import units as U

CPU_CASES = [((256, 1024), -1), ((64, 64, 16, 16), 1), ((8, 64, 384), -1)]
GPU_CASES = [
    ((8 * 1024, 768), -1),  # GPT-2-small activations: (batch x seq, d_model)
    ((8 * 1024, 3072), -1),  # its MLP hidden layer
    ((8, 1024, 12, 64), -2),  # attention heads as units
    ((64, 256, 56, 56), 1),  # ResNet stage-1 feature map, NCHW
    ((64, 2048, 7, 7), 1),  # ResNet stage-4: short spans
]


def timer(device: torch.device, fn: Callable[[], object], reps: int) -> float:
    """Median seconds per call over 5 batches of ``reps`` calls, after a warm-up."""
    fn()
    out = []
    for _ in range(5):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(reps):
                fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b) / 1e3 / reps)
        else:
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            out.append((time.perf_counter() - t0) / reps)
    return statistics.median(out)


def row(x: torch.Tensor, g: torch.Tensor, dim: int, reps: int) -> str:
    dev, units = x.device, x.shape[dim]
    acc, gacc = U.new_act_acc(units, dev), U.new_grad_acc(units, dev)
    nbytes = x.numel() * x.element_size()
    t_act = timer(dev, lambda: ops_units.unit_summary_out(x, dim, 0.0, math.nan, acc), reps)
    t_grad = timer(dev, lambda: ops_units.unit_grad_summary_out(g, x, dim, gacc), reps)
    t_sum = timer(dev, lambda: x.sum(), reps)
    t_torch = timer(
        dev, lambda: U.unit_summary_torch(x, dim, 0.0, math.nan, acc), max(1, reps // 5)
    )
    return (
        f"| {tuple(x.shape)} | {dim} | {str(x.dtype)[6:]} | {nbytes / 1e6:.0f} "
        f"| {nbytes / t_act / 1e9:.0f} | {2 * nbytes / t_grad / 1e9:.0f} "
        f"| {nbytes / t_sum / 1e9:.0f} | {t_sum / t_act:.0%} | {t_torch / t_act:.1f}× |"
    )


def topk_row(
    dev: torch.device, units: int, batch: int, k: int, gen: torch.Generator, reps: int
) -> str:
    s = torch.randn(batch, units, generator=gen).to(dev)
    ids = torch.arange(batch, dtype=torch.float32, device=dev)
    tk = U.TopK.new(units, k, dev)
    tk.merge(s, ids, 0)
    t_n = timer(dev, lambda: tk.merge(s, ids, 1), reps)
    t_t = timer(dev, lambda: tk.merge_torch(s, ids, 1), reps)
    return f"| | {units} | {batch} | {k} | {t_n * 1e6:.0f} | {t_t * 1e6:.0f} |"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    cases = GPU_CASES if dev.type == "cuda" else CPU_CASES
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, {name}, native kernels: {ops_units.native(dev.type)}")
    print()
    print(
        "| shape | dim | dtype | MB | act GB/s | grad+attr GB/s | torch.sum GB/s "
        "| act ÷ sum | torch fallback ÷ act |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for shape, dim in cases:
        for dt in args.dtypes:
            x = torch.randn(shape, generator=gen).to(getattr(torch, dt)).to(dev)
            g = torch.randn(shape, generator=gen).to(x.dtype).to(dev)
            print(row(x, g, dim, args.reps), flush=True)
    print()
    print("| top-k merge | units | batch | k | native µs | torch fallback µs |")
    print("|---|---|---|---|---|---|")
    for units, batch, k in ((768, 8, 8), (50257, 8, 8), (2048, 64, 16), (1024, 256, 8)):
        print(topk_row(dev, units, batch, k, gen, args.reps), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
