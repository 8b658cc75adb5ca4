"""Tracer extensions for spectral statistics, training dynamics and loss geometry (issue 6).

Each is an ``Extension``; ``dnntrace.enable(model, spectral=True, dynamics=True)`` adds the
default set (``spectral_extensions``), or pass instances through ``extensions=[...]``.

Rows written (vector rows, ``docs/FORMAT.md``; ``module``/``tensor`` name the parameter or the
traced module):

==================  ==========================================================================
kind                values
==================  ==========================================================================
``sigma_max``       [σ₁] of the weight matrix, warm-started power iteration (``WeightSpectra``)
``frobenius_norm``  [‖W‖F]
``stable_rank``     [‖W‖F² / σ₁²]
``spectrum``        all singular values, descending (every ``full_every`` steps, computed in a
                    background thread: recorded at a later step, see ``esd``)
``esd``             [source_step, alpha, ks_distance, xmin, n_tail, n_eigenvalues]: power-law fit
                    of the eigenvalues σ² (Clauset et al. 2009); ``source_step`` is the step the
                    weights were taken at; the ``spectrum`` row of the same step, module and
                    tensor belongs to it
``feature_eigs``    top-ℓ eigenvalues of the step's feature second-moment matrix (AᵀA / rows)
                    from a Frequent Directions sketch (``ActivationSketch``)
``rankme``          [source_step, RankMe, rows] from a bounded row sample (background thread)
``update_ratio``    [‖ΔW‖ / ‖W‖] of the step's optimizer update (``UpdateRatio``)
``trajectory``      coordinates of the parameter vector on the directions (``Trajectory``);
                    ``tensor`` = ``random:<seed>``
``trajectory_pca``  [source_step, c₁, c₂, ...] on PCA directions of snapshots (written at close)
``filter_norm``     per-filter norms of the weights the random directions are normalised with
==================  ==========================================================================

Scalars (``kind = scalar``): ``gns/grad_sq``, ``gns/trace_cov``, ``gns/b_simple``
(``GradientNoiseScale``); ``hessian/top_eigenvalue``, ``hessian/trace``, ``hessian/hvps``,
``hessian/seconds`` (``HessianEigen``); ``spectrum/skipped`` = 1 and ``rankme/skipped`` = 1 at a
step whose background job was not started because the previous one was still running (a slow
machine: the job is skipped rather than stalling training or queueing snapshots).
"""

from __future__ import annotations

import fnmatch
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..stats import curvature as C
from ..stats import dynamics as D
from ..stats import landscape as LS
from ..stats import spectral as S
from ..storage import kinds as K
from ..storage.files import sidecar
from .contract import Extension, TraceContext, option_dict, register_extension
from .selection import iter_float_tensors

Late = tuple[str, str, str, np.ndarray]  # module, kind, tensor, values


# ---- the background worker ----------------------------------------------------------------
class _Worker:
    """One daemon thread running jobs that return rows; results are drained on the training
    thread. At most ``max_pending`` jobs wait: a job submitted beyond that is skipped (counted),
    so a slow spectrum never stalls training or grows memory."""

    def __init__(self, name: str, max_pending: int = 1) -> None:
        self._jobs: queue.Queue[Callable[[], list[Late]] | None] = queue.Queue()
        self._results: queue.Queue[list[Late]] = queue.Queue()
        self._pending = 0
        self._lock = threading.Lock()
        self.max_pending = max_pending
        self.skipped = 0
        self.errors: list[str] = []
        self.seconds = 0.0
        self.jobs_done = 0
        self._blas = _BlasThreads()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def busy(self) -> bool:
        with self._lock:
            return self._pending >= self.max_pending

    def submit(self, job: Callable[[], list[Late]]) -> bool:
        with self._lock:
            if self._pending >= self.max_pending:
                self.skipped += 1
                return False
            self._pending += 1
        self._jobs.put(job)
        return True

    def _run(self) -> None:
        try:  # Linux: a per-thread nice value, so the training thread wins contended cores
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except (AttributeError, OSError):
            pass
        while True:
            job = self._jobs.get()
            if job is None:
                return
            t0 = time.perf_counter()
            try:
                with self._blas:
                    self._results.put(job())
            except Exception as e:  # noqa: BLE001 - reported in stats, training goes on
                self.errors.append(f"{type(e).__name__}: {e}")
            finally:
                self.seconds += time.perf_counter() - t0
                self.jobs_done += 1
                with self._lock:
                    self._pending -= 1

    def drain(self) -> list[Late]:
        out: list[Late] = []
        while True:
            try:
                out += self._results.get_nowait()
            except queue.Empty:
                return out

    def wait(self, timeout: float = 60.0) -> None:
        t_end = time.monotonic() + timeout
        while time.monotonic() < t_end:
            with self._lock:
                if self._pending == 0:
                    return
            time.sleep(0.005)

    def close(self) -> None:
        self._jobs.put(None)


