"""The stat bank: a preallocated device state of many slots (counts + moments rows)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .. import ops
from ..storage import layout as L
from ..storage.layout import Layout
from ..storage.summary import Summary


class StatBank:
    """``slots`` rows of statistics on ``device``; ``bytes`` states its size.

    ``accumulate(x, slot)`` and ``accumulate_many(xs, slots)`` add into rows without allocating
    or synchronising; ``reset()`` clears every row; ``summary(slot)`` reads one row (syncs).
    """

    def __init__(
        self, slots: int, layout: Layout | None = None, device: torch.device | str = "cpu"
    ) -> None:
        if slots < 1:
            raise ValueError(f"a stat bank needs at least one slot, got {slots}")
        self.layout = layout or Layout()
        self.device = torch.device(device)
        self.counts = torch.zeros((slots, self.layout.width), dtype=torch.int64, device=self.device)
        self.moments = torch.zeros((slots, L.NUM_MOMENTS), dtype=torch.float64, device=self.device)
        self.reset()

    @property
    def slots(self) -> int:
        return int(self.counts.shape[0])

    @property
    def bytes(self) -> int:
        return self.counts.numel() * 8 + self.moments.numel() * 8

    def reset(self) -> None:
        self.counts.zero_()
        self.moments.zero_()
        self.moments[:, L.MIN] = math.inf
        self.moments[:, L.MAX] = -math.inf

    def reset_rows(self, rows: Tensor) -> None:
        """Clears the rows given by an int64 index tensor on the bank's device (no sync)."""
        if rows.numel() == 0:
            return
        self.counts.index_fill_(0, rows, 0)
        empty = torch.zeros((1, L.NUM_MOMENTS), dtype=torch.float64, device=self.device)
        empty[0, L.MIN] = math.inf
        empty[0, L.MAX] = -math.inf
        self.moments.index_copy_(0, rows, empty.expand(rows.numel(), L.NUM_MOMENTS))

    def accumulate(self, x: Tensor, slot: int, *, histogram: bool = True) -> None:
        ops.tensor_summary_out(
            x.detach(), slot, self.counts, self.moments, self.layout, histogram=histogram
        )

    def accumulate_many(
        self, xs: Sequence[Tensor], slots: Sequence[int], *, histogram: bool = True
    ) -> None:
        ops.multi_tensor_summary_out(
            [x.detach() for x in xs],
            slots,
            self.counts,
            self.moments,
            self.layout,
            histogram=histogram,
        )

    def summary(self, slot: int) -> Summary:
        return Summary(
            self.counts[slot].cpu().numpy(), self.moments[slot].cpu().numpy(), self.layout
        )
