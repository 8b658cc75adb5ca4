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


def _default_traced(name: str, module: nn.Module) -> bool:
    """Leaves, and modules that own parameters themselves; containers repeat a child's output."""
    if isinstance(module, _CONTAINERS):
        return False
    has_children = next(module.children(), None) is not None
    owns_params = next(module.parameters(recurse=False), None) is not None
    return not has_children or owns_params or name == ""


def select_modules(model: nn.Module, spec: ModuleSpec) -> list[tuple[str, nn.Module]]:
    """Modules of ``model`` to trace, in ``named_modules()`` order.

    ``spec`` is ``None`` (leaves, modules owning parameters, and the root), or one or a list of:
    a glob over dotted names (``"encoder.*"``), a module type (``nn.Linear``), or either prefixed
    / wrapped as an exclusion (``"!*.dropout"``). Only exclusions: the default set minus them.
    """
    items = [spec] if isinstance(spec, str | type) else list(spec or [])
    include: list[str | type] = []
    exclude: list[str] = []
    for it in items:
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
                (isinstance(p, str) and fnmatch.fnmatchcase(name, p))
                or (isinstance(p, type) and isinstance(mod, p))
                for p in include
            )
        else:
            ok = _default_traced(name, mod)
        if ok and any(fnmatch.fnmatchcase(name, p) for p in exclude):
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