class _BlasThreads:
    """numpy's OpenBLAS limited to one thread while a background job runs (as threadpoolctl
    does), restored after. With its default thread count, OpenBLAS spins against the training
    thread on a busy CPU: a 256 × 128 SVD took 1.4 s instead of 1.8 ms (measured here, 2 cores).
    Best effort: a no-op where the library or its symbols are not found."""

    _NAMES = (
        ("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
        ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
        ("openblas_get_num_threads", "openblas_set_num_threads"),
    )

    def __init__(self) -> None:
        self._get: Any = None
        self._set: Any = None
        try:
            import ctypes

            import numpy  # noqa: F401  (loads its OpenBLAS)

            with open("/proc/self/maps") as f:
                paths = sorted({ln.split()[-1] for ln in f if "openblas" in ln.lower()})
            for path in paths:
                lib = ctypes.CDLL(path)
                for g, s in self._NAMES:
                    if hasattr(lib, g) and hasattr(lib, s):
                        self._get, self._set = getattr(lib, g), getattr(lib, s)
                        return
        except OSError:
            pass

    def __enter__(self) -> int | None:
        if self._get is None:
            return None
        self._old = int(self._get())
        self._set(1)
        return self._old

    def __exit__(self, *exc: object) -> None:
        if self._get is not None:
            self._set(self._old)


def _rankme(step: int, z: Tensor) -> dict[str, float]:
    return {"step": step, "rankme": S.rankme(z.float()), "rows": z.shape[0]}


def _record_late(tracer: TraceContext, rows: Sequence[Late]) -> None:
    for module, kind, tensor, values in rows:
        t = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
        if tracer.device.type == "cuda":
            t = t.pin_memory().to(tracer.device, non_blocking=True)
        tracer.record_vector(module, kind, tensor, t)


def _host_snapshot(ts: Sequence[Tensor]) -> tuple[list[Tensor], Any]:
    """Copies of ``ts`` on the host without stalling the training thread: a clone on the CPU;
    on CUDA a non-blocking copy into pinned memory and an event the worker waits on."""
    if not ts or ts[0].device.type != "cuda":
        return [t.detach().to("cpu", copy=True) for t in ts], None
    out = []
    for t in ts:
        h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        h.copy_(t.detach(), non_blocking=True)
        out.append(h)
    ev = torch.cuda.Event()
    ev.record()
    return out, ev


def _matrix_params(
    tracer: TraceContext, include: Sequence[str] | None
) -> list[tuple[str, str, Tensor]]:
    out = []
    for m, n, p in tracer.params:
        if p.dim() < 2 or p.numel() == 0:
            continue
        if include is not None and not any(
            fnmatch.fnmatchcase(f"{m}.{n}" if m else n, g) for g in include
        ):
            continue
        out.append((m, n, p))
    return out


# ---- weights --------------------------------------------------------------------------------
class WeightSpectra(Extension):
    """σ₁, ‖W‖F and stable rank of every weight matrix every ``every`` steps (one warm-started
    power-iteration step, on the device, batched over layers: ``stats.spectral.PowerIteration``);
    every ``full_every`` steps (0: never) the full singular spectrum and its power-law fit in a
    background thread from a host snapshot of the weights. ``params``: globs over
    ``module.param`` names (default all ≥2-D parameters). ``min_esd``: fewest eigenvalues to fit
    a power law to (fewer: NaN alpha)."""

    def __init__(
        self,
        every: int = 1,
        full_every: int = 100,
        *,
        params: Sequence[str] | None = None,
        min_esd: int = 50,
        warmup: int = 10,
    ) -> None:
        self.every, self.full_every = every, full_every
        self.include = params
        self.min_esd = min_esd
        self.warmup = warmup
        self._mats: list[tuple[str, str, Tensor]] = []
        self._pi: S.PowerIteration | None = None
        self._worker: _Worker | None = None

    def attach(self, tracer: TraceContext) -> None:
        self._mats = _matrix_params(tracer, self.include)
        self._pi = S.PowerIteration([p for _, _, p in self._mats], warmup=self.warmup)
        if self.full_every:
            self._worker = _Worker("dnntrace-spectra")

    def on_step_end(self, tracer: TraceContext) -> None:
        if self._worker is not None:
            _record_late(tracer, self._worker.drain())
        if not self._mats or self._pi is None:
            return
        if tracer.sampled(self.every):
            sigma, fro = self._pi.step()
            sr = S.stable_rank(sigma, fro)
            for i, (m, n, _) in enumerate(self._mats):
                tracer.record_vector(m, K.SIGMA_MAX, n, sigma[i : i + 1])
                tracer.record_vector(m, K.FROBENIUS_NORM, n, fro[i : i + 1])
                tracer.record_vector(m, K.STABLE_RANK, n, sr[i : i + 1])
        if self._worker is not None and tracer.sampled(self.full_every):
            if self._worker.busy():
                self._worker.skipped += 1
                tracer.log_scalar("spectrum/skipped", 1.0)
                return
            snap, ev = _host_snapshot([p for _, _, p in self._mats])
            names = [(m, n) for m, n, _ in self._mats]
            self._worker.submit(self._job(tracer.step_index, names, snap, ev))

    def _job(
        self, step: int, names: list[tuple[str, str]], snap: list[Tensor], ev: Any
    ) -> Callable[[], list[Late]]:
        min_esd = self.min_esd

        def run() -> list[Late]:
            if ev is not None:
                ev.synchronize()
            rows: list[Late] = []
            for (m, n), w in zip(names, snap, strict=True):
                a = w.double().numpy().reshape(w.shape[0], -1)
                s = np.linalg.svd(a, compute_uv=False)
                lam = s * s
                fit = (
                    S.fit_power_law(lam)
                    if lam.size >= min_esd
                    else S.PowerLawFit(math.nan, math.nan, math.nan, 0)
                )
                rows.append((m, K.SPECTRUM, n, s))
                esd = {
                    "step": step,
                    "alpha": fit.alpha,
                    "ks_distance": fit.ks_distance,
                    "xmin": fit.xmin,
                    "n_tail": fit.n_tail,
                    "n_eigenvalues": lam.size,
                }
                rows.append((m, K.ESD, n, np.array(K.pack(K.ESD, esd))))
            return rows

        return run

    def before_close(self, tracer: TraceContext) -> None:
        if self._worker is not None:
            self._worker.wait()
            _record_late(tracer, self._worker.drain())

    def close(self, tracer: TraceContext) -> None:
        if self._worker is not None:
            self._worker.close()


# ---- activations ----------------------------------------------------------------------------
_SKETCHED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, nn.LayerNorm)


