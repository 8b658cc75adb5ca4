"""Per-unit statistics of activations and output gradients, as vector rows of the trace.

``dnntrace.enable(model, units=True)`` (or ``extensions=[UnitStats(...)]``). For each selected
module, each sampled step, one vector row per statistic (kinds below, one value per unit).

**Which axis holds the units** (``unit_axis``):

- ``Conv*``, ``ConvTranspose*``, ``BatchNorm*``, ``InstanceNorm*``, ``GroupNorm``, pooling: dim 1
  (channels of ``(N, C, ...)``);
- ``Linear``, ``Bilinear``, ``LayerNorm``, ``RMSNorm``, ``Embedding``: the last dim (features);
- ``MultiheadAttention``: its output's embedding dim split into ``num_heads`` groups of
  ``embed_dim / num_heads`` channels, one unit per group. nn.MultiheadAttention applies
  ``out_proj`` inside, so a group is not the head's own output (which it does not expose);
- elementwise modules (activations, Dropout, Identity): the axis of the module before them in their
  ``nn.Sequential``; elsewhere dim 1 for 4-D and 5-D outputs (images, volumes), the last dim
  otherwise.

**Saturation** uses the nonlinearity that follows (``dnntrace.storage.kinds.NONLINEARITIES``, the
definition the viewer's flag uses too): an activation module's own outputs (Tanh, Hardtanh,
Softsign ``|y| >= 0.97``; Sigmoid, Hardsigmoid ``y <= 0.03 or y >= 0.97``; ReLU ``y == 0``, ReLU6
also ``y >= 6``), or, for a module directly followed by one in an ``nn.Sequential``, its inputs
to it (thresholds mapped through the inverse: ``|x| >= atanh(0.97)``, ...). Other modules have no
saturated units (0).

**Rows** (``kind``; ``tensor`` is the output position, ``""`` for a single tensor):
``unit_mean``, ``unit_sq_mean``, ``unit_firing`` (fraction > 0), ``unit_saturated`` (fraction),
``unit_max``; with gradients ``unit_grad_rms``; with attribution ``unit_attr`` and
``unit_attr_abs`` (Σ x·g and Σ |x·g| over one row's elements of the unit, averaged over rows:
samples for ``(N, C, ...)``, tokens for ``(..., F)``); every ``topk_every`` sampled steps and at
close ``unit_topk_value``, ``unit_topk_index`` (sample id: the in-batch index or the id given to
``set_sample_ids``; exact below 2^24), ``unit_topk_step``, each ``[units, k]`` row-major.

**Cadence**: every ``UNITS_EVERY`` (10) traced steps unless ``every`` says otherwise; on a sampled
step every forward and backward of the step is counted, top-k lists see the sampled steps' inputs.

**Cost**: native kernels on CPU and CUDA read each activation once (``unit_summary_out``), each
output gradient once with the activation for attribution (``unit_grad_summary_out``), and merge
top-k lists in place (``unit_topk_update``); all modules' buffers live in one tensor per kind
(``_Arena``), so a step's rows are finished by a handful of ops for the whole model and shipped
as one block. No host synchronisation.

**Memory**: ``(88 + 12·k)·U`` bytes of device buffers per module of ``U`` units (``stats.units``),
plus, with attribution, a reference to each selected module's output until its backward, and the
sampled step's rows (``8·4·U`` bytes per module) until the flush copies them to the host.
Only training forwards (``module.training`` and grad enabled) are counted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .. import ops_units
from ..stats import units as U
from ..storage import kinds as K
from .contract import Extension, TraceContext, option_dict, register_extension
from .selection import iter_float_tensors

_CHANNEL_FIRST = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
)
_CHANNEL_LAST: tuple[type, ...] = (nn.Linear, nn.Bilinear, nn.LayerNorm, nn.Embedding)
if hasattr(nn, "RMSNorm"):
    _CHANNEL_LAST += (nn.RMSNorm,)
_NONLINEARITY: dict[type, str] = {
    getattr(nn, name): nl for name, nl in K.NONLINEARITIES.items()
}  # the one definition of saturation: dnntrace.storage.kinds
_ELEMENTWISE: tuple[type, ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.Tanh,
    nn.Sigmoid,
    nn.GELU,
    nn.SiLU,
    nn.ELU,
    nn.LeakyReLU,
    nn.Mish,
    nn.Softplus,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Dropout,
    nn.Identity,
)


@dataclass
class UnitPlan:
    """How one module's output is read: unit axis, head groups, saturation bounds."""

    name: str
    dim: int  # 1 or -1
    heads: int = 0  # > 0: split the last dim into this many groups
    nonlinearity: str | None = None
    pre_activation: bool = False


