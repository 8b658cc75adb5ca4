"""A real Hugging Face Trainer, a few CPU steps of a tiny GPT-2 made from a config (no download),
with DnntraceCallback: every step's weight_grad against the gradient the optimizer used (captured
in on_pre_optimizer_step, after clipping, float64), HF's logged loss at its step, evaluation as
eval rows, resume from a checkpoint into a new file."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import dnntrace  # noqa: E402
from _rows import kind_rows, load_rows, load_two_ranks  # noqa: E402
from dnntrace.integrations.hf import DnntraceCallback  # noqa: E402


class Truth(transformers.TrainerCallback):  # type: ignore[misc]
    def __init__(self) -> None:
        self.grads: dict[int, dict[tuple[str, str], torch.Tensor]] = {}

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        model = kw["model"]
        self.grads[state.global_step] = {  # global_step: steps done before this one
            tuple(n.rsplit(".", 1)): p.grad.detach().double().clone()  # type: ignore[misc]
            for n, p in model.named_parameters()
            if p.grad is not None
        }


def _model() -> Any:
    cfg = transformers.GPT2Config(
        vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg)


class Tokens(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 64, (n, 16), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _args(out: Path, max_steps: int, **kw: Any) -> Any:
    return transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=max_steps,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
        **kw,
    )


def test_hf_trainer_rows_match_truth_and_resume(tmp_path: Path) -> None:
    path = tmp_path / "trace.arrow"
    truth = Truth()
    args = _args(
        tmp_path / "out", 4, eval_strategy="steps", eval_steps=2, save_strategy="steps",
        save_steps=2,
    )  # fmt: skip
    trainer = transformers.Trainer(
        model=_model(),
        args=args,
        train_dataset=Tokens(32, 1),
        eval_dataset=Tokens(4, 2),
        callbacks=[DnntraceCallback(path, activations_every=1), truth],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        trainer.train()
    df = load_rows(path)
    assert sorted(set(df["step"])) == [0, 1, 2, 3, 4]  # step 4: the final evaluation
    wg = df[df["kind"] == "weight_grad"]
    assert sorted(truth.grads) == [0, 1, 2, 3] == sorted(set(wg["step"]))
    for step, grads in truth.grads.items():
        at = wg[wg["step"] == step]
        assert len(at) == len(grads)
        for (mod, name), g in grads.items():
            r = at[(at["module"] == mod) & (at["tensor"] == name)]
            assert len(r) == 1 and int(r["calls"].iloc[0]) == 1, (step, mod, name)
            np.testing.assert_allclose(r["sum"].iloc[0], g.sum().item(), rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(r["sumsq"].iloc[0], g.square().sum().item(), rtol=1e-9)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    loss = df[(df["kind"] == "scalar") & (df["tensor"] == "loss")]
    assert list(loss["step"]) == [h["step"] - 1 for h in logged] == [0, 1, 2, 3]
    np.testing.assert_allclose(loss["sum"], [h["loss"] for h in logged], rtol=1e-6)
    # HF's two param groups (decay / no decay): lr/0, lr/1, the rate each step used
    lr = df[(df["kind"] == "scalar") & (df["tensor"] == "lr/0")].sort_values("step")
    assert list(lr["step"]) == [0, 1, 2, 3]
    np.testing.assert_allclose(lr["sum"], [h["learning_rate"] for h in logged], rtol=1e-6)
    # evaluations after 2 and 4 steps: eval rows and eval_loss at steps 2 and 4
    ev = df[df["phase"] == "eval"]
    assert set(ev["step"]) == {2, 4} and set(ev["kind"]) == {"activation"}
    evl = df[df["tensor"] == "eval_loss"]
    assert list(evl["step"]) == [2, 4]
    want = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    np.testing.assert_allclose(evl["sum"], want, rtol=1e-6)

    t2 = transformers.Trainer(
        model=_model(),
        args=_args(tmp_path / "out", 6, save_strategy="no"),
        train_dataset=Tokens(32, 1),
        callbacks=[DnntraceCallback(path, activations_every=1)],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        t2.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-4"))
    assert sorted(set(load_rows(path)["step"])) == [0, 1, 2, 3, 4]  # intact
    resumed = load_rows(tmp_path / "trace.from4.arrow")
    assert sorted(set(resumed[resumed["kind"] == "weight_grad"]["step"])) == [4, 5]


def _ddp_rank(rank: int, world: int, port: int, out: str) -> None:
    """One rank of a 2-process gloo run, as torchrun would start it (env vars, then Trainer)."""
    import os

    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = _args(Path(out) / "out", 2, save_strategy="no", ddp_backend="gloo")
        trainer = transformers.Trainer(
            model=_model(),
            args=args,
            train_dataset=Tokens(32, 1),
            callbacks=[DnntraceCallback(Path(out) / "trace.arrow")],
        )
        trainer.train()


def test_hf_trainer_ddp_ranks_write_their_own_files(tmp_path: Path) -> None:
    """Two gloo ranks of a real HF Trainer: one file per rank; DDP averaged the gradients, so the
    ranks' weight_grad rows agree, while each rank's activations come from its own batches."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_rank, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = load_two_ranks(tmp_path / "trace")
    g0, g1 = kind_rows(r0, "weight_grad"), kind_rows(r1, "weight_grad")
    assert sorted(set(g0["step"])) == [0, 1] and len(g0) == len(g1) > 0
    assert (g0["module"] == g1["module"]).all() and (g0["tensor"] == g1["tensor"]).all()
    np.testing.assert_allclose(g0["sum"], g1["sum"], rtol=1e-5, atol=1e-9)
    a0 = kind_rows(r0, "activation")["sum"].to_numpy()
    a1 = kind_rows(r1, "activation")["sum"].to_numpy()
    assert a0.shape == a1.shape and not np.allclose(a0, a1)  # different batches
    assert dnntrace.load(tmp_path / "trace" / "rank1.arrow").metadata["rank"] == 1