class ActivationSketch(Extension):
    """Every ``every`` steps: a Frequent Directions sketch (ℓ = ``ell``) of each selected module's
    output features over the step (at most ``max_rows`` uniformly sampled rows per call, on the
    device), recorded as ``feature_eigs`` (top-ℓ eigenvalues of AᵀA / rows); and a bounded row
    sample (``rankme_rows``, 0: off) whose RankMe is computed in a background thread. Features
    are the last dimension, the channel dimension (1) for convolutions. ``modules``: globs
    (default: traced ``Linear``/``Conv``/``Embedding``/``LayerNorm`` modules)."""

    def __init__(
        self,
        every: int = 10,
        ell: int = 32,
        *,
        max_rows: int = 1024,
        rankme_rows: int = 2048,
        modules: Sequence[str] | None = None,
        seed: int = 0,
    ) -> None:
        self.every, self.ell, self.max_rows, self.rankme_rows = every, ell, max_rows, rankme_rows
        self.include = modules
        self.seed = seed
        self._fd: dict[str, S.FrequentDirections] = {}
        self._sample: dict[str, list[Tensor]] = {}
        self._gen: torch.Generator | None = None
        self._worker: _Worker | None = None
        self._tracer: TraceContext | None = None

    def attach(self, tracer: TraceContext) -> None:
        self._tracer = tracer
        if self.rankme_rows:
            self._worker = _Worker("dnntrace-rankme")
        self._gen = torch.Generator(device=tracer.device).manual_seed(self.seed)
        for name, mod in tracer.traced_modules:
            if self.include is None:
                ok = isinstance(mod, _SKETCHED)
            else:
                ok = any(fnmatch.fnmatchcase(name, g) for g in self.include)
            if ok:
                h = mod.register_forward_hook(tracer.guard(self._hook(name, mod)))
                tracer.add_handle(h)

    def _hook(self, name: str, mod: nn.Module) -> Callable[..., None]:
        conv = isinstance(mod, nn.Conv1d | nn.Conv2d | nn.Conv3d)

        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            tr = self._tracer
            if tr is None or not tr.sampled(self.every) or torch.compiler.is_compiling():
                return
            if not (module.training and torch.is_grad_enabled()):
                return
            t = next((x for _, x in iter_float_tensors(output)), None)
            if t is None or t.dim() < 1 or t.device != tr.device:
                return
            x = t.detach()
            if conv and x.dim() >= 3:
                x = x.movedim(1, -1)
            rows = x.reshape(-1, x.shape[-1])
            n, d = rows.shape
            if n == 0:
                return
            if n > self.max_rows:
                idx = torch.randint(n, (self.max_rows,), device=rows.device, generator=self._gen)
                rows = rows.index_select(0, idx)
            fd = self._fd.get(name)
            if fd is None or fd.d != d:
                fd = self._fd[name] = S.FrequentDirections(d, self.ell, device=rows.device)
            fd.update(rows)
            if self.rankme_rows:
                have = sum(s.shape[0] for s in self._sample.get(name, []))
                if have < self.rankme_rows:
                    self._sample.setdefault(name, []).append(rows[: self.rankme_rows - have])

        return hook

    def on_step_end(self, tracer: TraceContext) -> None:
        if self._worker is not None:
            _record_late(tracer, self._worker.drain())
        if not tracer.sampled(self.every):
            return
        for name, fd in self._fd.items():
            if fd.rows_seen:
                eig = fd.eigenvalues() / fd.rows_seen
                tracer.record_vector(name, K.FEATURE_EIGS, "", eig)
                fd.reset()
        if self._worker is not None and self._sample and self._worker.busy():
            self._worker.skipped += 1
            tracer.log_scalar("rankme/skipped", 1.0)
        elif self._worker is not None and self._sample:
            names = list(self._sample)
            snap, ev = _host_snapshot([torch.cat(self._sample[n]) for n in names])
            step = tracer.step_index

            def run() -> list[Late]:
                if ev is not None:
                    ev.synchronize()
                return [
                    (n, K.RANKME, "", np.array(K.pack(K.RANKME, _rankme(step, z))))
                    for n, z in zip(names, snap, strict=True)
                ]

            self._worker.submit(run)
        self._sample = {}

    def before_close(self, tracer: TraceContext) -> None:
        if self._worker is not None:
            self._worker.wait()
            _record_late(tracer, self._worker.drain())

    def close(self, tracer: TraceContext) -> None:
        if self._worker is not None:
            self._worker.close()


