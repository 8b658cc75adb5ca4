"""What tracing adds to a real training step, against no tracing and against the usual tools.

Configurations, interleaved round-robin on the same model and machine (medians over rounds):

  a  no tracing
  b  dnntrace, everything every step              activations_every=1
  c  dnntrace, everything every 10 steps          every=10, activations_every=10
  d  TensorBoard add_histogram of every parameter and gradient, every step
  e  wandb.watch(model, log="all", log_freq=1), offline
  f  naive hooks: histc(out.cpu(), 64) + min/max .item() on every module output
  g  dnntrace, weights and weight gradients only  activations=False, activation_grads=False
                                                  (the tensors d and e record)
  h  dnntrace everything every step with the summary ops replaced by no-ops: what the hooks,
     the flush and the bookkeeping cost on the training thread, per traced tensor
  i  dnntrace, the default set                    dnntrace.enable(model, path)
                                                  (weights and weight gradients every step,
                                                  activations and their gradients every 10th)

Every round of every configuration starts with ``--warmup`` steps timed apart (default 10): a
configuration's start (a tracer allocates its slots and banks and faults in their pages in its
first steps, TensorBoard opens its event file) is a one-off cost of a run, so the steps after it
are what a long run pays per step; the start's cost is its own column (start ms: the start
steps' time beyond as many steady steps, less the same for (a)). ``--warmup 0`` times every step
from the start, as the runs in bench/RESULTS.md before its "ninth session" section did.

Per model and configuration: step time (mean over a round, median over rounds), ratio to (a);
for the dnntrace rows also the bytes the tracer reads per step (duplicates merged instead of
read are not counted), the floor (bytes / torch.sum bandwidth measured in this run), added time /
floor, bytes on disk per tensor-step, the bytes taken from the stat bank per step (on CUDA: moved
to the host) against the whole bank (what was moved before compaction), the writer thread's CPU
time per step, the flush cost on the training thread, steps dropped, and for (h) the training
thread's added time per traced tensor (all of it, the per-step flush and optimizer hooks
included, divided by the tensors the hooks trace per step). Below the table: the activation
hooks alone, (h - j) over the activation-side tensors per step (j: weights+grads with the op
stubbed), and the hooks' own wall time in (h): the forward hooks timed around each call inside
the loop, the C++ gradient hooks by the native table (tracer.stats());
weights+grads (g) against TensorBoard (d) and wandb (e).

    python bench/bench_overhead.py                 # full run (several minutes on 2 cores)
    python bench/bench_overhead.py --quick         # smoke test
    python bench/bench_overhead.py --models transformer --steps 20 --rounds 5 --out /tmp/b
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

import dnntrace

CONFIGS = {
    "a": "no tracing",
    "b": "dnntrace everything every step",
    "c": "dnntrace everything every=10",
    "d": "TensorBoard add_histogram",
    "e": "wandb.watch log=all",
    "f": "naive hooks (histc+.item)",
    "g": "dnntrace weights+grads",
    "h": "dnntrace everything, kernel stubbed",
    "j": "dnntrace weights+grads, kernel stubbed",
    "i": "dnntrace default set",
}
DNNTRACE_CONFIGS = ("b", "c", "g", "h", "i", "j")


# ---- models -------------------------------------------------------------------------------
class TinyTransformer(nn.Module):
    def __init__(self, d: int = 256, layers: int = 2, heads: int = 4, vocab: int = 512) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True)
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.embed(idx)
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.norm(h))


@dataclass
class Case:
    name: str
    make: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def resnet_like(width: int = 64, blocks: int = 8, classes: int = 100) -> nn.Module:
    """Conv stem, residual blocks of conv-BN-ReLU-conv-BN, global pooling, a linear head."""

    class Block(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(c, c, 3, padding=1, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(),
                nn.Conv2d(c, c, 3, padding=1, bias=False),
                nn.BatchNorm2d(c),
            )
            self.act = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(x + self.body(x))

    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        *[Block(width) for _ in range(blocks)],
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, classes),
    )


def _cases() -> dict[str, Case]:
    def mlp() -> nn.Module:
        layers: list[nn.Module] = []
        for _ in range(3):
            layers += [nn.Linear(1024, 1024), nn.ReLU()]
        return nn.Sequential(*layers, nn.Linear(1024, 10))

    def cnn() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 8 * 8, 10),
        )

    def ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out.flatten(0, -2), y.flatten())

    return {
        "mlp": Case(
            "mlp",
            mlp,
            lambda g: (
                torch.randn(256, 1024, generator=g),
                torch.randint(0, 10, (256,), generator=g),
            ),
            ce,
        ),
        "cnn": Case(
            "cnn",
            cnn,
            lambda g: (
                torch.randn(64, 3, 32, 32, generator=g),
                torch.randint(0, 10, (64,), generator=g),
            ),
            ce,
        ),
        # GPU sizes: a GPT-2-small-size transformer (d=768, 12 layers, 12 heads, seq 1024) and a
        # ResNet-style CNN (for bench/gpu_check.sh; far too slow for the CPU)
        "gpt2": Case(
            "gpt2",
            lambda: TinyTransformer(d=768, layers=12, heads=12, vocab=50257),
            lambda g: (
                torch.randint(0, 50257, (8, 1024), generator=g),
                torch.randint(0, 50257, (8, 1024), generator=g),
            ),
            ce,
        ),
        "resnet": Case(
            "resnet",
            resnet_like,
            lambda g: (
                torch.randn(64, 3, 64, 64, generator=g),
                torch.randint(0, 100, (64,), generator=g),
            ),
            ce,
        ),
        "transformer": Case(
            "transformer",
            TinyTransformer,
            lambda g: (
                torch.randint(0, 512, (8, 64), generator=g),
                torch.randint(0, 512, (8, 64), generator=g),
            ),
            ce,
        ),
    }


# ---- configurations: install / per-step / remove --------------------------------------------
@dataclass
class Run:
    """State of one configuration during one round."""

    after_backward: Callable[[int], None] = lambda i: None
    after_step: Callable[[int, torch.Tensor], None] = lambda i, loss: None
    close: Callable[[], dict[str, Any] | None] = lambda: None
    path: str | None = None
    tracer: Any = None


def _naive_hooks(model: nn.Module) -> Run:
    handles = []

    def hook(mod: nn.Module, inp: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            x = out.detach().float().cpu()
            torch.histc(x, 64)
            x.min().item()
            x.max().item()

    for _, m in model.named_modules():
        if next(m.children(), None) is None:
            handles.append(m.register_forward_hook(hook))

    def close() -> None:
        for h in handles:
            h.remove()

    return Run(close=close)


def _tensorboard(model: nn.Module, logdir: str) -> Run:
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(logdir)

    def after_backward(i: int) -> None:
        for n, p in model.named_parameters():
            w.add_histogram(n, p.detach(), i)
            if p.grad is not None:
                w.add_histogram(n + ".grad", p.grad, i)

    def close() -> None:
        w.close()

    return Run(after_backward=after_backward, close=close)


_WANDB_RUN: Any = None


def _wandb(model: nn.Module, wdir: str) -> Run:
    global _WANDB_RUN
    import wandb

    if _WANDB_RUN is None:
        os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=wdir)
        _WANDB_RUN = wandb.init(project="dnntrace-bench", dir=wdir, mode="offline")
    wandb.watch(model, log="all", log_freq=1)

    def after_step(i: int, loss: torch.Tensor) -> None:
        wandb.log({"loss": loss.item()})

    def close() -> None:
        wandb.unwatch(model)

    return Run(after_step=after_step, close=close)


def _dnntrace(model: nn.Module, path: str, **opts: Any) -> Run:
    tr = dnntrace.enable(model, path, **opts)
    return Run(close=tr.close, path=path, tracer=tr)


def _stubbed(run: Run) -> Run:
    """The run with dnntrace's summary ops replaced by no-ops until it closes."""
    from dnntrace import ops

    saved = ops.tensor_summary_out, ops.multi_tensor_summary_out
    ops.tensor_summary_out = lambda *a, **k: None  # type: ignore[assignment]
    ops.multi_tensor_summary_out = lambda *a, **k: None  # type: ignore[assignment]
    # activations and their gradients are summarised natively (capture/readonce.py)
    table = getattr(run.tracer, "_read_once", None)
    if hasattr(table, "set_stub"):  # (an older dnntrace, a "before" run: Python hooks)
        table.set_stub(True)
    close = run.close

    def restore() -> Any:
        try:
            return close()
        finally:
            ops.tensor_summary_out, ops.multi_tensor_summary_out = saved

    return Run(close=restore, path=run.path, tracer=run.tracer)


