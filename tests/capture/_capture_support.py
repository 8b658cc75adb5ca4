"""Tracer test helpers: small real models, a plain-torch recorder, trace row checks."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from _rows import load_rows  # noqa: F401 (re-exported to the capture tests)


class MLP(nn.Sequential):
    def __init__(self, n_in: int = 12, width: int = 32, n_out: int = 5) -> None:
        super().__init__(
            nn.Linear(n_in, width), nn.ReLU(), nn.Linear(width, width), nn.Tanh(),
            nn.Linear(width, n_out),
        )  # fmt: skip


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn1(self.conv1(x)))
        h = self.act(self.conv2(h))  # act is called twice per forward
        return self.fc(self.pool(h).flatten(1))


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 50, d: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layer = nn.TransformerEncoderLayer(d, 4, 64, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(self.embed(idx)))


def mlp_batch(g: torch.Generator, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 12, generator=g), torch.randint(0, 5, (n,), generator=g)


def cnn_batch(g: torch.Generator, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def tf_batch(g: torch.Generator, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randint(0, 50, (n, 10), generator=g), torch.randint(0, 50, (n, 10), generator=g)


def ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out.flatten(0, -2).float(), y.flatten())


class Recorder:
    """What the tracer should record, captured with plain torch hooks.

    ``act[step][(module, pos)]`` / ``act_grad[...]``: lists of tensors seen in the step;
    ``weight_grad[step][(module, pname)]``: the grad the optimizer saw (its pre-step hook);
    ``weight[step][(module, pname)]``: the value after the optimizer step.
    """

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, modules: list[str]) -> None:
        self.step = 0
        self.act: dict[int, dict[tuple[str, str], list[torch.Tensor]]] = defaultdict(
            lambda: defaultdict(list)
        )
        self.act_grad: dict[int, dict[tuple[str, str], list[torch.Tensor]]] = defaultdict(
            lambda: defaultdict(list)
        )
        self.weight: dict[int, dict[tuple[str, str], torch.Tensor]] = defaultdict(dict)
        self.weight_grad: dict[int, dict[tuple[str, str], torch.Tensor]] = defaultdict(dict)
        self._handles: list[Any] = []
        self._params = [
            (mn, pn, p)
            for mn, m in model.named_modules()
            for pn, p in m.named_parameters(recurse=False)
        ]
        named = dict(model.named_modules())
        for name in modules:
            self._handles.append(named[name].register_forward_hook(self._fwd(name)))
        self._handles.append(opt.register_step_pre_hook(self._pre))
        self._handles.append(opt.register_step_post_hook(self._post))

    def _fwd(self, name: str):  # type: ignore[no-untyped-def]
        def hook(mod: nn.Module, inp: Any, out: Any) -> None:
            from dnntrace.capture.selection import iter_float_tensors

            for pos, t in iter_float_tensors(out):
                self.act[self.step][(name, pos)].append(t.detach().clone())
                if t.requires_grad:
                    step = self.step
                    t.register_hook(
                        lambda g, k=(name, pos), s=step: self.act_grad[s][k].append(g.clone())
                    )

        return hook

    def _pre(self, opt: Any, args: Any, kwargs: Any) -> None:
        for mn, pn, p in self._params:
            if p.grad is not None:
                self.weight_grad[self.step][(mn, pn)] = p.grad.detach().clone()

    def _post(self, opt: Any, args: Any, kwargs: Any) -> None:
        for mn, pn, p in self._params:
            self.weight[self.step][(mn, pn)] = p.detach().clone()
        self.step += 1

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def one_row(df: pd.DataFrame, **where: Any) -> pd.Series:
    sel = df
    for k, v in where.items():
        sel = sel[sel[k] == v]
    assert len(sel) == 1, f"expected one row for {where}, got {len(sel)}"
    return sel.iloc[0]


def assert_row_matches(row: pd.Series, tensors: list[torch.Tensor] | torch.Tensor) -> None:
    """count, nan/zero/negative counts, min, max, sum and sumsq of a row vs plain numpy."""
    ts = [tensors] if isinstance(tensors, torch.Tensor) else tensors
    x = np.concatenate([t.detach().double().reshape(-1).numpy() for t in ts])
    fin = x[np.isfinite(x)]
    where = f"{row['module']}/{row['kind']}/{row['tensor']} step {row['step']}"
    assert row["calls"] == len(ts), where
    assert row["numel"] == ts[-1].numel(), where
    assert list(row["shape"]) == list(ts[-1].shape), where
    assert row["count"] == x.size, where
    assert row["nan_count"] == np.isnan(x).sum(), where
    assert row["posinf_count"] == (x == np.inf).sum(), where
    assert row["neginf_count"] == (x == -np.inf).sum(), where
    assert row["zero_count"] == (x == 0).sum(), where
    assert row["negative_count"] == (x < 0).sum(), where
    if fin.size:
        assert row["min"] == fin.min(), where
        assert row["max"] == fin.max(), where
        np.testing.assert_allclose(row["sum"], fin.sum(), rtol=1e-9, atol=1e-9, err_msg=where)
        np.testing.assert_allclose(row["sumsq"], (fin * fin).sum(), rtol=1e-9, err_msg=where)
    else:
        assert math.isnan(row["min"]) and math.isnan(row["max"]), where


def assert_quantiles_close(summary: Any, x: np.ndarray, k: int = 6) -> None:
    """Summary quantiles within the stated relative bound 2^-(k+1) of numpy's (inverted CDF)."""
    x = x[~np.isnan(x)]
    qs = np.array([0.0, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0])
    got = np.atleast_1d(summary.quantile(qs))
    want = np.quantile(x, qs, method="inverted_cdf")
    bound = 2.0 ** -(k + 1)
    np.testing.assert_array_less(np.abs(got - want), bound * np.abs(want) + 1e-30)


@contextmanager
def global_hook_counts() -> Iterator[dict[str, int]]:
    """Sizes of torch's global optimizer hook tables before (yielded) — compare after."""
    import torch.optim.optimizer as om

    yield {
        "pre": len(om._global_optimizer_pre_hooks),
        "post": len(om._global_optimizer_post_hooks),
    }


def train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    batch: Any,
    steps: int,
    *,
    seed: int = 0,
    accumulate: int = 1,
) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        for _ in range(accumulate):
            x, y = batch(g)
            loss = ce(model(x), y) / accumulate
            loss.backward()
            losses.append(loss.item())
        opt.step()
    return losses
