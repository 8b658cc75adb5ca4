"""Throughput of the fused summary op against the torch calls that give the same information.

For each dtype and size: GB/s (input bytes / median time) of
- ``fused``: ``dnntrace.ops.tensor_summary_out`` into a preallocated state (full: counts, sums,
  min/max and the log-linear histogram),
- ``moments``: the same op with ``histogram=False``,
- ``chain``: ``torch.aminmax``, ``torch.var_mean``, ``torch.histc``, ``isnan().sum()``,
  ``isinf().sum()``, ``count_nonzero``: the torch calls a monitor would otherwise make,
- ``sum``: ``torch.sum``, the bandwidth yardstick (one read, nothing else),
- on CUDA also ``copy``: a device-to-device copy (read + write bytes / time), the HBM yardstick.

Outputs are checked against torch before timing. Run: ``python bench/bench_summary.py``
(``--quick`` for a short run, ``--device cuda`` on a GPU).

Every run ends with the bandwidth ratios of issue #12 at the largest size (``--ratio-n``): fused
and moments-only GB/s as a percentage of ``torch.sum``'s, per dtype, on one thread and on all
threads, the three statements timed in interleaved rounds (wall clock, best round each) so that
load from other processes hits them alike. ``--ratios-only`` prints just that table.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import platform
import sys
import time

import torch
from torch.utils import benchmark

from dnntrace import _C, ops
from dnntrace.storage import layout as L
from dnntrace.storage.layout import Layout

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Issue #12 targets for fused / torch.sum on one thread at 10^8 elements (float16: measured only).
RATIO_TARGETS = {"float32": 0.50, "bfloat16": 0.40}


def product_dict(**axes):
    """Benchmark cases as data: every combination of the given axes."""
    keys = list(axes)
    for values in itertools.product(*axes.values()):
        yield dict(zip(keys, values, strict=True))


def make_input(n: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    return torch.randn(n, generator=g).to(dtype).to(device)


def new_state(lay: Layout, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    counts = torch.zeros((1, lay.width), dtype=torch.int64, device=device)
    moments = torch.zeros((1, L.NUM_MOMENTS), dtype=torch.float64, device=device)
    moments[:, L.MIN] = math.inf
    moments[:, L.MAX] = -math.inf
    return counts, moments


def chain(x: torch.Tensor):
    """The torch calls giving what the fused op gives (a 256-bin linear histogram over
    [min, max] standing in for the log-linear one)."""
    mn, mx = torch.aminmax(x)
    var, mean = torch.var_mean(x, correction=0)
    hist = torch.histc(
        x if _HISTC_NATIVE.get((x.dtype, x.device.type), True) else x.float(), bins=256
    )
    return mn, mx, var, mean, hist, x.isnan().sum(), x.isinf().sum(), torch.count_nonzero(x)


_HISTC_NATIVE: dict[tuple[torch.dtype, str], bool] = {}


def probe_histc(dtype: torch.dtype, device: str) -> None:
    """Where torch.histc lacks a kernel for the dtype, the chain histograms x.float() instead."""
    try:
        torch.histc(torch.ones(4, dtype=dtype, device=device), bins=4)
        _HISTC_NATIVE[(dtype, torch.device(device).type)] = True
    except RuntimeError:
        _HISTC_NATIVE[(dtype, torch.device(device).type)] = False
        print(
            f"note: torch.histc has no {dtype} kernel on {device}; the chain converts to fp32",
            file=sys.stderr,
        )


def check(x: torch.Tensor, lay: Layout, device: str) -> None:
    """The fused op agrees with torch on this input (exact counts, close sums)."""
    for histogram in (True, False):
        counts, moments = new_state(lay, device)
        ops.tensor_summary_out(x, 0, counts, moments, lay, histogram=histogram)
        c, m = counts[0].cpu(), moments[0].cpu()
        mn, mx, var, mean, hist, nan, inf, nz = (t.cpu() for t in chain(x))
        n = x.numel()
        assert int(c[L.COUNT]) == n
        assert int(c[L.NAN]) == int(nan)
        assert int(c[L.POSINF]) + int(c[L.NEGINF]) == int(inf)
        assert int(c[L.ZEROS]) == n - int(nz)
        assert int(c[L.NEGATIVES]) == int((x < 0).sum())
        assert float(m[L.MIN]) == float(mn) and float(m[L.MAX]) == float(mx)
        total = float(m[L.SUM] + m[L.SUM_COMP])
        ref = float(x.double().sum())
        assert abs(total - ref) <= 1e-9 * float(x.double().abs().sum())
        if histogram:
            in_window = n - int(c[: L.HEADER][[L.NAN, L.POSINF, L.NEGINF, L.ZEROS]].sum())
            in_window -= int(c[L.UNDER_POS] + c[L.UNDER_NEG] + c[L.OVER_POS] + c[L.OVER_NEG])
            assert int(c[L.HEADER :].sum()) == in_window
        if x.dtype == torch.float32:  # histc counts in the input dtype: inexact in bf16
            assert float(hist.sum()) == n


def cpu_time_it(stmt: str, env: dict, min_run_time: float, rounds: int) -> float:
    """Seconds of this thread's CPU time per call (one torch thread): unlike wall time, it does
    not count the time another process holds the core, so it stays usable on a busy machine."""
    code = compile(stmt, "<stmt>", "exec")
    best = math.inf
    for _ in range(rounds):
        calls, t0 = 0, time.thread_time()
        while time.thread_time() - t0 < min_run_time or calls < 3:
            exec(code, env)
            calls += 1
        best = min(best, (time.thread_time() - t0) / calls)
    return best


def time_it(
    stmt: str, env: dict, sync: bool, min_run_time: float, rounds: int, cpu_time: bool = False
) -> float:
    """Best over ``rounds`` of the median of a ``blocked_autorange``: a shared machine's
    interference only ever slows a round down."""
    if cpu_time:
        return cpu_time_it(stmt, env, min_run_time, rounds)
    if sync:
        stmt = f"{stmt}; torch.cuda.synchronize()"
    t = benchmark.Timer(stmt=stmt, globals=env, num_threads=torch.get_num_threads())
    return min(t.blocked_autorange(min_run_time=min_run_time).median for _ in range(rounds))


def run(args: argparse.Namespace) -> list[dict]:
    device = args.device
    sync = device.startswith("cuda")
    lay = Layout()
    rows = []
    for case in product_dict(dtype=args.dtypes, n=args.sizes):
        dtype, n = DTYPES[case["dtype"]], case["n"]
        x = make_input(n, dtype, device)
        probe_histc(dtype, device)
        check(x, lay, device)
        counts, moments = new_state(lay, device)
        env = {
            "ops": ops,
            "x": x,
            "counts": counts,
            "moments": moments,
            "lay": lay,
            "chain": chain,
            "torch": torch,
            "y": torch.empty_like(x),
        }
        stmts = {
            "sum": "torch.sum(x)",
            "fused": "ops.tensor_summary_out(x, 0, counts, moments, lay)",
            "moments": "ops.tensor_summary_out(x, 0, counts, moments, lay, histogram=False)",
            "chain": "chain(x)",
        }
        if sync:
            stmts["copy"] = "y.copy_(x)"
        t = {
            k: time_it(v, env, sync, args.min_run_time, args.rounds, args.cpu_time)
            for k, v in stmts.items()
        }
        nbytes = n * x.element_size()
        row = {"dtype": case["dtype"], "n": n, **{f"{k}_s": v for k, v in t.items()}}
        for k, v in t.items():
            row[f"{k}_gbs"] = (2 if k == "copy" else 1) * nbytes / v / 1e9
        rows.append(row)
        print(
            f"{case['dtype']:>8} n={n:<11.0e} fused {row['fused_gbs']:7.2f} GB/s  "
            f"moments {row['moments_gbs']:7.2f}  chain {row['chain_gbs']:6.2f}  "
            f"sum {row['sum_gbs']:7.2f}",
            file=sys.stderr,
            flush=True,
        )
        del x, env
    return rows


def interleaved_best(
    stmts: dict[str, str], env: dict, sync: bool, rounds: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Best wall time and best calling-thread CPU time per call of each statement over
    ``rounds`` rounds; each round times every statement (3 calls) before the next round starts,
    so a burst of load from elsewhere lands on all of them rather than on one. With one torch
    thread the work runs on the calling thread, and its CPU time leaves out the time slices
    other processes take (a long call is more likely to lose one than a short call)."""
    codes = {
        k: compile(v + ("; torch.cuda.synchronize()" if sync else ""), k, "exec")
        for k, v in stmts.items()
    }
    wall = dict.fromkeys(stmts, math.inf)
    cpu = dict.fromkeys(stmts, math.inf)
    for code in codes.values():  # warm up: thread pools, per-thread tables, page faults
        exec(code, env)
    for _ in range(rounds):
        for k, code in codes.items():
            for _ in range(3):
                c0, t0 = time.thread_time(), time.perf_counter()
                exec(code, env)
                wall[k] = min(wall[k], time.perf_counter() - t0)
                cpu[k] = min(cpu[k], time.thread_time() - c0)
    return wall, cpu