def _siblings(model: nn.Module) -> dict[str, tuple[str | None, str | None]]:
    """name -> (previous, next) sibling names inside an nn.Sequential parent."""
    out: dict[str, tuple[str | None, str | None]] = {}
    for pname, parent in model.named_modules():
        if not isinstance(parent, nn.Sequential):
            continue
        names = [f"{pname}.{c}" if pname else c for c, _ in parent.named_children()]
        for i, n in enumerate(names):
            out[n] = (names[i - 1] if i else None, names[i + 1] if i + 1 < len(names) else None)
    return out


def plan_units(model: nn.Module, modules: Sequence[tuple[str, nn.Module]]) -> dict[str, UnitPlan]:
    """The documented axis and saturation rule for every module it applies to."""
    by_name = dict(model.named_modules())
    sib = _siblings(model)

    def axis(name: str, depth: int = 0) -> int | None:
        m = by_name[name]
        if isinstance(m, _CHANNEL_FIRST):
            return 1
        if isinstance(m, (*_CHANNEL_LAST, nn.MultiheadAttention)):
            return -1
        if isinstance(m, _ELEMENTWISE) and depth < 16:
            prev = sib.get(name, (None, None))[0]
            return axis(prev, depth + 1) if prev is not None else 0  # 0: by the output's rank
        return None

    plans: dict[str, UnitPlan] = {}
    for name, m in modules:
        d = axis(name)
        if d is None:
            continue
        p = UnitPlan(name, d)
        if isinstance(m, nn.MultiheadAttention):
            p.heads = m.num_heads
        if type(m) in _NONLINEARITY:
            p.nonlinearity = _NONLINEARITY[type(m)]
        else:
            nxt = sib.get(name, (None, None))[1]
            if nxt is not None and type(by_name[nxt]) in _NONLINEARITY:
                p.nonlinearity = _NONLINEARITY[type(by_name[nxt])]
                p.pre_activation = True
        plans[name] = p
    return plans


@dataclass
class _State:
    plan: UnitPlan
    pos: str
    units: int
    act: Tensor
    grad: Tensor
    topk: U.TopK | None
    lo: float
    hi: float
    act_seen: bool = False
    grad_seen: bool = False
    topk_dirty: bool = False
    offset: int = -1  # first row in the arena; -1 until packed


@dataclass
class _Arena:
    """Every module's buffers stacked in one tensor each (``[sum of units, ...]``); a module's
    buffers are row views of them, so a step's rows are finished and reset by a few ops for the
    whole model rather than a dozen per module."""

    states: list[_State]
    act: Tensor
    grad: Tensor
    topk: U.TopK | None

    @classmethod
    def pack(cls, states: list[_State]) -> _Arena:
        act = torch.cat([st.act for st in states])
        grad = torch.cat([st.grad for st in states])
        tk = None
        if all(st.topk is not None for st in states):
            tk = U.TopK(
                torch.cat([st.topk.values for st in states]),  # type: ignore[union-attr]
                torch.cat([st.topk.ids for st in states]),  # type: ignore[union-attr]
                torch.cat([st.topk.steps for st in states]),  # type: ignore[union-attr]
            )
        o = 0
        for st in states:
            st.offset = o
            st.act, st.grad = act[o : o + st.units], grad[o : o + st.units]
            if tk is not None:
                st.topk = U.TopK(*(t[o : o + st.units] for t in (tk.values, tk.ids, tk.steps)))
            o += st.units
        return cls(states, act, grad, tk)


# Per-unit rows are sampled every 10th traced step unless asked otherwise: each sampled step
# re-reads every selected activation (and its gradient and, for attribution, the activation
# again) and writes units x 8 floats per module. Every step measured 33-73 % of the default
# set's own overhead on an H200 and 39-62 % on the CPU, and 4.1 MB more per step on disk for
# GPT-2 small (bench/RESULTS.md); every 10th keeps the maps' resolution over a run at a tenth
# of that.
UNITS_EVERY = 10


