"""Each tensor is read once per step: duplicates get the first read's statistics by a row merge,
and every row still equals what a separate read of its tensor gives (checked against tensors
captured by plain torch hooks)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from _capture_support import Recorder, assert_row_matches, load_rows, one_row
from torch import nn

import dnntrace
from dnntrace.capture.readonce import ReadOnce
from dnntrace.stats.bank import StatBank


class Half(nn.Module):
    """A view of its input that is not the same data (other shape, same storage and offset)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, : x.shape[1] // 2]


class Transposed(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.t()


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.drop = nn.Dropout(p=0.0)  # returns its input
        self.ident = nn.Identity()  # returns its input
        self.block = nn.Sequential(nn.Linear(16, 16), nn.ReLU(inplace=True))
        self.part = Half()
        self.tr = Transposed()
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ident(self.drop(self.fc1(x)))
        h = self.block(h)
        self.part(h)
        self.tr(h)
        return self.head(h)  # the root's output is the head's output


def test_duplicates_are_merged_and_rows_equal_separate_reads(trace_path: Path) -> None:
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    steps = 3
    # the no-op modules are traced on purpose (the default set leaves them out)
    mods = ["", "fc1", "drop", "ident", "block.*", "part", "tr", "head"]
    with dnntrace.enable(model, trace_path, optimizer=opt, modules=mods, activations_every=1) as tr:
        rec = Recorder(model, opt, [n for n, _ in tr._modules])
        for _ in range(steps):
            opt.zero_grad()
            x = torch.randn(6, 8, generator=g)
            if _ == steps - 1:  # NaN in the last step's rows: merged NaN counts are checked too
                x[0, 0] = float("nan")
            out = model(x)
            torch.nan_to_num(out).square().mean().backward()
            opt.step()
        rec.close()
    stats = tr.stats()
    # per step: drop, ident and the root (= head's output) in the forward, and their output
    # gradients in the backward
    assert stats["reads_saved"] == 2 * 3 * steps
    assert stats["bytes_read_saved"] > 0
    df = load_rows(trace_path)
    for step in range(steps):
        at = df[df["step"] == step]
        for (mod, pos), ts in rec.act[step].items():
            assert_row_matches(one_row(at, module=mod, kind="activation", tensor=pos), ts)
        for (mod, pos), ts in rec.act_grad[step].items():
            assert_row_matches(one_row(at, module=mod, kind="activation_grad", tensor=pos), ts)
        # histograms too: the duplicate's buckets equal the first read's bucket for bucket
        a = one_row(at, module="fc1", kind="activation", tensor="")
        for dup in ("drop", "ident"):
            b = one_row(at, module=dup, kind="activation", tensor="")
            assert list(a["hist_bucket"]) == list(b["hist_bucket"])
            assert list(a["hist"]) == list(b["hist"]) and len(a["hist"]) > 0
        # in-place ReLU: block.0's row holds the values before the ReLU, not after
        pre = one_row(at, module="block.0", kind="activation", tensor="")
        post = one_row(at, module="block.1", kind="activation", tensor="")
        if step < steps - 1:
            assert pre["negative_count"] > 0 and post["negative_count"] == 0


def test_merge_rows_equals_separate_reads() -> None:
    torch.manual_seed(0)
    xs = [torch.randn(n) * s for n, s in ((1000, 1.0), (37, 1e-3), (1, 5.0), (500, 100.0))]
    xs[1][3] = float("inf")
    xs[2][0] = float("nan")
    merged, direct = StatBank(6), StatBank(6)
    # rows 4 and 5 already hold other data; row 0 is merged into itself (a module called twice
    # on the same tensor); row 5 receives two merges
    for bank in (merged, direct):
        for slot, x in enumerate(xs):
            bank.accumulate(x, slot)
        bank.accumulate(xs[3] * -2, 4)
        bank.accumulate(xs[0] + 1, 5)
    merged.merge_rows([0, 1, 2, 3, 0], [0, 4, 5, 5, 4])
    for src, dst in ((0, 0), (1, 4), (2, 5), (3, 5), (0, 4)):
        direct.accumulate(xs[src], dst)
    assert torch.equal(merged.counts, direct.counts)
    for s in range(6):
        a, b = merged.summary(s), direct.summary(s)
        assert (a.min, a.max) == (b.min, b.max) or (np.isnan(a.min) and np.isnan(b.min))
        np.testing.assert_allclose(a.sum, b.sum, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(a.sumsq, b.sumsq, rtol=1e-12, atol=1e-12)


def test_not_the_same_data_is_read_again() -> None:
    bank, ro = StatBank(8), ReadOnce()
    x = torch.randn(64, 4)
    ro.accumulate(bank, x, 0)
    ro.accumulate(bank, x, 1)  # same data: merged
    ro.accumulate(bank, x[:32], 2)  # same storage and offset, other shape: read
    ro.accumulate(bank, x.t(), 3)  # other strides: read
    ro.accumulate(bank, x.view(-1), 4)  # other shape: read
    x.mul_(2)  # in place: the version counter moves
    ro.accumulate(bank, x, 5)  # read again
    ro.accumulate(bank, x, 6)  # merged from row 5
    ro.accumulate(bank, x, 0)  # merged from row 5 into a row that holds another tensor
    assert ro.reads_saved == 3
    ro.end_step(bank)
    direct = StatBank(8)
    y = x / 2
    for slot, t in ((0, y), (1, y), (2, y[:32]), (3, y.t()), (4, y.view(-1)), (5, x), (6, x)):
        direct.accumulate(t, slot)
    direct.accumulate(x, 0)
    assert torch.equal(bank.counts, direct.counts)
    # compare the compensated totals, not the raw (sum, compensation) pairs: a merge adds the
    # first read's pair where a second read would have produced its own rounding residue
    for s in range(7):
        a, b = bank.summary(s), direct.summary(s)
        assert (a.min, a.max) == (b.min, b.max)
        np.testing.assert_allclose(a.sum, b.sum, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(a.sumsq, b.sumsq, rtol=1e-12, atol=1e-12)


def test_high_rank_tensors_are_told_apart_by_every_dim() -> None:
    """Sizes and strides of six dimensions (past what the native key holds inline): a tensor
    that differs from a read one only in its last stride is read, an identical one merged."""
    bank, ro = StatBank(4), ReadOnce()
    x = torch.randn(2, 3, 2, 2, 3, 4)
    ro.accumulate(bank, x, 0)
    ro.accumulate(bank, x, 1)  # same data: merged
    y = x.transpose(4, 5)  # same address and numel, other sizes and strides: read
    ro.accumulate(bank, y, 2)
    z = torch.as_strided(x, x.shape, x.stride()[:5] + (0,))  # only the last stride differs
    ro.accumulate(bank, z, 3)
    assert ro.reads_saved == 1
    ro.end_step(bank)
    direct = StatBank(4)
    for slot, t in ((0, x), (1, x), (2, y), (3, z)):
        direct.accumulate(t, slot)
    assert torch.equal(bank.counts, direct.counts)


def test_freed_memory_reused_by_another_tensor_is_read() -> None:
    """A dead first tensor proves nothing: its address may now hold another tensor."""
    bank, ro = StatBank(4), ReadOnce()
    ptrs = set()
    for slot in range(4):
        x = torch.full((4096,), float(slot + 1))
        ptrs.add(x.data_ptr())
        ro.accumulate(bank, x, slot)
        del x
    assert ro.reads_saved == 0
    sums = bank.moments[:, 0] + bank.moments[:, 1]
    assert sums.tolist() == [4096.0 * (s + 1) for s in range(4)]