def ratio_rows(args: argparse.Namespace) -> list[dict]:
    """fused / torch.sum and moments-only / torch.sum per dtype, one thread and all threads."""
    device = args.device
    sync = device.startswith("cuda")
    lay = Layout()
    all_threads = args.threads or torch.get_num_threads()
    thread_counts = [1] if device != "cpu" or all_threads == 1 else [1, all_threads]
    rows = []
    old = torch.get_num_threads()
    try:
        for name in args.dtypes:
            dtype, n = DTYPES[name], args.ratio_n
            x = make_input(n, dtype, device)
            check(x, lay, device)
            counts, moments = new_state(lay, device)
            env = {"ops": ops, "x": x, "counts": counts, "moments": moments, "lay": lay}
            env["torch"] = torch
            stmts = {
                "sum": "torch.sum(x)",
                "fused": "ops.tensor_summary_out(x, 0, counts, moments, lay)",
                "moments": "ops.tensor_summary_out(x, 0, counts, moments, lay, histogram=False)",
            }
            for threads in thread_counts:
                torch.set_num_threads(threads)
                t, cpu = interleaved_best(stmts, env, sync, args.ratio_rounds)
                gbs = {k: n * x.element_size() / v / 1e9 for k, v in t.items()}
                row = {"dtype": name, "n": n, "threads": threads, **gbs}
                if threads == 1 and not sync:
                    row["cpu_fused_ratio"] = cpu["sum"] / cpu["fused"]
                    row["cpu_moments_ratio"] = cpu["sum"] / cpu["moments"]
                rows.append(row)
                print(
                    f"{name:>8} n={n:.0e} threads={threads}: fused {gbs['fused']:.2f} GB/s = "
                    f"{100 * gbs['fused'] / gbs['sum']:.0f}% of torch.sum ({gbs['sum']:.2f})",
                    file=sys.stderr,
                    flush=True,
                )
            del x, env
    finally:
        torch.set_num_threads(old)
    return rows


