"""From filled stat banks to record batches on disk, off the training thread.

At a step's end the training thread hands the filled bank, with the list of rows used in the
step, to a background writer and continues with a free bank from a pool (CUDA: an event marks
the end of the step's device work; the training stream waits on the GPU, never on the host, for
the new bank's reset). Only the used rows leave the bank, each compacted to its header, moments
and its non-zero histogram buckets as (uint16 bucket, uint32 count) pairs, which is what the
trace stores (format version 2):

- CPU: ``_C.compact_rows`` reads and resets the used rows in one native pass without the GIL,
  each row's scan bounded by its header and min/max (checked, rescanned when short) and
  skipping the gap between its signs where the row's last compaction found one (``_inner``;
  checked, read in full when it missed values), into two buffers reused from record batch to
  record batch (``_window``, ``_window_index``);
- CUDA: the writer thread runs the same compaction as device ops on a side stream
  (``StatBank.compact_bounds`` / ``gather_nonzero``), copies the compact rows to pinned memory
  and resets the used rows there; it polls events and never calls a synchronising function.

The bank goes back to the pool as soon as its rows are compacted. The writer coalesces the steps
waiting in its queue into one record batch. Memory is bounded by the pool (``host_buffers``
banks; 3 device banks on CUDA): when the writer falls behind and no bank is free, the step is
dropped and counted; training never blocks.
"""

from __future__ import annotations

import collections
import contextlib
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
from ..sketch import layout as L
from ..sketch.layout import Layout
from ..stats.bank import StatBank
from ..storage import kinds as K
from ..storage.rows import label_columns, pair_lists, scalar_state, state_to_batch
from ..storage.schema import BASE_SCHEMA
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
    # the bank rows used this step: the bank's set of touched rows as handed over (the flush does
    # no more work than that), sorted into int64 by the writer (_sorted_rows) before anything else
    rows: Any
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
    offsets: np.ndarray  # int64[m + 1], row i's pairs are index/values[offsets[i]:offsets[i+1]]
    index: np.ndarray  # uint16, the non-zero buckets, ascending per row
    values: np.ndarray  # uint32, their counts
    scalars: np.ndarray | None  # float64 values of tensor scalars
    vectors: np.ndarray | None  # float32, flat


_TICK: Any = object()  # the coalescing window ended without a new step


