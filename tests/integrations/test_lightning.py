"""A real Lightning Trainer, a few CPU steps of a tiny model, with DnntraceCallback: every
step's weight_grad against the gradient Lightning's optimizer used (captured in
on_before_optimizer_step, float64), loss and lr at their steps, validation as eval, resume."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

import dnntrace  # noqa: E402
from _rows import kind_rows, load_rows, load_two_ranks  # noqa: E402
from dnntrace.integrations.lightning import DnntraceCallback  # noqa: E402


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, idx: int) -> dict[str, torch.Tensor]:
        x, y = batch
        return {"loss": nn.functional.cross_entropy(self(x), y)}

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class Truth(pl.Callback):
    def __init__(self) -> None:
        self.grads: dict[int, dict[tuple[str, str], torch.Tensor]] = {}
        self.losses: list[tuple[int, float]] = []

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.grads[trainer.global_step] = {
            tuple(n.rsplit(".", 1)): p.grad.detach().double().clone()  # type: ignore[misc]
            for n, p in pl_module.named_parameters()
        }

    def on_train_batch_end(self, trainer: Any, pl_module: Any, out: Any, b: Any, i: int) -> None:
        self.losses.append((trainer.global_step, float(out["loss"])))


def _data(n: int, seed: int) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(seed)
    ds = torch.utils.data.TensorDataset(torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,)))
    return torch.utils.data.DataLoader(ds, batch_size=4)


def _trainer(max_steps: int, cbs: list[Any], **kw: Any) -> Any:
    return pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=cbs,
        **kw,
    )


def test_lightning_rows_match_truth_and_resume(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Tiny()
    truth = Truth()
    path = tmp_path / "trace.arrow"
    cb = DnntraceCallback(path, activations_every=1)
    trainer = _trainer(
        3, [cb, truth], accumulate_grad_batches=2, val_check_interval=4, limit_val_batches=2
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Lightning's advice (workers, ...)
        warnings.simplefilter("ignore", FutureWarning)  # Lightning on torch 2.13's pytree
        trainer.fit(model, _data(48, 1), _data(8, 2))
    df = load_rows(path)
    assert sorted(set(df["step"])) == [0, 1, 2]
    wg = df[df["kind"] == "weight_grad"]
    assert sorted(truth.grads) == [0, 1, 2]
    for step, grads in truth.grads.items():
        for (mod, name), g in grads.items():
            r = wg[(wg["step"] == step) & (wg["module"] == mod) & (wg["tensor"] == name)]
            assert len(r) == 1 and int(r["calls"].iloc[0]) == 1
            np.testing.assert_allclose(r["sum"].iloc[0], g.sum().item(), rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(r["sumsq"].iloc[0], g.square().sum().item(), rtol=1e-9)
            assert r["max"].iloc[0] == g.max().item()
    # two micro-batches per step: activations add up, the loss is their mean
    act = df[(df["kind"] == "activation") & (df["module"] == "net.0") & (df["phase"] == "train")]
    assert list(act["calls"]) == [2, 2, 2]
    micro = [v for _, v in truth.losses]  # two per step, in order
    want = {s: np.mean(micro[2 * s : 2 * s + 2]) for s in range(3)}
    loss = df[(df["kind"] == "scalar") & (df["tensor"] == "loss")]
    assert list(loss["step"]) == [0, 1, 2]
    np.testing.assert_allclose(loss["sum"], [want[s] for s in range(3)], rtol=1e-6)
    lr = df[(df["kind"] == "scalar") & (df["tensor"] == "lr")]
    np.testing.assert_allclose(lr.sort_values("step")["sum"], [0.1, 0.05, 0.025])
    # validation after the 4th batch (2 steps done): eval rows and val_loss at step 2
    ev = df[df["phase"] == "eval"]
    assert set(ev["step"]) == {2} and set(ev["kind"]) == {"activation"}
    assert list(df[df["tensor"] == "val_loss"]["step"]) == [2]

    ckpt = tmp_path / "c.ckpt"
    trainer.save_checkpoint(ckpt)
    t2 = _trainer(5, [DnntraceCallback(path, activations_every=1)], accumulate_grad_batches=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Lightning's advice (workers, ...)
        warnings.simplefilter("ignore", FutureWarning)  # Lightning on torch 2.13's pytree
        t2.fit(Tiny(), _data(48, 1), ckpt_path=str(ckpt))
    assert sorted(set(load_rows(path)["step"])) == [0, 1, 2]  # the first trace is intact
    resumed = load_rows(tmp_path / "trace.from3.arrow")
    assert sorted(set(resumed["step"])) == [3, 4]
    assert set(resumed[resumed["kind"] == "weight_grad"]["step"]) == {3, 4}


def test_lightning_ddp_ranks_write_their_own_files(tmp_path: Path) -> None:
    """Two gloo ranks (ddp_spawn on CPU): one file per rank; DDP averaged the gradients, so the
    ranks' weight_grad rows agree, and each rank saw its own half of the data."""
    torch.manual_seed(0)
    path = tmp_path / "trace.arrow"
    trainer = pl.Trainer(
        max_steps=2, accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=[DnntraceCallback(path)],
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        trainer.fit(Tiny(), _data(32, 1))
    r0, r1 = load_two_ranks(tmp_path / "trace")
    g0, g1 = kind_rows(r0, "weight_grad"), kind_rows(r1, "weight_grad")
    assert sorted(set(g0["step"])) == [0, 1] and len(g0) == len(g1) == 8
    np.testing.assert_allclose(g0["sum"], g1["sum"], rtol=1e-6, atol=1e-9)
    a0 = kind_rows(r0, "activation")["sum"].to_numpy()
    a1 = kind_rows(r1, "activation")["sum"].to_numpy()
    assert not np.allclose(a0, a1)  # different batches
    assert dnntrace.load(tmp_path / "trace" / "rank1.arrow").metadata["rank"] == 1