# ---- dynamics -------------------------------------------------------------------------------
class UpdateRatio(Extension):
    """``‖ΔW‖ / ‖W_before‖`` per parameter every ``every`` steps.

    ``mode="auto"``: rebuilt from the optimizer's state after its step for SGD/Adam/AdamW
    (``stats.dynamics.optimizer_updates``, no copy); other optimizers fall back to ``"copy"``:
    the parameters are copied into preallocated buffers before sampled steps (memory: one copy of
    the parameters, allocated on first use). ``mode="state"`` never copies (unsupported
    optimizers record nothing)."""

    def __init__(self, every: int = 1, mode: str = "auto") -> None:
        if mode not in ("auto", "copy", "state"):
            raise ValueError(f"UpdateRatio: mode must be auto, copy or state, got {mode!r}")
        self.every, self.mode = every, mode
        self._params: list[tuple[str, str, Tensor]] = []
        self._bufs: list[Tensor] | None = None
        self._opt: torch.optim.Optimizer | None = None
        self._copied = False
        self.used_mode: str | None = None

    def attach(self, tracer: TraceContext) -> None:
        self._params = [(m, n, p) for m, n, p in tracer.params if p.requires_grad]

    def _use_copy(self, opt: torch.optim.Optimizer) -> bool:
        if self.mode == "copy":
            return True
        return self.mode == "auto" and not D.supports_exact_updates(opt)

    def before_optimizer_step(self, tracer: TraceContext, optimizer: torch.optim.Optimizer) -> None:
        self._opt = optimizer
        self._copied = False
        if not tracer.sampled(self.every) or not self._use_copy(optimizer):
            return
        ps = [p.detach() for _, _, p in self._params]
        if self._bufs is None:
            self._bufs = [torch.empty_like(p) for p in ps]
        torch._foreach_copy_(self._bufs, ps)
        self._copied = True

    def on_step_end(self, tracer: TraceContext) -> None:
        opt, self._opt = self._opt, None
        if opt is None or not tracer.sampled(self.every) or not self._params:
            return
        ps = [p.detach() for _, _, p in self._params]
        if self._copied and self._bufs is not None:
            dn, bn = D.update_norms(self._bufs, ps)
            keep = list(range(len(ps)))
            self.used_mode = "copy"
        else:
            ups = D.optimizer_updates(opt, [p for _, _, p in self._params])  # state keys
            if ups is None:
                return
            keep = [i for i, u in enumerate(ups) if u is not None]
            if not keep:
                return
            dn = torch.stack(torch._foreach_norm([ups[i][0] for i in keep])).float()  # type: ignore[index]
            bn = torch.stack(torch._foreach_norm([ups[i][1] for i in keep])).float()  # type: ignore[index]
            self.used_mode = "state"
        ratio = dn / bn.clamp_min(1e-30)
        for j, i in enumerate(keep):
            m, n, _ = self._params[i]
            tracer.record_vector(m, K.UPDATE_RATIO, n, ratio[j : j + 1])


