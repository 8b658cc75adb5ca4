"""NaN/Inf origin: the first module, in forward execution order and then in backward order, whose
output (or output gradient) held a non-finite value, the step, and the statistics of its inputs.

``dnntrace.enable(model, on_anomaly="warn" | "raise" | "record")`` (or
``extensions=[AnomalyWatch(mode)]``). Nothing is synchronised in the normal path: the check reads
the NaN/±Inf counters the stat bank already holds for every traced output and output gradient.
At the end of each sampled step a copy of those counters (``slots × 5`` int64 and ``slots × 8``
float64, a few KB) is taken; on CUDA it goes to pinned memory on the current stream with an event,
and is examined once the event has completed (``event.query()``, never a wait), on the CPU at
once. The order in which the tracer's modules ran forward and backward is host-side bookkeeping
(the order their hooks fired in), kept per step.

When a step is found non-finite, in every mode the trace gets ``anomaly`` rows (below); then

- ``"record"``: nothing else; ``anomaly`` holds the first finding (also ``Trace`` readers);
- ``"warn"``: one ``RuntimeWarning`` naming the module and step (once per tracer);
- ``"raise"``: after the step that holds the finding has been flushed, the tracer closes (every
  step up to and including the one examined is written to disk) and ``AnomalyError`` is raised
  from ``optimizer.step()`` / ``tracer.step()``, naming the module and step. On the CPU that is
  the anomalous step itself; on CUDA the first step end after its counters reached the host
  (usually the next step). A finding first made at ``close()`` warns instead (closing never
  raises).

Only sampled steps are checked (the bank holds nothing otherwise). A module called several times
in a step is placed by its first call; its row sums all calls.

**Inputs**: with ``inputs=True`` each traced module's floating inputs are summarised (moments,
no histogram) into rows of kind ``input`` every sampled step, and the anomaly reports those;
otherwise it reports the output statistics of the module that ran just before it (its input in
a sequential model), and says so (``input_source``).

**Rows**: kind ``exec_order``, module ``""``, tensor ``forward`` / ``backward``: indices into the
metadata ``modules`` list in execution order, written at a step whenever the order changed.
Kind ``anomaly``, module = the origin, tensor ``forward`` / ``backward``, values
``dnntrace.storage.kinds.KINDS["anomaly"].fields`` (``kinds.pack``/``unpack``).
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..sketch import layout as L
from ..sketch import merge as M
from ..storage import kinds as K
from .config import ANOMALY_MODES
from .contract import AnomalyError, Extension, TraceContext, register_extension
from .selection import iter_float_tensors

MODES = ANOMALY_MODES
_COLS = (L.COUNT, L.CALLS, L.NAN, L.POSINF, L.NEGINF)


@dataclass
class _Pending:
    step: int
    labels: tuple[tuple[str, str, str, str], ...]
    forward: tuple[str, ...]
    backward: tuple[str, ...]
    counts: Tensor
    moments: Tensor
    event: Any = None


@dataclass
class AnomalyWatch(Extension):
    """Finds where the first NaN/Inf came from (see the module docstring)."""

    mode: str = "warn"
    inputs: bool = False
    found: dict[str, Any] | None = field(default=None, init=False)
    _pending: deque[_Pending] = field(default_factory=deque, init=False, repr=False)
    _fwd: list[str] = field(default_factory=list, init=False, repr=False)
    _bwd: list[str] = field(default_factory=list, init=False, repr=False)
    _fwd_seen: set[str] = field(default_factory=set, init=False, repr=False)
    _bwd_seen: set[str] = field(default_factory=set, init=False, repr=False)
    _last_order: dict[str, tuple[str, ...]] = field(default_factory=dict, init=False, repr=False)
    _index: dict[str, int] = field(default_factory=dict, init=False, repr=False)
    _cols: Tensor | None = field(default=None, init=False, repr=False)
    _error: AnomalyError | None = field(default=None, init=False, repr=False)
    _done: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"on_anomaly must be one of {', '.join(MODES)}, got {self.mode!r}")

    # ---- Extension ------------------------------------------------------------------------
    def attach(self, tracer: TraceContext) -> None:
        self._index = {n: i for i, (n, _) in enumerate(tracer.model.named_modules())}
        self._cols = torch.tensor(_COLS, device=tracer.device)
        for name, mod in tracer.traced_modules:
            h = mod.register_forward_hook(tracer.guard(self._make_hook(tracer, name)))
            tracer.add_handle(h)

    def on_step_end(self, tracer: TraceContext) -> None:
        fwd, bwd = tuple(self._fwd), tuple(self._bwd)
        self._fwd, self._bwd = [], []
        self._fwd_seen, self._bwd_seen = set(), set()
        if self._done:
            return
        for direction, order in (("forward", fwd), ("backward", bwd)):
            if order and order != self._last_order.get(direction):
                self._last_order[direction] = order
                idx = torch.tensor([float(self._index[n]) for n in order], device=tracer.device)
                tracer.record_vector("", K.EXEC_ORDER, direction, idx)
        if fwd or bwd:
            self._snapshot(tracer, fwd, bwd)
        self._poll(tracer, wait=False)

    def after_flush(self, tracer: TraceContext) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            tracer.close()
            raise err

    def before_close(self, tracer: TraceContext) -> None:
        if self.mode == "raise":
            self.mode = "warn"  # closing never raises
        self._poll(tracer, wait=True)
        self._error = None

    # ---- hooks ------------------------------------------------------------------------------
    def _make_hook(self, tracer: TraceContext, name: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if torch.compiler.is_compiling() or self._done:
                return
            if not tracer.sampled(tracer.activations_every):
                return
            if name not in self._fwd_seen:
                self._fwd_seen.add(name)
                self._fwd.append(name)
            phase = "train" if (module.training and torch.is_grad_enabled()) else "eval"
            if self.inputs:
                for pos, x in iter_float_tensors(inputs):
                    if x.device == tracer.device:
                        # moments only: inputs are for the anomaly report
                        tracer.accumulate(name, K.INPUT, pos, x, phase=phase, histogram=False)
            if phase == "train" and tracer.records(K.ACTIVATION_GRAD):
                t = next((t for _, t in iter_float_tensors(output) if t.requires_grad), None)
                if t is not None:
                    t.register_hook(tracer.guard(lambda g: self._backward_seen(name)))

        return hook

    def _backward_seen(self, name: str) -> None:
        if name not in self._bwd_seen:
            self._bwd_seen.add(name)
            self._bwd.append(name)

    # ---- the check --------------------------------------------------------------------------
    def _snapshot(self, tracer: TraceContext, fwd: tuple[str, ...], bwd: tuple[str, ...]) -> None:
        labels = tracer.row_labels()
        assert self._cols is not None
        # new tensors: the bank is reset once the step is written
        counts, moments = tracer.snapshot_rows(count_columns=self._cols)
        labels = labels[: counts.shape[0]]
        event = None
        if counts.is_cuda:
            hc = torch.empty(counts.shape, dtype=counts.dtype, pin_memory=True)
            hm = torch.empty(moments.shape, dtype=moments.dtype, pin_memory=True)
            hc.copy_(counts, non_blocking=True)
            hm.copy_(moments, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            counts, moments = hc, hm
        self._pending.append(_Pending(tracer.step_index, labels, fwd, bwd, counts, moments, event))

    def _poll(self, tracer: TraceContext, *, wait: bool) -> None:
        while self._pending and not self._done:
            p = self._pending[0]
            if p.event is not None:
                if wait:
                    p.event.synchronize()
                elif not p.event.query():
                    return
            self._pending.popleft()
            found = self._examine(p)
            if found is not None:
                self._report(tracer, found)
        if self._done:
            self._pending.clear()

    def _examine(self, p: _Pending) -> dict[str, Any] | None:
        c = p.counts.numpy()
        m = p.moments.numpy()
        bad = (c[:, 2] + c[:, 3] + c[:, 4] > 0) & (c[:, 1] > 0)
        if not bad.any():
            return None
        rows: dict[tuple[str, str], list[int]] = {}
        for i, (mod, kind, _, _) in enumerate(p.labels):
            rows.setdefault((mod, kind), []).append(i)

        def first(order: tuple[str, ...], kind: str) -> str | None:
            return next((n for n in order if any(bad[i] for i in rows.get((n, kind), ()))), None)

        def stats(mod: str, kind: str) -> dict[str, float]:
            idx = [i for i in rows.get((mod, kind), ()) if c[i, 1] > 0]
            if not idx:
                return {}
            cnt, nan, inf = (float(c[idx, j].sum()) for j in (0, 2, 3))
            inf += float(c[idx, 4].sum())
            fin = cnt - nan - inf
            s = float((m[idx, L.SUM] + m[idx, L.SUM_COMP]).sum())
            ss = float((m[idx, L.SUMSQ] + m[idx, L.SUMSQ_COMP]).sum())
            return {
                "count": cnt,
                "nan_count": nan,
                "inf_count": inf,
                "min": float(m[idx, L.MIN].min()) if fin else math.nan,
                "max": float(m[idx, L.MAX].max()) if fin else math.nan,
                "mean": float(M.mean(s, fin)),  # header statistics: dnntrace.sketch.merge
                "rms": float(M.rms(ss, fin)),
            }

        out: dict[str, Any] = {"step": p.step, "forward": None, "backward": None}
        fmod = first(p.forward, K.ACTIVATION)
        if fmod is not None:
            src = "input rows"
            ins = stats(fmod, K.INPUT)
            if not ins:
                k = p.forward.index(fmod)
                prev = p.forward[k - 1] if k else None
                ins = stats(prev, K.ACTIVATION) if prev else {}
                src = f"output of {prev!r}" if prev else "model input (not traced)"
            out["forward"] = {"module": fmod, **stats(fmod, K.ACTIVATION)}
            out["forward_inputs"] = ins
            out["input_source"] = src
        bmod = first(p.backward, K.ACTIVATION_GRAD)
        if bmod is None:  # no output gradient: the parameter gradients, in backward order
            order = tuple(reversed([lb[0] for lb in p.labels if lb[1] == K.WEIGHT_GRAD]))
            bmod = first(order, K.WEIGHT_GRAD)
            bkind = K.WEIGHT_GRAD
        else:
            bkind = K.ACTIVATION_GRAD
        if bmod is not None:
            out["backward"] = {"module": bmod, "kind": bkind, **stats(bmod, bkind)}
        if out["forward"] is None and out["backward"] is None:
            return None
        return out

    def _report(self, tracer: TraceContext, found: dict[str, Any]) -> None:
        self.found = found
        self._done = True
        step = found["step"]
        for direction in ("forward", "backward"):
            f = found.get(direction)
            if f is None:
                continue
            ins = found.get("forward_inputs", {}) if direction == "forward" else {}
            vals = K.pack(  # by name: the registry orders them (kinds.KINDS["anomaly"])
                K.ANOMALY,
                {
                    "step": float(step),
                    "nan_count": f.get("nan_count", 0.0),
                    "inf_count": f.get("inf_count", 0.0),
                    **{f"input_{k}": v for k, v in ins.items()},
                },
            )
            tracer.record_vector(
                f["module"], K.ANOMALY, direction, torch.tensor(vals, device=tracer.device)
            )
        msg = describe(found)
        if self.mode == "warn":
            warnings.warn(f"dnntrace: {msg}", RuntimeWarning, stacklevel=3)
        elif self.mode == "raise":
            self._error = AnomalyError(msg, found)


def describe(found: dict[str, Any]) -> str:
    """One sentence naming the step, the origin and (for forward) its inputs."""
    step = found["step"]
    parts = []
    f = found.get("forward")
    if f is not None:
        ins = found.get("forward_inputs") or {}
        parts.append(
            f"first non-finite output at step {step} in module {f['module']!r} (forward order; "
            f"{f.get('nan_count', 0):.0f} NaN, {f.get('inf_count', 0):.0f} Inf; inputs from "
            f"{found.get('input_source')}: min {ins.get('min', math.nan):.4g}, max "
            f"{ins.get('max', math.nan):.4g}, rms {ins.get('rms', math.nan):.4g})"
        )
    b = found.get("backward")
    if b is not None:
        parts.append(
            f"first non-finite {b['kind']} at step {step} in module {b['module']!r} "
            "(backward order)"
        )
    return "; ".join(parts)


def _on_anomaly(value: Any) -> list[Extension]:
    return [AnomalyWatch(value)]


register_extension("on_anomaly", _on_anomaly)
