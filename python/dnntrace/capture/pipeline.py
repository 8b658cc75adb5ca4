"""From filled stat banks to record batches on disk, off the training thread.

At a step's end the training thread hands the filled bank, with the list of rows used in the
step, to a background writer and continues with a free bank from a pool (CUDA: an event marks
the end of the step's device work; the training stream waits on the GPU, never on the host, for
the new bank's reset). Only the used rows leave the bank, each compacted to its header, moments
and the span of its non-zero histogram buckets as uint32:

- CPU: ``_C.compact_rows`` reads and resets the used rows in one native pass without the GIL;
- CUDA: the writer thread runs the same compaction as device ops on a side stream
  (``StatBank.compact_bounds`` / ``gather_spans``), copies the compact rows to pinned memory and
  resets the used rows there; it polls events and never calls a synchronising function.

The bank goes back to the pool as soon as its rows are compacted. The writer coalesces the steps
waiting in its queue into one record batch. Memory is bounded by the pool (``host_buffers``
banks; 3 device banks on CUDA): when the writer falls behind and no bank is free, the step is
dropped and counted; training never blocks.
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
import pyarrow as pa
import torch

from .. import _C
from ..stats.bank import StatBank
from ..storage import layout as L
from ..storage.layout import Layout
from ..storage.rows import label_columns, scalar_state, state_to_batch
from ..storage.writer import TraceWriter

SlotLabel = tuple[str, str, str, str]  # module, kind, tensor, phase


class VectorBlock(NamedTuple):
    """Vector rows recorded together: ``flat`` holds them back to back (on the device)."""

    labels: tuple[SlotLabel, ...]
    lengths: tuple[int, ...]
    flat: torch.Tensor


@dataclass
class _Job:
    bank: StatBank
    rows: np.ndarray  # int64, the bank rows used this step
    step: int
    wall_time_s: float
    labels: Sequence[SlotLabel]
    meta: Sequence[tuple[str, tuple[int, ...]]]
    scalars: dict[str, float]
    scalar_tensor: torch.Tensor | None = None  # values of tensor scalars (device)
    scalar_names: Sequence[str] = ()
    event: Any = None  # CUDA: recorded on the training stream after the step's last op
    vector_labels: Sequence[SlotLabel] = ()
    vector_lengths: Sequence[int] = ()
    vector_tensor: torch.Tensor | None = None  # all vectors of the step, flat float32 (device)


class _Compact(NamedTuple):
    """A step's rows as the writer stores them (host numpy arrays)."""

    job: _Job
    header: np.ndarray  # int64[m, HEADER]
    moments: np.ndarray  # float64[m, NUM_MOMENTS]
    first: np.ndarray  # int32[m], hist_offset
    offsets: np.ndarray  # int64[m + 1], span offsets into values
    values: np.ndarray  # uint32, the spans back to back
    scalars: np.ndarray | None  # float64 values of tensor scalars
    vectors: np.ndarray | None  # float32, flat


@dataclass
class PipelineStats:
    steps_written: int = 0
    steps_dropped: int = 0
    rows: int = 0
    batches: int = 0
    write_seconds: float = 0.0
    writer_cpu_seconds: float = 0.0
    bytes_to_host: int = 0  # compact rows taken from the banks (CUDA: copied device -> host)
    flush_us: list[float] = field(default_factory=list)


