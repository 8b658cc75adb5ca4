"""Hooks that feed a model's tensors to the stat bank, and the tracer that owns them.

``contract`` is the extension contract (``Extension``, ``TraceContext``), ``config`` the options
(``TraceConfig``); ``tracer`` implements both. See docs/ARCHITECTURE.md.
"""

from .config import TraceConfig
from .contract import AnomalyError, Extension, TraceContext, TracingError, register_extension
from .tracer import Tracer, disable, enable

__all__ = [
    "AnomalyError",
    "Extension",
    "TraceConfig",
    "TraceContext",
    "Tracer",
    "TracingError",
    "disable",
    "enable",
    "register_extension",
]
