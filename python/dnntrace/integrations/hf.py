"""``Trainer(..., callbacks=[DnntraceCallback("trace.arrow")])`` traces a Hugging Face run.

On top of ``dnntrace.enable(model, path, **options)`` at ``on_train_begin``:

- steps are the optimizer steps, numbered from 0: HF's ``state.global_step`` g (counted from 1)
  is dnntrace step g - 1; gradient accumulation is one step with the accumulated gradient;
- ``loss`` and ``grad_norm`` from HF's logs (``on_log``: the loss averaged over the
  ``logging_steps`` window, ``logging_steps=1`` gives every step) at the step HF logged them; the
  learning rate of every step is logged by the tracer itself (``lr``);
- evaluation runs under ``no_grad`` and is recorded as ``phase="eval"`` at the step after the one
  it follows, with HF's ``eval_*`` metrics;
- ``resume_from_checkpoint`` continues the numbering in a new file (``resume_path``);
- under DDP each rank writes ``<stem>/rank<r>.arrow``.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

from transformers import TrainerCallback

from . import start

__all__ = ["DnntraceCallback"]

_TRAIN_KEYS = ("loss", "grad_norm")


class DnntraceCallback(TrainerCallback):
    """Traces the trainer's model during ``train()``; ``options`` go to ``dnntrace.enable``."""

    def __init__(self, path: str | os.PathLike[str] = "trace.arrow", **options: Any) -> None:
        self.path = os.fspath(path)
        self.options = options
        self.tracer: Any = None
        self._warned = False

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model = kwargs.get("model")
        if model is None or (self.tracer is not None and not self.tracer.closed):
            return
        self.tracer = start(model, self.path, state.global_step, self.options)

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any
    ) -> None:
        tr = self.tracer
        if tr is None or tr.closed or not logs:
            return
        for key, v in logs.items():
            if not isinstance(v, int | float) or isinstance(v, bool):
                continue
            if key in _TRAIN_KEYS:  # the step that just ended: HF's global_step counts from 1
                try:
                    tr.log_scalar(key, float(v), step=state.global_step - 1)
                except ValueError as e:
                    if not self._warned:
                        self._warned = True
                        warnings.warn(
                            f"dnntrace: HF log not recorded: {e}", RuntimeWarning, stacklevel=2
                        )
            elif key.startswith("eval_"):
                tr.log_scalar(key, float(v))  # with the eval rows: the step being recorded

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.close()

    def close(self) -> dict[str, Any] | None:
        tr = self.tracer
        if tr is None or tr.closed:
            return None
        return tr.close()  # type: ignore[no-any-return]