# (h): the wall time of every dnntrace forward hook call, timed inside the training loop
HOOK_TIMES: list[float] = []
HOOK_MARK = [0]  # where the current round's calls begin in HOOK_TIMES


@contextlib.contextmanager
def _timed_forward_hooks() -> Iterator[None]:
    """Forward hooks made while inside are timed (perf_counter around each call, which adds
    its own ~1 us: an upper bound) into HOOK_TIMES."""
    from dnntrace.capture.tracer import Tracer

    make = Tracer._make_forward_hook

    def timed_make(self: Any, name: str) -> Callable[..., None]:
        hook = make(self, name)

        def timed(module: nn.Module, inputs: Any, output: Any) -> None:
            t0 = time.perf_counter()
            try:
                hook(module, inputs, output)
            finally:
                HOOK_TIMES.append(time.perf_counter() - t0)

        return timed

    Tracer._make_forward_hook = timed_make  # type: ignore[method-assign]
    try:
        yield
    finally:
        Tracer._make_forward_hook = make  # type: ignore[method-assign]


def install(cfg: str, model: nn.Module, workdir: str, tag: str) -> Run:
    path = os.path.join(workdir, f"{tag}-{cfg}.arrow")
    if cfg == "a":
        return Run()
    if cfg == "b":
        return _dnntrace(model, path, activations_every=1)
    if cfg == "c":
        return _dnntrace(model, path, every=10, activations_every=10)
    if cfg == "i":
        return _dnntrace(model, path)
    if cfg == "g":
        try:
            return _dnntrace(model, path, activations=False, activation_grads=False)
        except TypeError:  # an older dnntrace (a "before" run): no activation_grads=
            return _dnntrace(model, path, activations=False)
    if cfg == "h":
        with _timed_forward_hooks():
            return _stubbed(_dnntrace(model, path, activations_every=1))
    if cfg == "j":
        return _stubbed(_dnntrace(model, path, activations=False, activation_grads=False))
    if cfg == "d":
        return _tensorboard(model, os.path.join(workdir, f"tb-{tag}"))
    if cfg == "e":
        return _wandb(model, workdir)
    if cfg == "f":
        return _naive_hooks(model)
    raise ValueError(cfg)


