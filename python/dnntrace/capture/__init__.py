"""Hooks that feed a model's tensors to the stat bank, and the tracer that owns them."""

from .tracer import Tracer, TracingError, disable, enable

__all__ = ["Tracer", "TracingError", "disable", "enable"]
