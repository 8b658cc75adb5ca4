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
    # files
    "load": "dnntrace.storage",
    "Trace": "dnntrace.storage",
    "TraceError": "dnntrace.storage",
    "Summary": "dnntrace.storage",
    "Layout": "dnntrace.storage",
}

__all__ = ["__version__", *sorted(_LAZY)]

if "torch" in sys.modules:  # torch already there: make torch.ops.dnntrace.enable(model) exist
    importlib.import_module("dnntrace.ops")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dnntrace' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
