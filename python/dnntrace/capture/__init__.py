"""Hooks that feed a model's tensors to the stat bank, and the tracer that owns them."""

from .tracer import Extension, Tracer, TracingError, disable, enable

__all__ = ["Extension", "Tracer", "TracingError", "disable", "enable"]
