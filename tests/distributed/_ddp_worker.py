"""One rank of a small traced DDP / FSDP run on CPU with gloo (spawned by the tests and the bench).

``python _ddp_worker.py MODE RANK WORLD PORT OUT [STEPS]``; MODE is ``ddp`` (traced, merged, comm
hook), ``kill`` (rank 1 kills itself with SIGKILL after 3 written steps, in step 3's forward),
``fsdp`` (FSDP2 ``fully_shard``, each rank traces its shard). The data are fixed: at step s the
global batch is ``batch(s)`` and rank r takes rows ``r::world``; lr = 0 keeps the weights fixed,
so a one-process run over the whole batch sees the same activations.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

import dnntrace
from dnntrace.capture.distributed import DDPGradStats, RankMerge

GLOBAL_BATCH = 16


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 5)
    )


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(GLOBAL_BATCH, 12, generator=g), torch.randint(
        0, 5, (GLOBAL_BATCH,), generator=g
    )


def shard(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = batch(step)
    return x[rank::world].contiguous(), y[rank::world].contiguous()


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out, y, reduction="sum")


def main() -> None:
    mode, rank, world, port, out = sys.argv[1], *map(int, sys.argv[2:5]), sys.argv[5]
    steps = int(sys.argv[6]) if len(sys.argv) > 6 else 4
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=20),
    )
    model = make_model()
    info: dict[str, object] = {"rank": rank}
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        tr = dnntrace.enable(
            model, os.path.join(out, "trace.arrow"), optimizer=opt, strict=True, activations_every=1
        )
        traced = model
    else:
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.0)
        merge = RankMerge(timeout_s=20)
        hook = DDPGradStats(ddp, batch_size=GLOBAL_BATCH // world)
        tr = dnntrace.enable(
            model,
            os.path.join(out, "trace.arrow"),
            optimizer=opt,
            extensions=[merge, hook],
            activations_every=1,
        )
        traced = ddp
    try:
        for step in range(steps):
            x, y = shard(step, rank, world)
            pred = traced(x)
            if mode == "kill" and rank == 1 and step == 3:
                # step 3's forward handed step 2 to the writer: 3 steps, then the kill
                deadline = time.monotonic() + 20
                while tr.stats()["steps_written"] < 3 and time.monotonic() < deadline:
                    time.sleep(0.01)
                os.kill(os.getpid(), signal.SIGKILL)
            loss = loss_fn(pred, y)
            loss.backward()
            tr.log_scalar("loss", loss)
            opt.step()
            opt.zero_grad()
    finally:
        info["stats"] = {k: v for k, v in tr.close().items() if k != "memory_bytes"}
        info["path"] = tr.path
        with open(os.path.join(out, f"info{rank}.json"), "w") as f:
            json.dump(info, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
