"""``callbacks=[DnntraceCallback("trace.arrow")]`` traces a Lightning run.

What it does, on top of ``dnntrace.enable(pl_module, path, **options)`` at the start of training:

- steps are the trainer's optimizer steps, numbered like ``trainer.global_step`` (from 0, so a
  step's rows are those of the update that made ``global_step`` go from n to n + 1); gradients are
  the ones the optimizer uses under automatic optimization (``step(closure)``) and gradient
  accumulation (one row of the accumulated gradient per step);
- ``loss``: the mean over the step's micro-batches of what ``training_step`` returned (a tensor:
  no sync), at that step; the learning rate of each param group is logged by the tracer (``lr``);
- validation runs under ``no_grad`` and is recorded as ``phase="eval"`` at the step it follows,
  with ``val_loss`` (the mean of ``validation_step``'s returned losses) when there is one;
- resuming from a checkpoint continues the step numbering in a new file (``resume_path``);
- under DDP each rank writes ``<stem>/rank<r>.arrow`` (the tracer's rule).
"""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import torch

from . import start

__all__ = ["DnntraceCallback"]


def _loss_of(outputs: Any) -> torch.Tensor | None:
    if isinstance(outputs, torch.Tensor):
        return outputs.detach().reshape(()) if outputs.numel() == 1 else None
    if isinstance(outputs, dict):
        return _loss_of(outputs.get("loss"))
    return None


class DnntraceCallback(pl.Callback):
    """Traces ``pl_module`` while ``trainer.fit`` trains it; ``options`` go to
    ``dnntrace.enable`` (``every``, ``modules``, ``units``, ...)."""

    def __init__(
        self, path: str | os.PathLike[str] = "trace.arrow", *, log_loss: bool = True, **options: Any
    ) -> None:
        super().__init__()
        self.path = os.fspath(path)
        self.log_loss = log_loss
        self.options = options
        self.tracer: Any = None
        self._losses: list[torch.Tensor] = []
        self._val: list[torch.Tensor] = []
        self._seen_step = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.tracer is None or self.tracer.closed:
            self.tracer = start(pl_module, self.path, trainer.global_step, self.options)
        self._seen_step = trainer.global_step

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        tr = self.tracer
        if tr is None or tr.closed:
            return
        loss = _loss_of(outputs) if self.log_loss else None
        if loss is not None:
            self._losses.append(loss)
        if trainer.global_step != self._seen_step:  # the optimizer stepped in this batch
            self._seen_step = trainer.global_step
            if self._losses:
                # the step just ended is the one being recorded until the next forward
                tr.log_scalar("loss", torch.stack(self._losses).float().mean())
                self._losses = []

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        loss = _loss_of(outputs)
        if loss is not None and not trainer.sanity_checking:
            self._val.append(loss)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        tr, vals, self._val = self.tracer, self._val, []
        if tr is not None and not tr.closed and vals and not trainer.sanity_checking:
            tr.log_scalar("val_loss", torch.stack(vals).float().mean())

    def state_dict(self) -> dict[str, Any]:
        return {"path": self.path, "step": None if self.tracer is None else self.tracer.step_index}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        return None  # the trainer's global_step is the truth; resume_path picks the file

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.close()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self.close()

    def close(self) -> dict[str, Any] | None:
        """Writes the last step and closes the trace (also done at the end of ``fit``)."""
        tr = self.tracer
        if tr is None or tr.closed:
            return None
        if self._losses:
            tr.log_scalar("loss", torch.stack(self._losses).float().mean())
            self._losses = []
        return tr.close()  # type: ignore[no-any-return]
