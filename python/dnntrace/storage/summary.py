"""Moved to ``dnntrace.sketch.summary``; this name stays for code that imported it from here."""

from ..sketch.summary import Summary

__all__ = ["Summary"]