class GradientNoiseScale(Extension):
    """The simple gradient noise scale ``B_simple = tr(Σ)/|G|²`` (McCandlish et al. 2018) from
    gradient accumulation, every ``every`` steps, without copying gradients.

    With ``K ≥ 2`` micro-batches of ``micro_batch_size`` examples accumulated before a step, the
    accumulated gradient after the first backward ``S₁`` is a small-batch estimate (B_small = b)
    and ``S_K / K`` the big-batch one (B_big = K·b). Their squared norms come from a
    post-accumulate-grad hook on the first micro-batch and one ``_foreach_norm`` before the
    step; ``stats.dynamics.noise_scale_estimates`` makes them unbiased (appendix A.1). A loss
    scaled by 1/K scales both by 1/K², which cancels in ``B_simple``. Logged: ``gns/grad_sq``,
    ``gns/trace_cov`` (this step's unbiased estimates) and ``gns/b_simple`` (ratio of their
    EMAs, in examples; in micro-batches when ``micro_batch_size`` is None). Without
    accumulation (K = 1) a single batch cannot separate noise from signal: nothing is logged.
    Assumes gradients are zeroed (or set to None) before each step's first backward."""

    def __init__(
        self, every: int = 1, micro_batch_size: int | None = None, beta: float = 0.95
    ) -> None:
        self.every = every
        self.micro_batch_size = micro_batch_size
        self._ema = D.NoiseScaleEMA(beta)
        self._params: list[Tensor] = []
        self._calls: dict[int, int] = {}
        self._small: list[Tensor] = []
        self._tracer: TraceContext | None = None

    def attach(self, tracer: TraceContext) -> None:
        self._tracer = tracer
        self._params = [p for _, _, p in tracer.params if p.requires_grad]
        for p in self._params:
            tracer.add_handle(p.register_post_accumulate_grad_hook(tracer.guard(self._hook)))

    def _hook(self, p: Tensor) -> None:
        tr = self._tracer
        if tr is None or not tr.sampled(self.every) or p.grad is None:
            return
        k = self._calls.get(id(p), 0) + 1
        self._calls[id(p)] = k
        if k == 1:
            g = p.grad.detach()
            self._small.append(torch.linalg.vector_norm(g.double()).square())

    def before_optimizer_step(self, tracer: TraceContext, optimizer: torch.optim.Optimizer) -> None:
        calls, small = self._calls, self._small
        self._calls, self._small = {}, []
        if not tracer.sampled(self.every) or not calls or not small:
            return
        k = max(calls.values())
        if k < 2:
            return
        grads = [p.grad.detach() for p in self._params if p.grad is not None]
        big = torch.stack(torch._foreach_norm(grads)).double().square().sum() / (k * k)
        b = float(self.micro_batch_size or 1)
        g2, s = D.noise_scale_estimates(torch.stack(small).sum(), big, b, k * b)
        tracer.log_scalar("gns/grad_sq", g2)
        tracer.log_scalar("gns/trace_cov", s)
        tracer.log_scalar("gns/b_simple", self._ema.update(g2, s))


