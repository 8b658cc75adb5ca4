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
        self.touched: set[int] = set()  # rows added to since the last reset (host-side record)
        self.ready: object = None  # CUDA: event after which the bank is reset (set by the writer)
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
            [x.detach() for x in xs],
            slots,
            self.counts,
            self.moments,
            self.layout,
            histogram=histogram,
        )

    def compact_bounds(self, rows: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Device-side first half of ``_C.compact_rows`` (torch ops, no sync): (header int64[m,16],
        moments float64[m,8], hist_offset int64[m], span length int64[m], largest bucket int64[m])
        of the rows ``rows``, each histogram reduced to the span holding its non-zero buckets."""
        counts = self.counts.index_select(0, rows)
        hist = counts[:, L.HEADER :]
        nz = (hist != 0).to(torch.int8)
        bins = hist.shape[1]
        first = nz.argmax(1)
        last = bins - 1 - nz.flip(1).argmax(1)
        has = nz.amax(1) > 0
        first = torch.where(has, first, 0)
        length = torch.where(has, last - first + 1, 0)
        biggest = hist.amax(1) if bins else torch.zeros_like(first)
        return counts[:, : L.HEADER], self.moments.index_select(0, rows), first, length, biggest

    def gather_spans(self, rows: Tensor, first: Tensor, length: Tensor, total: int) -> Tensor:
        """Second half: the spans back to back as int32 (the uint32 bits), ``total`` the sum of
        ``length`` (known on the host from the first half, so no sync)."""
        if total == 0:
            return torch.zeros(0, dtype=torch.int32, device=self.device)
        starts = torch.cumsum(length, 0) - length
        owner = torch.repeat_interleave(
            torch.arange(rows.numel(), device=self.device), length, output_size=total
        )
        pos = torch.arange(total, device=self.device) - starts[owner] + first[owner] + L.HEADER
        return self.counts[rows[owner], pos].to(torch.int32)

    def summary(self, slot: int) -> Summary:
        return Summary(
            self.counts[slot].cpu().numpy(), self.moments[slot].cpu().numpy(), self.layout
        )
