"""Choosing the kinds a trace records: activations, activation_grads, weights, weight_grads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from _capture_support import MLP, Recorder, assert_row_matches, load_rows, mlp_batch, one_row, train

import dnntrace

ALL = {"activation", "activation_grad", "weight", "weight_grad"}


def _kinds_recorded(path: Path, **opts: Any) -> set[str]:
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with dnntrace.enable(model, path, **opts):
        train(model, opt, mlp_batch, 2)
    return set(load_rows(path)["kind"]) - {"scalar", "exec_order"}  # the call-order row: always


@pytest.mark.parametrize("found_optimizer", [False, True])
def test_weights_and_weight_grads_only_match_reference(
    found_optimizer: bool, trace_path: Path
) -> None:
    """What wandb.watch / TensorBoard record, and nothing else: no forward or tensor hooks."""
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opts = {} if found_optimizer else {"optimizer": opt}
    with dnntrace.enable(
        model, trace_path, activations=False, activation_grads=False, **opts
    ) as tr:
        assert not any(m._forward_hooks for m in model.modules())
        rec = Recorder(model, opt, [])
        train(model, opt, mlp_batch, 3)
        rec.close()
    assert tr.stats()["steps_written"] == 3
    df = load_rows(trace_path)
    assert set(df["kind"]) == {"weight", "weight_grad", "scalar"}
    for step in range(3):
        at = df[df["step"] == step]
        for (mod, pn), w in rec.weight[step].items():
            assert_row_matches(one_row(at, module=mod, kind="weight", tensor=pn), w)
        for (mod, pn), g in rec.weight_grad[step].items():
            assert_row_matches(one_row(at, module=mod, kind="weight_grad", tensor=pn), g)
        assert (at["kind"] == "weight_grad").sum() == len(rec.weight_grad[step]) == 6
    meta = dnntrace.load(trace_path).metadata["options"]
    assert (meta["activations"], meta["activation_grads"]) == (False, False)
    assert (meta["weights"], meta["weight_grads"]) == (True, True)


@pytest.mark.parametrize(
    ("opts", "want"),
    [
        ({}, ALL),
        ({"activations": False}, ALL - {"activation"}),
        ({"activation_grads": False}, ALL - {"activation_grad"}),
        ({"weight_grads": False}, ALL - {"weight_grad"}),
        ({"weights": False, "weight_grads": False}, {"activation", "activation_grad"}),
        ({"gradients": False}, {"activation", "weight"}),
        ({"gradients": False, "weight_grads": True}, {"activation", "weight", "weight_grad"}),
        ({"gradients": True, "activation_grads": False}, ALL - {"activation_grad"}),
        (
            {"activations": False, "weights": False, "weight_grads": False},
            {"activation_grad"},
        ),
    ],
)
def test_each_kind_is_chosen_independently(
    opts: dict[str, bool], want: set[str], trace_path: Path
) -> None:
    assert _kinds_recorded(trace_path, **opts) == want


def test_misspelt_options_are_refused_with_a_hint(tmp_path: Path) -> None:
    model = MLP()
    with pytest.raises(TypeError, match=r"unknown option 'activation_grad'.*'activation_grads'"):
        dnntrace.enable(model, tmp_path / "a.arrow", activation_grad=False)
    with pytest.raises(TypeError, match=r"unknown option 'weight_gradients'"):
        dnntrace.enable(model, tmp_path / "b.arrow", weight_gradients=False)
    with pytest.raises(ValueError, match="weight_grads must be True or False"):
        dnntrace.enable(model, tmp_path / "c.arrow", weight_grads="no")
    with pytest.raises(ValueError, match="activations must be True or False"):
        dnntrace.enable(model, tmp_path / "d.arrow", activations=None)
    # nothing was left behind: the model can be traced now
    assert not any(m._forward_hooks for m in model.modules())
    with dnntrace.enable(model, tmp_path / "e.arrow"):
        pass
