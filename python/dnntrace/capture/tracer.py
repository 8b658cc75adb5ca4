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
import errno
import os
import platform
import sys
import threading
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .._version import __version__
from ..stats.bank import StatBank
from ..storage import kinds as K
from ..storage.files import rank_path
from ..storage.schema import read_metadata
from ..storage.writer import TraceWriter
from . import compiled as _compiled
from . import optim as _optim
from .config import TraceConfig, options_doc
from .contract import AnomalyError, Extension, RowLabel, TracingError, extensions_for
from .pipeline import Pipeline, SlotLabel, VectorBlock
from .readonce import ReadOnce
from .selection import iter_float_tensors, select_modules

_ACTIVE: dict[int, Tracer] = {}  # id(model) -> tracer
_ACTIVE_LOCK = threading.Lock()


__all__ = ["AnomalyError", "Extension", "Tracer", "TracingError", "disable", "enable"]


def _local(t: torch.Tensor) -> torch.Tensor:
    # FSDP2 parameters and gradients are DTensors: each rank traces its own shard
    return t.to_local() if hasattr(t, "to_local") else t


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def _phase(module: nn.Module, grad_on: bool, flows: bool) -> str:
    """``train`` where gradients flow (frozen BatchNorm in ``eval()`` while fine-tuning is
    train); ``eval`` under ``no_grad``/``inference_mode`` or for an eval-mode module whose outputs
    carry no gradient. Reentrant checkpointing runs its forward under ``no_grad``: train."""
    if grad_on:
        return "train" if (flows or module.training) else "eval"
    return "train" if module.training and _in_reentrant_checkpoint() else "eval"


_POSITIONS = tuple(str(i) for i in range(16))


def _float_outputs(output: Any) -> list[tuple[str, torch.Tensor]]:
    """(position, tensor) of the floating tensors of a module output that is not one tensor: a
    flat tuple or list of tensors and Nones (attention's ``(output, weights)``) directly,
    anything else by ``iter_float_tensors`` (same positions)."""
    if type(output) is tuple or type(output) is list:
        out = []
        for i, v in enumerate(output):
            if v is None:
                continue
            if type(v) is not torch.Tensor or i >= len(_POSITIONS):
                return list(iter_float_tensors(output))
            if v.is_floating_point():
                out.append((_POSITIONS[i], v))
        return out
    return list(iter_float_tensors(output))


def _in_reentrant_checkpoint() -> bool:
    from torch.utils.checkpoint import CheckpointFunction

    code = CheckpointFunction.forward.__code__
    f = sys._getframe(2)
    for _ in range(64):
        if f is None:
            return False
        if f.f_code is code:
            return True
        f = f.f_back
    return False


