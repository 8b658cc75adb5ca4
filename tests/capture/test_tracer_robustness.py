"""Tracing never breaks training: NaN/Inf, internal errors, a full disk, a slow writer, kill -9."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch
from _capture_support import MLP, Recorder, assert_row_matches, load_rows, mlp_batch, one_row

import dnntrace
from dnntrace.capture.pipeline import Pipeline
from dnntrace.capture.tracer import TracingError
from dnntrace.stats.bank import StatBank


def _loop(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, poison=None):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(0)
    losses = []
    for step in range(steps):
        x, y = mlp_batch(g)
        if poison is not None:
            x = poison(step, x)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_nan_and_inf_are_counted_and_located(trace_path: Path) -> None:
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def poison(step: int, x: torch.Tensor) -> torch.Tensor:
        if step == 2:
            x = x.clone()
            x[0, 0] = float("nan")
            x[1, 0] = float("inf")
        return x

    with dnntrace.enable(model, trace_path, optimizer=opt, activations_every=1) as tr:
        rec = Recorder(model, opt, [n for n, _ in tr._modules])
        losses = _loop(model, opt, 4, poison)
        rec.close()
    assert np.isfinite(losses[:2]).all() and np.isnan(losses[2])  # training went on
    df = load_rows(trace_path)
    assert sorted(set(df["step"])) == [0, 1, 2, 3]
    first = one_row(df, step=2, module="0", kind="activation")
    assert first["nan_count"] > 0
    for (mod, pos), ts in rec.act[2].items():
        assert_row_matches(one_row(df, step=2, module=mod, kind="activation", tensor=pos), ts)
    clean = df[df["step"] < 2]
    assert (clean[["nan_count", "posinf_count", "neginf_count"]] == 0).all().all()
    anomalies = dnntrace.load(trace_path).anomalies()
    assert anomalies[0]["step"] == 2
    act = next(a for a in anomalies if a["kind"] == "activation")
    assert (act["step"], act["module"]) == (2, "0")
    assert act["nan_count"] == first["nan_count"]
    r = subprocess.run(
        [sys.executable, "-m", "dnntrace.cli", "info", str(trace_path)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert any("step" in ln and "activation" in ln and " 0 " in ln for ln in r.stdout.splitlines())


def test_inf_planted_in_a_weight(trace_path: Path) -> None:
    torch.manual_seed(0)
    model = MLP()
    g = torch.Generator().manual_seed(0)
    with dnntrace.enable(model, trace_path) as tr:  # no optimizer: steps end with tr.step()
        for step in range(3):
            if step == 1:
                with torch.no_grad():
                    model[2].weight[3, 4] = float("inf")
            x, y = mlp_batch(g)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            tr.step()
    df = load_rows(trace_path)
    w0 = one_row(df, step=0, module="2", kind="weight", tensor="weight")
    assert (w0["posinf_count"], w0["nan_count"]) == (0, 0)
    w = one_row(df, step=1, module="2", kind="weight", tensor="weight")
    assert (w["posinf_count"], w["nan_count"], w["count"]) == (1, 0, 32 * 32)
    ref = model[2].weight.detach().double()
    assert w["max"] == ref[torch.isfinite(ref)].max().item()  # min/max over finite values
    a = [x for x in dnntrace.load(trace_path).anomalies() if x["kind"] == "weight"][0]
    assert (a["step"], a["module"], a["inf_count"]) == (1, "2", 1)


def test_internal_error_disables_tracing_with_one_warning(
    trace_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with dnntrace.enable(model, trace_path, activations_every=1) as tr:
        _loop(model, opt, 2)

        def broken(self: StatBank, xs: object, slots: object, **kw: object) -> None:
            raise RuntimeError("injected")

        monkeypatch.setattr(StatBank, "accumulate_many", broken)  # weights and weight grads
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            losses = _loop(model, opt, 3)
    assert np.isfinite(losses).all()
    assert [w.category for w in caught] == [RuntimeWarning], [str(w.message) for w in caught]
    assert "tracing disabled" in str(caught[0].message) and "injected" in str(caught[0].message)
    assert "injected" in tr.stats()["disabled"]
    assert not any(m._forward_hooks for m in model.modules())
    assert dnntrace.load(trace_path).steps.tolist() == [0, 1]


def test_internal_error_raises_when_strict(
    trace_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def broken(self: StatBank, xs: object, slots: object, **kw: object) -> None:
        raise RuntimeError("injected")

    monkeypatch.setattr(StatBank, "accumulate_many", broken)
    with dnntrace.enable(model, trace_path, strict=True):
        with pytest.raises(TracingError, match="injected"):
            _loop(model, opt, 1)
    assert issubclass(TracingError, RuntimeError)


def _break_native_table(tr: dnntrace.Tracer, model: torch.nn.Module) -> None:
    """From the next forward on, the native table (activations, their gradients) writes into a
    one-row bank: its first output's row is outside it, an error inside the C++ op."""
    tiny = StatBank(1, tr.layout)
    model[0].register_forward_pre_hook(lambda m, a: tr._read_once.set_bank(tiny))


