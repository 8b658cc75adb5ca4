"""From filled stat banks to record batches on disk, off the training thread.

CUDA: the bank is copied into a free pinned host buffer on a side stream, then reset there; an
event marks completion and a background thread waits on it (only that thread blocks). Two device
banks alternate, so the training stream never waits for a copy. CPU: the filled bank itself is
handed to the background thread, which resets it and returns it to the pool.

Memory is bounded: ``banks`` device banks and ``host_buffers`` pinned buffers. When the writer
falls behind and no buffer is free, the step is dropped and counted; training never blocks.
"""

from __future__ import annotations

import queue
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from .. import _C
from ..stats.bank import StatBank
from ..storage import layout as L
from ..storage.layout import Layout
from ..storage.rows import (
    hist_with_empty,
    scalar_state,
    sparse_hist,
    state_to_batch,
)
from ..storage.writer import TraceWriter

SlotLabel = tuple[str, str, str, str]  # module, kind, tensor, phase


class VectorBlock(NamedTuple):
    """Vector rows recorded together: ``flat`` holds them back to back (on the device)."""

    labels: tuple[SlotLabel, ...]
    lengths: tuple[int, ...]
    flat: torch.Tensor


@dataclass
class _Job:
    counts: torch.Tensor  # host (pinned on CUDA) or the CPU bank's own tensor
    moments: torch.Tensor
    step: int
    wall_time_s: float
    labels: Sequence[SlotLabel]
    meta: Sequence[tuple[str, tuple[int, ...]]]
    scalars: dict[str, float]
    scalar_tensor: torch.Tensor | None = None  # values of tensor scalars, host
    scalar_names: Sequence[str] = ()
    event: Any = None
    release: Callable[[], None] | None = None
    vector_labels: Sequence[SlotLabel] = ()
    vector_lengths: Sequence[int] = ()
    vector_tensor: torch.Tensor | None = None  # all vectors of the step, flat, host float32


@dataclass
class PipelineStats:
    steps_written: int = 0
    steps_dropped: int = 0
    rows: int = 0
    write_seconds: float = 0.0
    flush_us: list[float] = field(default_factory=list)