# ---- curvature ------------------------------------------------------------------------------
class HessianEigen(Extension):
    """The top Hessian eigenvalue (HVP power iteration, ``stats.curvature``) every ``every``
    steps, after the optimizer update, through ``closure()`` (returns a loss on a batch of the
    caller's choosing; it should not change the model's state: use a fixed batch, and eval mode
    if the model has batch norm). Warm-started from the previous eigenvector. ``trace_samples``
    > 0 adds Hutchinson's trace estimate. Tracing is paused during the closure so its forward
    does not count as training. Its cost is logged as ``hessian/seconds`` and ``hessian/hvps``
    (synchronous: it reads values on the host)."""

    def __init__(
        self,
        closure: Callable[[], Tensor],
        every: int = 100,
        *,
        iters: int = 20,
        tol: float = 1e-3,
        trace_samples: int = 0,
        warm_start: bool = True,
    ) -> None:
        self.closure, self.every, self.iters, self.tol = closure, every, iters, tol
        self.trace_samples = trace_samples
        self.warm_start = warm_start
        self._v: list[Tensor] | None = None
        self.history: list[tuple[int, float, float]] = []  # step, eigenvalue, seconds

    def on_step_end(self, tracer: TraceContext) -> None:
        if not tracer.sampled(self.every):
            return
        params = [p for _, _, p in tracer.params if p.requires_grad]
        with tracer.paused():
            res = C.top_hessian_eigenvalue(
                self.closure, params, iters=self.iters, tol=self.tol, v0=self._v
            )
            tr = None
            t0 = time.perf_counter()
            if self.trace_samples:
                tr, _ = C.hutchinson_trace(self.closure, params, samples=self.trace_samples)
            seconds = res.seconds + (time.perf_counter() - t0)
        if self.warm_start:
            self._v = res.vector
        tracer.log_scalar("hessian/top_eigenvalue", res.eigenvalue)
        tracer.log_scalar("hessian/hvps", float(res.iterations + self.trace_samples))
        tracer.log_scalar("hessian/seconds", seconds)
        if tr is not None:
            tracer.log_scalar("hessian/trace", tr)
        self.history.append((tracer.step_index, res.eigenvalue, seconds))


