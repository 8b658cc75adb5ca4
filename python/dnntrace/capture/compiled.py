"""Recording inside ``torch.compile`` graphs (``fullgraph=True``, no graph break).

Dynamo inlines module hooks into the graph it builds. The tracer's eager hook does Python
bookkeeping (new slots, the execution order, checkpoint detection) that would break a graph, so
inside a compiled graph the hook takes this path instead: the slots were assigned at enable time
(single-tensor outputs: ``activation`` train/eval), the statistics op has a fake kernel, and the
only Python side effects are idempotent attribute stores that dynamo replays. The bank is read
through ``tracer._pipe.bank`` at each call, so a fresh bank per step needs no recompilation.

What cannot be recorded there is named once, in a warning at the end of the first compiled step
(``Tracer._warn_compiled``): output gradients (``activation_grad``: a gradient hook inside the
graph breaks autograd's version check of the bank), outputs without a slot (tuples, dicts), the
``activations_every`` cadence (reading the step counter would recompile every step: compiled
graphs record every step), and the extensions' hooks (units, anomaly, spectral), which skip
compiled graphs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .. import ops
from ..storage import kinds as K

if TYPE_CHECKING:
    from .tracer import Tracer


def preassign_slots(tracer: Tracer) -> None:
    """Slots of every traced module's single-tensor output, so compiled graphs find them."""
    for name, _ in tracer.traced_modules:
        if tracer.trace_activations:
            tracer._slot((name, K.ACTIVATION, "", "train"))
            tracer._slot((name, K.ACTIVATION, "", "eval"))


def record(tracer: Tracer, name: str, module: nn.Module, output: Any) -> None:
    """The forward hook's body inside a compiled graph (see the module docstring)."""
    tracer._compiled_forward = True
    if not isinstance(output, torch.Tensor):
        if any(isinstance(v, torch.Tensor) for v in _flat(output)):
            tracer._compiled_lost = tracer._compiled_lost | {name}
        return
    if not output.is_floating_point() or output.device != tracer.device:
        return
    grad_on = torch.is_grad_enabled()
    flows = grad_on and output.requires_grad
    phase = "train" if (flows or (grad_on and module.training)) else "eval"
    lay = tracer.layout
    if tracer.trace_activations:
        slot = tracer._slot_of.get((name, K.ACTIVATION, "", phase))
        if slot is not None and tracer._pipe is not None:
            bank = tracer._pipe.bank
            ops.tensor_summary_out(output.detach(), slot, bank.counts, bank.moments, lay)
            bank.touched.add(slot)  # the rows the writer takes (dynamo replays it per call)
            _note(tracer, slot, output)
            tracer._recorded = True
    if tracer.trace_activation_grads and flows:
        # A gradient hook registered inside the graph makes AOT autograd save the bank for the
        # backward, and the forward's own later updates of the bank then fail autograd's
        # version check in backward: output gradients are not recorded in compiled graphs.
        tracer._compiled_no_grads = True


def _note(tracer: Tracer, slot: int, x: torch.Tensor) -> None:
    # shapes are static ints unless dynamo made a dimension dynamic: then the shape is left out
    shape = tuple(d if isinstance(d, int) else -1 for d in x.shape)
    if -1 in shape:
        shape = ()
    tracer._meta[slot] = (str(x.dtype).removeprefix("torch."), shape)
    tracer._labels_snapshot = None


def _flat(obj: Any) -> list[Any]:
    if isinstance(obj, dict):
        return list(obj.values())
    if isinstance(obj, tuple | list):
        return list(obj)
    return []
