"""Each tensor read once per step: a tensor that is the same data as one already summarised this
step gets the first one's statistics by a row merge instead of a second read.

"The same data" means the same device address (storage + offset), dtype, shape, strides and
version counter, while the first tensor is still alive (a weak pointer to its TensorImpl proves
that its memory was not freed and handed to another tensor). Modules that return their input
(``nn.Identity``, ``Dropout`` at p = 0 or in eval mode), a root module returning its head's output,
or a container returning its last in-place activation all produce such tensors; in-place ops bump
the version counter, so a tensor modified since its first read is read again.

The merge adds the first row's state into the duplicate's row (counts and sums added, min/max
combined), which equals a separate read exactly, because the first row then holds that one tensor
only. Merges are queued and run before the step's rows are read (one native pass on a CPU bank,
index ops on a device); a row that is a pending merge source is merged out before anything else is
added to it.

The table is native (``csrc/ops/grad_watch.h``): the forward hook hands each output to it in one
pybind11 call (``record``; the op ``dnntrace::record_output`` does the same by the table's id),
which reads it (or queues its merge) and registers a C++ hook for its gradient, so activation
gradients take the same table without running Python in the backward.
This class is the tracer's handle on it: the bank the rows go to, and what the native side
recorded since the last drain (rows touched, dtype/shape changes, errors).
"""

from __future__ import annotations

from typing import Any

import torch

from .. import _C
from ..stats.bank import StatBank


class ReadOnce:
    """Per-step table of the tensors read (activations and their gradients), native."""

    def __init__(self) -> None:
        self._watch: Any = _C.GradWatch()
        self.id: int = self._watch.id
        self._bank: StatBank | None = None
        # record(x, act_slot, grad_slot): the forward hook's call, bound to the native table (a
        # plain pybind11 call; the op dnntrace::record_output does the same by the table's id)
        self.record = self._watch.record

    # ---- the tracer ---------------------------------------------------------------------
    def set_bank(self, bank: StatBank, previous: StatBank | None = None) -> None:
        """Rows (and gradients arriving from now on) go to ``bank``. Atomically with the switch,
        the rows touched since the last drain are marked in ``previous``, the bank they were
        written to (a gradient hook may run on another thread until the switch), or in ``bank``
        when there is none (the first bank; a grown bank, which holds a copy of the old one)."""
        lay = bank.layout
        touched = self._watch.set_bank(bank.counts, bank.moments, lay.k, lay.emin, lay.octaves)
        if touched:
            (previous if previous is not None else bank).touched.update(touched)
        self._bank = bank

    def drain(self, bank: StatBank, end_step: bool = False) -> tuple[bool, list[Any], str]:
        """Runs the pending merges (and, at the step's end, clears the table), marks the rows the
        native side touched in ``bank``; returns (anything recorded, [(slot, dtype, shape)] of
        changed rows, error message or "")."""
        touched, meta, recorded, err = self._watch.drain(end_step)
        if touched:
            bank.touched.update(touched)
        return recorded, meta, err

    def set_enabled(self, on: bool) -> None:
        """Off: pending gradient hooks and new outputs are ignored (paused, disabled, closed)."""
        self._watch.set_enabled(on)

    def set_stub(self, on: bool) -> None:
        """Benchmarks only: everything but the statistics op."""
        self._watch.set_stub(on)

    @property
    def reads_saved(self) -> int:
        return int(self._watch.saved()[0])

    @property
    def bytes_saved(self) -> int:
        return int(self._watch.saved()[1])

    @property
    def grad_hook_time(self) -> tuple[int, float]:
        """(calls, seconds) of the C++ gradient hooks so far (their wall time in the backward)."""
        calls, ns = self._watch.hook_time()
        return int(calls), ns * 1e-9

    def close(self) -> None:
        self._watch.close()

    # ---- direct use (tests, tools): one tensor into one row of a bank --------------------
    def accumulate(self, bank: StatBank, x: torch.Tensor, slot: int) -> None:
        """Adds ``x`` into ``slot`` of ``bank``: by a row merge when it is a duplicate."""
        if bank is not self._bank:
            self.set_bank(bank)
        self.record(x, slot, -1)
        _, _, err = self.drain(bank)  # errors raise here (no tracer to report them later)
        if err:
            raise RuntimeError(err)

    def apply(self, bank: StatBank) -> None:
        """Runs the pending merges (device ops, no sync)."""
        self.drain(bank)

    def end_step(self, bank: StatBank) -> None:
        self.drain(bank, end_step=True)
