"""Which modules a tracer watches, and how a module's outputs are named."""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

ModuleSpec = str | type | Sequence[str | type] | None

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _is_noop(module: nn.Module) -> bool:
    """``nn.Identity`` and dropout with ``p=0``: their output is their input, traced already."""
    if isinstance(module, nn.Identity):
        return True
    return isinstance(module, nn.modules.dropout._DropoutNd) and module.p == 0


def _default_traced(name: str, module: nn.Module) -> bool:
    """The root (whatever its type: the model's output), leaves, and modules that own
    parameters; containers repeat a child's output, no-op modules their input."""
    if name == "":
        return True
    if isinstance(module, _CONTAINERS) or _is_noop(module):
        return False
    has_children = next(module.children(), None) is not None
    owns_params = next(module.parameters(recurse=False), None) is not None
    return not has_children or owns_params


def _matches(pattern: str, name: str, module: nn.Module) -> bool:
    """A glob over the dotted name, or over the class name of the module or of a base class
    (``"Identity"``, ``"Dropout*"``, ``"*Norm"``)."""
    if fnmatch.fnmatchcase(name, pattern):
        return True
    return any(
        fnmatch.fnmatchcase(c.__name__, pattern)
        for c in type(module).__mro__
        if c not in (nn.Module, object)
    )


def select_modules(model: nn.Module, spec: ModuleSpec) -> list[tuple[str, nn.Module]]:
    """Modules of ``model`` to trace, in ``named_modules()`` order.

    ``spec`` is ``None`` (the root, leaves and modules owning parameters, without
    ``nn.Identity`` and ``p=0`` dropout), or one or a list of: a glob over dotted names
    (``"encoder.*"``) or class names (``"Linear"``, ``"*Norm"``), a module type (``nn.Linear``),
    or a string glob prefixed ``"!"`` as an exclusion (``"!*.dropout"``, ``"!Dropout"``). Only
    exclusions: the default set minus them.
    """
    items = [spec] if isinstance(spec, str | type) else list(spec or [])
    include: list[str | type] = []
    exclude: list[str] = []
    for it in items:
        if it == "!":
            raise ValueError("modules: '!' needs a glob or a class name after it")
        if isinstance(it, str):
            (exclude if it.startswith("!") else include).append(
                it.lstrip("!") if it.startswith("!") else it
            )
        elif isinstance(it, type) and issubclass(it, nn.Module):
            include.append(it)
        else:
            raise TypeError(
                "modules: expected glob strings or nn.Module types, got "
                f"{type(it).__name__}: {it!r}"
            )
    out = []
    for name, mod in model.named_modules():
        if include:
            ok = any(
                (isinstance(p, str) and _matches(p, name, mod))
                or (isinstance(p, type) and isinstance(mod, p))
                for p in include
            )
        else:
            ok = _default_traced(name, mod)
        if ok and any(_matches(p, name, mod) for p in exclude):
            ok = False
        if ok:
            out.append((name, mod))
    return out


def iter_float_tensors(
    obj: Any, prefix: str = "", depth: int = 0
) -> Iterator[tuple[str, torch.Tensor]]:
    """(position name, tensor) for every floating tensor in a module output.

    A single tensor is named ``""``; tuple/list items ``"0"``, ``"1"``…; dict items by key;
    dataclass fields by name; nested positions joined by ``"."``.
    """
    if depth > 4:
        return
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point():
            yield prefix, obj
        return
    if isinstance(obj, dict):
        items: Any = obj.items()
    elif isinstance(obj, tuple | list):
        items = enumerate(obj)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        items = ((f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj))
    else:
        return
    for key, val in items:
        name = f"{prefix}.{key}" if prefix else str(key)
        yield from iter_float_tensors(val, name, depth + 1)
