"""The native gradient watch (csrc/ops/grad_watch.h): activation gradients recorded by C++ hooks.

Values are checked against captured gradients in the tracer's own loops (test_tracer_readonce,
test_tracer*); here, what only the native path can get wrong: a hook must never raise into the
user's backward, a closed or disabled tracer's pending hooks do nothing, and a bank swapped
between forward and backward receives the gradient.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import dnntrace
from dnntrace import _C
from dnntrace.capture.readonce import ReadOnce
from dnntrace.sketch import layout as L
from dnntrace.stats.bank import StatBank
from reference import tensor_summary_ref


def _set_bank(w: _C.GradWatch, bank: StatBank) -> None:
    lay = bank.layout
    torch.ops.dnntrace.watch_set_bank.default(
        w.id, bank.counts, bank.moments, lay.k, lay.emin, lay.octaves
    )


def test_gradient_lands_in_the_slot_and_equals_the_reference() -> None:
    w, bank = _C.GradWatch(), StatBank(4)
    _set_bank(w, bank)
    x = torch.randn(300, requires_grad=True)
    y = x * 3
    torch.ops.dnntrace.watch_grad.default(y, w.id, 2)
    g = torch.randn(300)
    y.backward(g)
    w.end_step()
    assert w.take_touched() == [2]
    assert w.take_recorded()
    assert w.take_meta() == [(2, "float32", [300])]
    want_c, want_m = tensor_summary_ref(
        g.double().numpy(), bank.layout.k, bank.layout.emin, bank.layout.octaves
    )
    np.testing.assert_array_equal(bank.counts[2].numpy(), want_c)
    np.testing.assert_allclose(bank.moments[2].numpy()[: L.MAX + 1], want_m[: L.MAX + 1])
    assert bank.counts[[0, 1, 3]].sum() == 0


def test_a_failing_hook_never_raises_into_backward() -> None:
    w, bank = _C.GradWatch(), StatBank(2)
    _set_bank(w, bank)
    x = torch.randn(5, requires_grad=True)
    y = x * 2
    torch.ops.dnntrace.watch_grad.default(y, w.id, 7)  # outside the bank's 2 rows
    y.sum().backward()  # does not raise
    assert x.grad is not None
    err = w.take_error()
    assert "outside the bank" in err
    z = x * 2  # the watch is disabled from now on
    torch.ops.dnntrace.watch_grad.default(z, w.id, 0)
    z.sum().backward()
    assert bank.counts.sum() == 0


def test_the_watch_follows_the_bank_it_is_given() -> None:
    """Forward with one bank, backward after a swap: the gradient goes to the bank held at the
    time the hook runs (the tracer swaps banks at each flush)."""
    w, first, second = _C.GradWatch(), StatBank(2), StatBank(2)
    _set_bank(w, first)
    x = torch.randn(10, requires_grad=True)
    y = x + 1
    torch.ops.dnntrace.watch_grad.default(y, w.id, 1)
    _set_bank(w, second)
    y.sum().backward()
    assert first.counts.sum() == 0
    assert second.counts[1, L.COUNT] == 10


def test_hooks_of_a_closed_tracer_do_nothing(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    tr = dnntrace.enable(model, tmp_path / "t.arrow", activations_every=1)
    out = model(torch.randn(3, 4))  # gradient hooks registered on the activations
    stats = tr.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out.sum().backward()  # after close: no error, nothing recorded
    assert not tr._read_once.drain(StatBank(1))[0]  # the hooks recorded nothing
    assert tr.stats()["steps_written"] == stats["steps_written"]


def test_pause_stops_the_hooks(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with dnntrace.enable(model, tmp_path / "t.arrow", activations_every=1) as tr:
        out = model(torch.randn(3, 4))
        with tr.paused():
            out.sum().backward()  # inside paused(): the activation gradients are not recorded
        opt.step()
    trace = dnntrace.load(tmp_path / "t.arrow")
    kinds = set(trace.table.column("kind").to_pylist())
    assert "activation" in kinds
    assert "activation_grad" not in kinds


@given(
    plan=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 5)), min_size=1, max_size=10),
    seed=st.integers(0, 2**16),
)
def test_device_op_merges_equal_the_native_pass(plan, seed) -> None:
    """The merges a CUDA bank runs as ATen ops (index_select / index_add_ / scatter_reduce),
    forced on a CPU bank, against the native pass: the same bits, for any mix of duplicates
    (tensor i of `plan` into slot j; a tensor seen again is merged, not read)."""
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(int(torch.randint(1, 300, (1,), generator=g)), generator=g) for _ in range(4)]
    out = []
    for device_ops in (False, True):
        table, bank = ReadOnce(), StatBank(6)
        table._watch.set_device_ops(device_ops)
        for i, slot in plan:
            table.accumulate(bank, xs[i], slot)
        table.end_step(bank)
        out.append((bank, table.reads_saved))
    (a, saved_a), (b, saved_b) = out
    assert saved_a == saved_b
    assert torch.equal(a.counts, b.counts)
    assert a.moments.numpy().tobytes() == b.moments.numpy().tobytes()


def test_a_bank_swap_hands_the_old_bank_its_rows_and_merges() -> None:
    """Rows written after the step's last drain (a gradient hook on another thread) belong to the
    bank they were written to: the swap marks them there and runs their pending merges there, so
    the writer compacts and resets them with that bank and nothing leaks into a later step."""
    table, old, new = ReadOnce(), StatBank(4), StatBank(4)
    table.set_bank(old)
    x = torch.randn(50, requires_grad=True)
    y = x * 2
    torch.ops.dnntrace.record_output.default(y, table.id, 0, 1)  # y into row 0, its grad into 1
    torch.ops.dnntrace.record_output.default(y, table.id, 2, -1)  # a duplicate: a pending merge
    y.sum().backward()  # the gradient hook writes row 1
    table.set_bank(new, previous=old)  # no drain in between
    assert old.touched == {0, 1, 2}
    assert new.touched == set()
    assert torch.equal(old.counts[2], old.counts[0])  # the merge ran in the old bank
    assert old.counts[1, L.COUNT] == 50
    assert new.counts.sum() == 0
    z = x * 3
    torch.ops.dnntrace.record_output.default(z, table.id, 3, -1)
    recorded, _, err = table.drain(new)
    assert recorded and not err
    assert new.touched == {3} and new.counts[3, L.COUNT] == 50


def test_record_by_pybind_equals_the_op() -> None:
    """GradWatch.record (the forward hook's call) and the op dnntrace::record_output leave the
    same bank: activation read once, duplicate merged, gradient hooked."""
    banks = []
    x0 = torch.randn(64, 33)
    g = torch.randn(64, 33)
    for via_op in (False, True):
        w, bank = _C.GradWatch(), StatBank(4)
        _set_bank(w, bank)
        x = x0.clone().requires_grad_(True)
        y = x * 2
        for act, grad in ((0, 1), (2, -1)):  # the second is the same data: a merge
            if via_op:
                torch.ops.dnntrace.record_output.default(y, w.id, act, grad)
            else:
                w.record(y, act, grad)
        y.backward(g)
        w.end_step()
        assert sorted(set(w.take_touched())) == [0, 1, 2]
        assert w.take_error() == ""
        banks.append(bank)
    assert torch.equal(banks[0].counts, banks[1].counts)
    assert torch.equal(banks[0].moments, banks[1].moments)
    bank = banks[0]
    assert torch.equal(bank.counts[0], bank.counts[2])  # the duplicate's row is the first's
    want_c, _ = tensor_summary_ref(
        g.double().numpy().ravel(), bank.layout.k, bank.layout.emin, bank.layout.octaves
    )
    np.testing.assert_array_equal(bank.counts[1].numpy(), want_c)


def test_record_skips_other_devices_and_rejects_non_tensors() -> None:
    w, bank = _C.GradWatch(), StatBank(2)
    _set_bank(w, bank)
    w.record(torch.empty(8, device="meta", requires_grad=True), 0, 1)  # not the bank's device
    w.end_step()
    assert w.take_touched() == [] and w.take_error() == ""
    assert bank.counts.sum() == 0
    with pytest.raises(TypeError, match="not a tensor"):
        w.record(np.zeros(3), 0, -1)


def test_the_gradient_hooks_are_counted_and_timed(tmp_path: Path) -> None:
    """tracer.stats() counts every C++ gradient hook call (one per activation-gradient row call
    in the trace) and their time."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "t.arrow"
    with dnntrace.enable(model, path, activations_every=1) as tr:
        for _ in range(3):
            loss = model(torch.randn(5, 8)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    st = tr.stats()
    t = dnntrace.load(path).table
    kinds = np.array(t.column("kind").to_pylist())
    calls = int(np.asarray(t.column("calls"))[kinds == "activation_grad"].sum())
    assert calls > 0
    assert st["grad_hook_calls"] == calls
    assert st["grad_hook_seconds"] > 0
