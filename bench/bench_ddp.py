"""Tracing overhead under DDP: 2 CPU ranks (gloo, 127.0.0.1), one invocation, modes interleaved.

Modes: ``untraced``; ``traced`` (dnntrace.enable, default options); ``traced+merge+hook``
(also cross-rank merged summaries and the DDP comm hook). Each repeat runs every mode for
``--steps`` steps after ``--warmup`` steps, in rotated order; rank 0 prints the median step time
per mode and its ratio to ``untraced``. Each segment builds a fresh DDP wrapper (a comm hook
cannot be removed) from the same initial weights.

    python bench/bench_ddp.py [--steps 30] [--repeats 5] [--width 256] [--batch 64]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta

MODES = ("untraced", "traced", "traced+merge+hook")


def _model(width: int):  # type: ignore[no-untyped-def]
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
        nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10),
    )  # fmt: skip


def _segment(mode: str, args: argparse.Namespace, out: str, seg: int) -> float:
    import torch
    import torch.distributed as dist
    from torch import nn

    import dnntrace
    from dnntrace.capture.distributed import DDPGradStats, RankMerge

    model = _model(args.width)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=1e-3)
    tr = None
    if mode != "untraced":
        ext = [RankMerge(), DDPGradStats(ddp, batch_size=args.batch)] if "merge" in mode else []
        tr = dnntrace.enable(
            model, os.path.join(out, f"seg{seg}.arrow"), optimizer=opt, extensions=ext
        )
    g = torch.Generator().manual_seed(dist.get_rank())
    x = torch.randn(args.batch, 64, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    times = []
    for i in range(args.warmup + args.steps):
        dist.barrier()
        t0 = time.perf_counter()
        loss = nn.functional.cross_entropy(ddp(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    if tr is not None:
        tr.close()
    return statistics.median(times)


def _rank(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank, world_size=2,
        timeout=timedelta(seconds=120),
    )  # fmt: skip
    out = tempfile.mkdtemp(prefix="bench_ddp_")
    res: dict[str, list[float]] = {m: [] for m in MODES}
    seg = 0
    for rep in range(args.repeats):
        order = MODES[rep % len(MODES) :] + MODES[: rep % len(MODES)]
        for mode in order:
            res[mode].append(_segment(mode, args, out, seg))
            seg += 1
    if args.rank == 0:
        base = statistics.median(res["untraced"])
        print(
            f"DDP, 2 CPU ranks (gloo), MLP width {args.width}, batch {args.batch}/rank, "
            f"{args.steps} steps x {args.repeats} repeats, torch {torch.__version__}"
        )
        print(f"{'mode':<22}{'median step ms':>16}{'ratio':>8}")
        for m in MODES:
            med = statistics.median(res[m])
            print(f"{m:<22}{med * 1e3:>16.3f}{med / base:>8.3f}")
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rank", type=int, default=-1, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rank >= 0:
        _rank(args)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, __file__, *sys.argv[1:], "--port", str(port)]
    procs = [subprocess.Popen([*argv, "--rank", str(r)], env=env) for r in range(2)]
    for proc in procs:
        proc.wait(timeout=1800)
    sys.exit(max(abs(proc.returncode) for proc in procs))


if __name__ == "__main__":
    main()
