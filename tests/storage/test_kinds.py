"""The registry of row kinds (``dnntrace.storage.kinds``) and of a run's file names
(``dnntrace.storage.files``): one definition, used everywhere (checked by scanning the source
for kind names spelt outside the registry), fields rows by name, and the older readers' names."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest

from dnntrace.storage import files as F
from dnntrace.storage import kinds as K
from dnntrace.storage.schema import ANOMALY_FIELDS

ROOT = Path(__file__).resolve().parents[2]

# Files allowed to spell a kind name, and why. Each entry is a debt, not a design.
ALLOWED = {
    # stats may not import storage (layering): its block-row names are checked equal below
    "python/dnntrace/stats/units.py": {"unit_" + n for n in (
        "mean", "sq_mean", "firing", "saturated", "max", "grad_rms", "attr", "attr_abs")},
    # the `dnntrace landscape` subcommand; the landscape file's metadata key
    "python/dnntrace/cli.py": {"landscape"},
    "python/dnntrace/capture/spectral.py": {"landscape"},
    "viewer/dnntrace_viewer/spectral_data.py": {"landscape"},
}  # fmt: skip


def _kind_literals(path: Path) -> list[tuple[int, str]]:
    """String constants equal to a registered kind, except docstrings, ``__all__`` entries,
    dict keys, subscripts and widget ``name=``/``label=`` values (names, not kinds)."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            skip.add(id(body[0].value))  # docstring
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            skip.update(id(e) for e in ast.walk(node.value))
        if isinstance(node, ast.Dict):
            skip.update(id(k) for k in node.keys if k is not None)
        if isinstance(node, ast.Subscript):
            skip.add(id(node.slice))
        if isinstance(node, ast.keyword) and node.arg in ("name", "label"):
            skip.add(id(node.value))
    return [
        (n.lineno, n.value)
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant)
        and isinstance(n.value, str)
        and n.value in K.KINDS
        and id(n) not in skip
    ]


