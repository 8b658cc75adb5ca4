"""Real 2-process gloo runs: rank files, exact cross-rank merge, the DDP comm hook, a killed rank,
FSDP shards."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from _ddp_worker import GLOBAL_BATCH, batch, loss_fn, make_model, shard
from _dist_support import WORLD, run_ranks

import dnntrace
from dnntrace.capture.distributed import noise_scale, rank_path
from dnntrace.storage import load
from dnntrace.storage.runs import count_batches, open_runs

STEPS = 4
EXACT = ["count", "nan_count", "posinf_count", "neginf_count", "zero_count", "negative_count",
         "underflow_pos_count", "underflow_neg_count", "overflow_pos_count", "overflow_neg_count",
         "min", "max"]  # fmt: skip
KEY = ["step", "module", "kind", "tensor", "phase"]


def _frame(t: pa.Table) -> pd.DataFrame:
    df = t.to_pandas()
    for k in ("module", "kind", "tensor", "phase"):
        df[k] = df[k].astype(str)
    return df.sort_values(KEY).reset_index(drop=True)


def _single_process_run(path: Path) -> pa.Table:
    """The same model over the whole batch of every step, in one process."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with dnntrace.enable(model, path, optimizer=opt, activations_every=1):
        for step in range(STEPS):
            x, y = batch(step)
            loss_fn(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    return load(path).table


def test_rank_path() -> None:
    assert rank_path("run/t.arrow", 0, 1) == "run/t.arrow"
    assert rank_path("run/t.arrow", 3, 4) == "run/t/rank3.arrow"
    assert rank_path("run/t", 1, 2) == "run/t/rank1.arrow"
    assert rank_path("run/r{rank}of{world_size}.arrow", 1, 2) == "run/r1of2.arrow"


def test_one_file_per_rank_with_rank_metadata(ddp_run: Path) -> None:
    assert sorted(p.name for p in ddp_run.iterdir()) == [
        "merged.arrow",
        "rank0.arrow",
        "rank1.arrow",
    ]
    for r in range(WORLD):
        tr = load(ddp_run / f"rank{r}.arrow")
        assert tr.metadata["rank"] == r and tr.metadata["world_size"] == WORLD
        assert set(tr.table.column("rank").to_pylist()) == {r}
        assert list(tr.steps) == list(range(STEPS))
    merged = load(ddp_run / "merged.arrow")
    assert merged.metadata["merged"] is True and merged.metadata["rank"] == -1
    runs = open_runs(ddp_run)
    assert runs.runs == [ddp_run.name] and runs.ranks() == [0, 1] and runs.has_merged


def test_merged_rows_equal_a_single_process_run(ddp_run: Path, tmp_path: Path) -> None:
    single = _frame(_single_process_run(tmp_path / "single.arrow"))
    single = single[single.kind.isin(["activation", "activation_grad"])].reset_index(drop=True)
    merged = _frame(load(ddp_run / "merged.arrow").table)
    # 5 modules and the root (a Sequential: traced too) x (output, its gradient)
    assert len(merged) == len(single) == STEPS * 12
    pd.testing.assert_frame_equal(merged[KEY], single[KEY])
    for col in EXACT:
        np.testing.assert_array_equal(merged[col].to_numpy(), single[col].to_numpy(), err_msg=col)
    np.testing.assert_array_equal(merged["calls"], WORLD * single["calls"])  # one per rank
    for col in ("hist_bucket", "hist"):
        for a, b in zip(merged[col], single[col], strict=True):
            np.testing.assert_array_equal(a, b, err_msg=col)
    for col in ("sum", "sumsq"):
        np.testing.assert_allclose(merged[col], single[col], rtol=1e-9, atol=1e-9)
    # the merge computed when reading the rank files is the same
    read_merge = _frame(open_runs(ddp_run).merged_table(["activation", "activation_grad"]))
    for col in [*EXACT, "sum", "sumsq"]:
        np.testing.assert_array_equal(read_merge[col].to_numpy(), merged[col].to_numpy())


def _local_grads(step: int) -> list[torch.Tensor]:
    out = []
    for r in range(WORLD):
        m = make_model()
        x, y = shard(step, r, WORLD)
        loss_fn(m(x), y).backward()
        out.append(torch.cat([p.grad.flatten() for p in m.parameters()]).double())
    return out


def test_comm_hook_gradient_diversity_and_noise_scale(ddp_run: Path) -> None:
    runs = open_runs(ddp_run)

    def value(kind: str, rank: int, step: int) -> float:
        t = runs.select(kind=kind, rank=rank, step=step)
        assert t.num_rows == 1, (kind, rank, step)
        return float(np.sum(t.column("values")[0].values.to_numpy()))

    b = GLOBAL_BATCH // WORLD
    for step in range(STEPS):
        g = _local_grads(step)
        local = [float(x.square().sum()) for x in g]
        avg = float(((g[0] + g[1]) / WORLD).square().sum())
        diversity = sum(local) / float((g[0] + g[1]).square().sum())
        g2, s, bs = noise_scale(torch.tensor(np.mean(local)), torch.tensor(avg), b, b * WORLD)
        for r in range(WORLD):
            assert value("grad_sqnorm_local", r, step) == pytest.approx(local[r], rel=1e-5)
            assert value("grad_sqnorm_rank_mean", r, step) == pytest.approx(
                np.mean(local), rel=1e-5
            )
            assert value("grad_sqnorm_avg", r, step) == pytest.approx(avg, rel=1e-5)
            assert value("grad_diversity", r, step) == pytest.approx(diversity, rel=1e-5)
            assert value("gns_g2", r, step) == pytest.approx(float(g2), rel=1e-4, abs=1e-4)
            assert value("gns_trace_sigma", r, step) == pytest.approx(float(s), rel=1e-4)
            # local per-parameter summaries add up to the bucket norms
            t = runs.select(kind="weight_grad_local", rank=r, step=step)
            assert float(np.sum(t.column("sumsq").to_numpy())) == pytest.approx(local[r], rel=1e-5)
        assert np.isfinite(float(bs))


def test_killed_rank_leaves_readable_files(tmp_path: Path) -> None:
    codes = run_ranks("kill", tmp_path, steps=50, timeout=60)
    assert codes[1] == -signal.SIGKILL, (tmp_path / "log.txt").read_text()[-3000:]
    folder = tmp_path / "trace"
    runs = open_runs(folder)
    by_rank = {r: sorted(set(runs.select(rank=r).column("step").to_pylist())) for r in (0, 1)}
    assert by_rank[1][:3] == [0, 1, 2] and by_rank[1] == list(range(len(by_rank[1])))
    assert by_rank[0][:3] == [0, 1, 2]
    assert json.loads((tmp_path / "info0.json").read_text())["path"].endswith("rank0.arrow")
    # a rank file cut in the middle of a batch keeps its complete batches
    full = folder / "rank0.arrow"
    cut = tmp_path / "cut" / "rank0.arrow"
    cut.parent.mkdir()
    data = full.read_bytes()
    cut.write_bytes(data[: len(data) - 300])
    shutil.copy(folder / "rank1.arrow", cut.parent / "rank1.arrow")
    cut_runs = open_runs(cut.parent)
    n = cut_runs.select(rank=0).num_rows
    assert 0 < n < runs.select(rank=0).num_rows
    assert cut_runs.truncated == [str(cut)]
    assert count_batches(str(cut)) == count_batches(str(full)) - 1
    assert cut_runs.to_dask().query("rank == 0").shape[0].compute() == n


def test_fsdp_ranks_trace_their_shards(tmp_path: Path) -> None:
    codes = run_ranks("fsdp", tmp_path, steps=2)
    assert codes == [0, 0], (tmp_path / "log.txt").read_text()[-4000:]
    runs = open_runs(tmp_path / "trace")
    w = _frame(runs.select(kind="weight", step=0))
    full = {f"{m}.{n}": p.numel() for m, mod in make_model().named_children()
            for n, p in mod.named_parameters()}  # fmt: skip
    got = w.assign(name=w.module + "." + w.tensor).groupby("name")["count"].sum().to_dict()
    assert got == full
    assert (w.groupby("rank")["count"].sum() < sum(full.values())).all()  # shards, not copies