class Pipeline:
    """Owns the banks and the background writer of one tracer."""

    def __init__(
        self,
        writer: TraceWriter,
        layout: Layout,
        device: torch.device,
        slots: int,
        *,
        host_buffers: int = 4,
        rank: int = 0,
        on_error: Callable[[BaseException], None],
    ) -> None:
        self.writer = writer
        self.layout = layout
        self.device = device
        self.rank = rank
        self.stats = PipelineStats()
        self._on_error = on_error
        self._cuda = device.type == "cuda"
        self._closed = False
        self._dead: BaseException | None = None
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        if self._cuda:
            self._side = torch.cuda.Stream(device=device)
            self._banks = [StatBank(slots, layout, device) for _ in range(2)]
            self._bank_ready: list[Any] = [None, None]  # reset events
            self._free_host: queue.Queue[tuple[torch.Tensor, torch.Tensor]] = queue.Queue()
            self._host_buffers = host_buffers
            for _ in range(host_buffers):
                self._free_host.put(self._new_host(slots))
        else:
            self._host_buffers = host_buffers
            self._free_banks: queue.Queue[StatBank] = queue.Queue()
            for _ in range(host_buffers):
                self._free_banks.put(StatBank(slots, layout, device))
            self._banks = [StatBank(slots, layout, device)]
        self._cur = 0
        self._vectors: Sequence[VectorBlock] = ()
        self._thread = threading.Thread(target=self._run, name="dnntrace-writer", daemon=True)
        self._thread.start()

    # ---- the training thread ------------------------------------------------------------
    @property
    def bank(self) -> StatBank:
        return self._banks[self._cur]

    @property
    def capacity(self) -> int:
        return self.bank.slots

    def memory_bytes(self) -> dict[str, int]:
        per_bank = self.bank.bytes
        if self._cuda:
            return {"device": 2 * per_bank, "host_pinned": self._host_buffers * per_bank}
        return {"host": (1 + self._host_buffers) * per_bank}  # current bank + the pool

    def _new_host(self, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
        c = torch.empty((slots, self.layout.width), dtype=torch.int64, pin_memory=True)
        m = torch.empty((slots, L.NUM_MOMENTS), dtype=torch.float64, pin_memory=True)
        return c, m

    def grow(self, slots: int) -> None:
        """Make the current bank hold ``slots`` rows, keeping what it holds (async copy)."""
        old = self.bank
        new = StatBank(slots, self.layout, self.device)
        new.counts[: old.slots].copy_(old.counts)
        new.moments[: old.slots].copy_(old.moments)
        self._banks[self._cur] = new
        if self._cuda:
            other = 1 - self._cur
            if self._banks[other].slots < slots:
                if self._bank_ready[other] is not None:
                    torch.cuda.current_stream(self.device).wait_event(self._bank_ready[other])
                self._banks[other] = StatBank(slots, self.layout, self.device)
                self._bank_ready[other] = None

    def submit(
        self,
        step: int,
        labels: Sequence[SlotLabel],
        meta: Sequence[tuple[str, tuple[int, ...]]],
        scalars: dict[str, Any],
        vectors: Sequence[VectorBlock] = (),
    ) -> bool:
        """Hands the current bank's contents to the writer; False when the step was dropped."""
        t0 = time.perf_counter()
        if self._dead is not None or self._closed:
            self.bank.reset()
            self.stats.steps_dropped += 1  # the writer stopped: the step is lost, and counted
            return False
        py_scalars = {k: float(v) for k, v in scalars.items() if not isinstance(v, torch.Tensor)}
        t_names = [k for k, v in scalars.items() if isinstance(v, torch.Tensor)]
        self._vectors = vectors
        ok = (
            self._submit_cuda(step, labels, meta, py_scalars, t_names, scalars)
            if self._cuda
            else self._submit_cpu(step, labels, meta, py_scalars, t_names, scalars)
        )
        if not ok:
            self.stats.steps_dropped += 1
        self.stats.flush_us.append((time.perf_counter() - t0) * 1e6)
        if len(self.stats.flush_us) > 10_000:
            del self.stats.flush_us[:5_000]
        return ok

    def _vector_index(self) -> tuple[list[SlotLabel], list[int]]:
        labels = [lb for b in self._vectors for lb in b.labels]
        lengths = [n for b in self._vectors for n in b.lengths]
        return labels, lengths

    def _vector_cat(self) -> torch.Tensor:
        """All vector rows of the step in one new float32 tensor (one op for any number)."""
        return torch.cat([b.flat.float() for b in self._vectors])

    def _submit_cpu(self, step, labels, meta, py_scalars, t_names, scalars) -> bool:  # type: ignore[no-untyped-def]
        try:
            fresh = self._free_banks.get_nowait()
        except queue.Empty:
            self.bank.reset()  # writer behind: drop this step
            return False
        if fresh.slots < self.bank.slots:
            fresh = StatBank(self.bank.slots, self.layout, self.device)
        filled = self.bank
        self._banks[0] = fresh
        st = (
            torch.stack([scalars[n].detach().double().reshape(()) for n in t_names])
            if t_names
            else None
        )

        def release() -> None:
            filled.reset()
            self._free_banks.put(filled)

        job = _Job(
            filled.counts,
            filled.moments,
            step,
            time.time(),
            labels,
            meta,
            py_scalars,
            st,
            t_names,
            None,
            release,
        )
        if self._vectors:
            job.vector_labels, job.vector_lengths = self._vector_index()
            job.vector_tensor = self._vector_cat()  # a copy: the writer owns it
        self._jobs.put(job)
        return True

    def _submit_cuda(self, step, labels, meta, py_scalars, t_names, scalars) -> bool:  # type: ignore[no-untyped-def]
        main = torch.cuda.current_stream(self.device)
        bank = self.bank
        try:
            host = self._free_host.get_nowait()
        except queue.Empty:
            bank.reset()  # on the main stream, in order: the step is dropped
            return False
        if host[0].shape[0] < bank.slots:
            host = self._new_host(bank.slots)
        st_dev = (
            torch.stack([scalars[n].detach().double().reshape(()) for n in t_names])
            if t_names
            else None
        )
        vec_dev = self._vector_cat() if self._vectors else None
        self._side.wait_stream(main)
        with torch.cuda.stream(self._side):
            hc = host[0][: bank.slots]
            hm = host[1][: bank.slots]
            hc.copy_(bank.counts, non_blocking=True)
            hm.copy_(bank.moments, non_blocking=True)
            st_host = None
            if st_dev is not None:
                st_host = torch.empty(st_dev.shape, dtype=st_dev.dtype, pin_memory=True)
                st_host.copy_(st_dev, non_blocking=True)
                st_dev.record_stream(self._side)
            vec_host = None
            if vec_dev is not None:
                vec_host = torch.empty(vec_dev.shape, dtype=vec_dev.dtype, pin_memory=True)
                vec_host.copy_(vec_dev, non_blocking=True)
                vec_dev.record_stream(self._side)
            bank.reset()
            done = torch.cuda.Event()
            done.record(self._side)
        bank.counts.record_stream(self._side)
        bank.moments.record_stream(self._side)
        self._bank_ready[self._cur] = done
        # switch to the other bank; the main stream waits (on the GPU) for its earlier reset
        self._cur = 1 - self._cur
        if self._bank_ready[self._cur] is not None:
            main.wait_event(self._bank_ready[self._cur])
        if self.bank.slots < bank.slots:
            self._banks[self._cur] = StatBank(bank.slots, self.layout, self.device)

        def release() -> None:
            self._free_host.put(host)

        job = _Job(
            hc, hm, step, time.time(), labels, meta, py_scalars, st_host, t_names, done, release
        )
        if vec_host is not None:
            job.vector_labels, job.vector_lengths = self._vector_index()
            job.vector_tensor = vec_host
        self._jobs.put(job)
        return True

    def close(self, timeout: float = 60.0) -> None:
        if self._closed:
            return
        self._closed = True
        self._jobs.put(None)
        self._thread.join(timeout)
        try:
            self.writer.close()
        except OSError as e:
            if self._dead is None:  # a write error was already reported once
                warnings.warn(
                    f"dnntrace: could not close {self.writer.path}: {e}",
                    RuntimeWarning,
                    stacklevel=2,
                )

    # ---- the writer thread --------------------------------------------------------------
    def _run(self) -> None:
        # Build one throw-away batch first: the first conversion imports and initialises pyarrow
        # pieces (~0.5 s), which would otherwise make the first steps of a fast loop drop.
        try:
            empty = np.zeros((1, self.layout.width), np.int64)
            state_to_batch(
                empty,
                np.zeros((1, L.NUM_MOMENTS)),
                self.layout,
                step=0,
                module=[""],
                kind=["scalar"],
                tensor=[""],
                dtype=[""],
                shape=[()],
                values=[np.zeros(1, np.float32)],
            )
        except Exception:  # noqa: BLE001 - only a warm-up; real errors surface on real jobs
            pass
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                if self._dead is None:
                    if job.event is not None:
                        # poll rather than cudaEventSynchronize: query() never counts as a
                        # synchronising call (sync-debug mode) and only this thread waits
                        while not job.event.query():
                            time.sleep(0.0002)
                    t0 = time.perf_counter()
                    self._write(job)
                    self.stats.write_seconds += time.perf_counter() - t0
                    self.stats.steps_written += 1
                else:
                    self.stats.steps_dropped += 1
            except BaseException as e:  # noqa: BLE001 - reported once, tracing stops writing
                self._dead = e
                self.stats.steps_dropped += 1
                self._on_error(e)
            finally:
                if job.release is not None:
                    job.release()

    def _write(self, job: _Job) -> None:
        counts = job.counts.numpy()
        moments = job.moments.numpy()
        n = min(len(job.labels), counts.shape[0])
        used = np.flatnonzero(counts[:n, L.CALLS] > 0)
        labels = [job.labels[i] for i in used]
        meta = [job.meta[i] for i in used]
        counts, moments = counts[used], moments[used]
        # Histograms of the tensor rows only; scalar and vector rows carry none, so they are
        # built with the header columns alone (a full row is layout.width int64s).
        hist = sparse_hist(counts[:, L.HEADER :])
        counts = counts[:, : L.HEADER]
        names = list(job.scalars)
        svalues = list(job.scalars.values())
        if job.scalar_tensor is not None:
            names += list(job.scalar_names)
            svalues += job.scalar_tensor.tolist()
        extra_c: list[np.ndarray] = [counts]
        extra_m: list[np.ndarray] = [moments]
        if names:  # scalar rows ride in the same record batch
            sc, sm = scalar_state(svalues, self.layout, width=L.HEADER)
            extra_c.append(sc)
            extra_m.append(sm)
            labels += [("", "scalar", name, "train") for name in names]
            meta += [("float64", ())] * len(names)
        values: list[np.ndarray | None] | None = None
        if job.vector_tensor is not None:  # vector rows too
            flat = job.vector_tensor.numpy()
            vecs = np.split(flat, np.cumsum(job.vector_lengths)[:-1])
            lengths = np.asarray(job.vector_lengths, np.int64)
            vc, vm = _C.vector_row_stats(flat, lengths, L.HEADER)  # = vector_state, one pass
            values = [None] * len(labels) + list(vecs)
            extra_c.append(vc)
            extra_m.append(vm)
            labels += list(job.vector_labels)
            meta += [("float32", (int(n),)) for n in job.vector_lengths]
        if not labels:
            return
        counts = np.concatenate(extra_c) if len(extra_c) > 1 else counts
        moments = np.concatenate(extra_m) if len(extra_m) > 1 else moments
        hist = hist_with_empty(*hist, counts.shape[0] - len(hist[0]))
        batch = state_to_batch(
            counts,
            moments,
            self.layout,
            step=job.step,
            module=[lb[0] for lb in labels],
            kind=[lb[1] for lb in labels],
            tensor=[lb[2] for lb in labels],
            phase=[lb[3] for lb in labels],
            dtype=[m[0] for m in meta],
            shape=[m[1] for m in meta],
            rank=self.rank,
            wall_time_s=job.wall_time_s,
            values=values,
            hist=hist,
        )
        self.writer.write(batch)
        self.stats.rows += batch.num_rows