class Pipeline:
    """Owns the banks and the background writer of one tracer."""

    max_coalesce = 64  # steps per record batch at most

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
        self._side = torch.cuda.Stream(device=device) if self._cuda else None
        self._pool_size = min(host_buffers, 2) if self._cuda else host_buffers
        self._free_banks: queue.Queue[StatBank] = queue.Queue()
        for _ in range(self._pool_size):
            self._free_banks.put(StatBank(slots, layout, device))
        self._bank = StatBank(slots, layout, device)
        self._label_cache: dict[Any, tuple[Any, Any, dict[str, pa.Array]]] = {}
        self._vectors: Sequence[VectorBlock] = ()
        self._thread = threading.Thread(target=self._run, name="dnntrace-writer", daemon=True)
        self._thread.start()

    # ---- the training thread ------------------------------------------------------------
    @property
    def bank(self) -> StatBank:
        return self._bank

    @property
    def capacity(self) -> int:
        return self.bank.slots

    def memory_bytes(self) -> dict[str, int]:
        per_bank = self.bank.bytes
        where = "device" if self._cuda else "host"
        return {where: (1 + self._pool_size) * per_bank}  # current bank + the pool

    def grow(self, slots: int) -> None:
        """Make the current bank hold ``slots`` rows, keeping what it holds (async copy)."""
        old = self.bank
        new = StatBank(slots, self.layout, self.device)
        new.counts[: old.slots].copy_(old.counts)
        new.moments[: old.slots].copy_(old.moments)
        new.touched = set(old.touched)
        self._bank = new

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
        bank = self.bank
        rows = np.fromiter(sorted(bank.touched), np.int64, len(bank.touched))
        ok = False
        if self._dead is None and not self._closed:
            try:
                fresh = self._free_banks.get_nowait()
            except queue.Empty:
                fresh = None  # the writer is behind: drop this step
            if fresh is not None:
                if fresh.slots < bank.slots:
                    fresh = StatBank(bank.slots, self.layout, self.device)
                ok = True
        if not ok:
            self._reset(bank, rows)
            self.stats.steps_dropped += 1  # the step is lost, and counted
            self._note_flush(t0)
            return False
        t_names = [k for k, v in scalars.items() if isinstance(v, torch.Tensor)]
        job = _Job(
            bank,
            rows,
            step,
            time.time(),
            labels,
            meta,
            {k: float(v) for k, v in scalars.items() if not isinstance(v, torch.Tensor)},
            torch.stack([scalars[n].detach().double().reshape(()) for n in t_names])
            if t_names
            else None,
            t_names,
        )
        if vectors:
            job.vector_labels = [lb for b in vectors for lb in b.labels]
            job.vector_lengths = [n for b in vectors for n in b.lengths]
            # one new float32 tensor for any number of blocks: the writer owns it
            job.vector_tensor = torch.cat([b.flat.float() for b in vectors])
        if self._cuda:
            job.event = torch.cuda.Event()
            job.event.record()
            if fresh.ready is not None:  # its reset on the side stream, waited for on the GPU
                torch.cuda.current_stream(self.device).wait_event(fresh.ready)
                fresh.ready = None
        self._bank = fresh
        self._jobs.put(job)
        self._note_flush(t0)
        return True

    def _note_flush(self, t0: float) -> None:
        self.stats.flush_us.append((time.perf_counter() - t0) * 1e6)
        if len(self.stats.flush_us) > 10_000:
            del self.stats.flush_us[:5_000]

    def _reset(self, bank: StatBank, rows: np.ndarray) -> None:
        """Clears the used rows of a bank (on the current stream)."""
        if len(rows):
            bank.reset_rows(self._index(rows))
        bank.touched = set()

    def _index(self, rows: np.ndarray) -> torch.Tensor:
        idx = torch.from_numpy(rows)
        if self._cuda:
            idx = idx.pin_memory().to(self.device, non_blocking=True)
        return idx

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
            empty = np.zeros((1, L.HEADER), np.int64)
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
                hist=(np.zeros(1, np.int32), pa.array([[]], pa.list_(pa.uint32()))),
            )
        except Exception:  # noqa: BLE001 - only a warm-up; real errors surface on real jobs
            pass
        done = False
        while not done:
            job = self._jobs.get()
            if job is None:
                return
            jobs = [job]
            while len(jobs) < self.max_coalesce:  # steps already waiting go in the same batch
                try:
                    nxt = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    done = True
                    break
                jobs.append(nxt)
            c0, t0 = time.thread_time(), time.perf_counter()
            parts: list[_Compact] = []
            handed = 0  # jobs whose bank went back to the pool (_compact returns it, even failing)
            written = 0
            try:
                for j in jobs:
                    handed += 1
                    if self._dead is None:
                        parts.append(self._compact(j))
                    else:
                        self._release(j.bank, j.rows)
                if parts:
                    self._write(parts)
                    written = len(parts)
            except BaseException as e:  # noqa: BLE001 - reported once, tracing stops writing
                for j in jobs[handed:]:
                    self._release(j.bank, j.rows)
                if self._dead is None:
                    self._dead = e
                    self._on_error(e)
            self.stats.steps_written += written
            self.stats.steps_dropped += len(jobs) - written
            self.stats.write_seconds += time.perf_counter() - t0
            self.stats.writer_cpu_seconds += time.thread_time() - c0

    def _release(self, bank: StatBank, rows: np.ndarray) -> None:
        """Resets the used rows of a handed-over bank and returns it to the pool."""
        if self._cuda:
            assert self._side is not None
            with torch.cuda.stream(self._side):
                self._reset(bank, rows)
                bank.ready = torch.cuda.Event()
                bank.ready.record(self._side)
        else:
            self._reset(bank, rows)
        self._free_banks.put(bank)

    def _wait(self, event: Any) -> None:
        # poll rather than cudaEventSynchronize: query() never counts as a synchronising call
        # (sync-debug mode) and only this thread waits
        while not event.query():
            time.sleep(0.0002)

    def _compact(self, job: _Job) -> _Compact:
        """The used rows of the job's bank as compact host arrays; the bank is reset and returned
        to the pool (also when this fails)."""
        bank = job.bank
        if not self._cuda:
            try:
                header, moments, first, offsets, values = _C.compact_rows(
                    bank.counts.numpy(), bank.moments.numpy(), job.rows, True
                )
            except BaseException:
                self._release(bank, job.rows)
                raise
            bank.touched = set()
            self._free_banks.put(bank)
            st = job.scalar_tensor.numpy() if job.scalar_tensor is not None else None
            vt = job.vector_tensor.numpy() if job.vector_tensor is not None else None
            self.stats.bytes_to_host += header.nbytes + moments.nbytes + values.nbytes
            return _Compact(job, header, moments, first, offsets, values, st, vt)
        return self._compact_cuda(job)

    def _compact_cuda(self, job: _Job) -> _Compact:
        assert self._side is not None
        bank, side = job.bank, self._side
        self._wait(job.event)
        m = len(job.rows)
        try:
            with torch.cuda.stream(side):
                idx = self._index(job.rows)
                header, moments, first, length, biggest = bank.compact_bounds(idx)
                small = torch.cat([first, length, biggest])
                h_small = torch.empty(small.shape, dtype=small.dtype, pin_memory=True)
                h_header = torch.empty(header.shape, dtype=header.dtype, pin_memory=True)
                h_moments = torch.empty(moments.shape, dtype=moments.dtype, pin_memory=True)
                h_small.copy_(small, non_blocking=True)
                h_header.copy_(header, non_blocking=True)
                h_moments.copy_(moments, non_blocking=True)
                extra = []
                for t in (job.scalar_tensor, job.vector_tensor):
                    if t is None:
                        extra.append(None)
                        continue
                    t.record_stream(side)
                    h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                    h.copy_(t, non_blocking=True)
                    extra.append(h)
                ev = torch.cuda.Event()
                ev.record(side)
            self._wait(ev)
            hs = h_small.numpy()
            first_np, length_np, biggest_np = hs[:m], hs[m : 2 * m], hs[2 * m :]
            if m and biggest_np.max() > np.iinfo(np.uint32).max:
                raise OverflowError("a histogram bucket exceeds 2**32 - 1 in one step")
            offsets = np.zeros(m + 1, np.int64)
            np.cumsum(length_np, out=offsets[1:])
            total = int(offsets[-1])
            with torch.cuda.stream(side):
                spans = bank.gather_spans(idx, first, length, total)
                h_spans = torch.empty(spans.shape, dtype=spans.dtype, pin_memory=True)
                h_spans.copy_(spans, non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(side)
            self._wait(ev)
        finally:
            self._release(bank, job.rows)
        values = h_spans.numpy().view(np.uint32)
        self.stats.bytes_to_host += (
            h_small.numpy().nbytes + h_header.numpy().nbytes + h_moments.numpy().nbytes
        ) + values.nbytes
        return _Compact(
            job,
            h_header.numpy(),
            h_moments.numpy(),
            first_np.astype(np.int32),
            offsets,
            values,
            extra[0].numpy() if extra[0] is not None else None,
            extra[1].numpy() if extra[1] is not None else None,
        )

    def _write(self, parts: Sequence[_Compact]) -> None:
        batches = [b for b in (self._batch(p) for p in parts) if b is not None]
        if not batches:
            return
        if len(batches) == 1:
            batch = batches[0]
        else:  # one record batch for the steps that waited together (dictionaries unified)
            batch = pa.Table.from_batches(batches).combine_chunks().to_batches()[0]
        self.writer.write(batch)
        self.stats.rows += batch.num_rows
        self.stats.batches += 1

    def _labels(self, job: _Job, rows: np.ndarray) -> dict[str, pa.Array]:
        """Label columns of the tensor rows, cached: the same rows are used step after step. The
        entry keeps the label tuples alive, so their ids in the key are not reused."""
        key = (id(job.labels), id(job.meta), rows.tobytes())
        hit = self._label_cache.get(key)
        if hit is not None and hit[0] is job.labels and hit[1] is job.meta:
            return hit[2]
        if len(self._label_cache) > 64:
            self._label_cache.clear()
        cols = label_columns([job.labels[i] for i in rows], [job.meta[i] for i in rows])
        self._label_cache[key] = (job.labels, job.meta, cols)
        return cols

    def _batch(self, part: _Compact) -> pa.RecordBatch | None:
        job = part.job
        n = min(len(job.labels), job.bank.slots)
        header, moments, first, offsets = part.header, part.moments, part.first, part.offsets
        keep = (header[:, L.CALLS] > 0) & (job.rows < n)
        rows = job.rows
        if not keep.all():
            sel = np.flatnonzero(keep)
            lengths = np.diff(offsets)[sel]
            starts = offsets[:-1][sel]
            values = (
                np.concatenate(
                    [part.values[a : a + b] for a, b in zip(starts, lengths, strict=True)]
                )
                if len(sel)
                else np.zeros(0, np.uint32)
            )
            offsets = np.zeros(len(sel) + 1, np.int64)
            np.cumsum(lengths, out=offsets[1:])
            header, moments, first, rows = header[sel], moments[sel], first[sel], rows[sel]
        else:
            values = part.values
        labels: list[SlotLabel] = []
        meta: list[tuple[str, tuple[int, ...]]] = []
        extra_c: list[np.ndarray] = [header]
        extra_m: list[np.ndarray] = [moments]
        names = list(job.scalars)
        svalues = list(job.scalars.values())
        if part.scalars is not None:
            names += list(job.scalar_names)
            svalues += part.scalars.tolist()
        if names:  # scalar rows ride in the same record batch
            sc, sm = scalar_state(svalues, self.layout, width=L.HEADER)
            extra_c.append(sc)
            extra_m.append(sm)
            labels += [("", "scalar", name, "train") for name in names]
            meta += [("float64", ())] * len(names)
        vecs: list[np.ndarray] = []
        if part.vectors is not None:  # vector rows too
            flat = part.vectors
            vecs = np.split(flat, np.cumsum(job.vector_lengths)[:-1])
            lengths = np.asarray(job.vector_lengths, np.int64)
            vc, vm = _C.vector_row_stats(flat, lengths, L.HEADER)  # = vector_state, one pass
            extra_c.append(vc)
            extra_m.append(vm)
            labels += list(job.vector_labels)
            meta += [("float32", (int(k),)) for k in job.vector_lengths]
        n_tensor = len(rows)
        total = n_tensor + len(labels)
        if total == 0:
            return None
        counts = np.concatenate(extra_c) if len(extra_c) > 1 else header
        moments = np.concatenate(extra_m) if len(extra_m) > 1 else moments
        list_offsets = np.concatenate([offsets, np.full(len(labels), offsets[-1])]).astype(np.int32)
        hist = (
            np.concatenate([first, np.zeros(len(labels), np.int32)]),
            pa.ListArray.from_arrays(pa.array(list_offsets), pa.array(values, pa.uint32())),
        )
        cols = self._labels(job, rows)
        if labels:
            more = label_columns(labels, meta)
            cols = {k: pa.concat_arrays([v, more[k]]) for k, v in cols.items()}
        values_col = [None] * n_tensor + [None] * (len(labels) - len(vecs)) + list(vecs)
        return state_to_batch(
            counts,
            moments,
            self.layout,
            step=job.step,
            rank=self.rank,
            wall_time_s=job.wall_time_s,
            values=values_col if vecs else None,
            hist=hist,
            columns=cols,
        )
