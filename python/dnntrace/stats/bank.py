"""The stat bank: a preallocated device state of many slots (counts + moments rows)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .. import ops
from ..sketch import layout as L
from ..sketch.layout import Layout
from ..sketch.summary import Summary


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
        self.touched: set[int] = set()  # rows added to since the last reset (host-side record)
        self.ready: Any = None  # CUDA: event after which the bank is reset (set by the writer)
        self.reset()

    @property
    def slots(self) -> int:
        return int(self.counts.shape[0])

    @property
    def bytes(self) -> int:
        return self.counts.numel() * 8 + self.moments.numel() * 8

    def reset(self) -> None:
        self.touched = set()
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

    def merge_rows(self, src: Sequence[int], dst: Sequence[int]) -> None:
        """Adds the state of row ``src[i]`` into row ``dst[i]`` for every i, as if the tensors
        summarised in ``src[i]`` had also been summarised in ``dst[i]`` (counts and sums added,
        min/max combined). Device ops only, no sync; ``dst`` may repeat and may equal ``src``."""
        if not src:
            return
        self.touched.update(dst)
        index = torch.tensor([*src, *dst], dtype=torch.long)
        if self.device.type == "cuda":
            index = index.pin_memory().to(self.device, non_blocking=True)
        s, d = index[: len(src)], index[len(src) :]
        counts = self.counts.index_select(0, s)
        moments = self.moments.index_select(0, s)
        lo = moments[:, L.MIN].clone()
        hi = moments[:, L.MAX].clone()
        moments[:, L.MIN : L.MAX + 1] = 0.0
        self.counts.index_add_(0, d, counts)
        self.moments.index_add_(0, d, moments)
        self.moments[:, L.MIN].scatter_reduce_(0, d, lo, "amin")
        self.moments[:, L.MAX].scatter_reduce_(0, d, hi, "amax")

    def accumulate(self, x: Tensor, slot: int, *, histogram: bool = True) -> None:
        self.touched.add(slot)
        ops.tensor_summary_out(
            x.detach(), slot, self.counts, self.moments, self.layout, histogram=histogram
        )

    def accumulate_many(
        self, xs: Sequence[Tensor], slots: Sequence[int], *, histogram: bool = True
    ) -> None:
        self.touched.update(slots)
        ops.multi_tensor_summary_out(
            [x.detach() if x.requires_grad else x for x in xs],
            slots,
            self.counts,
            self.moments,
            self.layout,
            histogram=histogram,
        )

    def compact_bounds(self, rows: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Device-side first half of the compaction the CUDA writer does (torch ops, no sync):
        (header int64[m,16], moments float64[m,8], bounds int64[2, m], hist) of the rows
        ``rows``; ``bounds`` holds each histogram's number of non-zero buckets and its largest
        bucket."""
        counts = self.counts.index_select(0, rows)
        hist = counts[:, L.HEADER :]
        bounds = torch.stack([(hist != 0).sum(1), hist.amax(1)])
        return counts[:, : L.HEADER], self.moments.index_select(0, rows), bounds, hist

    @staticmethod
    def gather_nonzero(hist: Tensor, total: int) -> tuple[Tensor, Tensor]:
        """Second half: the non-zero buckets of ``hist`` (the rows from ``compact_bounds``) in
        row-major order as (bucket index within the row, int16 bits of a uint16; count, int32
        bits of a uint32); ``total`` = their number, known on the host from the first half, so
        no sync (no ``nonzero``: each non-zero bucket is scattered to its rank)."""
        flat = hist.reshape(-1)
        mask = flat != 0
        dest = torch.where(mask, torch.cumsum(mask, 0) - 1, total)
        col = torch.arange(flat.numel(), device=flat.device) % max(hist.shape[1], 1)
        index = torch.zeros(total + 1, dtype=torch.int32, device=flat.device)
        index.scatter_(0, dest, col.to(torch.int32))
        count = torch.zeros(total + 1, dtype=torch.int32, device=flat.device)
        count.scatter_(0, dest, flat.to(torch.int32))
        return index[:total].to(torch.int16), count[:total]

    def summary(self, slot: int) -> Summary:
        return Summary(
            self.counts[slot].cpu().numpy(), self.moments[slot].cpu().numpy(), self.layout
        )