def test_native_error_disables_tracing_with_one_warning(trace_path: Path) -> None:
    """An error inside the native recording (the forward's op or a gradient's C++ hook) never
    raises into the forward or the backward: the tracer reports it once, at the step's end."""
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with dnntrace.enable(model, trace_path, activations_every=1) as tr:
        _loop(model, opt, 2)
        _break_native_table(tr, model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            losses = _loop(model, opt, 3)
    assert np.isfinite(losses).all()
    assert [w.category for w in caught] == [RuntimeWarning], [str(w.message) for w in caught]
    assert "tracing disabled" in str(caught[0].message)
    assert "outside the bank" in str(caught[0].message)
    assert "outside the bank" in tr.stats()["disabled"]
    assert dnntrace.load(trace_path).steps.tolist() == [0, 1]


def test_native_error_raises_at_the_step_end_when_strict(trace_path: Path) -> None:
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with dnntrace.enable(model, trace_path, activations_every=1, strict=True) as tr:
        _loop(model, opt, 1)
        _break_native_table(tr, model)
        with pytest.raises(TracingError, match="outside the bank"):
            _loop(model, opt, 2)


# TraceWriter.close() raises ENOSPC from the IPC writer's close before closing the file, so the
# file object leaks (a ResourceWarning when collected, in whichever test runs then): the tests
# close it by hand.
_DEV_FULL_LEAK = pytest.mark.filterwarnings(
    "ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning"
)


def _enable_dev_full(model: torch.nn.Module):  # type: ignore[no-untyped-def]
    """enable() on /dev/full; a constructor that raises leaks its file, collected here."""
    raised = None
    try:
        return dnntrace.enable(model, "/dev/full")
    except OSError as e:
        raised = f"{type(e).__name__}: {e}"
    gc.collect()
    pytest.fail(f"dnntrace.enable raised on a full disk instead of warning: {raised}")


@_DEV_FULL_LEAK
def test_disk_full_warns_once_and_training_continues() -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("/dev/full not available")
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr = _enable_dev_full(model)
        losses = _loop(model, opt, 4)
        stats = tr.close()
    tr._writer._file.close()  # see _DEV_FULL_LEAK
    assert np.isfinite(losses).all()
    assert stats["steps_written"] == 0
    msgs = [f"{w.category.__name__}: {w.message}" for w in caught]
    assert len(caught) == 1 and caught[0].category is RuntimeWarning, msgs
    assert "No space left" in str(caught[0].message)
    assert stats["steps_written"] + stats["steps_dropped"] == 4


@pytest.mark.filterwarnings("ignore:dnntrace. could not close /dev/full:UserWarning")
@_DEV_FULL_LEAK
def test_disk_full_pytest_warns() -> None:
    """The part of the disk-full contract that holds today: training continues, a warning."""
    if not os.path.exists("/dev/full"):
        pytest.skip("/dev/full not available")
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.warns(RuntimeWarning, match="stopped writing /dev/full"):
        tr = _enable_dev_full(model)
        losses = _loop(model, opt, 3)
        tr.close()
    tr._writer._file.close()  # see _DEV_FULL_LEAK
    assert np.isfinite(losses).all()


def test_slow_writer_drops_steps_and_memory_is_bounded(
    trace_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A writer that cannot keep up (a disk slower than the data), made deterministic: it is held
    # until the loop ends, so the pool (host_buffers=2) runs out at the third step whatever the
    # machine's speed, and every later step is dropped and counted, never waited for.
    release = threading.Event()
    real_compact = Pipeline._compact

    def held_compact(self: Pipeline, job: Any) -> Any:
        release.wait(60)
        return real_compact(self, job)

    monkeypatch.setattr(Pipeline, "_compact", held_compact)
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    steps = 40
    mem = []
    with dnntrace.enable(model, trace_path, host_buffers=2) as tr:
        g = torch.Generator().manual_seed(0)
        for _ in range(steps):
            x, y = mlp_batch(g)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            mem.append(tr.stats()["memory_bytes"]["host"])  # the banks (not the writer's window)
        release.set()
    stats = tr.stats()
    assert stats["steps_dropped"] > 0
    assert stats["steps_written"] + stats["steps_dropped"] == steps
    bank = tr._pipe.bank.bytes
    assert max(mem) <= (1 + 2) * bank  # the current bank + host_buffers, never more
    trace = dnntrace.load(trace_path)
    assert len(trace.steps) == stats["steps_written"]
    assert trace.steps[0] == 0 and (np.diff(trace.steps) > 0).all()


_KILL_SCRIPT = """
import sys, time, torch, dnntrace
torch.manual_seed(0)
m = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
opt = torch.optim.SGD(m.parameters(), lr=0.01)
# enough host buffers that a busy machine does not make the writer drop steps
tr = dnntrace.enable(m, sys.argv[1], host_buffers=64)
while True:
    loss = m(torch.randn(8, 16)).pow(2).mean()
    opt.zero_grad(); loss.backward(); opt.step()
    time.sleep(0.02)
"""


def test_kill_9_leaves_every_flushed_batch_readable(tmp_path: Path) -> None:
    path = tmp_path / "killed.arrow"
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_KILL_SCRIPT), str(path)],
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        seen = 0
        while time.monotonic() < deadline and proc.poll() is None:
            if path.exists():
                try:
                    seen = len(dnntrace.load(path).steps)
                except dnntrace.TraceError:
                    seen = 0  # the header is not there yet
            if seen >= 5:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert seen >= 5, "the traced subprocess did not write 5 steps in 60 s"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if proc.stderr:
            proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    trace = dnntrace.load(path)
    steps = trace.steps.tolist()
    assert len(steps) >= seen
    assert isinstance(trace.truncated, bool)
    assert steps == list(range(len(steps)))
    # plain pyarrow, batch by batch, up to the first torn message
    batches = []
    with pa.memory_map(str(path)) as src:
        reader = pa.ipc.open_stream(src)
        while True:
            try:
                batches.append(reader.read_next_batch())
            except StopIteration:
                break
            except (pa.ArrowInvalid, OSError):
                break  # a torn last message
    table = pa.Table.from_batches(batches, schema=reader.schema)
    assert table.num_rows == trace.table.num_rows
    assert sorted(set(table.column("step").to_pylist())) == steps
