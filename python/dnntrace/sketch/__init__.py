"""The sketch: what one row of statistics is, and how rows merge. Numpy only (no torch, no
pyarrow), below ``ops``/``stats`` (which fill rows on the device) and ``storage`` (which writes
and reads them).

- ``layout``: the log-linear bucket layout (``Layout``), the counts-row header fields (``COUNT``,
  ``NAN``, ...) and the moments-row fields (``SUM``, ``SUM_COMP``, ...), mirrored from
  ``csrc/core/loglinear.h``; ``row_index``, the numpy twin of the bucket mapping.
- ``merge``: ``merge_rows``, the one row merge (exact counts, compensated sums) used by every
  merger, and the header statistics (``finite_count``, ``mean``, ``variance``, ``rms``, ``l2``).
- ``summary``: ``Summary``, one merged row with its derived statistics and sketch queries
  (quantile, CDF, histograms).
"""

from . import layout, merge
from .layout import Layout, row_index
from .merge import empty_moments, merge_rows
from .summary import Summary

__all__ = ["Layout", "Summary", "empty_moments", "layout", "merge", "merge_rows", "row_index"]
