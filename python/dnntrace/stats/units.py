"""Per-unit statistics on the device: accumulators, their vectors, top-k activating inputs.

A *unit* is one index of an activation's unit axis ``dim`` (a neuron of a Linear output, a
channel of a conv output, a head group): ``x`` is read as ``(outer, units, inner)`` around ``dim``.
Everything here adds into preallocated device tensors without synchronising; the CPU runs the
fused native kernels of ``dnntrace.ops_units`` (one read of ``x``), other devices a short sequence
of torch reductions with the same results.

Device memory per unit axis of ``U`` units, with top-``k``: activation accumulator ``6·U`` float64,
gradient accumulator ``5·U`` float64, top-k ``3·U·k`` float32 (values, sample ids, steps):
``(88 + 12·k)·U`` bytes, plus the step's recorded vectors (``≤ 12·U`` float32 until flushed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import ops_units

ACT_COLS = 6  # count sum sumsq firing saturated max
GRAD_COLS = 5  # rows count g^2 x*g |x*g|
NO_BOUND = math.nan  # a saturation bound that never matches

# Saturation of the outputs of bounded nonlinearities (configurable by the caller); the trace's
# definition is dnntrace.storage.kinds (SATURATION_MARGIN, NONLINEARITIES), which capture passes
# in; tests/storage/test_kinds.py checks these defaults against it.
TANH_SATURATION = 0.97  # |tanh(x)| >= 0.97
SIGMOID_SATURATION = (0.03, 0.97)  # sigmoid(x) <= 0.03 or >= 0.97


def saturation_bounds(
    nonlinearity: str | None,
    *,
    pre_activation: bool,
    tanh: float = TANH_SATURATION,
    sigmoid: tuple[float, float] = SIGMOID_SATURATION,
) -> tuple[float, float]:
    """``(lo, hi)``: a value is saturated when ``x <= lo or x >= hi``.

    ``nonlinearity`` is tanh-like (``"tanh"``, ``"hardtanh"``, ``"softsign"``: outputs in
    [-1, 1], saturated at ``|y| >= tanh``), sigmoid-like (``"sigmoid"``, ``"hardsigmoid"``:
    outputs in [0, 1], saturated at ``y <= sigmoid[0]`` or ``y >= sigmoid[1]``), ``"relu"``
    (ReLU family: saturated means the output is exactly 0), ``"relu6"`` or None (never
    saturated). ``pre_activation`` maps the bounds through the inverse nonlinearity, for the
    input of the nonlinearity (a Linear followed by it).
    """
    if nonlinearity in ("tanh", "hardtanh", "softsign"):
        t = tanh
        if pre_activation:
            # tanh: atanh; hardtanh: the identity inside [-1, 1]; softsign x/(1+|x|): y/(1-|y|)
            t = {"tanh": math.atanh(t), "hardtanh": t, "softsign": t / (1 - t)}[nonlinearity]
        return -t, t
    if nonlinearity in ("sigmoid", "hardsigmoid"):
        lo, hi = sigmoid
        if pre_activation and nonlinearity == "sigmoid":
            return math.log(lo / (1 - lo)), math.log(hi / (1 - hi))
        if pre_activation:  # hardsigmoid: clamp(x / 6 + 1/2, 0, 1)
            return 6 * (lo - 0.5), 6 * (hi - 0.5)
        return lo, hi
    if nonlinearity == "relu":
        return 0.0, NO_BOUND
    if nonlinearity == "relu6":
        return 0.0, 6.0
    return NO_BOUND, NO_BOUND


def new_act_acc(units: int, device: torch.device | str) -> Tensor:
    acc = torch.zeros((units, ACT_COLS), dtype=torch.float64, device=device)
    acc[:, 5] = -math.inf
    return acc


def reset_act_acc(acc: Tensor) -> None:
    acc[:, :5].zero_()
    acc[:, 5].fill_(-math.inf)


def new_grad_acc(units: int, device: torch.device | str) -> Tensor:
    return torch.zeros((units, GRAD_COLS), dtype=torch.float64, device=device)


def _as3(x: Tensor, dim: int) -> Tensor:
    d = dim % x.dim()
    return x.reshape(math.prod(x.shape[:d]), x.shape[d], math.prod(x.shape[d + 1 :]))


def unit_summary_torch(x: Tensor, dim: int, lo: float, hi: float, acc: Tensor) -> None:
    """The same as the native ``unit_summary_out`` with torch reductions (any device)."""
    if x.numel() == 0:
        return
    v = _as3(x.detach(), dim).double().transpose(0, 1).reshape(x.shape[dim % x.dim()], -1)
    acc[:, 0] += v.shape[1]
    acc[:, 1] += v.sum(1)
    acc[:, 2] += (v * v).sum(1)
    acc[:, 3] += (v > 0).sum(1)
    acc[:, 4] += ((v <= lo) | (v >= hi)).sum(1)
    mx = torch.where(torch.isnan(v), -math.inf, v).amax(1)
    torch.maximum(acc[:, 5], mx, out=acc[:, 5])


def unit_grad_summary_torch(g: Tensor, x: Tensor | None, dim: int, acc: Tensor) -> None:
    """The same as the native ``unit_grad_summary_out`` with torch reductions (any device)."""
    if g.numel() == 0:
        return
    g3 = _as3(g.detach(), dim).double()
    acc[:, 0] += g3.shape[0]
    acc[:, 1] += g3.shape[0] * g3.shape[2]
    acc[:, 2] += (g3 * g3).sum((0, 2))
    if x is not None:
        p = g3 * _as3(x.detach(), dim).double()
        acc[:, 3] += p.sum((0, 2))
        acc[:, 4] += p.abs().sum((0, 2))


def unit_summary_out(x: Tensor, dim: int, lo: float, hi: float, acc: Tensor) -> None:
    """Adds per-unit count, sum, sum of squares, firing (> 0), saturated and max of ``x``."""
    if ops_units.native(x.device.type):
        ops_units.unit_summary_out(x.detach(), dim, lo, hi, acc)
    else:
        unit_summary_torch(x, dim, lo, hi, acc)


def unit_grad_summary_out(g: Tensor, x: Tensor | None, dim: int, acc: Tensor) -> None:
    """Adds per-unit rows, count, sum g², sum x·g and sum |x·g| of an output gradient."""
    if ops_units.native(g.device.type):
        ops_units.unit_grad_summary_out(g.detach(), None if x is None else x.detach(), dim, acc)
    else:
        unit_grad_summary_torch(g, x, dim, acc)


ACT_KINDS = ("unit_mean", "unit_sq_mean", "unit_firing", "unit_saturated", "unit_max")
GRAD_KINDS = ("unit_grad_rms", "unit_attr", "unit_attr_abs")


def act_block(acc: Tensor) -> Tensor:
    """float32 ``[5, units]``, one row per ``ACT_KINDS``: mean, mean of squares, firing and
    saturated fractions (0/0 = NaN for a unit that saw nothing), max. Three ops for any number
    of units, so many modules' accumulators stacked in one tensor finish together."""
    out = torch.empty((5, acc.shape[0]), dtype=torch.float32, device=acc.device)
    out[:4] = (acc[:, 1:5] / acc[:, :1]).t()
    out[4] = acc[:, 5]
    return out