class Tracer:
    """Traces one model into one trace file. Use ``dnntrace.enable(model, ...)``, or
    ``Tracer(model, path, TraceConfig(...))`` (keyword options work too). Extensions see it as a
    ``TraceContext`` (``capture.contract``).

    A context manager: ``with dnntrace.enable(model) as tr: ...`` closes on exit (also when the
    block raises). ``step()`` ends a step by hand (not needed when an optimizer steps);
    ``log_scalar(name, value, step=None)`` records the loss, learning rate, ... (a tensor is not
    synced); ``close()`` writes the last step, waits for the writer and removes every hook. Where
    steps begin and end, and which gradient a step records, is ``capture.optim``'s docstring.
    """

    def __init__(
        self,
        model: nn.Module,
        path: str | os.PathLike[str] = "trace.arrow",
        config: TraceConfig | None = None,
        **options: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"dnntrace.enable expects an nn.Module, got {type(model).__name__}")
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # torch.compile's wrapper: its hooks run in its graph
        if options and config is not None:
            raise TypeError("Tracer: pass a TraceConfig or keyword options, not both")
        cfg = TraceConfig.from_options(**options) if config is None else config
        if not isinstance(cfg, TraceConfig):
            raise TypeError(f"Tracer: config must be a TraceConfig, got {type(cfg).__name__}")
        self.config = cfg
        kinds = cfg.kinds
        self.layout = cfg.layout
        # plain attributes (read in every hook): the cadences of weight / activation rows
        self.every: int = cfg.every
        self.activations_every: int = cfg.activation_cadence
        self.model = model
        self.path = os.fspath(path)
        self.trace_activations = K.ACTIVATION in kinds
        self.trace_activation_grads = K.ACTIVATION_GRAD in kinds
        self.trace_weight_grads = K.WEIGHT_GRAD in kinds
        self.trace_gradients = self.trace_activation_grads or self.trace_weight_grads
        self.trace_weights = K.WEIGHT in kinds
        self.strict = cfg.strict
        self.log_lr = cfg.log_lr
        self.closed = False
        self.disabled_reason: str | None = None
        self._paused = False
        self.step_index = 0
        self._handles: list[RemovableHandle] = []
        self._lock = threading.RLock()

        self._modules = select_modules(model, cfg.modules)
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
        self._pidx = {id(p): i for i, (_, _, p) in enumerate(self._params)}
        optimizer = cfg.optimizer
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
            self.path = rank_path(self.path, self.rank, self.world_size)
        with _ACTIVE_LOCK:
            real = os.path.realpath(self.path)
            for other in _ACTIVE.values():
                if not other.closed and os.path.realpath(other.path) == real:
                    raise RuntimeError(
                        f"dnntrace.enable: {self.path!r} is being written by another live tracer "
                        f"(of a {type(other.model).__name__}); close it first or use another path"
                    )

        # slot table: label -> row of the bank
        self._slot_of: dict[SlotLabel, int] = {}
        self._labels: list[SlotLabel] = []
        self._meta: list[tuple[str, tuple[int, ...]]] = []
        self._labels_snapshot: tuple[tuple[SlotLabel, ...], tuple[Any, ...]] | None = None
        self._scalars: dict[str, Any] = {}
        self._vectors: list[VectorBlock] = []
        self._recorded = False
        # step boundaries (capture.optim): the ended step is written when the next begins
        self._end_pending = False
        self._stepped: set[int] = set()  # ids of the optimizers that stepped in this step
        self._grads_done: set[int] = set()  # parameters whose gradient this step recorded
        self._weights_done: set[int] = set()  # ... and whose weight
        self._dirty: set[int] = set()  # parameters a backward wrote to (no optimizer yet)
        self._held: set[int] = set()  # parameters some optimizer holds
        self._opt_params: dict[int, tuple[int, list[int]]] = {}
        self._opt_order: list[weakref.ref[torch.optim.Optimizer]] = []
        self._explicit_opt: torch.optim.Optimizer | None = None
        self._pre_steps = 0
        self._compiled_forward = False  # a traced module ran inside a torch.compile graph
        self._compiled_lost: frozenset[str] = frozenset()  # outputs compiled graphs cannot record
        self._compile_warned = False
        self._compiled_no_grads = False
        self._first_call: dict[str, int] = {}
        self._exec_new: list[int] = []  # metadata indices of modules first called this step
        self._module_index = {n: i for i, (n, _) in enumerate(model.named_modules())}
        self._ext_ended = False  # extensions' on_step_end ran for the step that ended
        self._warned_cleared = False
        self._read_once = ReadOnce()
        self.extensions = extensions_for(cfg)  # built-ins through the registry
        capacity = 4 * len(self._modules) + 2 * len(self._params) + 16

        options = cfg.options_metadata()
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
            self._writer = TraceWriter(
                self.path, meta, fsync=cfg.fsync, compression=cfg.compression
            )
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
            host_buffers = cfg.host_buffers
            if host_buffers is None:
                # as many steps in flight as fit the host budget: small models get a deep queue
                # (a fast loop does not outrun the writer), large ones a few buffers
                per_bank = capacity * (self.layout.width + 8) * 8
                host_buffers = int(min(64, max(2, cfg.host_memory_mb * 2**20 // per_bank)))
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
        self._read_once.set_bank(self._pipe.bank)
        self._weight_slots: list[int] = []
        self._grad_slots: list[int] = []
        if self.trace_weights or self.trace_weight_grads:
            for mname, pname, _ in self._params:
                if self.trace_weights:
                    self._weight_slots.append(self._slot((mname, K.WEIGHT, pname, "train")))
                if self.trace_weight_grads:
                    self._grad_slots.append(self._slot((mname, K.WEIGHT_GRAD, pname, "train")))
        _compiled.preassign_slots(self)
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
                # the grown bank holds a copy of the old one's rows (and is marked with them)
                self._read_once.set_bank(self._pipe.bank)
        return s

    def _swap_bank(self, old: StatBank, new: StatBank) -> None:
        """The native table moves to the next bank; rows touched since the drain go to ``old``."""
        self._read_once.set_bank(new, previous=old)

    def _drain_native(self, end_step: bool = False) -> None:
        """Takes what the native table recorded (activations, their gradients) into the tracer's
        state: merges run (at the step's end, the table cleared), rows touched, row metadata,
        errors (reported once, as any internal error)."""
        if self._pipe is None:
            return
        recorded, meta, err = self._read_once.drain(self._pipe.bank, end_step)
        for slot, dtype, shape in meta:
            self._meta[slot] = (dtype, tuple(shape))
            self._labels_snapshot = None
        if recorded:
            self._recorded = True
        if err and self.disabled_reason is None:
            self._fail(RuntimeError(f"recording activations: {err}"))

    def _note(self, slot: int, x: torch.Tensor) -> None:
        shape = tuple(x.shape)
        m = self._meta[slot]
        if m[1] != shape or not m[0]:
            self._meta[slot] = (_dtype_name(x.dtype), shape)
            self._labels_snapshot = None

    def _note_many(self, slots: Sequence[int], xs: Sequence[torch.Tensor]) -> None:
        meta = self._meta
        for slot, x in zip(slots, xs, strict=True):
            m = meta[slot]
            if m[1] != x.shape or not m[0]:  # torch.Size is a tuple: no copy to compare
                meta[slot] = (_dtype_name(x.dtype), tuple(x.shape))
                self._labels_snapshot = None

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
                self._handles.append(mod.register_forward_hook(self._make_forward_hook(name)))
        # the next step begins with the model's next forward: the step just ended is written
        self._handles.append(self.model.register_forward_pre_hook(self._guard(self._root_pre_hook)))
        if self.trace_weight_grads and optimizer is None:
            # Until an optimizer steps, note which gradients a backward produced: tracer.step()
            # records them (an optimizer, once found, records them in its pre-step hook).
            for i, (_, _, p) in enumerate(self._params):
                if p.requires_grad:
                    h = p.register_post_accumulate_grad_hook(self._guard(self._make_grad_hook(i)))
                    h._dnntrace_grad = True  # type: ignore[attr-defined]
                    self._handles.append(h)
        if optimizer is not None:
            self._attach_optimizer(optimizer)
        import torch.optim.optimizer as optim_mod

        self._handles.append(
            optim_mod.register_optimizer_step_pre_hook(self._guard(self._global_pre_step))
        )
        self._handles.append(
            optim_mod.register_optimizer_step_post_hook(self._guard(self._global_post_step))
        )
        _optim.register(self)

    def _root_pre_hook(self, module: nn.Module, args: Any) -> None:
        if torch.compiler.is_compiling():
            self._compiled_forward = True  # a side effect torch.compile replays: no graph break
            return
        self._activity()

    def _make_forward_hook(self, name: str) -> Callable[..., None]:
        # Runs on the training thread for every traced module call, so it is one Python function
        # (the checks of _guard inline) with few calls: in place, after the module's own ops,
        # each costs several times its warm time. Labels and slots are looked up once per
        # (position, phase); each output goes to the native table (readonce.py) in one pybind11
        # call, which reads it (or queues its merge) and registers a C++ hook for its gradient,
        # so the backward runs no Python. Outputs on another device than the bank's are skipped
        # there (model parallel).
        labels: dict[tuple[str, str], tuple[int, int]] = {}
        record = self._read_once.record
        device = self.device
        is_compiling = torch.compiler.is_compiling
        graph_task = torch._C._current_graph_task_id
        grad_enabled = torch.is_grad_enabled
        tensor_type = torch.Tensor

        def labels_of(pos: str, phase: str, t: torch.Tensor) -> tuple[int, int]:
            if t.device != device:
                return (-1, -1)  # not cached: the module may move to the bank's device
            act = grad = -1
            if self.trace_activations:
                act = self._slot((name, K.ACTIVATION, pos, phase))
            if self.trace_activation_grads:
                grad = self._slot((name, K.ACTIVATION_GRAD, pos, phase))
            entry = labels[(pos, phase)] = (act, grad)
            return entry

        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if self.disabled_reason is not None or self.closed or self._paused:
                return
            try:
                if is_compiling():
                    _compiled.record(self, name, module, output)
                    return
                if self._end_pending:  # something of the next step: write the step that ended
                    self._finish()
                if name not in self._first_call:  # execution order, for readers and the viewer
                    self._first_call[name] = len(self._first_call)
                    self._exec_new.append(self._module_index[name])
                if self.step_index % self.activations_every:
                    return
                if type(output) is tensor_type:  # the common case: one tensor
                    if not output.is_floating_point():
                        return
                    tensors: Sequence[tuple[str, torch.Tensor]] = (("", output),)
                    requires = output.requires_grad
                else:
                    tensors = _float_outputs(output)
                    requires = False
                    for _, t in tensors:
                        if t.requires_grad:
                            requires = True
                            break
                grad_on = grad_enabled()
                flows = grad_on and requires
                if graph_task() != -1:
                    # a forward inside backward is activation checkpointing's recompute: the
                    # activations were recorded by the original forward. Reentrant checkpointing
                    # backpropagates through the recomputed outputs, so their gradients are taken
                    # here (non-reentrant recompute outputs are not on the graph: no hook fires).
                    if flows and self.trace_activation_grads:
                        for pos, t in tensors:
                            if t.requires_grad and t.device == device:
                                slot = self._slot((name, K.ACTIVATION_GRAD, pos, "train"))
                                record(t, -1, slot)
                    return
                if grad_on:  # _phase, inline
                    phase = "train" if (flows or module.training) else "eval"
                else:
                    phase = _phase(module, grad_on, flows)
                for pos, t in tensors:
                    act, grad = labels.get((pos, phase)) or labels_of(pos, phase, t)
                    record(t, act, grad if flows and t.requires_grad else -1)
            except AnomalyError:
                raise
            except Exception as e:
                self._fail(e)

        return hook

    def _make_grad_hook(self, index: int) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            self._dirty.add(index)

        return hook

    def _owns(self, optimizer: torch.optim.Optimizer) -> bool:
        return any(id(p) in self._param_ids for g in optimizer.param_groups for p in g["params"])

    def wants_optimizer(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether ``optimizer``'s steps are steps of this tracer."""
        if self._explicit_opt is not None:
            return optimizer is self._explicit_opt
        return self._owns(optimizer)

    def _attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        if not self._owns(optimizer):
            raise ValueError("dnntrace.enable: the optimizer holds none of the model's parameters")
        self._explicit_opt = optimizer
        self._optimizer = optimizer

    def _param_indices(self, opt: torch.optim.Optimizer) -> list[int]:
        n = sum(len(g["params"]) for g in opt.param_groups)
        cached = self._opt_params.get(id(opt))
        if cached is None or cached[0] != n:  # add_param_group changes the set
            ps = [p for g in opt.param_groups for p in g["params"]]
            idx = [self._pidx[id(p)] for p in ps if id(p) in self._pidx]
            cached = (n, idx)
            self._opt_params[id(opt)] = cached
            self._held.update(idx)
        return cached[1]

    def _global_pre_step(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> Any:
        if not self.wants_optimizer(opt):
            return None
        if self._optimizer is None:
            self._optimizer = opt
            self._drop_grad_hooks()
        self._pre_steps += 1
        self._begin_opt_step(opt)
        wrapped = _optim.with_probe(opt, args, kwargs, lambda c: _optim.ClosureProbe(c, self, opt))
        if wrapped is not None:
            return wrapped  # gradients are read after the closure's first evaluation
        self._grads_ready(opt)
        return None

    def _begin_opt_step(self, opt: torch.optim.Optimizer) -> None:
        if self._end_pending:
            if id(opt) in self._stepped:
                self._finish()  # this optimizer already stepped: a new step begins
            else:
                self._end_pending = False  # another optimizer joins the step just ended
        self._stepped.add(id(opt))

    def _grads_ready(self, opt: torch.optim.Optimizer, extensions: bool = True) -> None:
        """The gradients ``opt`` is about to step with are final: record them."""
        if extensions:
            for ext in self.extensions:
                ext.before_optimizer_step(self, opt)
        if self.trace_weight_grads and self._sampling(self.every):
            idx = self._param_indices(opt)
            if len(self._stepped) == 1:  # the step's first optimizer also takes orphans
                idx = idx + [i for i in range(len(self._params)) if i not in self._held]
            self._record_grads(idx)

    def _record_grads(self, indices: Sequence[int]) -> None:
        xs, slots = [], []
        done, params, device, tensor_type = (
            self._grads_done,
            self._params,
            self.device,
            torch.Tensor,
        )
        for i in indices:
            if i in done:
                continue
            g = params[i][2].grad
            if g is None:
                continue
            if type(g) is not tensor_type:
                g = _local(g)
            if g.is_sparse or g.device != device:
                continue
            xs.append(g)
            slots.append(self._grad_slots[i])
            done.add(i)
        if xs:
            self._note_many(slots, xs)
            self._pipe.bank.accumulate_many(xs, slots)
            self._recorded = True

    def _record_weights(self, indices: Iterable[int]) -> None:
        """Records the weights at the end of the step (after the update), once per step."""
        if not self.trace_weights or self.step_index % self.every:
            return
        xs, slots = [], []
        done, params, device, tensor_type = (
            self._weights_done,
            self._params,
            self.device,
            torch.Tensor,
        )
        for i in indices:
            if i in done:
                continue
            done.add(i)
            x = params[i][2]  # detached by the bank
            if type(x) is not tensor_type and type(x) is not nn.Parameter:
                x = _local(x.detach())
            if x.device == device:
                xs.append(x)
                slots.append(self._weight_slots[i])
        if xs:
            self._note_many(slots, xs)
            self._pipe.bank.accumulate_many(xs, slots)
            self._recorded = True

    def _global_post_step(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if id(opt) in self._stepped and self.wants_optimizer(opt):
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
        self._dirty.clear()

    def _post_step(self, opt: torch.optim.Optimizer) -> None:
        if self.log_lr and self._sampling(self.every):
            j = self._opt_index(opt)
            for i, g in enumerate(opt.param_groups):
                lr = g.get("lr")
                if isinstance(lr, int | float):
                    name = "lr" if j == 0 else f"lr/opt{j}"
                    if len(opt.param_groups) > 1:
                        name += f"/{i}"
                    self._scalars[name] = float(lr)
        # its parameters' new values; the others' (frozen, or another optimizer's that has not
        # stepped yet) when the step is written
        self._record_weights(self._param_indices(opt))
        self._end_step()

    def _opt_index(self, opt: torch.optim.Optimizer) -> int:
        for j, ref in enumerate(self._opt_order):
            if ref() is opt:
                return j
        self._opt_order.append(weakref.ref(opt))
        return len(self._opt_order) - 1

    def _after_scaler_step(self, opt: torch.optim.Optimizer, scaler: Any, skipped: bool) -> None:
        """Called by the wrapped ``GradScaler.step``: marks a skipped step, logs the scale."""

        def after() -> None:
            if skipped:  # no update: extensions are not told of one
                self._begin_opt_step(opt)
                self._grads_ready(opt, extensions=False)
                self._scalars["amp/skipped"] = 1.0
                self._post_step(opt)
            scale = getattr(scaler, "_scale", None)
            if isinstance(scale, torch.Tensor) and scale.numel() == 1:
                self._scalars["amp/scale"] = scale.detach().reshape(()).clone()

        self._guard(after)()

    def _end_step(self) -> None:
        """The step ended (its optimizers stepped): extensions read the update now, right
        after the optimizer step; the step is written when the next begins."""
        if self._exec_new and self.disabled_reason is None:
            order = torch.tensor(self._exec_new, dtype=torch.float32, device=self.device)
            self._exec_new = []
            self.record_vector("", K.EXEC_ORDER, "first_call", order)
        if not self._ext_ended and self.disabled_reason is None:
            self._ext_ended = True
            if self._pipe is not None:
                self._drain_native()  # duplicates' rows merged, before extensions
            for ext in self.extensions:
                ext.on_step_end(self)
        self._end_pending = True
        if self._compiled_forward:
            # a compiled forward cannot tell the tracer a step began: write the step now
            self._warn_compiled()
            self._finish()

    def _warn_compiled(self) -> None:
        if self._compile_warned:
            return
        self._compile_warned = True
        lost = []
        if self._compiled_no_grads:
            lost.append("output gradients (activation_grad rows)")
        if self._compiled_lost:
            names = ", ".join(repr(n) for n in sorted(self._compiled_lost)[:5])
            lost.append(f"the tuple/dict outputs of {len(self._compiled_lost)} modules ({names})")
        if self.activations_every != 1 and (self.trace_activations or self.trace_activation_grads):
            lost.append(
                f"the activations_every={self.activations_every} cadence (compiled graphs record "
                "activations every step)"
            )
        hooked = [type(e).__name__ for e in self.extensions if type(e).__name__ != "DDPGradStats"]
        if hooked:
            lost.append(f"the hooks of {', '.join(hooked)}")
        lost.append(
            "scalars logged after opt.step() go to the next step (a compiled forward cannot "
            "mark where a step begins)"
        )
        warnings.warn(
            "dnntrace: the model runs under torch.compile; inside compiled graphs these are not "
            "recorded as in eager mode: " + "; ".join(lost),
            RuntimeWarning,
            stacklevel=4,
        )

    def _activity(self) -> None:
        """Something of the next step is being recorded: write the step that ended."""
        if self._end_pending:
            self._finish()

    # ---- the extension contract (capture.contract.TraceContext) -----------------------------
    def records(self, kind: str) -> bool:
        """Whether rows of built-in ``kind`` are recorded (``TraceConfig.kinds``)."""
        return kind in self.config.kinds

    def accumulate(
        self,
        module: str,
        kind: str,
        tensor: str,
        x: torch.Tensor,
        *,
        phase: str = "train",
        histogram: bool = True,
    ) -> None:
        """Adds ``x``'s statistics into the row (module, kind, tensor, phase) of this step."""
        if self.disabled_reason is not None or self.closed or self._pipe is None:
            return
        if x.device != self.device:
            return
        x = _local(x.detach())
        slot = self._slot((module, kind, tensor, phase))
        self._note(slot, x)
        self._pipe.bank.accumulate(x, slot, histogram=histogram)
        self._recorded = True

    def accumulate_many(
        self,
        labels: Sequence[tuple[str, str, str]],
        xs: Sequence[torch.Tensor],
        *,
        phase: str = "train",
    ) -> None:
        """``accumulate`` of ``xs[i]`` into row ``labels[i]``, in few launches."""
        if self.disabled_reason is not None or self.closed or self._pipe is None:
            return
        if len(labels) != len(xs):
            raise ValueError(f"accumulate_many: {len(labels)} labels for {len(xs)} tensors")
        keep, slots = [], []
        for (m, k, t), x in zip(labels, xs, strict=True):
            if x.device != self.device:
                continue
            x = _local(x.detach())
            slot = self._slot((m, k, t, phase))
            self._note(slot, x)
            keep.append(x)
            slots.append(slot)
        if keep:
            self._pipe.bank.accumulate_many(keep, slots)
            self._recorded = True

    def row_labels(self) -> tuple[RowLabel, ...]:
        """The labels of the bank's rows, in bank order."""
        return tuple(self._labels)

    def row_meta(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """(dtype name, shape) of each bank row's tensor, in bank order."""
        return tuple(self._meta)

    def snapshot_rows(
        self,
        rows: Sequence[int] | torch.Tensor | None = None,
        count_columns: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """New device tensors (counts, moments) of bank rows ``rows`` (default: every labelled
        row) and count columns ``count_columns`` (default: all). No sync."""
        if self._pipe is None:
            raise RuntimeError("snapshot_rows: the tracer never started (no bank)")
        bank = self._pipe.bank
        if rows is None:
            n = min(len(self._labels), bank.slots)
            counts, moments = bank.counts[:n], bank.moments[:n].clone()
        else:
            idx = rows if isinstance(rows, torch.Tensor) else torch.tensor(rows, dtype=torch.long)
            idx = idx.to(device=bank.counts.device, dtype=torch.long)
            counts, moments = bank.counts.index_select(0, idx), bank.moments.index_select(0, idx)
        if count_columns is not None:
            counts = counts.index_select(1, count_columns.to(counts.device))
        elif rows is None:
            counts = counts.clone()
        return counts, moments

    def file_metadata(self) -> dict[str, Any]:
        """A copy of the metadata in the trace file's header."""
        if self._writer is None:
            raise RuntimeError("file_metadata: the tracer never started (no trace file)")
        return read_metadata(self._writer.schema, self.path)

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
        self._read_once.set_enabled(False)
        try:
            yield
        finally:
            self._paused = was
            if not was and self.disabled_reason is None:
                self._read_once.set_enabled(not self.closed)

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
    def log_scalar(self, name: str, value: float | torch.Tensor, step: int | None = None) -> None:
        """Records a scalar (loss, accuracy, ...). A tensor is not synced: its value is copied
        with the step's statistics.

        Without ``step`` it belongs to the step being recorded: logged after ``opt.step()`` and
        before the next forward, that is the step just ended (``loss.backward(); opt.step();
        log_scalar("loss", loss)`` records the loss with its step). ``step`` may name that step
        or the next one (``tracer.step_index`` / ``+ 1``); earlier steps are already written.
        A name the ended step already holds goes to the next step (never overwritten)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"log_scalar: name must be a non-empty string, got {name!r}")
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"log_scalar: {name!r} must be a single value, got {value.shape}")
            value = value.detach()
        elif not isinstance(value, int | float) or isinstance(value, bool):
            raise TypeError(f"log_scalar: {name!r} must be a number or tensor, got {type(value)}")
        if step is not None:
            if not isinstance(step, int) or isinstance(step, bool):
                raise TypeError(f"log_scalar: step must be an int, got {step!r}")
            cur = self.step_index
            if step == cur + 1 and self._end_pending:
                with self._lock:
                    self._finish()
            elif step != cur:
                raise ValueError(
                    f"log_scalar: {name!r} at step {step}: the step being recorded is {cur}"
                    + (f" (or {cur + 1}, the next)" if self._end_pending else "")
                    + "; earlier steps are already written"
                )
        elif self._end_pending and name in self._scalars:
            with self._lock:  # the step that ended has its value: this one is the next step's
                self._finish()
        self._scalars[name] = value

    def step(self) -> None:
        """Ends the current step (not needed when an optimizer steps). Without an optimizer,
        the gradients accumulated since the last step are recorded now."""
        if self.closed:
            return
        try:
            with self._lock:
                self._activity()
                if self.disabled_reason is not None or self._pipe is None:
                    self.step_index += 1
                    return
                if self._dirty:
                    dirty, self._dirty = sorted(self._dirty), set()
                    if self.trace_weight_grads and self._sampling(self.every):
                        lost = [i for i in dirty if self._params[i][2].grad is None]
                        if lost and not self._warned_cleared:
                            self._warned_cleared = True
                            warnings.warn(
                                f"dnntrace: {len(lost)} gradients were cleared before "
                                "tracer.step(): their weight_grad rows are missing; call "
                                "tracer.step() before zero_grad()",
                                RuntimeWarning,
                                stacklevel=3,
                            )
                        self._record_grads(dirty)
                self._record_weights(range(len(self._params)))
                self._end_step()
        except AnomalyError:
            raise
        except Exception as e:
            self._fail(e)

    def _finish(self) -> None:
        """Writes the step that ended (weights and extensions' rows first); the next begins."""
        self._end_pending = False
        self._ext_ended = False
        self._stepped.clear()
        self._grads_done.clear()
        try:
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
        # weights are recorded when the step ends (_record_weights); what no optimizer recorded
        # is taken here. A flush at close only ships what is left.
        if not closing:
            self._record_weights(range(len(self._params)))
        self._weights_done.clear()
        self._drain_native(end_step=True)
        if self.disabled_reason is not None:
            return
        if not self._recorded and not self._scalars and not self._vectors:
            return
        if self._labels_snapshot is None:
            self._labels_snapshot = (tuple(self._labels), tuple(self._meta))
        labels, meta = self._labels_snapshot
        self._pipe.submit(
            self.step_index, labels, meta, self._scalars, self._vectors, swap=self._swap_bank
        )
        self._scalars = {}
        self._vectors = []
        self._recorded = False

    def stats(self) -> dict[str, Any]:
        """Steps written and dropped, rows, bytes on disk, bank memory, flush cost, the C++
        gradient hooks' calls and time."""
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
                "buckets_scanned": 0,
                "bank_bytes": 0,
                "batches": 0,
                "grad_hook_calls": 0,
                "grad_hook_seconds": 0.0,
                "disabled": self.disabled_reason,
            }
        s = self._pipe.stats
        flush = sorted(s.flush_us)
        hook_calls, hook_seconds = self._read_once.grad_hook_time
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
            # histogram buckets the CPU writer's compaction read (0 on CUDA)
            "buckets_scanned": s.buckets_scanned,
            "bank_bytes": self._pipe.bank.bytes,
            "batches": s.batches,
            # the C++ gradient hooks of activations: calls and their wall time in the backward
            "grad_hook_calls": hook_calls,
            "grad_hook_seconds": hook_seconds,
            "disabled": self.disabled_reason,
        }

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        # gradient hooks already on tensors do nothing from now on
        self._read_once.set_enabled(False)

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
            # the step that ended is written now, with what extensions add at closing
            pending, self._end_pending = self._end_pending, False
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
                if self.disabled_reason is None:
                    self._drain_native()
                if pending or self._recorded or self._scalars or self._vectors:
                    self._flush(closing=not pending)
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
            _optim.unregister(self)
            self._pipe.close()
            self._read_once.close()
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

    Options: ``dnntrace.TraceConfig``'s fields, listed below (generated from it); a misspelt one
    raises ``TypeError`` naming it, a bad value a one-line ``ValueError``.
    """
    inner = getattr(model, "_orig_mod", None)  # torch.compile's wrapper: the module it wraps
    with _ACTIVE_LOCK:
        old = _ACTIVE.get(id(inner if isinstance(inner, nn.Module) else model))
    if old is not None and not old.closed:
        raise RuntimeError(
            f"dnntrace.enable: this model is already traced into {old.path!r}; call "
            "dnntrace.disable(model) first"
        )
    return Tracer(model, path, TraceConfig.from_options(**options))


enable.__doc__ = (enable.__doc__ or "").rstrip() + "\n\n" + options_doc() + "\n"


def disable(model: nn.Module) -> dict[str, Any] | None:
    """Closes the tracer of ``model`` (flush, remove hooks); returns its stats, None if none."""
    inner = getattr(model, "_orig_mod", None)
    with _ACTIVE_LOCK:
        tr = _ACTIVE.get(id(inner if isinstance(inner, nn.Module) else model))
    return tr.close() if tr is not None else None


def _close_all() -> None:
    for tr in list(_ACTIVE.values()):
        try:
            tr.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


atexit.register(_close_all)
