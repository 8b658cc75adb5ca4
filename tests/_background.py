"""Deterministic background jobs for tests that assert which steps' spectra were computed."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest


@contextlib.contextmanager
def background_jobs_finish() -> Iterator[None]:
    """Inside, each background job of the spectral extensions runs to its end before training
    goes on, so every due spectrum or RankMe is computed however busy the machine. The tracer
    itself skips a job due while the previous one runs and marks the step
    (``test_busy_worker_skips_and_marks_the_step``)."""
    from dnntrace.capture import spectral as SP

    submit = SP._Worker.submit

    def submit_and_wait(self, job):  # type: ignore[no-untyped-def]
        ok = submit(self, job)
        self.wait()
        return ok

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SP._Worker, "submit", submit_and_wait)
        yield
