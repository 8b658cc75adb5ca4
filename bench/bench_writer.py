"""Where the writer thread's CPU goes, and what would (and would not) make it cheaper.

On a machine whose cores all train (the 2-core CI VM with 2 torch threads), the writer's CPU is
paid by the training step (bench/NOTES.md), so its cost per step is worth taking apart. Three
parts, each on the bench transformer of bench_overhead.py (``--model`` for the others):

1. ``split``: one tracer for ``--steps`` steps per configuration (g: weights + weight grads,
   b: everything every step, i: the default set), the writer thread's CPU per step split into
   the compaction of the used bank rows (``_C.compact_rows``), the Arrow IPC write (zstd
   included), the Python that builds rows and record batches, and the rest of the loop.
2. ``codec``: the record batches of that trace written again in memory (CPU time of the writing
   thread, best of 5): the histogram columns as stored (format version 2: the non-zero
   buckets, ``hist_bucket`` + ``hist``) against format version 1's dense spans of the same
   buckets (``hist_offset`` + ``hist``, zeros inside the span included),
   with zstd, lz4 and no compression; also the fixed cost of one zstd-compressed Arrow buffer.
   This is how a format change would be judged: CPU and bytes, measured on real rows.
3. ``priority`` (opt-in, Linux): the writer thread at a lower scheduling priority (SCHED_IDLE,
   SCHED_BATCH or a nice value) in a loop of ~3-5 ms steps (bench_overhead's fast loop: steps
   written and dropped) and in the step-time ratio of g and b against no tracing. Lowering a
   thread's priority cannot be undone without privileges, which is why dnntrace does not do it.

    python bench/bench_writer.py                       # split + codec, ~1 min on 2 cores
    python bench/bench_writer.py --parts split --configs g,b --steps 300
    python bench/bench_writer.py --parts priority --priority idle,nice:10
    python bench/bench_writer.py --parts split --option k=5    # an enable() option for all
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pyarrow as pa
import torch

import dnntrace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_overhead as B  # noqa: E402 - the bench models and configurations
from dnntrace.capture import pipeline as P  # noqa: E402
from dnntrace.storage import writer as W  # noqa: E402


# ---- 1. the writer's CPU, split ------------------------------------------------------------
@contextmanager
def _timed(owner: Any, name: str, key: str, acc: dict[str, float]) -> Iterator[None]:
    """``owner.name`` wrapped: the calling thread's CPU time inside it added to acc[key]."""
    f = getattr(owner, name)

    def timed(*a: Any, **k: Any) -> Any:
        t0 = time.thread_time()
        try:
            return f(*a, **k)
        finally:
            acc[key] = acc.get(key, 0.0) + time.thread_time() - t0

    setattr(owner, name, timed)
    try:
        yield
    finally:
        setattr(owner, name, f)


