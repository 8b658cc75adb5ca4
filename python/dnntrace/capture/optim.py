"""Where a traced step begins and ends, and which gradient it records, for every way a step runs.

The rules (docs/FORMAT.md, "Steps"):

- A step **ends** at an optimizer's ``step()`` (its post-hook), at ``tracer.step()``, or when a
  ``GradScaler`` skips the optimizer step. The step is written when the next one **begins**: at
  the next forward pass of the model (or any other recorded tensor), at the next ``step()`` of an
  optimizer that already stepped, or at ``close()``. So a scalar logged after ``opt.step()`` and
  before the next forward belongs to the step just ended, and closing adds no empty step.
- Another optimizer stepping before the next forward (several optimizers on one model, one
  backward) joins the step just ended: one step per training iteration.
- ``weight_grad`` is the gradient each optimizer steps with: read in its pre-step hook, after
  clipping and ``GradScaler.unscale_``; with ``step(closure)`` (LBFGS, Lightning), right after
  the **first** closure evaluation, which is the gradient at the step's starting weights. Later
  evaluations of the same step (LBFGS line search) are not recorded at all, so activations and
  gradients describe one forward/backward. Parameters held by no optimizer are recorded with the
  first optimizer of the step. Without an optimizer, ``tracer.step()`` records the gradients
  accumulated since the last step.
- A step a ``GradScaler`` skipped (Inf/NaN gradients) is recorded with its unscaled gradients and
  a scalar row ``amp/skipped`` = 1; ``amp/scale`` holds the loss scale the step used.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .tracer import Tracer

_TRACERS: weakref.WeakSet[Tracer] = weakref.WeakSet()
_LOCK = threading.Lock()
_PATCHED = False


def register(tracer: Tracer) -> None:
    """Makes ``GradScaler.step`` report skipped steps to ``tracer`` (patched once, lazily)."""
    _patch_grad_scaler()
    with _LOCK:
        _TRACERS.add(tracer)


def unregister(tracer: Tracer) -> None:
    with _LOCK:
        _TRACERS.discard(tracer)


def _patch_grad_scaler() -> None:
    # GradScaler.step skips optimizer.step() when gradients hold Inf/NaN, so no optimizer hook
    # fires and the step would silently merge with the next. There is no hook on GradScaler, so
    # its step() is wrapped once: without a live tracer it only calls the original.
    global _PATCHED
    with _LOCK:
        if _PATCHED:
            return
        from torch.amp import grad_scaler

        cls = grad_scaler.GradScaler
        orig = cls.step

        def step(self: Any, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
            with _LOCK:
                live = [t for t in _TRACERS if not t.closed and t.wants_optimizer(optimizer)]
            if not live or not self.is_enabled():
                return orig(self, optimizer, *args, **kwargs)
            before = [t._pre_steps for t in live]
            out = orig(self, optimizer, *args, **kwargs)
            for t, n in zip(live, before, strict=True):
                t._after_scaler_step(optimizer, self, skipped=t._pre_steps == n)
            return out

        step.__wrapped__ = orig  # type: ignore[attr-defined]
        step.__doc__ = orig.__doc__
        cls.step = step  # type: ignore[method-assign]
        _PATCHED = True


class ClosureProbe:
    """Wraps an optimizer's closure: the first evaluation is traced and its gradients recorded;
    later evaluations (LBFGS line search) run with the tracer paused."""

    def __init__(
        self, closure: Callable[[], Any], tracer: Tracer, optimizer: torch.optim.Optimizer
    ) -> None:
        self.closure = closure
        self.tracer = tracer
        self.optimizer = optimizer
        self.calls = 0

    def __call__(self) -> Any:
        self.calls += 1
        if self.calls > 1:
            with self.tracer.paused():
                return self.closure()
        out = self.closure()
        self.tracer.guard(self.tracer._grads_ready)(self.optimizer)
        return out


def with_probe(
    opt: torch.optim.Optimizer,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    probe_of: Callable[[Callable[[], Any]], Any],
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """``(args, kwargs)`` of ``optimizer.step`` with its closure wrapped; None without one.
    The step hooks see ``args`` with the optimizer itself first."""
    i = 1 if args and args[0] is opt else 0
    if len(args) > i and callable(args[i]):
        return (*args[:i], probe_of(args[i]), *args[i + 1 :]), kwargs
    c = kwargs.get("closure")
    if callable(c):
        return args, {**kwargs, "closure": probe_of(c)}
    return None