def grad_block(acc: Tensor, attribution: bool = True) -> Tensor:
    """float32 ``[3 or 1, units]``, rows ``GRAD_KINDS`` (``unit_grad_rms`` only without
    attribution): the RMS over the unit's elements, and the sums of x·g and |x·g| over one row's
    (sample's or token's) elements of the unit, averaged over rows."""
    out = torch.empty(
        (3 if attribution else 1, acc.shape[0]), dtype=torch.float32, device=acc.device
    )
    out[0] = (acc[:, 2] / acc[:, 1]).sqrt_()
    if attribution:
        out[1:] = (acc[:, 3:5] / acc[:, :1]).t()
    return out


def act_vectors(acc: Tensor) -> dict[str, Tensor]:
    """``act_block`` as a dict: ``unit_mean``, ``unit_sq_mean``, ``unit_firing`` (fraction > 0),
    ``unit_saturated`` (fraction), ``unit_max``."""
    return dict(zip(ACT_KINDS, act_block(acc), strict=True))


def grad_vectors(acc: Tensor, attribution: bool = True) -> dict[str, Tensor]:
    """``grad_block`` as a dict: ``unit_grad_rms``, and with ``attribution`` ``unit_attr`` /
    ``unit_attr_abs``."""
    return dict(zip(GRAD_KINDS, grad_block(acc, attribution), strict=False))


