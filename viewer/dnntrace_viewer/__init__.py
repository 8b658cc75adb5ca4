"""dnntrace-view: a Datashader + Panel browser viewer for dnntrace trace files.

Imports only ``dnntrace.storage`` from dnntrace (no torch); heavy modules load on use.
"""

from __future__ import annotations

__all__ = ["__version__"]
__version__ = "0.1.0"