# ---- measurement --------------------------------------------------------------------------
DEVICE = torch.device("cpu")
# --cpu-time: one torch thread; a step costs the training thread's CPU time plus the dnntrace
# writer thread's (peers' background threads are not counted: conservative for dnntrace)
CPU_TIME = False


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def train_steps(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    case: Case,
    run: Run,
    steps: int,
    seed: int,
    warm: int = 0,
) -> list[float]:
    """Per-step times of ``warm + steps`` steps (the first ``warm`` are the configuration's
    start: the caller times them apart)."""
    g = torch.Generator().manual_seed(seed)
    batches = [tuple(t.to(DEVICE) for t in case.batch(g)) for _ in range(warm + steps)]
    times = []
    clock = time.thread_time if CPU_TIME else time.perf_counter
    for i, (x, y) in enumerate(batches):
        if warm and i == warm:
            del HOOK_TIMES[HOOK_MARK[0] :]  # hook calls of the start steps are not counted
        _sync()
        t0 = clock()
        loss = case.loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        run.after_backward(i)
        opt.step()
        run.after_step(i, loss)
        _sync()
        times.append(clock() - t0)
    return times


def memory_bandwidth() -> float:
    """Bytes/s of torch.sum over a 400 MB fp32 tensor (median of 5); per CPU second of the
    calling thread with --cpu-time (one torch thread)."""
    x = torch.ones(100_000_000, device=DEVICE)
    x.sum()
    ts = []
    clock = time.thread_time if CPU_TIME else time.perf_counter
    for _ in range(5):
        _sync()
        t0 = clock()
        x.sum()
        _sync()
        ts.append(clock() - t0)
    return x.numel() * 4 / statistics.median(ts)


