"""``TraceConfig``: one place the options of ``dnntrace.enable`` are spelled and validated."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import dnntrace
from dnntrace.capture.config import TraceConfig, field_names

README = Path(__file__).resolve().parents[2] / "README.md"

# the metadata ``options`` keys that readers of earlier versions know (they must stay)
OLD_OPTION_KEYS = {
    "every",
    "activations_every",
    "activations",
    "gradients",
    "activation_grads",
    "weights",
    "weight_grads",
    "modules",
    "k",
    "emin",
    "octaves",
    "strict",
    "host_buffers",
    "host_memory_mb",
    "units",
    "on_anomaly",
    "merge_ranks",
    "ddp_hook",
    "spectral",
    "dynamics",
}


@pytest.mark.parametrize("bad", ["evry", "activation_every", "weight_gradients", "unit"])
def test_misspelt_option_raises_type_error_naming_it(bad: str, tmp_path: Path) -> None:
    model = nn.Linear(3, 2)
    with pytest.raises(TypeError, match=rf"unknown option {bad!r}"):
        dnntrace.enable(model, tmp_path / "t.arrow", **{bad: 1})
    assert not (tmp_path / "t.arrow").exists()
    assert not model._forward_hooks
    with pytest.raises(TypeError, match=bad):
        TraceConfig(**{bad: 1})


def test_misspelt_option_names_the_closest() -> None:
    with pytest.raises(TypeError, match=r"unknown option 'evry' \(did you mean 'every'\?\)"):
        TraceConfig.from_options(evry=2)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"every": 0}, "every must be a positive int, got 0"),
        ({"every": True}, "every must be a positive int, got True"),
        ({"activations_every": -3}, "activations_every must be a positive int, got -3"),
        ({"host_buffers": 0}, "host_buffers must be a positive int, got 0"),
        ({"host_memory_mb": 0}, "host_memory_mb must be > 0, got 0"),
        ({"compression": "gzip"}, "compression must be 'zstd', 'lz4' or None, got 'gzip'"),
        ({"on_anomaly": "panic"}, "on_anomaly must be one of warn, raise, record, got 'panic'"),
        ({"activations": "yes"}, "activations must be True or False, got 'yes'"),
        ({"weight_grads": 1}, "weight_grads must be True or False, got 1"),
        ({"strict": None}, "strict must be True or False, got None"),
        ({"units": 3}, "units must be True, False or a dict of options, got 3"),
        ({"extensions": "x"}, "extensions must be a sequence of dnntrace.Extension"),
        ({"k": 9}, "k"),
        ({"k": "x"}, "k must be an int, got 'x'"),
        ({"k": 2.5}, "k must be an int, got 2.5"),
        ({"octaves": True}, "octaves must be an int, got True"),
    ],
)
def test_bad_values_raise_one_line_value_errors(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        TraceConfig(**options)
    assert "\n" not in str(e.value)


def test_config_is_frozen_and_validated_once() -> None:
    cfg = TraceConfig(every=2, units={"every": 1})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.every = 3  # type: ignore[misc]
    assert cfg.extensions == ()
    assert isinstance(TraceConfig(extensions=[]).extensions, tuple)


def test_metadata_options_keep_the_keys_older_readers_know(tmp_path: Path) -> None:
    cfg = TraceConfig(gradients=False, weight_grads=True, units={"every": 1}, every=3)
    opts = cfg.options_metadata()
    assert set(opts) == OLD_OPTION_KEYS
    assert opts["gradients"] is False and opts["activation_grads"] is False
    assert opts["weight_grads"] is True and opts["units"] is True
    model = nn.Sequential(nn.Linear(3, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with dnntrace.enable(model, tmp_path / "t.arrow", every=2, activations_every=4) as tr:
        opt.zero_grad()
        model(torch.randn(2, 3)).sum().backward()
        opt.step()
        assert tr.config.every == 2
    written = dnntrace.load(tmp_path / "t.arrow").metadata["options"]
    assert set(written) == OLD_OPTION_KEYS
    assert written["every"] == 2 and written["activations_every"] == 4


def test_tracer_takes_a_config(tmp_path: Path) -> None:
    model = nn.Linear(3, 2)
    cfg = TraceConfig(activations=False, activation_grads=False)
    with dnntrace.Tracer(model, tmp_path / "t.arrow", cfg) as tr:
        assert tr.config is cfg
        assert not tr.records("activation") and tr.records("weight_grad")
    with pytest.raises(TypeError, match="TraceConfig"):
        dnntrace.Tracer(model, tmp_path / "u.arrow", {"every": 1})  # type: ignore[arg-type]
    with dnntrace.Tracer(model, tmp_path / "v.arrow", every=2) as tr:
        assert tr.config.every == 2
    with pytest.raises(TypeError, match="unknown option 'evry'"):
        dnntrace.Tracer(model, tmp_path / "w.arrow", evry=2)
    with pytest.raises(TypeError, match="not both"):
        dnntrace.Tracer(model, tmp_path / "w.arrow", cfg, every=2)


def _readme_options() -> list[str]:
    text = README.read_text()
    block = text.split("<!-- options:begin -->", 1)[1].split("<!-- options:end -->", 1)[0]
    return re.findall(r"^\| `(\w+)` \|", block, flags=re.M)


def test_readme_and_enable_docstring_name_exactly_the_config_fields() -> None:
    fields = list(field_names())
    assert _readme_options() == fields
    doc = dnntrace.enable.__doc__ or ""
    assert re.findall(r"^\s*- ``(\w+)=", doc, flags=re.M) == fields
