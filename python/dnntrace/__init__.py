"""dnntrace: streaming statistics of activations, gradients and weights while a model trains.

Public names resolve lazily (PEP 562) so ``import dnntrace.storage`` stays free of torch.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from ._version import __version__

_LAZY = {
    # statistics of tensors
    "summarize": "dnntrace.stats.summary",
    "StatBank": "dnntrace.stats.bank",
    # tracing
    "enable": "dnntrace.capture.tracer",
    "disable": "dnntrace.capture.tracer",
    "Tracer": "dnntrace.capture.tracer",
    # the extension contract and the options
    "Extension": "dnntrace.capture.contract",
    "TraceContext": "dnntrace.capture.contract",
    "TraceConfig": "dnntrace.capture.config",
    "register_extension": "dnntrace.capture.contract",
    # files
    "load": "dnntrace.storage",
    "Trace": "dnntrace.storage",
    "TraceError": "dnntrace.storage",
    "Summary": "dnntrace.storage",
    "Layout": "dnntrace.storage",
}

__all__ = ["__version__", *sorted(_LAZY)]


def _torch_ops_enable(model: Any, path: Any = "trace.arrow", **options: Any) -> Any:
    """``torch.ops.dnntrace.enable(model, path, **options)``: ``dnntrace.enable``."""
    return importlib.import_module("dnntrace.capture.tracer").enable(model, path, **options)


def _torch_ops_disable(model: Any) -> Any:
    """``torch.ops.dnntrace.disable(model)``: ``dnntrace.disable``."""
    return importlib.import_module("dnntrace.capture.tracer").disable(model)


def _expose_torch_ops() -> None:
    """Registers the ops (``dnntrace.ops`` loads ``_C``) and sets ``torch.ops.dnntrace.enable``
    / ``disable``: no op schema takes an nn.Module, so these Python entry points are attributes
    of the op namespace object (not operators)."""
    importlib.import_module("dnntrace.ops")
    ns = sys.modules["torch"].ops.dnntrace
    ns.enable = _torch_ops_enable
    ns.disable = _torch_ops_disable


if "torch" in sys.modules:  # torch already there: make torch.ops.dnntrace.enable(model) exist
    _expose_torch_ops()


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        if _LAZY[name].startswith("dnntrace.capture"):  # torch is loaded now
            _expose_torch_ops()
        globals()[name] = value  # resolved once
        return value
    raise AttributeError(f"module 'dnntrace' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