# ---- trajectory -----------------------------------------------------------------------------
class Trajectory(Extension):
    """The parameter vector's coordinates on ``n`` filter-normalised random directions
    (Li et al. 2018) every ``every`` steps, as ``trajectory`` rows (``tensor = random:<seed>``).

    The directions are normalised with the weights at attach time; those per-filter norms are
    written once (``filter_norm`` rows) so ``load_directions`` / ``dnntrace landscape`` regenerate
    the same directions from the seed: no direction is stored in the trace. They are kept on the
    device while training (memory: ``n`` copies of the parameters).

    ``pca_snapshots`` > 0 also keeps that many evenly spaced host snapshots of the parameters
    (memory: as many copies, on the host); at close the top-2 PCA directions of the snapshots are
    saved to ``<trace>.pca.pt`` and the snapshots' coordinates on them written as
    ``trajectory_pca`` rows."""

    def __init__(
        self, seed: int = 0, every: int = 1, n: int = 2, *, pca_snapshots: int = 0
    ) -> None:
        self.seed, self.every, self.n = seed, every, n
        self.pca_snapshots = pca_snapshots
        self._params: list[tuple[str, str, Tensor]] = []
        self._proj: LS.Projector | None = None
        self._norms: list[Tensor | None] = []
        self._wrote_norms = False
        self._snaps: list[tuple[int, list[Tensor]]] = []
        self._snap_every = 1

    def attach(self, tracer: TraceContext) -> None:
        self._params = list(tracer.params)
        ps = [p for _, _, p in self._params]
        self._norms = LS.filter_norms(ps)
        dirs = LS.random_directions(ps, self.seed, self.n, norms=self._norms)
        self._proj = LS.Projector(dirs)

    def on_step_end(self, tracer: TraceContext) -> None:
        if self._proj is None or not tracer.sampled(self.every):
            return
        if not self._wrote_norms:
            for (m, n, _), fn in zip(self._params, self._norms, strict=True):
                if fn is not None:
                    tracer.record_vector(m, K.FILTER_NORM, n, fn)
            self._wrote_norms = True
        ps = [p for _, _, p in self._params]
        coords = self._proj(ps).float()
        tracer.record_vector("", K.TRAJECTORY, f"random:{self.seed}", coords)
        if self.pca_snapshots and (tracer.step_index // self.every) % self._snap_every == 0:
            self._snaps.append((tracer.step_index, [p.detach().to("cpu", copy=True) for p in ps]))
            if len(self._snaps) > self.pca_snapshots:  # keep every other: evenly spaced, bounded
                self._snaps = self._snaps[::2]
                self._snap_every *= 2

    def before_close(self, tracer: TraceContext) -> None:
        if len(self._snaps) < 3:
            return
        ps = [p for _, _, p in self._params]
        if self._snaps[-1][0] != tracer.step_index:  # end at the final weights
            self._snaps.append((tracer.step_index, [p.detach().to("cpu", copy=True) for p in ps]))
        dirs, explained = LS.pca_directions([s for _, s in self._snaps], n=2)
        torch.save(
            {
                "directions": dirs,
                "explained": explained.tolist(),
                "steps": [s for s, _ in self._snaps],
                "params": [f"{m}.{n}" if m else n for m, n, _ in self._params],
            },
            sidecar(tracer.path, "pca"),
        )
        proj = LS.Projector(dirs)
        rows: list[Late] = []
        for step, snap in self._snaps:
            c = proj(snap).numpy()
            rows.append(("", K.TRAJECTORY_PCA, "pca", np.concatenate([[step], c])))
        _record_late(tracer, rows)


def spectral_extensions(
    spectral: bool | dict[str, Any] = False, dynamics: bool | dict[str, Any] = False
) -> list[Extension]:
    """The extensions behind ``dnntrace.enable(..., spectral=, dynamics=)``: ``spectral`` adds
    ``WeightSpectra`` (+ ``ActivationSketch`` unless ``{"activations": False}``); ``dynamics``
    adds ``UpdateRatio`` and ``GradientNoiseScale``. A dict passes options: ``{"every": 10,
    "full_every": 500, "sketch": {...}}`` / ``{"every": 1, "micro_batch_size": 8}``."""
    out: list[Extension] = []
    if spectral:
        opts = option_dict(spectral)
        sketch = opts.pop("sketch", {})
        acts = opts.pop("activations", True)
        out.append(WeightSpectra(**opts))
        if acts:
            out.append(ActivationSketch(**sketch))
    if dynamics:
        opts = option_dict(dynamics)
        every = opts.pop("every", 1)
        out.append(UpdateRatio(every, opts.pop("mode", "auto")))
        out.append(GradientNoiseScale(every, **opts))
    return out


# ---- landscape ------------------------------------------------------------------------------
def named_params(model: nn.Module) -> list[tuple[str, str, nn.Parameter]]:
    """(module, name, parameter) in the tracer's order (``TraceContext.params``)."""
    out, seen = [], set()
    for mname, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            if id(p) in seen or not p.is_floating_point():
                continue
            seen.add(id(p))
            out.append((mname, pname, p))
    return out


def load_directions(
    model: nn.Module,
    trace: str | os.PathLike[str] | None = None,
    *,
    kind: str = "random",
    seed: int | None = None,
    n: int = 2,
) -> tuple[list[LS.Direction], dict[str, Any]]:
    """Directions for ``model``'s parameters (``named_params`` order): ``kind="random"``
    regenerates the training run's random directions from its seed and the ``filter_norm`` rows
    of ``trace`` (without a trace: normalised with the model's own weights, Li et al.'s plot
    around a solution); ``kind="pca"`` loads ``<trace>.pca.pt``."""
    params = [p for _, _, p in named_params(model)]
    info: dict[str, Any] = {"directions": kind}
    if kind == "pca":
        if trace is None:
            raise ValueError("load_directions: PCA directions need the training trace")
        saved = torch.load(sidecar(trace, "pca"), map_location="cpu", weights_only=True)
        dirs = [
            [d.to(p.device, p.dtype) for d, p in zip(ds, params, strict=True)]
            for ds in saved["directions"]
        ]
        info.update(explained=saved["explained"], tensor="pca")
        return dirs, info
    if kind != "random":
        raise ValueError(f"load_directions: kind must be random or pca, got {kind!r}")
    norms: list[Tensor | None] | None = None
    if trace is not None:
        from ..storage import load

        tr = load(trace)
        t = tr.select(kind=K.TRAJECTORY)
        tensors = sorted(set(t.column("tensor").cast("string").to_pylist())) if t.num_rows else []
        randoms = [x for x in tensors if x.startswith("random:")]
        if seed is None and randoms:
            seed = int(randoms[0].split(":", 1)[1])
        fn = tr.select(kind=K.FILTER_NORM)
        by_name: dict[tuple[str, str], np.ndarray] = {}
        mods = fn.column("module").cast("string").to_pylist()
        tens = fn.column("tensor").cast("string").to_pylist()
        vals = fn.column("values").to_pylist()
        for m, x, v in zip(mods, tens, vals, strict=True):
            by_name.setdefault((m, x), np.asarray(v, np.float32))
        norms = []
        for m, x, p in named_params(model):
            if p.dim() < 2:
                norms.append(None)
                continue
            v = by_name.get((m, x))
            if v is None or v.size != p.shape[0]:
                raise ValueError(f"{trace}: no filter norms recorded for {m}.{x}")
            norms.append(torch.from_numpy(v))
    seed = 0 if seed is None else seed
    info.update(seed=seed, tensor=f"random:{seed}")
    return LS.random_directions(params, seed, n, norms=norms), info


def write_landscape(
    path: str | os.PathLike[str], grid: LS.LandscapeGrid, info: dict[str, Any] | None = None
) -> str:
    """Writes a grid as a small trace: ``landscape_axis`` rows (``tensor`` x / y: absolute
    coordinates, the trajectory's frame) and one ``landscape`` row per y index (``step`` = j,
    ``values`` = loss along x); ``metadata["landscape"]`` holds ``info``, span and timing."""
    from ..sketch.layout import Layout
    from ..storage.rows import state_to_batch, vector_state
    from ..storage.writer import TraceWriter

    lay = Layout()
    meta = {
        "landscape": {
            **(info or {}),
            "center": grid.center.tolist(),
            "span": float(grid.alphas[-1]),
            "steps": int(grid.alphas.size),
            "seconds": grid.seconds,
        },
        "layout": lay.to_dict(),
        "modules": [],
    }
    vecs = [grid.xs, grid.ys] + [grid.loss[j] for j in range(grid.loss.shape[0])]
    kinds = [K.LANDSCAPE_AXIS, K.LANDSCAPE_AXIS] + [K.LANDSCAPE] * grid.loss.shape[0]
    tens = ["x", "y"] + ["loss"] * grid.loss.shape[0]
    steps = np.array([0, 0] + list(range(grid.loss.shape[0])), np.int64)
    counts, moments = vector_state(vecs, lay)
    batch = state_to_batch(
        counts,
        moments,
        lay,
        step=steps,
        module=[""] * len(vecs),
        kind=kinds,
        tensor=tens,
        dtype=["float32"] * len(vecs),
        shape=[(v.size,) for v in vecs],
        values=vecs,
    )
    with TraceWriter(path, meta) as w:
        w.write(batch)
    return os.fspath(path)


def landscape(
    model: nn.Module,
    loss_fn: Callable[[nn.Module], Tensor | float],
    out: str | os.PathLike[str],
    *,
    trace: str | os.PathLike[str] | None = None,
    directions: str = "random",
    seed: int | None = None,
    steps: int = 21,
    span: float = 1.0,
    progress: bool = True,
) -> LS.LandscapeGrid:
    """``dnntrace landscape`` as an API: the loss of ``model`` on a ``steps × steps`` grid along
    the training run's directions (``load_directions``), written to ``out``."""
    dirs, info = load_directions(model, trace, kind=directions, seed=seed)
    params = [p for _, _, p in named_params(model)]
    grid = LS.evaluate_grid(
        model, loss_fn, dirs, steps=steps, span=span, progress=progress, params=params
    )
    info["trace"] = None if trace is None else os.fspath(trace)
    write_landscape(out, grid, info)
    return grid


__all__ = [
    "ActivationSketch",
    "GradientNoiseScale",
    "HessianEigen",
    "Trajectory",
    "UpdateRatio",
    "WeightSpectra",
    "landscape",
    "load_directions",
    "named_params",
    "spectral_extensions",
    "write_landscape",
]


register_extension("spectral", lambda value: spectral_extensions(spectral=value))
register_extension("dynamics", lambda value: spectral_extensions(dynamics=value))