def ratio_markdown(rows: list[dict]) -> str:
    head = [
        "dtype",
        "n",
        "threads",
        "sum GB/s",
        "fused GB/s",
        "fused / sum",
        "moments-only GB/s",
        "moments-only / sum",
        "fused / sum, thread CPU time",
        "target (1 thread, wall)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ratio = r["fused"] / r["sum"]
        target = RATIO_TARGETS.get(r["dtype"]) if r["threads"] == 1 else None
        verdict = (
            "—"
            if target is None
            else (f"≥ {100 * target:.0f}%: {'met' if ratio >= target else 'NOT met'}")
        )
        cells = [
            r["dtype"],
            f"1e{round(math.log10(r['n']))}",
            str(r["threads"]),
            f"{r['sum']:.2f}",
            f"{r['fused']:.2f}",
            f"{100 * ratio:.0f}%",
            f"{r['moments']:.2f}",
            f"{100 * r['moments'] / r['sum']:.0f}%",
            f"{100 * r['cpu_fused_ratio']:.0f}%" if "cpu_fused_ratio" in r else "—",
            verdict,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cpu_kernel(device: str) -> str:
    """The CPU kernel version that ran ('avx512', 'avx2' or 'baseline'; 'unknown' for builds before
    ``_C.cpu_kernel_isa`` existed, so this bench can time older builds too)."""
    if device != "cpu":
        return "-"
    isa = getattr(_C, "cpu_kernel_isa", None)
    return isa() if isa else "unknown"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return (
        f"{platform.machine()}, {cpu}, {os.cpu_count()} logical cores, "
        f"torch.get_num_threads() = {torch.get_num_threads()}{gpu}, torch {torch.__version__}"
    )


def markdown(rows: list[dict], device: str) -> str:
    copy = device.startswith("cuda")
    head = [
        "dtype",
        "n",
        "sum GB/s",
        "fused GB/s",
        "moments-only GB/s",
        "chain GB/s",
        "fused vs chain",
        "fused / sum",
        "moments-only / sum",
    ]
    if copy:
        head += ["copy GB/s", "fused / copy"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["dtype"],
            f"1e{round(math.log10(r['n']))}" if r["n"] > 0 else "0",
            f"{r['sum_gbs']:.2f}",
            f"{r['fused_gbs']:.2f}",
            f"{r['moments_gbs']:.2f}",
            f"{r['chain_gbs']:.2f}",
            f"{r['chain_s'] / r['fused_s']:.1f}x",
            f"{100 * r['fused_gbs'] / r['sum_gbs']:.0f}%",
            f"{100 * r['moments_gbs'] / r['sum_gbs']:.0f}%",
        ]
        if copy:
            cells += [f"{r['copy_gbs']:.1f}", f"{100 * r['fused_gbs'] / r['copy_gbs']:.0f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _flat(items: list[str]) -> list[str]:
    """``--dtypes a b`` and ``--dtypes a,b`` both work."""
    return [part for item in items for part in item.split(",") if part]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--sizes",
        nargs="+",
        default=["1e4", "1e5", "1e6", "1e7", "1e8"],
        help="element counts, e.g. 1e6 1e7 (or 1e6,1e7)",
    )
    p.add_argument(
        "--dtypes",
        nargs="+",
        default=["float32", "bfloat16", "float16"],
        help=f"from {sorted(DTYPES)}",
    )
    p.add_argument(
        "--min-run-time",
        type=float,
        default=None,
        help="seconds per blocked_autorange (default 0.5 on CPU, 0.25 on CUDA)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="timings per case, the best is kept (default 3 on CPU, 2 on CUDA)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--quick", action="store_true", help="sizes up to 1e6, one 0.2 s timing")
    p.add_argument(
        "--ratio-n",
        default=None,
        help="elements for the ratio table (default: the largest of --sizes)",
    )
    p.add_argument(
        "--ratio-rounds", type=int, default=5, help="interleaved rounds for the ratio table"
    )
    p.add_argument(
        "--ratios-only", action="store_true", help="print only the ratio table (issue #12)"
    )
    p.add_argument(
        "--cpu-time",
        action="store_true",
        help="CPU: time by this thread's CPU time with one torch thread (for a "
        "machine shared with other jobs)",
    )
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.sizes = [int(float(s)) for s in _flat(args.sizes)]
    args.dtypes = _flat(args.dtypes)
    if args.min_run_time is None:
        args.min_run_time = 0.25 if cuda else 0.5
    if args.rounds is None:
        args.rounds = 2 if cuda else 3
    if args.quick:
        args.sizes = [n for n in args.sizes if n <= 10**6]
        args.min_run_time = 0.2
        args.rounds = 1
    if args.cpu_time:
        if cuda:
            p.error("--cpu-time is for --device cpu")
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    unknown = [d for d in args.dtypes if d not in DTYPES]
    if unknown:
        p.error(f"unknown dtypes {unknown}; choose from {sorted(DTYPES)}")
    args.ratio_n = int(float(args.ratio_n)) if args.ratio_n else max(args.sizes)
    if not args.ratios_only:
        rows = run(args)
        load = os.getloadavg() if hasattr(os, "getloadavg") else ()
        print(
            f"device: {args.device}; {machine()}; best of {args.rounds} x "
            f"{args.min_run_time} s per timing"
            f"{' of thread CPU time' if args.cpu_time else ''}; load average after the run "
            f"{tuple(round(v, 2) for v in load)}"
        )
        print(markdown(rows, args.device))
    ratios = ratio_rows(args)
    load = os.getloadavg() if hasattr(os, "getloadavg") else ()
    print(
        f"\nRatios to torch.sum, wall clock, best of {args.ratio_rounds} interleaved rounds "
        f"(3 calls each); CPU kernel: {cpu_kernel(args.device)}; "
        f"{machine()}; load average after {tuple(round(v, 2) for v in load)}"
    )
    print(ratio_markdown(ratios))


if __name__ == "__main__":
    main()