@dataclass
class UnitStats(Extension):
    """Per-unit statistics of the selected modules' outputs (see the module docstring).

    ``modules``: names (globs) among the tracer's modules to restrict to (default all that the
    axis rule covers); ``every``: cadence in steps (default ``UNITS_EVERY`` times the tracer's
    ``activations_every`` if given, else its ``every``; 1 for every step);
    ``gradients``: ``unit_grad_rms``; ``attribution``: ``unit_attr*`` (holds the output until
    backward); ``topk``: inputs kept per unit (0: none); ``tanh`` / ``sigmoid``: thresholds."""

    modules: Sequence[str] | None = None
    every: int | None = None
    gradients: bool = True
    attribution: bool = True
    topk: int = 8
    topk_every: int = 50
    tanh: float = K.TANH_SATURATION
    sigmoid: tuple[float, float] = K.SIGMOID_SATURATION
    states: dict[str, _State] = field(default_factory=dict, init=False, repr=False)
    _plans: dict[str, UnitPlan] = field(default_factory=dict, init=False, repr=False)
    _ids: Tensor | None = field(default=None, init=False, repr=False)
    _arange: dict[tuple[int, str], Tensor] = field(default_factory=dict, init=False, repr=False)
    _sampled_steps: int = field(default=0, init=False, repr=False)
    _arena: _Arena | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.topk, bool) or not isinstance(self.topk, int):
            raise TypeError(f"UnitStats: topk must be an int, got {self.topk!r}")
        if not 0 <= self.topk <= ops_units.MAX_TOPK:
            top = ops_units.MAX_TOPK
            raise ValueError(f"UnitStats: topk must be in [0, {top}], got {self.topk}")
        if isinstance(self.topk_every, bool) or not isinstance(self.topk_every, int):
            raise TypeError(f"UnitStats: topk_every must be an int, got {self.topk_every!r}")
        if self.every is not None and (
            isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1
        ):
            raise ValueError(f"UnitStats: every must be a positive int or None, got {self.every!r}")

    def set_sample_ids(self, ids: Tensor | Sequence[int] | None) -> None:
        """Ids of the next forward's samples (one per row of the batch axis), kept with the
        top-k; None goes back to in-batch indices. A tensor on the model's device avoids a copy."""
        self._ids = None if ids is None else torch.as_tensor(ids).float()

    # ---- Extension ------------------------------------------------------------------------
    def attach(self, tracer: TraceContext) -> None:
        import fnmatch

        mods = tracer.traced_modules
        if self.modules is not None:
            pats = list(self.modules)
            mods = [(n, m) for n, m in mods if any(fnmatch.fnmatchcase(n, p) for p in pats)]
        self._plans = plan_units(tracer.model, mods)
        every = self._every(tracer)
        by_name = dict(mods)
        for name, plan in self._plans.items():
            hook = self._make_hook(tracer, plan, every)
            tracer.add_handle(by_name[name].register_forward_hook(tracer.guard(hook)))

    def on_step_end(self, tracer: TraceContext) -> None:
        every = self._every(tracer)
        if not tracer.sampled(every):
            return
        self._sampled_steps += 1
        topk_now = self._sampled_steps % max(self.topk_every, 1) == 1 or self.topk_every <= 1
        arena = self._packed()
        if arena is None:
            return
        sts = arena.states
        if any(st.act_seen for st in sts):
            self._record_block(
                tracer, K.UNIT_ACT_KINDS, U.act_block(arena.act), [s.act_seen for s in sts]
            )
            U.reset_act_acc(arena.act)
        if any(st.grad_seen for st in sts):
            kinds = K.UNIT_GRAD_KINDS if self.attribution else K.UNIT_GRAD_KINDS[:1]
            block = U.grad_block(arena.grad, self.attribution)
            self._record_block(tracer, kinds, block, [s.grad_seen for s in sts])
            arena.grad.zero_()
        for st in sts:
            st.act_seen = st.grad_seen = False
        if topk_now:
            self._record_topk(tracer)

    def before_close(self, tracer: TraceContext) -> None:
        self._record_topk(tracer)

    # ---- internals ------------------------------------------------------------------------
    def _every(self, tracer: TraceContext) -> int:
        # an explicit activations_every sets the base cadence; the default set's 10 x every for
        # activation rows does not (units stay at every 10th recorded step)
        return self.every or UNITS_EVERY * (tracer.config.activations_every or tracer.every)

    def _packed(self) -> _Arena | None:
        """The arena of all states, repacked when a module was first seen since."""
        if not self.states:
            return None
        if self._arena is None or len(self._arena.states) != len(self.states):
            self._arena = _Arena.pack(list(self.states.values()))
        return self._arena

    def _record_block(
        self, tracer: TraceContext, kinds: Sequence[str], block: Tensor, seen: list[bool]
    ) -> None:
        """Rows of ``block`` [kinds, all units] for the states seen this step: one record for
        the whole block when every state was seen (the usual case), else one per state."""
        sts = self._arena.states  # type: ignore[union-attr]
        if all(seen):
            labels = [(st.plan.name, k, st.pos) for k in kinds for st in sts]
            tracer.record_vectors(labels, [st.units for _ in kinds for st in sts], block)
            return
        for st, ok in zip(sts, seen, strict=True):
            if ok:
                for i, k in enumerate(kinds):
                    tracer.record_vector(
                        st.plan.name, k, st.pos, block[i, st.offset : st.offset + st.units]
                    )

    def _record_topk(self, tracer: TraceContext) -> None:
        arena = self._packed()  # at close, modules first seen since the last step join too
        if arena is None or arena.topk is None:
            return
        sts = arena.states
        dirty = [st.topk_dirty for st in sts]
        if not any(dirty):
            return
        kinds = K.UNIT_TOPK_KINDS
        tensors = (arena.topk.values, arena.topk.ids, arena.topk.steps)
        k = arena.topk.k
        for kind, t in zip(kinds, tensors, strict=True):
            # copies: the lists are updated in place by later steps, the recorded rows must not be
            if all(dirty):
                labels = [(st.plan.name, kind, st.pos) for st in sts]
                tracer.record_vectors(labels, [st.units * k for st in sts], t.clone())
                continue
            for st in sts:
                if st.topk_dirty:
                    rows = t[st.offset : st.offset + st.units]
                    tracer.record_vector(st.plan.name, kind, st.pos, rows.clone())
        for st in sts:
            st.topk_dirty = False

    def _sample_ids(self, n: int, device: torch.device) -> Tensor:
        if self._ids is not None and self._ids.numel() == n:
            if self._ids.device != device:
                self._ids = self._ids.to(device, non_blocking=True)
            return self._ids
        key = (n, str(device))
        a = self._arange.get(key)
        if a is None:
            a = self._arange[key] = torch.arange(n, dtype=torch.float32, device=device)
        return a

    def _view(self, plan: UnitPlan, t: Tensor) -> tuple[Tensor, int] | None:
        if t.dim() == 0:
            return None
        if plan.heads:
            if t.shape[-1] % plan.heads:
                return None
            return t.unflatten(-1, (plan.heads, t.shape[-1] // plan.heads)), -2
        dim = plan.dim
        if dim == 0:  # elementwise module without a known producer: by the output's rank
            dim = 1 if t.dim() in (4, 5) else -1
        if dim == 1 and t.dim() < 2:
            return None
        return t, dim

    def _state(self, tracer: TraceContext, plan: UnitPlan, pos: str, x: Tensor, dim: int) -> _State:
        units = int(x.shape[dim])
        lo, hi = U.saturation_bounds(
            plan.nonlinearity,
            pre_activation=plan.pre_activation,
            tanh=self.tanh,
            sigmoid=self.sigmoid,
        )
        st = _State(
            plan,
            pos,
            units,
            U.new_act_acc(units, x.device),
            U.new_grad_acc(units, x.device),
            U.TopK.new(units, self.topk, x.device) if self.topk > 0 else None,
            lo,
            hi,
        )
        self.states[plan.name] = st
        return st

    def _make_hook(self, tracer: TraceContext, plan: UnitPlan, every: int) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if torch.compiler.is_compiling() or not tracer.sampled(every):
                return
            if not (module.training and torch.is_grad_enabled()):
                return
            first = next(iter_float_tensors(output), None)
            if first is None:
                return
            pos, t = first
            if t.device != tracer.device:
                return
            view = self._view(plan, t)
            if view is None:
                return
            x, dim = view
            st = self.states.get(plan.name) or self._state(tracer, plan, pos, x, dim)
            if x.shape[dim] != st.units:
                return  # a call with another width: not this module's unit axis
            U.unit_summary_out(x, dim, st.lo, st.hi, st.act)
            st.act_seen = True
            if st.topk is not None:
                samples = U.per_sample(x, dim)
                if samples is not None:
                    ids = self._sample_ids(samples.shape[0], x.device)
                    st.topk.merge(samples, ids, tracer.step_index)
                    st.topk_dirty = True
            if self.gradients and t.requires_grad:
                saved = x.detach() if self.attribution else None
                heads = plan.heads

                def grad_hook(g: Tensor) -> None:
                    gv = g.unflatten(-1, (heads, g.shape[-1] // heads)) if heads else g
                    U.unit_grad_summary_out(gv, saved, dim, st.grad)
                    st.grad_seen = True

                t.register_hook(tracer.guard(grad_hook))

        return hook


def _units(value: Any) -> list[Extension]:
    return [UnitStats(**option_dict(value))]


register_extension("units", _units)