def split(model_name: str, configs: list[str], steps: int, workdir: str) -> dict[str, str]:
    """Writer CPU per step and its parts; returns each configuration's trace path."""
    case = B._cases()[model_name]
    torch.manual_seed(0)
    model = case.make()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    paths = {}
    print(f"\n1. writer CPU per step ({model_name}, one tracer for {steps} steps; ms)")
    print(
        "| config | writer CPU | compaction | IPC write + zstd | rows (Python) | batch (Python) "
        "| rest of _write | loop and queue | record batches | KB on disk per step "
        "| K buckets read per step |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for cfg in configs:
        acc: dict[str, float] = {}
        with (
            _timed(P.Pipeline, "_compact", "compact", acc),
            _timed(P.Pipeline, "_rows", "rows", acc),
            _timed(P, "state_to_batch", "batch", acc),
            _timed(W.TraceWriter, "write", "ipc", acc),
            _timed(P.Pipeline, "_write", "write", acc),
        ):
            run = B.install(cfg, model, workdir, "writer")
            B.train_steps(model, opt, case, run, steps, 0)
            st = run.close()
        n = max(st["steps_written"], 1)
        total = st["writer_cpu_seconds"]
        rest_write = (
            acc.get("write", 0) - acc.get("ipc", 0) - acc.get("batch", 0) - acc.get("rows", 0)
        )
        loop = total - acc.get("compact", 0) - acc.get("write", 0)
        cells = [
            total,
            acc.get("compact", 0),
            acc.get("ipc", 0),
            acc.get("rows", 0),
            acc.get("batch", 0),
            rest_write,
            loop,
        ]
        print(
            f"| {cfg} {B.CONFIGS[cfg]} | "
            + " | ".join(f"{c / n * 1e3:.3f}" for c in cells)
            + f" | {st['batches']} | {st['bytes'] / n / 1e3:.1f} "
            + f"| {st.get('buckets_scanned', float('nan')) / n / 1e3:.0f} |"
        )
        if st["steps_dropped"]:
            print(f"  ({cfg}: {st['steps_dropped']} steps dropped)")
        assert run.path is not None
        paths[cfg] = run.path
    return paths


# ---- 2. encodings of the stored histograms -----------------------------------------------
def _write_cpu(batch: pa.RecordBatch, codec: str | None) -> tuple[float, int]:
    """(CPU seconds of the best of 5 in-memory IPC writes of ``batch``, bytes written)."""
    best, size = float("inf"), 0
    for _ in range(5):
        sink = pa.BufferOutputStream()
        opts = pa.ipc.IpcWriteOptions(compression=codec, use_threads=False)
        with pa.ipc.new_stream(sink, batch.schema, options=opts) as w:
            t0 = time.thread_time()
            w.write_batch(batch)
            best = min(best, time.thread_time() - t0)
        size = sink.getvalue().size
    return best, size


def dense_of(table: pa.Table) -> tuple[pa.Int32Array, pa.ListArray, int, int]:
    """The stored (bucket, count) pairs as format version 1 stored them: each row's dense span
    from its first to its last non-zero bucket (``hist_offset``, ``hist``); also (buckets a
    span stores, non-zero buckets). The span is checked to give back every pair."""
    buckets = table.column("hist_bucket").combine_chunks()
    counts = table.column("hist").combine_chunks()
    offs = counts.offsets.to_numpy().astype(np.int64)
    b = buckets.values.to_numpy().astype(np.int64)[offs[0] : offs[-1]]
    c = counts.values.to_numpy()[offs[0] : offs[-1]]
    offs = offs - offs[0]
    n = len(offs) - 1
    lengths = np.diff(offs)
    has = lengths > 0
    first = np.zeros(n, np.int64)
    last = np.full(n, -1, np.int64)
    first[has] = b[offs[:-1][has]]
    last[has] = b[offs[1:][has] - 1]
    span = last - first + 1
    s_offs = np.zeros(n + 1, np.int64)
    np.cumsum(span, out=s_offs[1:])
    dense = np.zeros(int(s_offs[-1]), np.uint32)
    row = np.repeat(np.arange(n), lengths)
    dense[s_offs[row] + b - first[row]] = c
    assert int(dense.astype(np.int64).sum()) == int(c.astype(np.int64).sum()), "span lost pairs"
    lists = pa.ListArray.from_arrays(pa.array(s_offs.astype(np.int32)), pa.array(dense))
    return pa.array(first.astype(np.int32)), lists, int(s_offs[-1]), int(len(c))


def codec(paths: dict[str, str]) -> None:
    print(
        "\n2. the histogram column re-encoded (in-memory IPC write, CPU of the writing thread, "
        "best of 5; per traced step)"
    )
    print("| config | encoding | raw KB | codec | CPU ms | KB written |")
    print("|---|---|---|---|---|---|")
    for cfg, path in paths.items():
        with pa.memory_map(path) as src:
            table = pa.ipc.open_stream(src).read_all()
        steps = max(len(np.unique(table.column("step").to_numpy())), 1)
        first, spans, stored, nonzero = dense_of(table)
        dense = pa.record_batch([first, spans], names=["hist_offset", "hist"])
        sparse = pa.record_batch(
            [table.column(c).combine_chunks() for c in ("hist_bucket", "hist")],
            names=["hist_bucket", "hist"],
        )
        print(
            f"| {cfg} | ({stored / steps:.0f} buckets in version 1's spans per step, "
            f"{nonzero / steps:.0f} non-zero: {nonzero / max(stored, 1):.0%}) | | | | |"
        )
        for name, batch in (("dense spans (version 1)", dense), ("pairs (version 2)", sparse)):
            for cd in ("zstd", "lz4", None):
                cpu, size = _write_cpu(batch, cd)
                print(
                    f"| {cfg} | {name} | {batch.nbytes / steps / 1e3:.0f} | {cd} | "
                    f"{cpu / steps * 1e3:.3f} | {size / steps / 1e3:.1f} |"
                )
    col = pa.record_batch([pa.array(np.arange(60, dtype=np.int64))], names=["c"])
    for cd in ("zstd", "lz4", None):
        sink = pa.BufferOutputStream()
        opts = pa.ipc.IpcWriteOptions(compression=cd, use_threads=False)
        with pa.ipc.new_stream(sink, col.schema, options=opts) as w:
            w.write_batch(col)
            t0 = time.thread_time()
            for _ in range(500):
                w.write_batch(col)
            per = (time.thread_time() - t0) / 500
        print(f"one record batch of one 60-value int64 column, {cd}: {per * 1e6:.1f} us")


# ---- 3. the writer at a lower priority -----------------------------------------------------
def _set_priority(spec: str) -> Callable[[], None]:
    """A function that gives the calling thread the scheduling ``spec``."""

    def apply() -> None:
        tid = threading.get_native_id()
        if spec == "idle":
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        elif spec == "batch":
            os.sched_setscheduler(tid, os.SCHED_BATCH, os.sched_param(0))
        elif spec.startswith("nice:"):
            os.setpriority(os.PRIO_PROCESS, tid, int(spec[5:]))
        elif spec != "normal":
            raise ValueError(f"--priority: unknown {spec!r} (normal, idle, batch, nice:N)")

    return apply


@contextmanager
def _writer_priority(spec: str) -> Iterator[None]:
    run = P.Pipeline._run
    setter = _set_priority(spec)

    def patched(self: Any) -> None:
        setter()
        run(self)

    P.Pipeline._run = patched  # type: ignore[method-assign]
    try:
        yield
    finally:
        P.Pipeline._run = run  # type: ignore[method-assign]


def priority(model_name: str, specs: list[str], steps: int, rounds: int, workdir: str) -> None:
    if not hasattr(os, "sched_setscheduler"):
        print("\n3. priority: needs Linux scheduling calls; skipped")
        return
    case = B._cases()[model_name]
    torch.manual_seed(0)
    model = case.make()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    print(
        f"\n3. the writer thread's priority ({model_name}: step ms, mean of a round, median of "
        f"{rounds} interleaved rounds of {steps} steps; fast loop: written/dropped)"
    )
    print("| writer | a ms | g ms | g ×(a) | b ms | b ×(a) | fast loop i | fast loop b |")
    print("|---|---|---|---|---|---|---|---|")
    specs = ["normal", *specs]
    means: dict[str, dict[str, list[float]]] = {sp: {"a": [], "g": [], "b": []} for sp in specs}
    for r in range(-1, rounds):  # round -1 warms up (allocator, first batches): not counted
        for spec in specs:  # interleaved, so the machine's drift hits every spec alike
            with _writer_priority(spec):
                for cfg in ("a", "g", "b"):
                    run = B.install(cfg, model, workdir, f"prio{r}")
                    t = B.train_steps(model, opt, case, run, steps, r + 1)
                    run.close()
                    if r >= 0:
                        means[spec][cfg].append(statistics.mean(t[2:]))
    for spec in specs:
        with _writer_priority(spec):
            fast = B.fast_loop(workdir, 300)
        med = {k: statistics.median(v) * 1e3 for k, v in means[spec].items()}
        wd = []
        for line in fast[1:]:
            written = line.split("steps written ")[1].split(",")[0]
            dropped = line.split("dropped ")[1].split(";")[0]
            wd.append(f"{written}/{dropped}")
        print(
            f"| {spec} | {med['a']:.2f} | {med['g']:.2f} | {med['g'] / med['a']:.3f} | "
            f"{med['b']:.2f} | {med['b'] / med['a']:.3f} | {wd[0]} | {wd[1]} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="split,codec", help="split, codec, priority")
    ap.add_argument("--model", default="transformer", choices=sorted(B._cases()))
    ap.add_argument("--configs", default="g,b,i", help="for split and codec")
    ap.add_argument("--steps", type=int, default=150, help="steps per tracer (split)")
    ap.add_argument("--priority", default="idle,batch,nice:10,nice:19", help="for priority")
    ap.add_argument("--rounds", type=int, default=5, help="rounds (priority)")
    ap.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a dnntrace.enable option for every tracer, e.g. k=5, compression=lz4 or "
        "compression=None (repeatable)",
    )
    args = ap.parse_args()
    extra: dict[str, Any] = {}
    consts = {"None": None, "True": True, "False": False}
    for item in args.option:
        name, sep, value = item.partition("=")
        if not sep or not name.isidentifier():
            ap.error(f"--option: {item!r} is not NAME=VALUE")
        if value in consts:
            extra[name] = consts[value]
        elif value.lstrip("-").isdigit():
            extra[name] = int(value)
        else:
            extra[name] = value
    try:
        dnntrace.TraceConfig(**extra)
    except (TypeError, ValueError) as e:
        ap.error(f"--option: {e}")
    parts = set(args.parts.split(","))
    unknown = parts - {"split", "codec", "priority"}
    if unknown:
        ap.error(f"unknown part(s) {sorted(unknown)}: split, codec, priority")
    configs = args.configs.split(",")
    for c in configs:
        if c not in ("b", "c", "g", "i"):
            ap.error(f"--configs: {c!r} is not a writing dnntrace configuration (b, c, g, i)")
    if args.steps < 10:
        ap.error("--steps must be at least 10")
    for spec in args.priority.split(","):
        nice = spec[5:] if spec.startswith("nice:") else ""
        if spec not in ("idle", "batch", "normal") and not (nice.isdigit() and int(nice) <= 19):
            ap.error(f"--priority: {spec!r} is not idle, batch, normal or nice:N (N in 0..19)")
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    print(
        f"dnntrace writer, torch {torch.__version__}, {torch.get_num_threads()} torch threads, "
        f"{os.cpu_count()} cores"
    )
    if extra:
        print(f"every tracer with {extra}")
        plain = B._dnntrace
        B._dnntrace = lambda model, path, **kw: plain(model, path, **{**kw, **extra})  # type: ignore[assignment]
    with tempfile.TemporaryDirectory(prefix="dnntrace-writer-") as wd:
        paths = {}
        if "split" in parts or "codec" in parts:
            paths = split(args.model, configs, args.steps, wd)
        if "codec" in parts:
            codec(paths)
        if "priority" in parts:
            priority(args.model, args.priority.split(","), 20, args.rounds, wd)


if __name__ == "__main__":
    main()
