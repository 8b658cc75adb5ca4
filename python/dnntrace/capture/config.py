"""``TraceConfig``: the options of ``dnntrace.enable``, spelled and validated in one place.

Every option is a field of the frozen dataclass below, with its default and a one-line doc
(field metadata). ``enable``'s docstring is generated from those docs, the README's option table
is checked against the fields by a test, and the file metadata ``options`` dict comes from
``TraceConfig.options_metadata()`` (the keys older readers know, unchanged).

``TraceConfig.from_options(**options)`` refuses a misspelt option with ``TypeError`` naming it
(and the closest option); bad values get the one-line ``ValueError`` of ``enable``.

**Cadences.** ``every=n`` records weights and weight gradients at steps 0, n, 2n, ...
``activations_every=m`` records activations and activation gradients at steps 0, m, 2m, ...
(its own step count: with ``every=2, activations_every=5`` weights are recorded at steps 0, 2,
4, ... and activations at 0, 5, 10, ...). Unset (``None``) it is ``10 * every``: activations
and activation gradients at every 10th step that records weights; with ``on_anomaly=`` set it is
``every`` (a NaN watch must see every recorded step). That is the default set,
the one meant to be left on (weights and weight gradients every step, activations and their
gradients every 10th step: activations are most of the bytes read).
``activations_every=1`` records everything every step.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..sketch.layout import DEFAULT_EMIN, DEFAULT_OCTAVES, Layout
from ..storage import kinds as K

ANOMALY_MODES = ("warn", "raise", "record")
COMPRESSIONS = ("zstd", "lz4", None)
ACTIVATIONS_EVERY_FACTOR = 10
"""Unset ``activations_every`` is ``ACTIVATIONS_EVERY_FACTOR * every``."""


def _opt(default: Any, doc: str, *, factory: Any = None) -> Any:
    if factory is not None:
        return field(default_factory=factory, metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class TraceConfig:
    """The options of ``dnntrace.enable`` (see each field's doc, ``TraceConfig.docs()``)."""

    every: int = _opt(1, "record weights and weight gradients every n-th step")
    activations_every: int | None = _opt(
        None,
        "record activations and activation gradients every n-th step (default ``10 * every``, "
        "``every`` when ``on_anomaly`` is set; ``1``: everything every step)",
    )
    activations: bool = _opt(True, "record module outputs (kind ``activation``)")
    activation_grads: bool | None = _opt(
        None, "record gradients w.r.t. module outputs (default: ``gradients``)"
    )
    weights: bool = _opt(True, "record parameters after the optimizer step")
    weight_grads: bool | None = _opt(
        None, "record the gradients the optimizer steps with (default: ``gradients``)"
    )
    gradients: bool | None = _opt(
        None,
        "shorthand for both gradient kinds (an explicit ``activation_grads``/``weight_grads`` "
        "wins); ``activations=False, activation_grads=False`` records what wandb.watch and "
        "TensorBoard do",
    )
    modules: Any = _opt(
        None, 'modules to trace: globs, class names, module types, ``"!glob"`` exclusions'
    )
    k: int = _opt(6, "histogram mantissa bits, 0..7 (quantiles within 2^-(k+1) relative)")
    emin: int = _opt(DEFAULT_EMIN, "the smallest binary exponent with its own bucket")
    octaves: int = _opt(DEFAULT_OCTAVES, "the number of binary exponents with buckets")
    optimizer: Any = _opt(None, "the optimizer whose steps end a step (else found at its first)")
    strict: bool = _opt(False, "raise ``TracingError`` instead of disabling on internal errors")
    host_buffers: int | None = _opt(
        None, "steps waiting for the writer (default: as many as ``host_memory_mb`` holds)"
    )
    host_memory_mb: float = _opt(256.0, "host memory for steps waiting for the writer")
    fsync: bool = _opt(False, "force every batch to the disk")
    compression: str | None = _opt(
        "zstd",
        '``"zstd"``, ``"lz4"`` or None (uncompressed: memory-mapped by readers, for 10^9 '
        "per-unit values)",
    )
    log_lr: bool = _opt(True, "record each optimizer's learning rates as scalars")
    extensions: tuple[Any, ...] = _opt(
        None, "your own ``dnntrace.Extension`` objects", factory=tuple
    )
    units: bool | Mapping[str, Any] = _opt(
        False, "per-unit statistics: True or ``UnitStats`` options (``capture.units``)"
    )
    on_anomaly: str | None = _opt(
        None, '``"warn"``, ``"raise"`` or ``"record"``: NaN/Inf origin (``capture.anomaly``)'
    )
    merge_ranks: bool | Mapping[str, Any] = _opt(
        False, "merged cross-rank summaries under torch.distributed (``capture.distributed``)"
    )
    ddp_hook: bool | Mapping[str, Any] = _opt(
        False, "a DDP comm hook for gradient diversity and noise scale (``capture.distributed``)"
    )
    spectral: bool | Mapping[str, Any] = _opt(
        False, "weight spectra and activation sketches: True or options (``capture.spectral``)"
    )
    dynamics: bool | Mapping[str, Any] = _opt(
        False, "update ratios and gradient noise scale: True or options (``capture.spectral``)"
    )

    def __post_init__(self) -> None:
        def bad(name: str, what: str) -> ValueError:
            return ValueError(
                f"dnntrace.enable: {name} must be {what}, got {getattr(self, name)!r}"
            )

        for name in ("every", "activations_every", "host_buffers"):
            v = getattr(self, name)
            if v is None and name != "every":
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise bad(name, "a positive int")
        for name in ("activations", "weights", "strict", "fsync", "log_lr"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "True or False")
        for name in ("gradients", "activation_grads", "weight_grads"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise bad(name, "True or False")
        m = self.host_memory_mb
        if not isinstance(m, int | float) or isinstance(m, bool) or not m > 0:
            raise ValueError(f"dnntrace.enable: host_memory_mb must be > 0, got {m!r}")
        if self.compression not in COMPRESSIONS:
            raise ValueError(
                "dnntrace.enable: compression must be 'zstd', 'lz4' or None, got "
                f"{self.compression!r}"
            )
        if self.on_anomaly is not None and self.on_anomaly not in ANOMALY_MODES:
            raise ValueError(
                f"dnntrace.enable: on_anomaly must be one of {', '.join(ANOMALY_MODES)}, got "
                f"{self.on_anomaly!r}"
            )
        for name in ("units", "merge_ranks", "ddp_hook", "spectral", "dynamics"):
            if not isinstance(getattr(self, name), bool | Mapping):
                raise bad(name, "True, False or a dict of options")
        exts = self.extensions
        if not isinstance(exts, Sequence) or isinstance(exts, str):
            raise bad("extensions", "a sequence of dnntrace.Extension")
        object.__setattr__(self, "extensions", tuple(exts))
        Layout(self.k, self.emin, self.octaves)  # validates k / emin / octaves

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_options(cls, **options: Any) -> TraceConfig:
        """A config from ``enable``'s keyword options; a misspelt one raises ``TypeError``."""
        names = field_names()
        unknown = [k for k in options if k not in names]
        if unknown:
            hint = difflib.get_close_matches(unknown[0], names, n=1)
            raise TypeError(
                f"dnntrace.enable: unknown option {unknown[0]!r}"
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
                + f"; options: {', '.join(sorted(names))}"
            )
        return cls(**options)

    # ---- resolved values ----------------------------------------------------------------
    @property
    def layout(self) -> Layout:
        return Layout(self.k, self.emin, self.octaves)

    @property
    def activation_cadence(self) -> int:
        """``activations_every``, resolved (module docstring, "Cadences")."""
        if self.activations_every is not None:
            return self.activations_every
        if self.on_anomaly is not None:
            # a NaN watch reads the counters of activations and their gradients: it must see
            # every step that records anything, or it names a later step than the first NaN's
            return self.every
        return ACTIVATIONS_EVERY_FACTOR * self.every

    @property
    def kinds(self) -> frozenset[str]:
        """The built-in row kinds recorded: ``gradients`` is the shorthand for both gradient
        kinds; an explicit ``activation_grads`` / ``weight_grads`` wins over it."""
        both = True if self.gradients is None else self.gradients
        on = {
            K.ACTIVATION: self.activations,
            K.ACTIVATION_GRAD: both if self.activation_grads is None else self.activation_grads,
            K.WEIGHT: self.weights,
            K.WEIGHT_GRAD: both if self.weight_grads is None else self.weight_grads,
        }
        return frozenset(k for k, v in on.items() if v)

    def options_metadata(self) -> dict[str, Any]:
        """The file metadata's ``options``: the keys and value types older readers know."""
        kinds = self.kinds
        return {
            "every": self.every,
            "activations_every": self.activation_cadence,
            "activations": self.activations,
            "gradients": K.ACTIVATION_GRAD in kinds and K.WEIGHT_GRAD in kinds,
            "activation_grads": K.ACTIVATION_GRAD in kinds,
            "weights": self.weights,
            "weight_grads": K.WEIGHT_GRAD in kinds,
            "modules": None if self.modules is None else repr(self.modules),
            "k": self.k,
            "emin": self.emin,
            "octaves": self.octaves,
            "strict": self.strict,
            "host_buffers": self.host_buffers,
            "host_memory_mb": self.host_memory_mb,
            "units": bool(self.units),
            "on_anomaly": self.on_anomaly,
            "merge_ranks": bool(self.merge_ranks),
            "ddp_hook": bool(self.ddp_hook),
            "spectral": bool(self.spectral),
            "dynamics": bool(self.dynamics),
        }

    @classmethod
    def docs(cls) -> dict[str, str]:
        """Option name -> (default, one-line doc), in field order."""
        out = {}
        for f in dataclasses.fields(cls):
            factory: Any = f.default_factory
            default = f.default if f.default is not dataclasses.MISSING else factory()
            out[f.name] = f"``{f.name}={default!r}``: {f.metadata['doc']}"
        return out


def field_names() -> tuple[str, ...]:
    """Every option of ``dnntrace.enable``, in field order."""
    return tuple(f.name for f in dataclasses.fields(TraceConfig))


def options_doc(indent: str = "    ") -> str:
    """The ``Options:`` block of ``enable``'s docstring, one bullet per field."""
    return "\n".join(f"{indent}- {line}" for line in TraceConfig.docs().values())
