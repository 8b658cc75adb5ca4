"""One-line tracing for trainers: ``dnntrace.integrations.lightning.DnntraceCallback`` (Lightning)
and ``dnntrace.integrations.hf.DnntraceCallback`` (Hugging Face ``Trainer``).

Each lives in its own module so that importing dnntrace imports neither library.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["resume_path"]


def resume_path(path: str | os.PathLike[str], step: int) -> str:
    """Where a run resumed at ``step`` writes: ``path`` itself when nothing is there yet, else
    ``<stem>.from<step>.arrow`` beside it (then ``.from<step>-2`` ...), so the trace of the run
    before the checkpoint is never overwritten nor appended to (a closed Arrow stream ends with
    an end-of-stream marker). ``dnntrace-view`` opens both together."""
    p = os.fspath(path)
    if step <= 0 or not os.path.exists(p):
        return p
    stem, ext = os.path.splitext(p)
    cand = f"{stem}.from{step}{ext or '.arrow'}"
    i = 2
    while os.path.exists(cand):
        cand = f"{stem}.from{step}-{i}{ext or '.arrow'}"
        i += 1
    return cand


def start(model: Any, path: str, step: int, options: dict[str, Any]) -> Any:
    """Enables tracing of ``model`` with its step counter at ``step`` (the trainer's global
    step: a resumed run continues its numbering)."""
    from ..capture.tracer import enable

    tracer = enable(model, resume_path(path, step), **options)
    tracer.step_index = int(step)
    return tracer
