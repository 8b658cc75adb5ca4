"""Tensors -> summaries: the stat bank and ``summarize``. Calls ``dnntrace.ops`` only."""

from .bank import StatBank
from .summary import summarize

__all__ = ["StatBank", "summarize"]
