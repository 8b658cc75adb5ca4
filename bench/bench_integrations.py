"""What the trainer callbacks add to a training step, against the same trainer without them and
against a plain loop (with and without dnntrace.enable), on the same tiny model and machine.

Configurations, interleaved round-robin (median over rounds of the mean step time of a round):

  plain        a hand-written loop: forward, backward, SGD step
  plain+trace  the same loop with dnntrace.enable(model, path)
  lightning    lightning.pytorch.Trainer.fit, no callback
  lightning+cb the same with callbacks=[dnntrace.integrations.lightning.DnntraceCallback(path)]
  hf           transformers.Trainer.train, no callback
  hf+cb        the same with callbacks=[dnntrace.integrations.hf.DnntraceCallback(path)]

Each trainer run includes its fixed start-up (dataloaders, callbacks, close); the step time is
(wall time of a run with N steps - wall time with N0 steps) / (N - N0), which cancels it.

    python bench/bench_integrations.py              # a few minutes on 2 cores
    python bench/bench_integrations.py --quick
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import dnntrace

WIDTH = 256


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, WIDTH), nn.GELU(), nn.LayerNorm(WIDTH), nn.Linear(WIDTH, WIDTH), nn.GELU(),
        nn.Linear(WIDTH, 10),
    )  # fmt: skip


def _data(n: int) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(0)
    return torch.utils.data.TensorDataset(
        torch.randn(n, 64, generator=g), torch.randint(0, 10, (n,), generator=g)
    )


BATCH = 32


def plain(steps: int, path: str | None) -> float:
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    dl = torch.utils.data.DataLoader(_data(steps * BATCH), batch_size=BATCH)
    t0 = time.perf_counter()
    tr = dnntrace.enable(model, path) if path else None
    for x, y in dl:
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if tr is not None:
            tr.log_scalar("loss", loss)
    if tr is not None:
        tr.close()
    return time.perf_counter() - t0


def lightning(steps: int, path: str | None) -> float:
    import lightning.pytorch as pl

    from dnntrace.integrations.lightning import DnntraceCallback

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _net()

        def training_step(self, batch: Any, idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[DnntraceCallback(path)] if path else [],
    )  # fmt: skip
    dl = torch.utils.data.DataLoader(_data(steps * BATCH), batch_size=BATCH)
    t0 = time.perf_counter()
    trainer.fit(Module(), dl)
    return time.perf_counter() - t0


def hf(steps: int, path: str | None) -> float:
    import transformers

    from dnntrace.integrations.hf import DnntraceCallback

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _net()

        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"loss": nn.functional.cross_entropy(self.net(x), labels)}

    class DS(torch.utils.data.Dataset):  # type: ignore[type-arg]
        def __init__(self) -> None:
            self.d = _data(steps * BATCH)

        def __len__(self) -> int:
            return len(self.d)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            x, y = self.d[i]
            return {"x": x, "labels": y}

    with tempfile.TemporaryDirectory() as out:
        args = transformers.TrainingArguments(
            output_dir=out, max_steps=steps, per_device_train_batch_size=BATCH, report_to=[],
            use_cpu=True, save_strategy="no", logging_steps=10, disable_tqdm=True,
            dataloader_num_workers=0, optim="sgd", learning_rate=0.01,
        )  # fmt: skip
        trainer = transformers.Trainer(
            model=Model(), args=args, train_dataset=DS(),
            callbacks=[DnntraceCallback(path)] if path else [],
        )  # fmt: skip
        t0 = time.perf_counter()
        trainer.train()
        return time.perf_counter() - t0


CASES: dict[str, tuple[Callable[[int, str | None], float], bool]] = {
    "plain": (plain, False),
    "plain+trace": (plain, True),
    "lightning": (lightning, False),
    "lightning+cb": (lightning, True),
    "hf": (hf, False),
    "hf+cb": (hf, True),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--base-steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: stable on a loaded machine)"
    )
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.quick:
        a.steps, a.base_steps, a.rounds = 12, 4, 1
    warnings.simplefilter("ignore")  # the trainers' advice (workers, pytree) is not measured
    import logging

    logging.disable(logging.WARNING)
    per_step: dict[str, list[float]] = {k: [] for k in CASES}
    with tempfile.TemporaryDirectory() as d:
        for fn, traced in CASES.values():  # warm-up: imports, first-call costs
            fn(a.base_steps, os.path.join(d, "w.arrow") if traced else None)
        for r in range(a.rounds):
            for name, (fn, traced) in CASES.items():
                path = os.path.join(d, f"{name}-{r}.arrow") if traced else None
                short = fn(a.base_steps, path.replace(".arrow", "s.arrow") if path else None)
                long = fn(a.steps, path)
                per_step[name].append((long - short) / (a.steps - a.base_steps))
    med = {k: statistics.median(v) for k, v in per_step.items()}
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {a.threads} torch threads, load average "
        f"{os.getloadavg()[0]:.1f}, {a.rounds} rounds, steps {a.base_steps}->{a.steps}, "
        f"MLP 64-{WIDTH}-{WIDTH}-10, batch {BATCH}"
    )
    print(f"{'configuration':<14}{'ms/step':>9}{'vs same w/o tracing':>22}{'vs plain':>10}")
    for name in CASES:
        base = name.removesuffix("+cb").removesuffix("+trace")
        print(
            f"{name:<14}{med[name] * 1e3:>9.2f}{med[name] / med[base]:>21.2f}x"
            f"{med[name] / med['plain']:>9.2f}x"
        )
    for name in ("plain+trace", "lightning+cb", "hf+cb"):
        base = name.removesuffix("+cb").removesuffix("+trace")
        print(f"added by tracing, {base:<10}: {(med[name] - med[base]) * 1e3:+.2f} ms/step")


if __name__ == "__main__":
    main()