def test_kind_names_are_spelt_only_in_the_registry() -> None:
    found = []
    for root in ("python/dnntrace", "viewer/dnntrace_viewer"):
        for path in sorted((ROOT / root).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel == "python/dnntrace/storage/kinds.py":
                continue
            allowed = ALLOWED.get(rel, set())
            found += [
                f"{rel}:{line}: {name!r}"
                for line, name in _kind_literals(path)
                if allowed is not None and name not in allowed
            ]
    assert not found, "kind names outside storage/kinds.py (use its constants):\n" + "\n".join(
        found
    )


def test_registry_is_consistent() -> None:
    assert K.TENSOR_KINDS == ("activation", "activation_grad", "weight", "weight_grad")
    assert all(K.KINDS[k].shape == "histogram" for k in K.TENSOR_KINDS)
    assert set(K.TENSOR_KINDS) <= set(K.HISTOGRAM_KINDS)
    assert not set(K.DERIVED_KINDS) & set(K.HISTOGRAM_KINDS)
    assert K.SCALAR not in K.DERIVED_KINDS
    for k in K.KINDS.values():
        assert (k.shape == "fields") == bool(k.fields) or k.name == K.TRAJECTORY_PCA, k.name
        assert k.tab in (None, "units", "spectral"), k.name
    # every rank diagnostic (bucket norms included) is a rank kind, never flagged
    for name in ("grad_sqnorm_local", "grad_sqnorm_rank_mean", "grad_sqnorm_avg", "gns_g2"):
        assert K.family(name) == "rank" and not K.is_tensor_kind(name)
    assert K.is_histogram_kind("weight_grad_local") and not K.is_tensor_kind("weight_grad_local")
    assert K.family("unit_future_stat") == "unit" and K.family("some_future_kind") == "other"
    assert K.tab_kinds("spectral") == set(K.SPECTRAL_KINDS) - {"filter_norm", "trajectory_pca"}
    assert K.tab_kinds("units") == {*K.UNIT_KINDS, *K.UNIT_TOPK_KINDS, "anomaly"}
    assert "feature_eigs" in K.SPECTRAL_KINDS and "fd_eigs" not in K.KINDS  # the old drift


def test_anomaly_fields_keep_their_file_order() -> None:
    # older readers (and files) read anomaly values by position: the order is the format
    assert ANOMALY_FIELDS == (
        "step", "nan_count", "inf_count", "input_count", "input_nan_count", "input_inf_count",
        "input_min", "input_max", "input_mean", "input_rms",
    )  # fmt: skip


def test_fields_rows_by_name() -> None:
    vals = K.pack(K.ESD, {"alpha": 2.5, "step": 7, "n_eigenvalues": 64})
    assert len(vals) == len(K.KINDS[K.ESD].fields)
    back = K.unpack(K.ESD, vals)
    assert (back["step"], back["alpha"], back["n_eigenvalues"]) == (7.0, 2.5, 64.0)
    assert math.isnan(back["ks_distance"]) and math.isnan(back["xmin"])
    with pytest.raises(ValueError, match="alhpa"):
        K.pack(K.ESD, {"alhpa": 1.0})
    # a shorter row (an older writer) reads with NaN for what it lacks; a longer one is cut
    short = K.unpack(K.ANOMALY, [3.0, 1.0])
    assert short["step"] == 3.0 and short["nan_count"] == 1.0 and math.isnan(short["input_rms"])
    assert list(K.unpack(K.RANKME, [1.0, 2.0, 3.0, 99.0])) == ["step", "rankme", "rows"]
    assert K.unpack(K.ANOMALY, None)["step"] != K.unpack(K.ANOMALY, None)["step"]  # NaN
    assert K.tail(K.TRAJECTORY_PCA, [5.0, 0.1, 0.2]) == [0.1, 0.2]


def test_saturation_is_defined_once() -> None:
    stats_units = pytest.importorskip("dnntrace.stats.units")  # needs torch
    assert stats_units.TANH_SATURATION == K.TANH_SATURATION
    assert stats_units.SIGMOID_SATURATION == K.SIGMOID_SATURATION
    assert stats_units.ACT_KINDS == K.UNIT_ACT_KINDS
    assert stats_units.GRAD_KINDS == K.UNIT_GRAD_KINDS
    for nl in K.NONLINEARITIES.values():  # every nonlinearity has bounds
        lo, hi = stats_units.saturation_bounds(nl, pre_activation=False)
        assert not (math.isnan(lo) and math.isnan(hi)), nl
    # the viewer's module flag and the per-unit rows cover the same bounded modules
    assert {t for t in K.NONLINEARITIES if K.saturation_family(t)} == {
        "Tanh", "Hardtanh", "Softsign", "Sigmoid", "Hardsigmoid"
    }  # fmt: skip


@pytest.mark.parametrize(
    ("nl", "f"),
    [
        ("tanh", math.tanh),
        ("hardtanh", lambda x: min(max(x, -1.0), 1.0)),
        ("softsign", lambda x: x / (1 + abs(x))),
        ("sigmoid", lambda x: 1 / (1 + math.exp(-x))),
        ("hardsigmoid", lambda x: min(max(x / 6 + 0.5, 0.0), 1.0)),
    ],
)
def test_pre_activation_bounds_map_through_the_nonlinearity(nl, f) -> None:
    stats_units = pytest.importorskip("dnntrace.stats.units")
    lo_y, hi_y = stats_units.saturation_bounds(nl, pre_activation=False)
    lo_x, hi_x = stats_units.saturation_bounds(nl, pre_activation=True)
    assert f(lo_x) == pytest.approx(lo_y, abs=1e-12) and f(hi_x) == pytest.approx(hi_y, abs=1e-12)


def test_file_names() -> None:
    assert F.rank_path("run/t.arrow", 0, 1) == "run/t.arrow"
    assert F.rank_path("run/t.arrow", 3, 4) == "run/t/rank3.arrow"
    assert F.rank_path("run/r{rank}of{world_size}.arrow", 1, 2) == "run/r1of2.arrow"
    assert F.is_rank_file("x/rank12.arrow") and F.is_rank_file(F.MERGED_FILE)
    assert not F.is_rank_file("rank.arrow") and not F.is_rank_file("rank1.arrow.lod")
    assert F.is_trace_file("a.arrow") and not F.is_trace_file(".a.arrow")
    assert F.sidecar("t.arrow", "lod") == "t.arrow.lod"
    assert F.sidecar("t.arrow", "pca") == "t.arrow.pca.pt"
    assert F.landscape_path("runs/t.arrow") == "runs/t-landscape.arrow"
    with pytest.raises(ValueError, match="unknown sidecar"):
        F.sidecar("t.arrow", "lods")
    # the capture side names rank files through the same function
    from dnntrace.capture import distributed

    assert distributed.rank_path is F.rank_path and distributed.MERGED_FILE == F.MERGED_FILE