def _sorted_rows(rows: set[int]) -> np.ndarray:
    """The bank rows of a step as sorted int64 (from the bank's set of touched rows)."""
    return np.fromiter(sorted(rows), np.int64, len(rows))


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A pinned host copy of ``t``, queued on the current stream (complete at its next event)."""
    if not t.is_cuda:
        return t.clone()
    h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    h.copy_(t, non_blocking=True)
    return h


@dataclass
class PipelineStats:
    steps_written: int = 0
    steps_dropped: int = 0
    rows: int = 0
    batches: int = 0
    write_seconds: float = 0.0
    writer_cpu_seconds: float = 0.0
    bytes_to_host: int = 0  # compact rows taken from the banks (CUDA: copied device -> host)
    buckets_scanned: int = 0  # histogram buckets the CPU compaction read
    flush_us: list[float] = field(default_factory=list)


class Pipeline:
    """Owns the banks and the background writer of one tracer."""

    max_coalesce = 256  # steps per record batch at most
    # Steps are compacted as they arrive (their bank goes back to the pool at once) and written
    # together at most this long after the first of them: one record batch, one compression
    # and one disk write per window instead of per step. A kill -9 loses at most this window.
    coalesce_s = 0.5
    # CPU banks compacted by the device-op path CUDA uses (tests check it against the native one)
    device_ops = False
    # (bucket, count) pairs the window holds at first (6 MB); it grows to the largest window
    # written, up to max_window pairs (96 MB): a larger window gets fresh arrays, freed once written
    initial_window = 1 << 20
    max_window = 1 << 24

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
        # a C queue and a deque (atomic append/popleft): the flush takes no Python-level locks
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._side = torch.cuda.Stream(device=device) if self._cuda else None
        self._pool_size = min(host_buffers, 2) if self._cuda else host_buffers
        self._free_banks: collections.deque[StatBank] = collections.deque()
        for _ in range(self._pool_size):
            self._free_banks.append(StatBank(slots, layout, device))
        self._bank = StatBank(slots, layout, device)
        self._label_cache: dict[Any, tuple[Any, Any, dict[str, pa.Array]]] = {}
        # The (bucket, count) pairs of the steps waiting to be written, back to back (CPU banks):
        # two buffers reused window after window, so neither the compaction's output nor the
        # record batch's list values are fresh memory to fault in.
        size = 0 if self._cuda else self.initial_window
        self._window = np.empty(size, np.uint32)  # counts
        self._window_index = np.empty(size, np.uint16)  # bucket indices
        self._window_used = 0  # pairs of pending steps in it
        self._window_need = 0  # pairs of pending steps in all: the next window's size
        self._window_scan = 0  # the most room one step's compaction needed (its spans)
        # per bank row, where its data was at its last compaction (compact_rows' `inner`): a
        # prediction of the empty buckets between its signs, which the next compaction skips
        self._inner = np.full((0 if self._cuda else slots, 2), -1, np.int32)
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
        out = {where: (1 + self._pool_size) * per_bank}  # current bank + the pool
        if self._window.nbytes:  # the pairs of steps waiting to be written
            out["writer_window"] = self._window.nbytes + self._window_index.nbytes
        return out

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
        swap: Callable[[StatBank, StatBank], None] | None = None,
    ) -> bool:
        """Hands the current bank's contents to the writer; False when the step was dropped.
        ``swap(old, new)`` is called once the next bank is known (``new is old`` when the step is
        dropped), before the old bank is handed over or reset: writers of rows outside this call
        (the native gradient hooks) move to the new bank there and mark their rows in the old."""
        t0 = time.perf_counter()
        bank = self.bank
        ok = False
        if self._dead is None and not self._closed:
            try:
                fresh = self._free_banks.popleft()
            except IndexError:
                fresh = None  # the writer is behind: drop this step
            if fresh is not None:
                if fresh.slots < bank.slots:
                    fresh = StatBank(bank.slots, self.layout, self.device)
                ok = True
        if not ok:
            if swap is not None:
                swap(bank, bank)
            self._reset(bank, _sorted_rows(bank.touched))
            self.stats.steps_dropped += 1  # the step is lost, and counted
            self._note_flush(t0)
            return False
        assert fresh is not None
        if swap is not None:
            swap(bank, fresh)
        # host tensors are read here (no sync, and no torch ops on the training thread); device
        # tensors are stacked and copied on the writer's side stream
        t_names = [
            k for k, v in scalars.items() if isinstance(v, torch.Tensor) and v.device.type != "cpu"
        ]
        job = _Job(
            bank,
            bank.touched,
            step,
            time.time(),
            labels,
            meta,
            {
                k: float(v)
                for k, v in scalars.items()
                if not isinstance(v, torch.Tensor) or v.device.type == "cpu"
            },
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
                kind=[K.SCALAR],
                tensor=[""],
                dtype=[""],
                shape=[()],
                values=[np.zeros(1, np.float32)],
                hist=(pa.array([[]], pa.list_(pa.uint16())), pa.array([[]], pa.list_(pa.uint32()))),
            )
        except Exception:  # noqa: BLE001 - only a warm-up; real errors surface on real jobs
            pass
        pending: list[_Compact] = []
        since = 0.0  # when the oldest pending step was compacted
        while True:
            wait = None if not pending else max(0.0, since + self.coalesce_s - time.monotonic())
            try:
                job = self._jobs.get(timeout=wait)
            except queue.Empty:
                job = _TICK
            c0, t0 = time.thread_time(), time.perf_counter()
            if job is not None and job is not _TICK:
                try:
                    job.rows = _sorted_rows(job.rows)
                    if self._dead is None:
                        pending.append(self._compact(job))  # returns the bank, even failing
                        since = since if len(pending) > 1 else time.monotonic()
                    else:
                        self._release(job.bank, job.rows)
                        self.stats.steps_dropped += 1
                except BaseException as e:  # noqa: BLE001 - reported once, tracing stops writing
                    self._failed(e, 1)
            if pending and (
                job is None
                or job is _TICK
                or len(pending) >= self.max_coalesce
                or time.monotonic() - since >= self.coalesce_s
            ):
                try:
                    if self._dead is None:
                        self._write(pending)
                        self.stats.steps_written += len(pending)
                    else:
                        self.stats.steps_dropped += len(pending)
                except BaseException as e:  # noqa: BLE001 - reported once, tracing stops writing
                    self._failed(e, len(pending))
                pending = []
                self._window_reset()
            self.stats.write_seconds += time.perf_counter() - t0
            self.stats.writer_cpu_seconds += time.thread_time() - c0
            if job is None:
                return

    def _failed(self, e: BaseException, steps: int) -> None:
        self.stats.steps_dropped += steps
        if self._dead is None:
            self._dead = e
            self._on_error(e)

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
        self._free_banks.append(bank)

    def _wait(self, event: Any) -> None:
        # poll rather than cudaEventSynchronize: query() never counts as a synchronising call
        # (sync-debug mode) and only this thread waits
        while not event.query():
            time.sleep(0.0002)

    def _compact(self, job: _Job) -> _Compact:
        """The used rows of the job's bank as compact host arrays; the bank is reset and returned
        to the pool (also when this fails)."""
        bank = job.bank
        if not self._cuda and not self.device_ops:
            try:
                lay = self.layout  # scans bounded by each row's header and min/max
                if len(self._inner) < bank.slots:  # the bank grew: new rows, no prediction
                    grown = np.full((bank.slots, 2), -1, np.int32)
                    grown[: len(self._inner)] = self._inner
                    self._inner = grown
                header, moments, offsets, index, values, room, scanned = _C.compact_rows(
                    bank.counts.numpy(),
                    bank.moments.numpy(),
                    job.rows,
                    True,
                    (lay.k, lay.emin, lay.octaves),
                    self._window,
                    self._window_index,
                    self._window_used,
                    self._inner,
                )
                if len(values) and np.shares_memory(values, self._window):
                    self._window_used += len(values)
                self._window_need += len(values)
                self._window_scan = max(self._window_scan, room)
                self.stats.buckets_scanned += scanned
            except BaseException:
                self._release(bank, job.rows)
                raise
            bank.touched = set()
            self._free_banks.append(bank)
            st = job.scalar_tensor.numpy() if job.scalar_tensor is not None else None
            vt = job.vector_tensor.numpy() if job.vector_tensor is not None else None
            # what the CUDA path moves for these rows: header, moments, 2 bounds per row and 6
            # bytes per non-zero bucket
            self.stats.bytes_to_host += len(job.rows) * (L.HEADER + L.NUM_MOMENTS + 2) * 8
            self.stats.bytes_to_host += 6 * len(values) + (vt.nbytes if vt is not None else 0)
            return _Compact(job, header, moments, offsets, index, values, st, vt)
        return self._compact_device(job)

    def _stream(self) -> Any:
        return torch.cuda.stream(self._side) if self._cuda else contextlib.nullcontext()

    def _done(self) -> None:
        """Waits (polling an event) for the work queued on the side stream."""
        if self._cuda:
            ev = torch.cuda.Event()
            ev.record(self._side)
            self._wait(ev)

    def _compact_device(self, job: _Job) -> _Compact:
        """Two rounds on the side stream, each ended by a polled event: (1) the rows' headers,
        moments and numbers of non-zero buckets; (2) those buckets as (uint16 index, uint32
        count), now that their number is known here: the pairs the file stores."""
        bank = job.bank
        if job.event is not None:
            self._wait(job.event)
        m = len(job.rows)
        moved = 0
        try:
            with self._stream():
                idx = self._index(job.rows)
                header, moments, bounds, hist = bank.compact_bounds(idx)
                small = [_to_host(t) for t in (header, moments, bounds)]
                extra = []
                for t in (job.scalar_tensor, job.vector_tensor):
                    if t is not None and self._side is not None:
                        t.record_stream(self._side)
                    extra.append(_to_host(t) if t is not None else None)
            self._done()
            h_header, h_moments, h_bounds = (t.numpy() for t in small)
            nnz, biggest = h_bounds
            if m and biggest.max() > np.iinfo(np.uint32).max:
                raise OverflowError("a histogram bucket exceeds 2**32 - 1 in one step")
            total = int(nnz.sum())
            with self._stream():
                index, count = StatBank.gather_nonzero(hist, total)
                pairs = (_to_host(index), _to_host(count))
            self._done()
        finally:
            self._release(bank, job.rows)
        offsets = np.zeros(m + 1, np.int64)
        np.cumsum(nnz, out=offsets[1:])
        for t in (*small, *pairs, *extra):
            if t is not None:
                moved += t.numpy().nbytes
        self.stats.bytes_to_host += moved
        return _Compact(
            job,
            h_header,
            h_moments,
            offsets,
            pairs[0].numpy().view(np.uint16),
            pairs[1].numpy().view(np.uint32),
            extra[0].numpy() if extra[0] is not None else None,
            extra[1].numpy() if extra[1] is not None else None,
        )

    def _write(self, parts: Sequence[_Compact]) -> None:
        """The steps of ``parts`` as one record batch: their rows concatenated, one conversion."""
        pieces = [p for p in (self._rows(part) for part in parts) if p is not None]
        if not pieces:
            return
        counts = np.concatenate([p["counts"] for p in pieces])
        moments = np.concatenate([p["moments"] for p in pieces])
        lengths = np.concatenate([p["lengths"] for p in pieces])
        values = self._joined(pieces, "values", self._window)
        index = self._joined(pieces, "index", self._window_index)
        n_rows = [len(p["lengths"]) for p in pieces]
        step = np.repeat([p["step"] for p in pieces], n_rows)
        wall = np.repeat([p["wall"] for p in pieces], n_rows)
        if len(pieces) == 1:
            cols = pieces[0]["cols"]
        else:  # dictionaries unified where the steps' label sets differ
            cols = {
                k: pa.chunked_array([p["cols"][k] for p in pieces]).combine_chunks()
                for k in pieces[0]["cols"]
            }
        vectors = None
        if any(p["vectors"] for p in pieces):
            vectors = [v for p in pieces for v in (p["vectors"] or [None] * len(p["lengths"]))]
        batch = state_to_batch(
            counts,
            moments,
            self.layout,
            step=step,
            rank=self.rank,
            wall_time_s=wall,
            values=vectors,
            hist=pair_lists(lengths, index, values),
            columns=cols,
        )
        self.writer.write(batch)
        self.stats.rows += batch.num_rows
        self.stats.batches += 1

    def _joined(self, pieces: Sequence[dict[str, Any]], key: str, window: np.ndarray) -> np.ndarray:
        """The pieces' arrays ``key`` as one array: a view of ``window`` when they lie there back
        to back (the steps of a CPU bank, in order), else a concatenation."""
        parts = [p[key] for p in pieces if len(p[key])]
        if not parts:
            return np.zeros(0, window.dtype)
        size = window.itemsize
        base = window.ctypes.data
        at = (parts[0].ctypes.data - base) // size
        pos = at
        for v in parts:
            if v.ctypes.data != base + size * pos or not np.shares_memory(v, window):
                return np.concatenate(parts)
            pos += len(v)
        return window[at:pos]

    def _window_reset(self) -> None:
        """The pending steps were written: the window is free (grown to the last one's size and
        room for one more step's scan)."""
        need = self._window_need + self._window_scan
        if len(self._window) < need <= self.max_window:
            grown = min(need + need // 4, self.max_window)
            self._window = np.empty(grown, np.uint32)
            self._window_index = np.empty(grown, np.uint16)
        self._window_used = self._window_need = 0

    def _labels(
        self,
        job: _Job,
        rows: np.ndarray,
        extra: Sequence[SlotLabel],
        extra_meta: Sequence[tuple[str, tuple[int, ...]]],
    ) -> dict[str, pa.Array]:
        """Label columns of the rows (tensor rows, then scalar and vector rows), in the schema's
        types, cached: the same rows are used step after step. The entry keeps the label tuples
        alive, so their ids in the key are not reused."""
        key = (id(job.labels), id(job.meta), rows.tobytes(), tuple(extra), tuple(extra_meta))
        hit = self._label_cache.get(key)
        if hit is not None and hit[0] is job.labels and hit[1] is job.meta:
            return hit[2]
        if len(self._label_cache) > 64:
            self._label_cache.clear()
        cols = label_columns(
            [job.labels[i] for i in rows] + list(extra),
            [job.meta[i] for i in rows] + list(extra_meta),
        )
        for name, v in cols.items():
            ftype = BASE_SCHEMA.field(name).type
            if pa.types.is_dictionary(ftype):
                v = v.dictionary_encode()
            cols[name] = v.cast(ftype)
        self._label_cache[key] = (job.labels, job.meta, cols)
        return cols

    def _rows(self, part: _Compact) -> dict[str, Any] | None:
        """A step's rows: tensor rows with calls, then scalar rows, then vector rows."""
        job = part.job
        n = min(len(job.labels), job.bank.slots)
        header, moments, offsets = part.header, part.moments, part.offsets
        keep = (header[:, L.CALLS] > 0) & (job.rows < n)
        rows = job.rows
        lengths = np.diff(offsets)
        index, values = part.index, part.values
        if not keep.all():
            sel = np.flatnonzero(keep)
            starts = offsets[:-1][sel]
            lengths = lengths[sel]
            spans = list(zip(starts, lengths, strict=True))
            index = np.concatenate([part.index[a : a + b] for a, b in spans] or [index[:0]])
            values = np.concatenate([part.values[a : a + b] for a, b in spans] or [values[:0]])
            header, moments, rows = header[sel], moments[sel], rows[sel]
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
            labels += [("", K.SCALAR, name, "train") for name in names]
            meta += [("float64", ())] * len(names)
        vecs: list[np.ndarray] = []
        if part.vectors is not None:  # vector rows too
            flat = part.vectors
            vecs = np.split(flat, np.cumsum(job.vector_lengths)[:-1])
            vlen = np.asarray(job.vector_lengths, np.int64)
            vc, vm = _C.vector_row_stats(flat, vlen, L.HEADER)  # = vector_state, one pass
            extra_c.append(vc)
            extra_m.append(vm)
            labels += list(job.vector_labels)
            meta += [("float32", (int(k),)) for k in job.vector_lengths]
        if len(rows) + len(labels) == 0:
            return None
        return {
            "counts": np.concatenate(extra_c) if len(extra_c) > 1 else header,
            "moments": np.concatenate(extra_m) if len(extra_m) > 1 else moments,
            "lengths": np.concatenate([lengths, np.zeros(len(labels), lengths.dtype)]),
            "index": index,
            "values": values,
            "step": job.step,
            "wall": job.wall_time_s,
            "cols": self._labels(job, rows, labels, meta),
            "vectors": [None] * (len(rows) + len(labels) - len(vecs)) + list(vecs)
            if vecs
            else None,
        }
