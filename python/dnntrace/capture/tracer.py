"""``dnntrace.enable(model)``: trace activations, gradients and weights while a model trains.

Hooks add each tensor's statistics into a slot of a preallocated device stat bank (one fused op per
tensor, all parameters in one multi-tensor op); nothing is synchronised or copied in the training
thread. At each optimizer step (or ``tracer.step()``) the bank goes to a background writer
(``capture.pipeline``). The tracer never breaks training: an internal error disables tracing with
one warning, unless ``strict=True``.
"""

from __future__ import annotations

import atexit
import contextlib
import difflib
import errno
import inspect
import os
import platform
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .._version import __version__
from ..storage.layout import DEFAULT_EMIN, DEFAULT_OCTAVES, Layout
from ..storage.writer import TraceWriter
from .pipeline import Pipeline, SlotLabel, VectorBlock
from .readonce import ReadOnce
from .selection import ModuleSpec, iter_float_tensors, select_modules

_ACTIVE: dict[int, Tracer] = {}  # id(model) -> tracer
_ACTIVE_LOCK = threading.Lock()


class TracingError(RuntimeError):
    """An internal tracing failure, raised only with ``strict=True``."""


class AnomalyError(RuntimeError):
    """A NaN/Inf found with ``on_anomaly="raise"`` (``capture.anomaly``); ``found`` says where.
    Raised after the tracer closed, so the trace on disk holds every step up to the finding."""

    def __init__(self, message: str, found: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.found = found or {}


class Extension:
    """Adds statistics to a tracer (per-unit statistics, spectra, ...).

    ``attach`` runs once (register hooks through ``tracer.guard`` and ``tracer.add_handle``);
    ``before_optimizer_step`` runs when gradients are final; ``on_step_end`` after the optimizer
    update, before the step is flushed (record with ``tracer.record_vector`` /
    ``tracer.log_scalar``); ``after_flush`` after the step was handed to the writer (may raise
    ``AnomalyError``); ``before_close`` before the last flush (may still record); ``close`` when
    the tracer closes. Default methods do nothing."""

    def attach(self, tracer: Tracer) -> None:
        return None

    def before_optimizer_step(self, tracer: Tracer, optimizer: torch.optim.Optimizer) -> None:
        return None

    def on_step_end(self, tracer: Tracer) -> None:
        return None

    def after_flush(self, tracer: Tracer) -> None:
        return None

    def before_close(self, tracer: Tracer) -> None:
        return None

    def close(self, tracer: Tracer) -> None:
        return None


def _kinds(
    activations: Any,
    gradients: Any,
    weights: Any,
    activation_grads: Any,
    weight_grads: Any,
) -> tuple[bool, bool]:
    """(activation_grads, weight_grads): ``gradients`` is the shorthand for both; an explicit
    ``activation_grads`` / ``weight_grads`` wins over it."""
    for name, v in (
        ("activations", activations),
        ("weights", weights),
        ("gradients", gradients),
        ("activation_grads", activation_grads),
        ("weight_grads", weight_grads),
    ):
        if not isinstance(v, bool) and not (v is None and name not in ("activations", "weights")):
            raise ValueError(f"dnntrace.enable: {name} must be True or False, got {v!r}")
    both = True if gradients is None else gradients
    return (
        both if activation_grads is None else activation_grads,
        both if weight_grads is None else weight_grads,
    )


def _local(t: torch.Tensor) -> torch.Tensor:
    # FSDP2 parameters and gradients are DTensors: each rank traces its own shard
    return t.to_local() if hasattr(t, "to_local") else t


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


class Tracer:
    """Traces one model into one trace file. Use ``dnntrace.enable(model, ...)``.

    A context manager: ``with dnntrace.enable(model) as tr: ...`` closes on exit (also when the
    block raises). ``step()`` ends a step by hand (not needed when an optimizer steps);
    ``log_scalar(name, value)`` records the loss, learning rate, ... (a tensor is not synced);
    ``close()`` flushes the last step, waits for the writer and removes every hook.
    """

    def __init__(
        self,
        model: nn.Module,
        path: str | os.PathLike[str] = "trace.arrow",
        *,
        every: int = 1,
        activations: bool = True,
        gradients: bool | None = None,
        weights: bool = True,
        activation_grads: bool | None = None,
        weight_grads: bool | None = None,
        modules: ModuleSpec = None,
        k: int = 6,
        emin: int = DEFAULT_EMIN,
        octaves: int = DEFAULT_OCTAVES,
        optimizer: torch.optim.Optimizer | None = None,
        strict: bool = False,
        activations_every: int | None = None,
        host_buffers: int | None = None,
        host_memory_mb: float = 256.0,
        fsync: bool = False,
        compression: str | None = "zstd",
        log_lr: bool = True,
        extensions: Sequence[Extension] = (),
        units: bool | dict[str, Any] = False,
        on_anomaly: str | None = None,
        merge_ranks: bool | dict[str, Any] = False,
        ddp_hook: bool | dict[str, Any] = False,
        spectral: bool | dict[str, Any] = False,
        dynamics: bool | dict[str, Any] = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"dnntrace.enable expects an nn.Module, got {type(model).__name__}")
        if type(model).__name__ == "OptimizedModule" or hasattr(model, "_orig_mod"):
            raise TypeError(
                "dnntrace.enable: this model was made by torch.compile; trace the original "
                "module instead (dnntrace.enable(model) then torch.compile(model) records weights "
                "and gradients; activation hooks are skipped inside compiled graphs)"
            )
        if compression not in ("zstd", "lz4", None):
            raise ValueError(
                f"dnntrace.enable: compression must be 'zstd', 'lz4' or None, got {compression!r}"
            )
        if not isinstance(host_memory_mb, int | float) or not host_memory_mb > 0:
            raise ValueError(f"dnntrace.enable: host_memory_mb must be > 0, got {host_memory_mb!r}")
        for name, v in (("every", every), ("host_buffers", host_buffers or 1)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"dnntrace.enable: {name} must be a positive int, got {v!r}")
        if activations_every is not None and (
            not isinstance(activations_every, int) or activations_every < 1
        ):
            raise ValueError(
                f"dnntrace.enable: activations_every must be a positive int, got "
                f"{activations_every!r}"
            )
        activation_grads, weight_grads = _kinds(
            activations, gradients, weights, activation_grads, weight_grads
        )
        self.layout = Layout(k, emin, octaves)  # validates k / emin / octaves
        self.model = model
        self.path = os.fspath(path)
        self.every = every
        self.activations_every = activations_every or every
        self.trace_activations = activations
        self.trace_activation_grads = activation_grads
        self.trace_weight_grads = weight_grads
        self.trace_gradients = activation_grads or weight_grads  # either kind of gradient
        self.trace_weights = weights
        self.strict = strict
        self.log_lr = log_lr
        self.closed = False
        self.disabled_reason: str | None = None
        self._paused = False
        self.step_index = 0
        self._handles: list[RemovableHandle] = []
        self._lock = threading.RLock()

        self._modules = select_modules(model, modules)
        self._params: list[tuple[str, str, nn.Parameter]] = []  # (module, param name, param)
        seen: set[int] = set()
        for mname, mod in model.named_modules():
            for pname, p in mod.named_parameters(recurse=False):
                if id(p) in seen or not p.is_floating_point():
                    continue
                seen.add(id(p))
                self._params.append((mname, pname, p))
        self.device = self._params[0][2].device if self._params else torch.device("cpu")
        self._param_ids = {id(p) for _, _, p in self._params}
        if optimizer is not None and not self._owns(optimizer):
            raise ValueError("dnntrace.enable: the optimizer holds none of the model's parameters")
        try:
            import torch.distributed as dist

            dist_on = dist.is_available() and dist.is_initialized()
            self.rank = dist.get_rank() if dist_on else 0
            self.world_size = dist.get_world_size() if dist_on else 1
        except (ImportError, RuntimeError):
            self.rank, self.world_size = 0, 1
        if self.world_size > 1 or "{rank" in self.path:
            from .distributed import rank_path  # one file per rank: <stem>/rank<r>.arrow

            self.path = rank_path(self.path, self.rank, self.world_size)

        # slot table: label -> row of the bank
        self._slot_of: dict[SlotLabel, int] = {}
        self._labels: list[SlotLabel] = []
        self._meta: list[tuple[str, tuple[int, ...]]] = []
        self._labels_snapshot: tuple[tuple[SlotLabel, ...], tuple[Any, ...]] | None = None
        self._scalars: dict[str, Any] = {}
        self._vectors: list[VectorBlock] = []
        self._recorded = False
        self._read_once = ReadOnce()
        self._grad_hooks: dict[SlotLabel, Callable[[torch.Tensor], None]] = {}
        self.extensions = list(extensions)
        if units:
            from .units import UnitStats

            self.extensions.append(UnitStats(**(units if isinstance(units, dict) else {})))
        if on_anomaly is not None:
            from .anomaly import AnomalyWatch

            self.extensions.append(AnomalyWatch(on_anomaly))
        if merge_ranks or ddp_hook:
            from .distributed import DDPGradStats, RankMerge

            if merge_ranks:
                opts = merge_ranks if isinstance(merge_ranks, dict) else {}
                self.extensions.append(RankMerge(**opts))
            if ddp_hook:
                opts = ddp_hook if isinstance(ddp_hook, dict) else {}
                self.extensions.append(DDPGradStats(**opts))
        if spectral or dynamics:
            from .spectral import spectral_extensions

            self.extensions += spectral_extensions(spectral, dynamics)
        capacity = 4 * len(self._modules) + 2 * len(self._params) + 16

        options = {
            "every": every,
            "activations_every": self.activations_every,
            "activations": activations,
            "gradients": activation_grads and weight_grads,
            "activation_grads": activation_grads,
            "weights": weights,
            "weight_grads": weight_grads,
            "modules": None if modules is None else repr(modules),
            "k": k,
            "emin": emin,
            "octaves": octaves,
            "strict": strict,
            "host_buffers": host_buffers,
            "host_memory_mb": host_memory_mb,
            "units": bool(units),
            "on_anomaly": on_anomaly,
            "merge_ranks": bool(merge_ranks),
            "ddp_hook": bool(ddp_hook),
            "spectral": bool(spectral),
            "dynamics": bool(dynamics),
        }
        traced = {n for n, _ in self._modules}
        meta = {
            "dnntrace_version": __version__,
            "torch_version": torch.__version__,
            "created_unix_s": __import__("time").time(),
            "host": platform.node(),
            "pid": os.getpid(),
            "rank": self.rank,
            "world_size": self.world_size,
            "device": str(self.device),
            "layout": self.layout.to_dict(),
            "options": options,
            "modules": [
                {
                    "name": n,
                    "type": type(m).__name__,
                    "depth": 0 if n == "" else n.count(".") + 1,
                    "traced": n in traced,
                    "params": {pn: list(p.shape) for pn, p in m.named_parameters(recurse=False)},
                }
                for n, m in model.named_modules()
            ],
        }
        self._optimizer: torch.optim.Optimizer | None = None
        self._pipe: Pipeline | None = None
        self._writer: TraceWriter | None = None
        try:
            self._writer = TraceWriter(self.path, meta, fsync=fsync, compression=compression)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise ValueError(
                    f"dnntrace.enable: cannot write the trace {self.path!r}: {e.strerror or e}"
                ) from None
            # a full disk never stops training: warn once, train untraced
            self.disabled_reason = f"disk full writing {self.path!r}"
            warnings.warn(
                f"dnntrace: not tracing: {self.path!r} cannot be written ({e.strerror}); "
                "training continues untraced",
                RuntimeWarning,
                stacklevel=3,
            )
            with _ACTIVE_LOCK:
                _ACTIVE[id(model)] = self
            return
        try:
            if host_buffers is None:
                # as many steps in flight as fit the host budget: small models get a deep queue
                # (a fast loop does not outrun the writer), large ones a few buffers
                per_bank = capacity * (self.layout.width + 8) * 8
                host_buffers = int(min(64, max(2, host_memory_mb * 2**20 // per_bank)))
            self._setup(capacity, host_buffers, optimizer)
        except BaseException:
            self._remove_hooks()
            if self._pipe is not None:
                self._pipe.close()
            elif self._writer is not None:
                self._writer.close()
            raise
        with _ACTIVE_LOCK:
            _ACTIVE[id(model)] = self

    def _setup(
        self, capacity: int, host_buffers: int, optimizer: torch.optim.Optimizer | None
    ) -> None:
        assert self._writer is not None
        self._pipe = Pipeline(
            self._writer,
            self.layout,
            self.device,
            capacity,
            host_buffers=host_buffers,
            rank=self.rank,
            on_error=self._writer_failed,
        )
        self._weight_slots: list[int] = []
        self._grad_slots: list[int] = []
        if self.trace_weights or self.trace_weight_grads:
            for mname, pname, _ in self._params:
                if self.trace_weights:
                    self._weight_slots.append(self._slot((mname, "weight", pname, "train")))
                if self.trace_weight_grads:
                    self._grad_slots.append(self._slot((mname, "weight_grad", pname, "train")))
        # rows of these slots to clear if an optimizer turns up after grads were recorded
        self._grad_slot_index = torch.tensor(self._grad_slots, dtype=torch.long, device=self.device)
        self._install_hooks(optimizer)
        for ext in self.extensions:
            ext.attach(self)

    # ---- slots --------------------------------------------------------------------------
    def _slot(self, label: SlotLabel) -> int:
        s = self._slot_of.get(label)
        if s is None:
            s = len(self._labels)
            self._slot_of[label] = s
            self._labels.append(label)
            self._meta.append(("", ()))
            self._labels_snapshot = None
            if s >= self._pipe.capacity:
                self._pipe.grow(max(2 * self._pipe.capacity, s + 1))
        return s

    def _note(self, slot: int, x: torch.Tensor) -> None:
        shape = tuple(x.shape)
        m = self._meta[slot]
        if m[1] != shape or not m[0]:
            self._meta[slot] = (_dtype_name(x.dtype), shape)
            self._labels_snapshot = None

    def _accumulate(self, label: SlotLabel, x: torch.Tensor) -> None:
        if x.device != self.device:
            return  # another device than the bank's (model parallel): not traced
        slot = self._slot(label)
        self._note(slot, x)
        self._read_once.accumulate(self._pipe.bank, x, slot)
        self._recorded = True

    # ---- hooks --------------------------------------------------------------------------
    def _guard(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if self.disabled_reason is not None or self.closed or self._paused:
                return None
            try:
                return fn(*args, **kwargs)
            except AnomalyError:
                raise
            except Exception as e:
                self._fail(e)
                return None

        return wrapped

    def _fail(self, e: BaseException) -> None:
        if self.strict:
            raise TracingError(f"dnntrace: tracing failed: {type(e).__name__}: {e}") from e
        self.disabled_reason = f"{type(e).__name__}: {e}"
        warnings.warn(
            f"dnntrace: tracing disabled after an internal error ({self.disabled_reason}); "
            "training continues untraced",
            RuntimeWarning,
            stacklevel=3,
        )
        self._remove_hooks()

    def _writer_failed(self, e: BaseException) -> None:
        # runs on the writer thread: warn once; the training thread keeps going, steps are dropped
        warnings.warn(
            f"dnntrace: stopped writing {self.path} ({type(e).__name__}: {e}); training "
            "continues, later steps are not recorded",
            RuntimeWarning,
            stacklevel=2,
        )

    def _sampling(self, every: int) -> bool:
        return self.step_index % every == 0

    def _install_hooks(self, optimizer: torch.optim.Optimizer | None) -> None:
        if self.trace_activations or self.trace_activation_grads:
            for name, mod in self._modules:
                self._handles.append(
                    mod.register_forward_hook(self._guard(self._make_forward_hook(name)))
                )
        if self.trace_weight_grads and optimizer is None:
            # Without an optimizer the gradient is summarised as it is accumulated.
            for (_, _, p), slot in zip(self._params, self._grad_slots, strict=True):
                if p.requires_grad:
                    h = p.register_post_accumulate_grad_hook(
                        self._guard(self._make_grad_hook(slot))
                    )
                    h._dnntrace_grad = True  # type: ignore[attr-defined]
                    self._handles.append(h)
        if optimizer is not None:
            self._attach_optimizer(optimizer)
        else:
            import torch.optim.optimizer as optim_mod

            self._handles.append(
                optim_mod.register_optimizer_step_pre_hook(self._guard(self._global_pre_step))
            )
            self._handles.append(
                optim_mod.register_optimizer_step_post_hook(self._guard(self._global_post_step))
            )

    def _make_forward_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if torch.compiler.is_compiling():
                return
            if not self._sampling(self.activations_every):
                return
            phase = "train" if (module.training and torch.is_grad_enabled()) else "eval"
            for pos, t in iter_float_tensors(output):
                if self.trace_activations:
                    self._accumulate((name, "activation", pos, phase), t)
                if self.trace_activation_grads and t.requires_grad and torch.is_grad_enabled():
                    label = (name, "activation_grad", pos, phase)
                    fn = self._grad_hooks.get(label)
                    if fn is None:  # one guarded hook per label, made once
                        fn = self._grad_hooks[label] = self._guard(
                            self._make_tensor_grad_hook(label)
                        )
                    t.register_hook(fn)

        return hook

    def _make_tensor_grad_hook(self, label: SlotLabel) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            self._accumulate(label, grad)

        return hook

    def _make_grad_hook(self, slot: int) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            if p.grad is None or not self._sampling(self.every):
                return
            g = _local(p.grad)
            self._note(slot, g)
            self._pipe.bank.accumulate(g, slot)
            self._recorded = True

        return hook

    def _owns(self, optimizer: torch.optim.Optimizer) -> bool:
        return any(id(p) in self._param_ids for g in optimizer.param_groups for p in g["params"])

    def _attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        if not self._owns(optimizer):
            raise ValueError("dnntrace.enable: the optimizer holds none of the model's parameters")
        self._optimizer = optimizer
        self._handles.append(
            optimizer.register_step_pre_hook(
                self._guard(lambda opt, args, kwargs: self._pre_step(opt))
            )
        )
        self._handles.append(
            optimizer.register_step_post_hook(
                self._guard(lambda opt, args, kwargs: self._post_step(opt))
            )
        )

    def _global_pre_step(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._optimizer is None and self._owns(opt):
            self._optimizer = opt
            self._drop_grad_hooks()
            # Grads recorded by the accumulate hooks so far are partial sums that _pre_step is
            # about to record whole: clear them so the step counts each gradient once.
            if self._grad_slots:
                self._pipe.bank.reset_rows(self._grad_slot_index)
        if opt is self._optimizer:
            self._pre_step(opt)

    def _global_post_step(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if opt is self._optimizer:
            self._post_step(opt)

    def _drop_grad_hooks(self) -> None:
        # An optimizer was found: gradients are summarised once, right before it steps.
        keep = []
        for h in self._handles:
            if getattr(h, "_dnntrace_grad", False):
                h.remove()
            else:
                keep.append(h)
        self._handles = keep

    def _pre_step(self, opt: torch.optim.Optimizer) -> None:
        for ext in self.extensions:
            ext.before_optimizer_step(self, opt)
        if not self.trace_weight_grads or not self._sampling(self.every):
            return
        xs, slots = [], []
        for (_, _, p), slot in zip(self._params, self._grad_slots, strict=True):
            if p.grad is not None and p.grad.device == self.device and not p.grad.is_sparse:
                xs.append(_local(p.grad))
                slots.append(slot)
                self._note(slot, xs[-1])
        if xs:
            self._pipe.bank.accumulate_many(xs, slots)
            self._recorded = True

    def _post_step(self, opt: torch.optim.Optimizer) -> None:
        if self.log_lr and self._sampling(self.every):
            for i, g in enumerate(opt.param_groups):
                lr = g.get("lr")
                if isinstance(lr, int | float):
                    self._scalars[f"lr/{i}" if len(opt.param_groups) > 1 else "lr"] = float(lr)
        self.step()

    # ---- the extension interface ------------------------------------------------------------
    @property
    def traced_modules(self) -> list[tuple[str, nn.Module]]:
        """(name, module) of every traced module, in model order."""
        return list(self._modules)

    @property
    def params(self) -> list[tuple[str, str, nn.Parameter]]:
        """(module name, parameter name, parameter) of every floating parameter."""
        return list(self._params)

    def sampled(self, every: int | None = None) -> bool:
        """Whether the current step is recorded at cadence ``every`` (default: ``every``)."""
        return self._sampling(every or self.every)

    def guard(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Wraps a hook so an exception disables tracing (or raises in strict mode)."""
        return self._guard(fn)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Hooks do nothing inside (an extension's own forward passes, e.g. a Hessian closure)."""
        was, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = was

    def add_handle(self, handle: RemovableHandle) -> None:
        """A hook handle to remove when the tracer closes or is disabled."""
        self._handles.append(handle)

    def record_vector(
        self, module: str, kind: str, tensor: str, values: torch.Tensor, phase: str = "train"
    ) -> None:
        """Records a vector statistic (one value per unit) for the current step, on the device:
        no sync; it is copied to the host with the step's bank. ``values`` must not be modified
        afterwards."""
        if self.disabled_reason is not None or self.closed:
            return
        v = values.detach().reshape(-1)
        self._vectors.append(VectorBlock(((module, kind, tensor, phase),), (v.numel(),), v))

    def record_vectors(
        self,
        labels: Sequence[tuple[str, str, str]],
        lengths: Sequence[int],
        flat: torch.Tensor,
        phase: str = "train",
    ) -> None:
        """Records many vector rows at once: ``flat`` (on the device) holds them back to back,
        row ``i`` (``(module, kind, tensor)`` ``labels[i]``) being the next ``lengths[i]`` values.
        One tensor for a whole extension's rows instead of one per row. ``flat`` must not be
        modified afterwards."""
        if self.disabled_reason is not None or self.closed:
            return
        if len(labels) != len(lengths) or sum(lengths) != flat.numel():
            raise ValueError(
                f"record_vectors: {len(labels)} labels, {len(lengths)} lengths summing to "
                f"{sum(lengths)}, for {flat.numel()} values"
            )
        lbs = tuple((m, k, t, phase) for m, k, t in labels)
        self._vectors.append(VectorBlock(lbs, tuple(lengths), flat.detach().reshape(-1)))

    # ---- public -------------------------------------------------------------------------
    def log_scalar(self, name: str, value: float | torch.Tensor) -> None:
        """Records a scalar (loss, accuracy, ...) for the current step. A tensor is not synced:
        its value is copied with the step's statistics."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"log_scalar: name must be a non-empty string, got {name!r}")
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"log_scalar: {name!r} must be a single value, got {value.shape}")
            value = value.detach()
        elif not isinstance(value, int | float):
            raise TypeError(f"log_scalar: {name!r} must be a number or tensor, got {type(value)}")
        self._scalars[name] = value

    def step(self) -> None:
        """Ends the current step: its statistics go to the writer; the step counter advances."""
        if self.closed:
            return
        try:
            with self._lock:
                if self.disabled_reason is None:
                    if self._pipe is not None:
                        self._read_once.apply(self._pipe.bank)
                    for ext in self.extensions:
                        ext.on_step_end(self)
                self._flush()
                self.step_index += 1
                for ext in self.extensions:
                    ext.after_flush(self)
        except AnomalyError:
            raise
        except Exception as e:
            self._fail(e)

    def _flush(self, closing: bool = False) -> None:
        if self.disabled_reason is not None:
            return
        # weights are recorded at the optimizer step; a flush at close only ships what is left
        if not closing and self.trace_weights and self._sampling(self.every) and self._params:
            xs = [_local(p.detach()) for _, _, p in self._params]
            idx = [i for i, x in enumerate(xs) if x.device == self.device]
            if idx:
                self._pipe.bank.accumulate_many(
                    [xs[i] for i in idx], [self._weight_slots[i] for i in idx]
                )
                for i in idx:
                    self._note(self._weight_slots[i], xs[i])
                self._recorded = True
        self._read_once.end_step(self._pipe.bank)
        if not self._recorded and not self._scalars and not self._vectors:
            return
        if self._labels_snapshot is None:
            self._labels_snapshot = (tuple(self._labels), tuple(self._meta))
        labels, meta = self._labels_snapshot
        self._pipe.submit(self.step_index, labels, meta, self._scalars, self._vectors)
        self._scalars = {}
        self._vectors = []
        self._recorded = False

    def stats(self) -> dict[str, Any]:
        """Steps written and dropped, rows, bytes on disk, bank memory, flush cost."""
        if self._pipe is None or self._writer is None:  # never started (disk full)
            return {
                "steps_written": 0,
                "steps_dropped": self.step_index,
                "rows": 0,
                "bytes": 0,
                "slots": 0,
                "memory_bytes": {},
                "flush_us_median": 0.0,
                "write_seconds": 0.0,
                "reads_saved": 0,
                "bytes_read_saved": 0,
                "writer_cpu_seconds": 0.0,
                "bytes_to_host": 0,
                "bank_bytes": 0,
                "batches": 0,
                "disabled": self.disabled_reason,
            }
        s = self._pipe.stats
        flush = sorted(s.flush_us)
        return {
            "steps_written": s.steps_written,
            "steps_dropped": s.steps_dropped,
            "rows": s.rows,
            "bytes": self._writer.bytes_written,
            "slots": len(self._labels),
            "memory_bytes": self._pipe.memory_bytes(),
            "flush_us_median": flush[len(flush) // 2] if flush else 0.0,
            "write_seconds": s.write_seconds,
            "reads_saved": self._read_once.reads_saved,
            "bytes_read_saved": self._read_once.bytes_saved,
            "writer_cpu_seconds": s.writer_cpu_seconds,
            "bytes_to_host": s.bytes_to_host,
            "bank_bytes": self._pipe.bank.bytes,
            "batches": s.batches,
            "disabled": self.disabled_reason,
        }

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def close(self) -> dict[str, Any]:
        """Flushes the last step, waits for the writer, removes every hook. Idempotent."""
        if self.closed:
            return self.stats()
        if self._pipe is None:  # never started (disk full)
            self.closed = True
            with _ACTIVE_LOCK:
                if _ACTIVE.get(id(self.model)) is self:
                    del _ACTIVE[id(self.model)]
            return self.stats()
        with self._lock:
            for ext in self.extensions:
                try:
                    if self.disabled_reason is None:
                        ext.before_close(self)
                except Exception as e:  # noqa: BLE001 - an extension must not break closing
                    warnings.warn(
                        f"dnntrace: extension {ext!r} failed before closing: {e}",
                        RuntimeWarning,
                        stacklevel=2,
                    )
            try:
                if self._recorded or self._scalars or self._vectors:
                    self._flush(closing=True)
            except Exception as e:  # closing must not raise into the user's finally-blocks
                if self.strict:
                    raise
                warnings.warn(
                    f"dnntrace: last step not written ({e})", RuntimeWarning, stacklevel=2
                )
            self.closed = True
            for ext in self.extensions:
                try:
                    ext.close(self)
                except Exception as e:  # noqa: BLE001 - an extension must not break closing
                    warnings.warn(
                        f"dnntrace: extension {ext!r} failed to close: {e}",
                        RuntimeWarning,
                        stacklevel=2,
                    )
            self._remove_hooks()
            self._pipe.close()
        with _ACTIVE_LOCK:
            if _ACTIVE.get(id(self.model)) is self:
                del _ACTIVE[id(self.model)]
        return self.stats()

    def __enter__(self) -> Tracer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mem = self._pipe.memory_bytes() if self._pipe is not None else {}
        return (
            f"Tracer({self.path!r}, step={self.step_index}, modules={len(self._modules)}, "
            f"params={len(self._params)}, slots={len(self._labels)}, "
            f"memory={ {k: f'{v / 2**20:.1f} MiB' for k, v in mem.items()} })"
        )


def enable(
    model: nn.Module, path: str | os.PathLike[str] = "trace.arrow", **options: Any
) -> Tracer:
    """Starts tracing ``model`` into ``path`` and returns the ``Tracer``.

    Options: ``every`` (trace every n-th step), ``activations_every`` (activations and output
    gradients on another cadence); the kinds recorded, each a bool: ``activations`` (module
    outputs), ``activation_grads`` (gradients w.r.t. them), ``weights``, ``weight_grads``
    (``gradients`` sets both gradient kinds; ``activations=False, activation_grads=False`` records
    what wandb.watch and TensorBoard do: weights and weight gradients only);
    ``modules`` (globs / types / ``"!glob"`` exclusions), ``k`` (histogram mantissa bits, 0..7),
    ``emin``/``octaves`` (exponent window), ``optimizer`` (else found at its first step),
    ``strict`` (raise instead of disabling on internal errors), ``host_memory_mb`` (host memory
    for steps waiting for the writer, default 256 MB) or ``host_buffers`` (their number),
    ``fsync``, ``compression`` (``"zstd"`` default, ``"lz4"``, or None: uncompressed batches are
    memory-mapped by readers instead of decompressed at open, which traces of 10^9 per-unit
    values need), ``units`` (per-unit statistics: True or ``UnitStats``
    options, ``capture.units``), ``on_anomaly`` (``"warn"``/``"raise"``/``"record"``: NaN/Inf
    origin, ``capture.anomaly``), ``merge_ranks`` / ``ddp_hook`` (under torch.distributed: merged
    cross-rank summaries / a DDP comm hook for gradient diversity and noise scale, True or options,
    ``capture.distributed``), ``spectral`` / ``dynamics`` (weight spectra and activation
    sketches / update ratios and gradient noise scale: True or options,
    ``capture.spectral.spectral_extensions``).
    """
    with _ACTIVE_LOCK:
        old = _ACTIVE.get(id(model))
    if old is not None and not old.closed:
        raise RuntimeError(
            f"dnntrace.enable: this model is already traced into {old.path!r}; call "
            "dnntrace.disable(model) first"
        )
    unknown = [k for k in options if k not in _OPTIONS]
    if unknown:
        hint = difflib.get_close_matches(unknown[0], _OPTIONS, n=1)
        raise TypeError(
            f"dnntrace.enable: unknown option {unknown[0]!r}"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
            + f"; options: {', '.join(sorted(_OPTIONS))}"
        )
    return Tracer(model, path, **options)


_OPTIONS = tuple(inspect.signature(Tracer.__init__).parameters)[3:]  # after self, model, path


def disable(model: nn.Module) -> dict[str, Any] | None:
    """Closes the tracer of ``model`` (flush, remove hooks); returns its stats, None if none."""
    with _ACTIVE_LOCK:
        tr = _ACTIVE.get(id(model))
    return tr.close() if tr is not None else None


def _close_all() -> None:
    for tr in list(_ACTIVE.values()):
        try:
            tr.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


atexit.register(_close_all)