def per_sample(x: Tensor, dim: int) -> Tensor | None:
    """``(batch, units)``: each sample's activation of each unit, the max over the other axes
    (positions, tokens, head channels); None when ``x`` has no batch axis apart from ``dim``."""
    d = dim % x.dim()
    if x.dim() < 2 or d == 0:
        return None
    x = x.detach()
    rest = [i for i in range(1, x.dim()) if i != d]
    v = x.amax(dim=rest) if rest else x
    return v.reshape(x.shape[0], x.shape[d])


@dataclass
class TopK:
    """The ``k`` largest per-sample activations of each unit seen so far, with their sample ids
    and steps; merged on the device each step (``torch.topk`` over old ∪ new), no sync."""

    values: Tensor  # float32 [units, k], -inf where empty
    ids: Tensor  # float32 [units, k]
    steps: Tensor  # float32 [units, k]

    @classmethod
    def new(cls, units: int, k: int, device: torch.device | str) -> TopK:
        def filled(v: float) -> Tensor:
            return torch.full((units, k), v, dtype=torch.float32, device=device)

        return cls(filled(-math.inf), filled(-1.0), filled(-1.0))

    @property
    def k(self) -> int:
        return int(self.values.shape[1])

    def merge(self, samples: Tensor, ids: Tensor, step: int) -> None:
        """``samples`` [batch, units] (``per_sample``), ``ids`` [batch] float32 sample ids.

        A value enters a unit's list when strictly greater than its k-th; equal values keep the
        earlier one (older steps, then lower batch positions); NaN never enters."""
        if ops_units.native(samples.device.type):
            ops_units.unit_topk_update(
                samples.detach(), ids, step, self.values, self.ids, self.steps
            )
        else:
            self.merge_torch(samples, ids, step)

    def merge_torch(self, samples: Tensor, ids: Tensor, step: int) -> None:
        """``merge`` with torch ops on any device: a stable descending sort of old ∪ new."""
        new_v = samples.detach().float().t()  # [units, batch]
        new_v = torch.nan_to_num(new_v, nan=-math.inf, posinf=math.inf, neginf=-math.inf)
        u, b = new_v.shape
        vals = torch.cat([self.values, new_v], dim=1)
        all_ids = torch.cat([self.ids, ids.float().reshape(1, b).expand(u, b)], dim=1)
        all_steps = torch.cat(
            [self.steps, torch.full((u, b), float(step), device=vals.device)], dim=1
        )
        # -inf entries never displace: entries equal to the k-th stay in arrival order
        order = torch.sort(vals, dim=1, descending=True, stable=True).indices[:, : self.k]
        top = torch.gather(vals, 1, order)
        keep = top > -math.inf
        # in place, like the native op: the lists may be views into a larger buffer
        self.ids.copy_(torch.where(keep, torch.gather(all_ids, 1, order), -1.0))
        self.steps.copy_(torch.where(keep, torch.gather(all_steps, 1, order), -1.0))
        self.values.copy_(torch.where(keep, top, -math.inf))
