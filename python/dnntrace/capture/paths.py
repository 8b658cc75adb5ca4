"""Where a rank's trace goes: ``rank_path`` (one file per rank under ``torch.distributed``)."""

from __future__ import annotations

import os

MERGED_FILE = "merged.arrow"
"""The cross-rank merged rows, beside the rank files (``capture.distributed.RankMerge``)."""


def rank_path(path: str | os.PathLike[str], rank: int, world_size: int) -> str:
    """The file of ``rank``: ``path`` formatted when it holds ``{rank}``; else, when
    ``world_size > 1``, ``<path without suffix>/rank<rank>.arrow``; else ``path`` itself."""
    p = os.fspath(path)
    if "{rank" in p or "{world_size" in p:
        return p.format(rank=rank, world_size=world_size)
    if world_size <= 1:
        return p
    stem, ext = os.path.splitext(p)
    return os.path.join(stem, f"rank{rank}{ext or '.arrow'}")
