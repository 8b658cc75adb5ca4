"""Tracing under ``torch.distributed``: one file per rank, merged summaries, DDP gradient noise.

**Rank files.** With ``world_size > 1`` the trace path ``run.arrow`` becomes the folder ``run/``
holding ``rank0.arrow``, ``rank1.arrow``, ... (``rank_path``); a path with ``{rank}`` in it is
formatted instead (``"run/r{rank}.arrow"``). Every rank traces its own modules and parameters
(its shard under FSDP) and writes only its own file, so a rank that dies leaves the others' files
and its own complete batches readable.

**Merged summaries** (``RankMerge``, ``dnntrace.enable(..., merge_ranks=True)``). At the end of a
sampled step the rows of the chosen kinds are copied out of the stat bank (a device copy, no
sync) and handed to a background thread which reduces them over a separate gloo group: counts
and histograms are all-reduced by sum (exact); the moments rows (compensated sums, min, max) are
gathered and merged on rank 0 by ``dnntrace.sketch.merge`` (``merge_ranks``), the same merge
every reader uses, so ``merged.arrow`` and a read-time merge of the rank files agree bit for
bit. The training thread never waits for it.
Ranks that recorded different rows first agree on the union of their labels. Rank 0 writes the
merged rows, with ``rank = -1``, into ``merged.arrow`` next to the rank files. Tensors that every
rank holds a copy of (weights and all-reduced gradients under DDP) would be counted once per
rank, so by default only activations and their gradients are merged.

**Gradient noise across ranks** (``DDPGradStats``, ``enable(ddp_model, ddp_hook=True)``). A DDP
communication hook reads each bucket's local gradient before the all-reduce: its squared norm,
and with ``local_grads`` the full dnntrace summary of every parameter's local gradient (kind
``weight_grad_local``). After the all-reduce it takes the averaged gradient's squared norm. Per
step it records vector rows (module ``""``): ``grad_sqnorm_local`` (this rank, one value per
bucket), ``grad_sqnorm_rank_mean`` (mean over ranks), ``grad_sqnorm_avg`` (of the averaged
gradient), ``grad_diversity`` (Yin et al. 2018: sum_i |g_i|^2 / |sum_i g_i|^2, 1/W when the W
ranks agree), and the noise-scale estimates of McCandlish et al. 2018 (appendix A) with
``B_small`` the per-rank batch and ``B_big = W * B_small``: ``gns_g2`` (|G|^2),
``gns_trace_sigma`` (tr(Sigma)) and ``gns_b_simple`` (tr(Sigma) / |G|^2). Without
``batch_size`` the last two are in units of the per-rank batch (``tensor = "per_rank_batch"``).
These cost no extra forward or backward: two norms and one extra all-reduce of a few floats per
bucket.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..sketch import layout as L
from ..sketch.merge import merge_moments
from ..storage import kinds as K
from ..storage.files import MERGED_FILE, MERGED_RANK, merged_path, rank_path
from ..storage.kinds import DEFAULT_MERGE_KINDS
from ..storage.rows import state_to_batch
from ..storage.writer import TraceWriter
from .contract import Extension, RowLabel, TraceContext, option_dict, register_extension


def merge_ranks(moments: Sequence[np.ndarray]) -> np.ndarray:
    """The merged moments rows ``[n, 8]`` of every rank's ``moments[r]`` (``[n, 8]``, rank
    order): ``sketch.merge.merge_moments`` over the ranks of each row."""
    stacked = np.stack(moments, axis=1)  # [n, world, 8]: the ranks of one row together
    n, world = stacked.shape[:2]
    return merge_moments(stacked.reshape(n * world, -1), np.repeat(np.arange(n), world), n)


SlotLabel = RowLabel


def _label_signature(labels: Sequence[SlotLabel]) -> int:
    h = hashlib.blake2b(repr(tuple(labels)).encode(), digest_size=7)
    return int.from_bytes(h.digest(), "little")


@dataclass
class _MergeJob:
    step: int
    wall_time_s: float
    labels: tuple[SlotLabel, ...]
    meta: tuple[tuple[str, tuple[int, ...]], ...]
    counts: torch.Tensor
    moments: torch.Tensor
    event: Any = None


@dataclass
class MergedStep:
    """Merged rows of one step, the same on every rank."""

    step: int
    labels: list[SlotLabel]
    counts: np.ndarray
    moments: np.ndarray


class RankMerge(Extension):
    """Exact cross-rank summaries of each sampled step, all-reduced off the training thread.

    ``kinds``: row kinds to merge (``None``: every row of the bank); ``every``: merge every n-th
    traced step; ``path``: the merged file (default ``merged.arrow`` beside the rank file);
    ``timeout_s``: bound on one collective of the merge group and on waiting for it at close.
    ``latest`` holds the last merged step on every rank. Close the tracer before
    ``destroy_process_group``.
    """

    def __init__(
        self,
        kinds: Sequence[str] | None = DEFAULT_MERGE_KINDS,
        *,
        every: int = 1,
        path: str | os.PathLike[str] | None = None,
        timeout_s: float = 60.0,
    ) -> None:
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"RankMerge: every must be a positive int, got {every!r}")
        self.kinds = None if kinds is None else frozenset(kinds)
        self.every = every
        self.path = None if path is None else os.fspath(path)
        self.timeout_s = timeout_s
        self.latest: MergedStep | None = None
        self.steps_merged = 0
        self.error: BaseException | None = None
        self._active = False
        self._jobs: queue.Queue[_MergeJob | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._writer: TraceWriter | None = None
        self._group: Any = None

    def attach(self, tracer: TraceContext) -> None:
        if tracer.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
            return  # one process: its own file is the merge
        self._active = True
        self._tracer = tracer
        self._layout = tracer.layout
        if self.path is None:
            self.path = merged_path(tracer.path)
        # a group of its own: its collectives never queue behind (or in front of) the model's
        self._group = dist.new_group(backend="gloo", timeout=timedelta(seconds=self.timeout_s))
        self._thread = threading.Thread(target=self._run, name="dnntrace-merge", daemon=True)
        self._thread.start()

    # ---- the training thread ------------------------------------------------------------
    def on_step_end(self, tracer: TraceContext) -> None:
        if not self._active or self.error is not None:
            return
        if not tracer.sampled() or (tracer.step_index // tracer.every) % self.every:
            return
        labels = tracer.row_labels()
        meta = tracer.row_meta()
        keep = [i for i, lb in enumerate(labels) if self.kinds is None or lb[1] in self.kinds]
        counts, moments = tracer.snapshot_rows(keep)
        job = _MergeJob(
            tracer.step_index,
            time.time(),
            tuple(labels[i] for i in keep),
            tuple(meta[i] for i in keep),
            counts,
            moments,
        )
        if counts.device.type == "cuda":
            job.event = torch.cuda.Event()
            job.event.record()
        self._jobs.put(job)

    def close(self, tracer: TraceContext) -> None:
        if not self._active or self._thread is None:
            return
        self._jobs.put(None)
        self._thread.join(self.timeout_s)
        if self._thread.is_alive():
            self.error = self.error or TimeoutError(
                f"cross-rank merge still waiting after {self.timeout_s:g} s (a rank is gone?)"
            )
        elif self._writer is not None:
            self._writer.close()
        if self.error is not None:
            warnings.warn(
                f"dnntrace: cross-rank merge stopped ({type(self.error).__name__}: {self.error});"
                " the rank files are complete",
                RuntimeWarning,
                stacklevel=2,
            )

    # ---- the merge thread ---------------------------------------------------------------
    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if self.error is not None:
                continue  # drain: a collective failed, the group is no longer in step
            try:
                self._merge(job)
            except Exception as e:  # noqa: BLE001 - reported at close, training unaffected
                self.error = e

    def _merge(self, job: _MergeJob) -> None:
        if job.event is not None:
            job.event.synchronize()  # only this thread waits for the copy
        g = self._group
        world = dist.get_world_size(g)
        counts = job.counts.cpu()
        moments = job.moments.cpu()
        labels, meta = list(job.labels), list(job.meta)
        sig = torch.tensor([len(labels), _label_signature(labels)], dtype=torch.int64)
        sigs = [torch.empty_like(sig) for _ in range(world)]
        dist.all_gather(sigs, sig, group=g)
        if any(not torch.equal(s, sig) for s in sigs):
            # rows differ between ranks: merge over the union of the labels, in a fixed order
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, list(zip(labels, meta, strict=True)), group=g)
            union: dict[SlotLabel, tuple[str, tuple[int, ...]]] = {}
            for part in gathered:
                for lb, mt in part:
                    if mt[0] or lb not in union:
                        union[tuple(lb)] = (mt[0], tuple(mt[1]))
            order = sorted(union)
            pos = {lb: i for i, lb in enumerate(order)}
            c = torch.zeros((len(order), counts.shape[1]), dtype=counts.dtype)
            m = torch.zeros((len(order), moments.shape[1]), dtype=moments.dtype)
            m[:, L.MIN] = torch.inf
            m[:, L.MAX] = -torch.inf
            at = torch.tensor([pos[lb] for lb in labels], dtype=torch.long)
            c[at] = counts
            m[at] = moments
            counts, moments, labels, meta = c, m, order, [union[lb] for lb in order]
        # counts add exactly in any order: one all-reduce; every rank's moments are gathered and
        # merged in rank order by the one row merge (compensated sums), the same bits on every
        # rank and in RunSet.merged_table
        parts = [torch.empty_like(moments) for _ in range(world)]
        works = [
            dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=g, async_op=True),
            dist.all_gather(parts, moments.contiguous(), group=g, async_op=True),
        ]
        for w in works:
            w.wait()
        cn, mn = counts.numpy(), merge_ranks([p.numpy() for p in parts])
        used = np.flatnonzero(cn[:, L.CALLS] > 0)
        self.latest = MergedStep(job.step, [labels[i] for i in used], cn[used], mn[used])
        self.steps_merged += 1
        if dist.get_rank() == 0 and used.size:
            self._write(job, [labels[i] for i in used], [meta[i] for i in used], cn[used], mn[used])

    def _write(
        self, job: _MergeJob, labels: list[SlotLabel], meta: list[Any], c: Any, m: Any
    ) -> None:
        if self._writer is None:
            tr = self._tracer
            md = tr.file_metadata()
            md.pop("schema_version", None)
            md.update(rank=MERGED_RANK, merged=True, pid=os.getpid())
            md["merge"] = {"kinds": None if self.kinds is None else sorted(self.kinds)}
            assert self.path is not None
            self._writer = TraceWriter(self.path, md)
        batch = state_to_batch(
            c,
            m,
            self._layout,
            step=job.step,
            module=[lb[0] for lb in labels],
            kind=[lb[1] for lb in labels],
            tensor=[lb[2] for lb in labels],
            phase=[lb[3] for lb in labels],
            dtype=[mt[0] for mt in meta],
            shape=[mt[1] for mt in meta],
            rank=MERGED_RANK,
            wall_time_s=job.wall_time_s,
        )
        self._writer.write(batch)


def noise_scale(
    sq_small: torch.Tensor, sq_big: torch.Tensor, b_small: float, b_big: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """McCandlish et al. 2018, appendix A: unbiased |G|^2 and tr(Sigma) from the squared norms of
    gradients over batches of ``b_small`` and ``b_big`` samples, and ``B_simple = tr(Sigma) /
    |G|^2``. Tensors in, tensors out (no sync)."""
    g2 = (b_big * sq_big - b_small * sq_small) / (b_big - b_small)
    s = (sq_small - sq_big) / (1.0 / b_small - 1.0 / b_big)
    return g2, s, s / g2


class DDPGradStats(Extension):
    """Registers a DDP communication hook that records each rank's local gradient statistics
    next to the averaged gradient (module docstring). ``ddp_model``: the
    ``DistributedDataParallel`` module (default: the traced model itself); ``batch_size``:
    samples per rank and step; ``local_grads``: also summarise every parameter's local
    gradient (kind ``weight_grad_local``)."""

    def __init__(
        self,
        ddp_model: torch.nn.Module | None = None,
        *,
        batch_size: int | None = None,
        local_grads: bool = True,
        process_group: Any = None,
    ) -> None:
        self.ddp_model = ddp_model
        self.batch_size = batch_size
        self.local_grads = local_grads
        self.process_group = process_group
        self._pending: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._lock = threading.Lock()

    def attach(self, tracer: TraceContext) -> None:
        from torch.nn.parallel import DistributedDataParallel

        model = self.ddp_model if self.ddp_model is not None else tracer.model
        if not isinstance(model, DistributedDataParallel):
            raise TypeError(
                "DDPGradStats: needs a DistributedDataParallel model (pass ddp_model= or trace "
                f"the DDP module), got {type(model).__name__}"
            )
        self._tracer = tracer
        self._world = dist.get_world_size(self.process_group)
        self._names = {id(p): (m, n) for m, n, p in tracer.params}
        self._stats_of_bucket = tracer.guard(self._bucket_stats)
        hook = DDPGradStats._hook
        # DDP checks the annotations as objects; ``from __future__ import annotations`` made them
        # strings
        hook.__annotations__ = {
            "state": object,
            "bucket": dist.GradBucket,
            "return": torch.futures.Future[torch.Tensor],
        }
        model.register_comm_hook(self, hook)

    # ---- DDP's side: runs during backward ---------------------------------------------------
    @staticmethod
    def _hook(state: DDPGradStats, bucket: Any) -> torch.futures.Future[torch.Tensor]:
        tr = state._tracer
        group = state.process_group or dist.group.WORLD
        world = state._world
        buf = bucket.buffer()
        on = tr.disabled_reason is None and not tr.closed and tr.sampled()
        sq_fut = None
        local_sq = None
        if on:
            local_sq = torch.linalg.vector_norm(buf, dtype=torch.float64).square().reshape(1)
            state._stats_of_bucket(bucket)
            sq_sum = local_sq.clone()
            sq_fut = dist.all_reduce(sq_sum, group=group, async_op=True).get_future()
        buf.div_(world)
        grad_fut = dist.all_reduce(buf, group=group, async_op=True).get_future()
        if sq_fut is None:
            return grad_fut.then(lambda f: f.value()[0])
        index = bucket.index()

        def done(fut: torch.futures.Future[list[torch.futures.Future[Any]]]) -> torch.Tensor:
            f_grad, f_sq = fut.value()
            avg = f_grad.value()[0]
            avg_sq = torch.linalg.vector_norm(avg, dtype=torch.float64).square().reshape(1)
            mean_sq = f_sq.value()[0] / world
            with state._lock:
                state._pending[index] = (local_sq, mean_sq, avg_sq)
            return avg

        return torch.futures.collect_all([grad_fut, sq_fut]).then(done)

    def _bucket_stats(self, bucket: Any) -> None:
        if not self.local_grads:
            return
        labels, xs = [], []
        for p, g in zip(bucket.parameters(), bucket.gradients(), strict=True):
            name = self._names.get(id(p))
            if name is not None:
                labels.append((name[0], K.WEIGHT_GRAD_LOCAL, name[1]))
                xs.append(g)
        self._tracer.accumulate_many(labels, xs)

    # ---- the tracer's side --------------------------------------------------------------
    def on_step_end(self, tracer: TraceContext) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        if not pending:
            return
        order = sorted(pending)
        local = torch.cat([pending[i][0] for i in order])
        mean = torch.cat([pending[i][1] for i in order])
        avg = torch.cat([pending[i][2] for i in order])
        w = float(self._world)
        rec = tracer.record_vector
        rec("", K.GRAD_SQNORM_LOCAL, "bucket", local)
        rec("", K.GRAD_SQNORM_RANK_MEAN, "bucket", mean)
        rec("", K.GRAD_SQNORM_AVG, "bucket", avg)
        sq_small, sq_big = mean.sum().reshape(1), avg.sum().reshape(1)
        rec("", K.GRAD_DIVERSITY, "", sq_small / (w * sq_big))
        if self._world > 1:
            b = float(self.batch_size or 1)
            g2, s, b_simple = noise_scale(sq_small, sq_big, b, b * w)
            unit = "" if self.batch_size else "per_rank_batch"
            rec("", K.GNS_G2, "", g2)
            rec("", K.GNS_TRACE_SIGMA, unit, s)
            rec("", K.GNS_B_SIMPLE, unit, b_simple)


__all__ = [
    "DEFAULT_MERGE_KINDS",
    "MERGED_FILE",
    "MERGED_RANK",
    "DDPGradStats",
    "MergedStep",
    "RankMerge",
    "noise_scale",
    "rank_path",
]


def _merge_ranks(value: Any) -> list[Extension]:
    return [RankMerge(**option_dict(value))]


def _ddp_hook(value: Any) -> list[Extension]:
    return [DDPGradStats(**option_dict(value))]


register_extension("merge_ranks", _merge_ranks)
register_extension("ddp_hook", _ddp_hook)
