"""The extension contract: what a tracer offers the code that adds statistics to it.

An extension is a subclass of ``dnntrace.Extension`` passed as ``dnntrace.enable(model,
extensions=[MyStats()])``. It sees the tracer only through ``TraceContext`` (below): the built-in
extensions (per-unit statistics, anomaly origin, cross-rank merge, DDP gradient noise, spectra,
dynamics) use nothing else, so a third-party extension can do whatever they do.

Hook order, each step (``capture.optim`` says where steps begin and end):

1. ``attach(ctx)`` once, when tracing starts: register hooks through ``ctx.guard`` and hand
   their handles to ``ctx.add_handle`` (removed when the tracer closes or is disabled).
2. ``before_optimizer_step(ctx, optimizer)`` when the step's gradients are final.
3. ``on_step_end(ctx)`` after the optimizer update, before the step is written: record rows now
   (``accumulate`` / ``record_vector`` / ``log_scalar``); ``snapshot_rows`` copies the bank's
   rows of the step (the bank is reset once the step is written).
4. The step is handed to the writer (flush), then ``after_flush(ctx)`` (may raise
   ``AnomalyError``: the tracer closes first, every step so far is on disk).
5. At close: ``before_close(ctx)`` (may still record), the last flush, ``close(ctx)``.

Failures: an exception in a hook wrapped by ``ctx.guard`` or in ``attach``/``on_step_end``/...
disables tracing with one warning and training continues, unless ``strict=True`` (then
``TracingError``). Nothing an extension does may synchronise the device in the training thread.

Registry: the options of ``dnntrace.enable`` that switch a built-in extension on (``units=``,
``spectral=``, ``dynamics=``, ``merge_ranks=``, ``ddp_hook=``, ``on_anomaly=``) name a module that
registers a factory for its option with ``register_extension`` when imported; the tracer resolves
them through ``extensions_for(config)`` and imports none of them itself.

This module imports torch and nothing of dnntrace but ``capture.config``.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .config import TraceConfig

RowLabel = tuple[str, str, str, str]
"""A bank row: (module, kind, tensor, phase). ``kind`` is the row kind of the file
(``activation``, ``weight_grad``, ... or an extension's own), ``phase`` ``train`` / ``eval``."""


class TracingError(RuntimeError):
    """An internal tracing failure, raised only with ``strict=True``."""


class AnomalyError(RuntimeError):
    """A NaN/Inf found with ``on_anomaly="raise"`` (``capture.anomaly``); ``found`` says where.
    Raised after the tracer closed, so the trace on disk holds every step up to the finding."""

    def __init__(self, message: str, found: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.found = found or {}


@runtime_checkable
class TraceContext(Protocol):
    """What an extension may use of the tracer (``Tracer`` implements it). Nothing here
    synchronises the device."""

    # ---- what is traced -----------------------------------------------------------------
    model: nn.Module
    """The traced module (the module inside a ``torch.compile`` wrapper)."""
    path: str
    """The trace file of this rank."""
    device: torch.device
    """The stat bank's device (the first parameter's); tensors elsewhere are not traced."""
    rank: int
    world_size: int
    config: TraceConfig
    """The validated options of ``dnntrace.enable``."""
    step_index: int
    """The step being recorded (0-based)."""
    closed: bool
    disabled_reason: str | None
    """Why tracing stopped after an internal error; ``None`` while it runs."""

    @property
    def layout(self) -> Any:
        """The histogram layout of the bank's rows (``dnntrace.storage.Layout``)."""
        ...

    @property
    def traced_modules(self) -> list[tuple[str, nn.Module]]:
        """(name, module) of every traced module, in model order."""
        ...

    @property
    def params(self) -> list[tuple[str, str, nn.Parameter]]:
        """(module name, parameter name, parameter) of every floating parameter."""
        ...

    @property
    def every(self) -> int:
        """The cadence of weight and weight-gradient rows."""
        ...

    @property
    def activations_every(self) -> int:
        """The cadence of activation and activation-gradient rows (resolved)."""
        ...

    def records(self, kind: str) -> bool:
        """Whether the tracer records rows of built-in ``kind`` (``activation``,
        ``activation_grad``, ``weight``, ``weight_grad``)."""
        ...

    # ---- sampling, guard, pause ---------------------------------------------------------
    def sampled(self, every: int | None = None) -> bool:
        """Whether the current step is recorded at cadence ``every`` (default ``every``)."""
        ...

    def guard(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` wrapped for use as a hook: does nothing once tracing is disabled or closed or
        while paused; an exception disables tracing (or raises ``TracingError`` in strict
        mode)."""
        ...

    def paused(self) -> contextlib.AbstractContextManager[None]:
        """Hooks do nothing inside (an extension's own forward passes, e.g. a Hessian closure)."""
        ...

    def add_handle(self, handle: RemovableHandle) -> None:
        """A hook handle to remove when the tracer closes or is disabled."""
        ...

    # ---- rows ---------------------------------------------------------------------------
    def accumulate(
        self,
        module: str,
        kind: str,
        tensor: str,
        x: Tensor,
        *,
        phase: str = "train",
        histogram: bool = True,
    ) -> None:
        """Adds the statistics of ``x`` (counts, min/max, compensated moments and, unless
        ``histogram=False``, the histogram) into the row (module, kind, tensor, phase) of the
        current step: a full summary row as the built-in kinds have. Calls in one step add up.
        A tensor on another device than ``device`` is skipped."""
        ...

    def accumulate_many(
        self,
        labels: Sequence[tuple[str, str, str]],
        xs: Sequence[Tensor],
        *,
        phase: str = "train",
    ) -> None:
        """``accumulate`` of ``xs[i]`` into row ``labels[i]`` for many tensors, in few launches."""
        ...

    def record_vector(
        self, module: str, kind: str, tensor: str, values: Tensor, phase: str = "train"
    ) -> None:
        """A vector row (one value per unit, or one value) for the current step, on the
        device; ``values`` must not be modified afterwards."""
        ...

    def record_vectors(
        self,
        labels: Sequence[tuple[str, str, str]],
        lengths: Sequence[int],
        flat: Tensor,
        phase: str = "train",
    ) -> None:
        """Many vector rows at once, back to back in ``flat``."""
        ...

    def log_scalar(self, name: str, value: float | Tensor, step: int | None = None) -> None:
        """A scalar row (a tensor is not synced)."""
        ...

    def row_labels(self) -> tuple[RowLabel, ...]:
        """The labels of the bank's rows, in bank order (the row index is the position)."""
        ...

    def row_meta(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """(dtype name, shape) of each bank row's tensor, in bank order ("" before seen)."""
        ...

    def snapshot_rows(
        self, rows: Sequence[int] | Tensor | None = None, count_columns: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """New device tensors (counts int64, moments float64) holding bank rows ``rows``
        (default: every labelled row) of the step so far, count columns ``count_columns``
        (default: all; ``dnntrace.storage.layout`` names them). No sync."""
        ...

    def file_metadata(self) -> dict[str, Any]:
        """A copy of the metadata in the trace file's header (options, modules, layout...)."""
        ...

    def close(self) -> dict[str, Any]:
        """Writes the last step and closes the tracer."""
        ...


class Extension:
    """Adds statistics to a tracer. Subclass it and override the hooks you need (each does
    nothing by default); every hook gets the tracer as a ``TraceContext``. See the module
    docstring for when each runs."""

    def attach(self, tracer: TraceContext) -> None:
        return None

    def before_optimizer_step(self, tracer: TraceContext, optimizer: torch.optim.Optimizer) -> None:
        return None

    def on_step_end(self, tracer: TraceContext) -> None:
        return None

    def after_flush(self, tracer: TraceContext) -> None:
        return None

    def before_close(self, tracer: TraceContext) -> None:
        return None

    def close(self, tracer: TraceContext) -> None:
        return None


# ---- the registry of built-in extensions ------------------------------------------------------
ExtensionFactory = Callable[[Any], Sequence[Extension]]
"""Makes the extensions of an option from its (truthy) value, e.g. ``units={"every": 1}``."""

_BUILTIN_MODULES = {
    # option -> the module that registers it when imported (in the order extensions attach)
    "units": "dnntrace.capture.units",
    "on_anomaly": "dnntrace.capture.anomaly",
    "merge_ranks": "dnntrace.capture.distributed",
    "ddp_hook": "dnntrace.capture.distributed",
    "spectral": "dnntrace.capture.spectral",
    "dynamics": "dnntrace.capture.spectral",
}
_FACTORIES: dict[str, ExtensionFactory] = {}


def register_extension(option: str, factory: ExtensionFactory) -> None:
    """Makes ``dnntrace.enable(model, <option>=value)`` add ``factory(value)``'s extensions.
    ``option`` must be a ``TraceConfig`` field that switches an extension on."""
    if option not in _BUILTIN_MODULES:
        raise ValueError(
            f"register_extension: {option!r} is not an extension option "
            f"({', '.join(_BUILTIN_MODULES)}); pass your own as extensions=[...]"
        )
    _FACTORIES[option] = factory


def option_dict(value: Any) -> dict[str, Any]:
    """The keyword options of an extension option's value: ``True`` -> ``{}``, a mapping -> a
    dict of it."""
    return dict(value) if isinstance(value, Mapping) else {}


def extension_options() -> tuple[str, ...]:
    """The options that switch a registered extension on, in the order they attach."""
    return tuple(_BUILTIN_MODULES)


def extensions_for(config: TraceConfig) -> list[Extension]:
    """The extensions ``config`` asks for: ``config.extensions`` first, then those of each
    extension option that is set (not False/None), built by their registered factories."""
    out = list(config.extensions)
    for option, module in _BUILTIN_MODULES.items():
        value = getattr(config, option)
        if value is None or value is False:
            continue
        if option not in _FACTORIES:
            importlib.import_module(module)  # registers its factories
        out.extend(_FACTORIES[option](value))
    return out
