"""Each tensor read once per step: a tensor that is the same data as one already summarised this
step gets the first one's statistics by a device-side row merge instead of a second read.

"The same data" means the same device address (storage + offset), dtype, shape, strides and
version counter, while the first tensor is still alive (a weak reference proves that its memory was
not freed and handed to another tensor). Modules that return their input (``nn.Identity``,
``Dropout`` at p = 0 or in eval mode), a root module returning its head's output, or a container
returning its last in-place activation all produce such tensors; in-place ops bump the version
counter, so a tensor modified since its first read is read again.

The merge adds the first row's state into the duplicate's row (counts and sums added, min/max
combined), which equals a separate read exactly, because the first row then holds that one tensor
only. Merges are queued and run before the step's rows are read (one native pass on a CPU bank,
index ops on a device); a row that is a pending merge source is merged out before anything else is
added to it. Activation gradients are recorded by C++ hooks (csrc/ops/grad_watch.h), which keep
the same table natively, with the TensorImpl's weak pointer as the liveness proof.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from ..stats.bank import StatBank


class ReadOnce:
    """Per-step table of the tensors read, and the pending row merges of their duplicates."""

    def __init__(self) -> None:
        self._seen: dict[tuple[Any, ...], tuple[weakref.ref[torch.Tensor], int]] = {}
        self._adds: dict[int, int] = {}  # slot -> tensors added into it this step
        self._pending: list[tuple[int, int]] = []  # (source slot, destination slot)
        self._sources: set[int] = set()
        self.reads_saved = 0
        self.bytes_saved = 0

    def accumulate(self, bank: StatBank, x: torch.Tensor, slot: int) -> None:
        """Adds ``x`` into ``slot``: by a row merge when it is a duplicate, else by reading it."""
        if slot in self._sources:
            self.apply(bank)  # the row is about to change: merge its pending copies out first
        if x.is_inference():
            # inference_mode tensors (Lightning's validation) have no version counter: read them
            bank.accumulate(x, slot)
            self._adds[slot] = self._adds.get(slot, 0) + 1
            return
        key = (x.data_ptr(), x.dtype, x.shape, x.stride(), x._version)
        hit = self._seen.get(key)
        if hit is not None and hit[0]() is not None and self._adds.get(hit[1]) == 1:
            src = hit[1]
            self._pending.append((src, slot))
            self._sources.add(src)
            self.reads_saved += 1
            self.bytes_saved += x.numel() * x.element_size()
        else:
            bank.accumulate(x, slot)
            self._seen[key] = (weakref.ref(x), slot)
        self._adds[slot] = self._adds.get(slot, 0) + 1

    def apply(self, bank: StatBank) -> None:
        """Runs the pending merges (device ops, no sync)."""
        if self._pending:
            src, dst = zip(*self._pending, strict=True)
            self._pending = []
            self._sources.clear()
            bank.merge_rows(src, dst)

    def end_step(self, bank: StatBank) -> None:
        self.apply(bank)
        self._seen.clear()
        self._adds.clear()