_ITEMSIZE = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2}


def bytes_read_per_step(path: str) -> tuple[float, float, float]:
    """(bytes in the rows per traced step, bytes on disk per tensor row, hook-traced tensors per
    traced step) from a trace."""
    tr = dnntrace.load(path)
    t = tr.table
    kind = t.column("kind").cast("string").to_numpy(zero_copy_only=False)
    dtype = t.column("dtype").cast("string").to_numpy(zero_copy_only=False)
    numel = t.column("numel").to_numpy()
    calls = t.column("calls").to_numpy()
    keep = kind != "scalar"
    item = np.array([_ITEMSIZE.get(d, 4) for d in dtype])
    total = float((numel * calls * item)[keep].sum())
    nsteps = max(len(tr.steps), 1)
    hooked = np.char.startswith(kind.astype(str), "activation")
    return (
        total / nsteps,
        os.path.getsize(path) / max(int(keep.sum()), 1),
        float(calls[hooked].sum()) / nsteps,
    )


def check_tracing_is_transparent(case: Case, workdir: str) -> None:
    """One step with and without tracing from the same state: identical loss and parameters."""
    torch.manual_seed(0)
    m0 = case.make().to(DEVICE)
    g = torch.Generator().manual_seed(0)
    x, y = (t.to(DEVICE) for t in case.batch(g))
    m1 = copy.deepcopy(m0)
    results = []
    for m, traced in ((m0, False), (m1, True)):
        opt = torch.optim.SGD(m.parameters(), lr=1e-2, momentum=0.9)
        tr = dnntrace.enable(m, os.path.join(workdir, "check.arrow")) if traced else None
        loss = case.loss(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if tr is not None:
            tr.close()
        results.append((loss.item(), [p.detach().clone() for p in m.parameters()]))
    (l0, p0), (l1, p1) = results
    assert l0 == l1, (case.name, l0, l1)
    if DEVICE.type == "cuda":
        # CUDA backward kernels with atomics (embedding, index_add) are not bitwise
        # reproducible even untraced: the updated parameters agree to rounding
        close = (torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(p0, p1, strict=True))
        assert all(close), case.name
    else:
        assert all(torch.equal(a, b) for a, b in zip(p0, p1, strict=True)), case.name


@dataclass
class Result:
    round_means: dict[str, list[float]] = field(default_factory=dict)
    # per round: the first ``warm`` steps' time beyond as many steady steps (the start's cost)
    start_costs: dict[str, list[float]] = field(default_factory=dict)
    stats: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    read_bytes: dict[str, float] = field(default_factory=dict)
    disk_per_row: dict[str, float] = field(default_factory=dict)
    hooked: dict[str, float] = field(default_factory=dict)
    hook_times: list[float] = field(default_factory=list)  # (h) forward hook calls, timed rounds


def bench_case(
    case: Case, configs: list[str], steps: int, rounds: int, workdir: str, warm: int = 0
) -> Result:
    torch.manual_seed(0)
    model = case.make().to(DEVICE)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    res = Result()
    # warm-up untimed (allocator, thread pools, first wandb/tensorboard import)
    for cfg in configs:
        run = install(cfg, model, workdir, f"{case.name}-warm")
        train_steps(model, opt, case, run, 2, seed=999)
        run.close()
    HOOK_TIMES.clear()
    for r in range(rounds):
        order = configs[r % len(configs) :] + configs[: r % len(configs)]  # rotate start
        for cfg in order:
            run = install(cfg, model, workdir, f"{case.name}-r{r}")
            HOOK_MARK[0] = len(HOOK_TIMES)
            times = train_steps(model, opt, case, run, steps, seed=r, warm=warm)
            st = run.close()
            start, times = times[:warm], times[warm:]
            per_step = sum(times) / len(times)
            if CPU_TIME and isinstance(st, dict):  # the writer thread's CPU, up to close
                per_step += st.get("writer_cpu_seconds", 0.0) / (steps + warm)
            res.round_means.setdefault(cfg, []).append(per_step)
            res.start_costs.setdefault(cfg, []).append(sum(start) - warm * per_step)
            if isinstance(st, dict):
                res.stats.setdefault(cfg, []).append(st)
            if run.path is not None and r == rounds - 1:
                res.read_bytes[cfg], res.disk_per_row[cfg], res.hooked[cfg] = bytes_read_per_step(
                    run.path
                )
    res.hook_times = list(HOOK_TIMES)
    return res


def fast_loop(workdir: str, steps: int, batch: int = 8) -> list[str]:
    """The bench MLP at a small batch (a few ms per step): are all traced steps written? Steps
    may be dropped only when the disk is slower than the data; a fast loop must not drop."""
    case = _cases()["mlp"]
    torch.manual_seed(0)
    model = case.make().to(DEVICE)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    data = [
        (
            torch.randn(batch, 1024, generator=g).to(DEVICE),
            torch.randint(0, 10, (batch,), generator=g).to(DEVICE),
        )
        for _ in range(steps)
    ]
    out = []
    for cfg, opts in (("a", None), ("i", {}), ("b", {"activations_every": 1})):
        path = os.path.join(workdir, f"fast-{cfg}.arrow")
        tr = dnntrace.enable(model, path, **opts) if opts is not None else None
        times = []
        for x, y in data:
            _sync()
            t0 = time.perf_counter()
            loss = case.loss(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            _sync()
            times.append(time.perf_counter() - t0)
        if tr is None:
            out.append(
                f"fast loop (bench MLP, batch {batch}, {steps} steps, {CONFIGS[cfg]}): median "
                f"step {statistics.median(times) * 1e3:.2f} ms"
            )
            continue
        st = tr.close()
        out.append(
            f"fast loop (bench MLP, batch {batch}, {steps} steps, {CONFIGS[cfg]}): median step "
            f"{statistics.median(times) * 1e3:.2f} ms; steps written {st['steps_written']}, "
            f"dropped {st['steps_dropped']}; {st['batches']} record batches; writer CPU "
            f"{st['writer_cpu_seconds'] / max(st['steps_written'], 1) * 1e3:.2f} ms/step"
        )
    return out


def demo_bytes_per_row(workdir: str, steps: int) -> tuple[float, int]:
    out = os.path.join(workdir, "demo.arrow")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "dnntrace.demo",
            "--out",
            out,
            "--steps",
            str(steps),
            "--mlp-steps",
            str(2 * steps),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    size, rows = 0, 0
    for p in (out, out.replace(".arrow", "-mlp.arrow")):
        tr = dnntrace.load(p)
        size += os.path.getsize(p)
        rows += tr.table.num_rows
    return size / rows, rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few steps, one round (CI smoke)")
    ap.add_argument("--models", default="mlp,cnn,transformer")
    ap.add_argument("--configs", default="".join(CONFIGS))
    ap.add_argument("--steps", type=int, default=20, help="steps per round (%(default)s)")
    ap.add_argument("--rounds", type=int, default=5, help="round-robin rounds (%(default)s)")
    ap.add_argument(
        "--warmup",
        type=int,
        default=10,
        help="steps run first in every round of every configuration and timed apart (the "
        "configuration's start: a tracer's first steps allocate its slots and banks), so the "
        "step times are a long run's; a multiple of 10 keeps the default set's 1-in-10 cadence "
        "(%(default)s)",
    )
    ap.add_argument("--demo-steps", type=int, default=200, help="0 to skip the demo trace size")
    ap.add_argument(
        "--fast-steps",
        type=int,
        default=300,
        help="steps of the small-batch MLP loop (steps written vs dropped); 0 to skip",
    )
    ap.add_argument("--out", default=None, help="folder for traces (default: a temp folder)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (%(default)s)")
    ap.add_argument(
        "--cpu-time",
        action="store_true",
        help="one torch thread; per step the training thread's CPU time plus the dnntrace writer "
        "thread's, instead of wall time: robust on a machine shared with other jobs",
    )
    args = ap.parse_args(argv)
    global DEVICE, CPU_TIME
    DEVICE = torch.device(args.device)
    CPU_TIME = args.cpu_time
    if CPU_TIME:
        torch.set_num_threads(1)
    if args.quick:
        args.steps, args.rounds, args.demo_steps, args.fast_steps = 10, 1, 0, 30
        args.warmup = min(args.warmup, 2)
    cases = _cases()
    models = [m for m in args.models.split(",") if m]
    for m in models:
        if m not in cases:
            ap.error(f"unknown model {m!r}; choose from {', '.join(cases)}")
    configs = [c for c in args.configs if c in CONFIGS]
    workdir = args.out or tempfile.mkdtemp(prefix="dnntrace-bench-")
    os.makedirs(workdir, exist_ok=True)
    warnings.filterwarnings("ignore", category=DeprecationWarning)

    torch.set_num_threads(max(1, torch.get_num_threads()))
    cpu = platform.processor() or platform.machine()
    print(
        f"dnntrace {dnntrace.__version__} ({os.path.dirname(dnntrace.__file__)}), torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores ({cpu}); "
        f"{args.steps} steps x {args.rounds} rounds after {args.warmup} start steps; "
        f"{'training + writer thread CPU time' if CPU_TIME else 'wall time'} per step; "
        f"traces in {workdir}"
    )
    bw = memory_bandwidth()
    print(f"memory bandwidth (torch.sum over 400 MB fp32): {bw / 1e9:.1f} GB/s")
    for m in models:
        check_tracing_is_transparent(cases[m], workdir)
    print("checked: one step gives the same loss and parameters with and without tracing")

    header = (
        "| model | config | step ms | ×(a) | added ms | start ms | MB read/step | floor ms "
        "| added/floor "
        "| B/tensor-step | MB from bank/step | whole bank MB | writer CPU ms/step | flush µs "
        "| dropped | hook µs/tensor |"
    )
    lines = [header, "|" + "---|" * 16]
    peers = []
    for m in models:
        res = bench_case(cases[m], configs, args.steps, args.rounds, workdir, args.warmup)
        base = statistics.median(res.round_means["a"]) if "a" in res.round_means else math.nan
        base_start = statistics.median(res.start_costs["a"]) if "a" in res.start_costs else 0.0
        added_of = {}
        for cfg in configs:
            med = statistics.median(res.round_means[cfg])
            added = med - base
            added_of[cfg] = added
            row = [
                m,
                f"{cfg} {CONFIGS[cfg]}",
                f"{med * 1e3:.1f}",
                f"{med / base:.3f}",
                f"{added * 1e3:+.1f}",
                # the start steps' time beyond as many steady steps, less the untraced run's
                f"{(statistics.median(res.start_costs[cfg]) - base_start) * 1e3:+.0f}"
                if args.warmup
                else "-",
            ]
            stub_of = {"h": "b", "j": "g"}  # a stubbed run's rows are counted in its real run's
            real = stub_of.get(cfg, cfg)
            if cfg in DNNTRACE_CONFIGS and cfg in res.read_bytes and real in configs:
                sts = res.stats[cfg]
                written = sum(s["steps_written"] for s in sts) or 1
                traced = written + sum(s["steps_dropped"] for s in sts)
                # duplicates merged instead of read (none to subtract when the ops are stubbed)
                saved = sum(s.get("bytes_read_saved", 0) for s in sts) / traced * (cfg == real)
                # every=10 traces one step in ten: its per-step floor is a tenth
                per_step = (res.read_bytes[cfg] - saved) / (10 if cfg == "c" else 1)
                floor = per_step / bw
                # the stubbed run's rows are empty: count its tensors in the default run's trace
                hooked = res.hooked[real] / (10 if cfg == "c" else 1)
                cpu = sum(s.get("writer_cpu_seconds", math.nan) for s in sts) / written
                moved = sum(s.get("bytes_to_host", math.nan) for s in sts) / written
                row += [
                    f"{per_step / 1e6:.2f}",
                    f"{floor * 1e3:.2f}",
                    f"{added / floor:.1f}" if floor > 0 and cfg == real else "-",
                    f"{res.disk_per_row[cfg]:.0f}",
                    f"{moved / 1e6:.3f}",
                    f"{statistics.median(s.get('bank_bytes', 0) for s in sts) / 1e6:.2f}",
                    f"{cpu * 1e3:.2f}",
                    f"{statistics.median(s['flush_us_median'] for s in sts):.0f}",
                    str(sum(s["steps_dropped"] for s in sts)),
                    # the training thread's share: the writer's CPU is counted in --cpu-time steps
                    f"{(added - (cpu if CPU_TIME else 0.0)) / hooked * 1e6:.1f}"
                    if cfg == "h" and hooked
                    else "-",
                ]
            else:
                row += ["-"] * 10
            lines.append("| " + " | ".join(row) + " |")
        for cfg in configs:
            rm = ", ".join(f"{t * 1e3:.0f}" for t in res.round_means[cfg])
            print(f"  {m} {cfg}: round means ms [{rm}]", flush=True)
        if {"h", "j"} <= added_of.keys() and {"b", "g"} <= res.hooked.keys():
            # the hooks alone: everything minus weights+grads, both with the op stubbed, over the
            # activation-side tensors (activations, their gradients) the hooks see per step
            n = res.hooked["b"] - res.hooked["g"]
            if n > 0:
                peers.append(
                    f"{m}: activation hooks, (h - j) / activation-side tensors = "
                    f"{(added_of['h'] - added_of['j']) / n * 1e6:.1f} us per tensor "
                    f"({n:.0f} tensors per step)"
                )
                if res.hook_times:
                    # the hooks timed where they run: the forward hooks (Python, timed around
                    # each call here) and the gradient hooks (C++, timed by the native table)
                    steps = args.rounds * args.steps
                    per_step = sum(res.hook_times) / steps  # the timed steps' calls only
                    calls = len(res.hook_times) / steps
                    sts = res.stats.get("h", [])
                    traced = args.rounds * (args.steps + args.warmup)  # the tracer's counts
                    g_calls = sum(s.get("grad_hook_calls", 0) for s in sts) / traced
                    g_step = sum(s.get("grad_hook_seconds", 0.0) for s in sts) / traced
                    peers.append(
                        f"{m}: hooks timed in place (h): forward median "
                        f"{statistics.median(res.hook_times) * 1e6:.1f} us per call, "
                        f"{per_step * 1e6:.0f} us per step over {calls:.1f} calls; gradient "
                        f"{g_step / max(g_calls, 1) * 1e6:.1f} us per call, {g_step * 1e6:.0f} "
                        f"us per step over {g_calls:.1f} calls; together "
                        f"{(per_step + g_step) / n * 1e6:.1f} us per activation-side tensor"
                    )
        if "g" in added_of:
            for peer in ("d", "e"):
                if peer in added_of and added_of[peer] > 0:
                    peers.append(
                        f"{m}: weights+grads added time / {CONFIGS[peer]}'s = "
                        f"{added_of['g'] / added_of[peer]:.3f}"
                    )
    print()
    print("\n".join(lines))
    if peers:
        print()
        print("\n".join(peers))
    if args.fast_steps:
        print()
        print("\n".join(fast_loop(workdir, args.fast_steps)))
    if args.demo_steps:
        per_row, rows = demo_bytes_per_row(workdir, args.demo_steps)
        print(
            f"\ndemo traces (python -m dnntrace.demo --steps {args.demo_steps}, k=6): "
            f"{per_row:.0f} B per tensor-step over {rows} rows"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
