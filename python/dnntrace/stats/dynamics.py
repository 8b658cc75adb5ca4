"""Training dynamics: update-to-weight ratios and the gradient noise scale.

Update ratio ``‖ΔW‖ / ‖W‖`` (``W`` before the update) per parameter, two ways:

- ``optimizer_updates``: the update an optimizer just applied, reconstructed exactly (up to
  rounding) from its state after ``step()``, with no copy of the weights. Supported: ``SGD``
  (plain, momentum, Nesterov, weight decay, dampening) and ``Adam``/``AdamW`` (L2 or decoupled
  weight decay, AMSGrad), non-``maximize``, non-``capturable``, with a float learning rate.
  Others return ``None``: use a copy.
- ``update_norms``: ``‖after − before‖`` against an explicit copy of the weights taken before the
  step (costs one copy of the traced weights; the capture extension keeps it preallocated and
  refreshes it on sampled steps only).

Gradient noise scale (McCandlish, Kaplan, Amodei et al. 2018, "An Empirical Model of Large-Batch
Training", appendix A.1): with gradient estimates at two batch sizes ``B_small < B_big``,
``E|G_B|² = |G|² + tr(Σ)/B`` gives the unbiased estimates::

    |G|²   ≈ (B_big |G_big|² − B_small |G_small|²) / (B_big − B_small)
    tr(Σ)  ≈ (|G_small|² − |G_big|²) / (1/B_small − 1/B_big)

and ``B_simple = tr(Σ)/|G|²``. Each step's pair is noisy, so (as the paper advises) the two are
averaged separately (an exponential moving average) before the ratio is taken.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

# ---- update ratios ----------------------------------------------------------------------------


@torch.no_grad()
def update_norms(before: Sequence[Tensor], after: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """(‖after − before‖, ‖before‖) per tensor, float32 ``[n]``, on the device, no sync."""
    if not before:
        z = torch.zeros(0)
        return z, z
    delta = torch._foreach_sub(list(after), list(before))
    return (
        torch.stack(torch._foreach_norm(delta)).float(),
        torch.stack(torch._foreach_norm(list(before))).float(),
    )


def _float(x: object) -> float | None:
    if isinstance(x, bool):
        return None
    if isinstance(x, int | float):
        return float(x)
    if isinstance(x, Tensor) and x.numel() == 1 and x.device.type == "cpu":
        return float(x)
    return None


def supports_exact_updates(opt: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer_updates`` can reconstruct this optimizer's updates."""
    if type(opt) not in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW):
        return False
    for g in opt.param_groups:
        if g.get("maximize") or g.get("capturable") or g.get("fused"):
            return False
        if _float(g.get("lr")) is None:
            return False
    return True


@torch.no_grad()
def optimizer_updates(
    opt: torch.optim.Optimizer, params: Sequence[Tensor]
) -> list[tuple[Tensor, Tensor] | None] | None:
    """For each of ``params``: ``(ΔW, W_before)`` of the step ``opt`` has just taken, rebuilt
    from its state (``None`` for a parameter it did not update); ``None`` when the optimizer is
    not supported. Call right after ``opt.step()`` (before a scheduler changes ``lr``)."""
    if not supports_exact_updates(opt):
        return None
    group_of: dict[int, dict] = {}
    for g in opt.param_groups:
        for p in g["params"]:
            group_of[id(p)] = g
    adam = isinstance(opt, torch.optim.Adam | torch.optim.AdamW)
    out: list[tuple[Tensor, Tensor] | None] = []
    for p in params:
        g = group_of.get(id(p))
        st = opt.state.get(p, {}) if g is not None else {}
        if g is None or p.grad is None or (adam and not st):
            out.append(None)
            continue
        lr = float(g["lr"])
        wd = float(g.get("weight_decay", 0.0) or 0.0)
        w_after = p.detach()
        if adam:
            step = _float(st.get("step"))
            if step is None or step < 1:
                out.append(None)
                continue
            b1, b2 = g["betas"]
            eps = float(g["eps"])
            v = st["max_exp_avg_sq"] if g.get("amsgrad") else st["exp_avg_sq"]
            bc1 = 1 - b1**step
            bc2 = 1 - b2**step
            # torch: denom = sqrt(v)/sqrt(bc2) + eps; p -= (lr/bc1) * m / denom
            u = st["exp_avg"] / (v.sqrt() / (bc2**0.5) + eps) * (lr / bc1)
            decoupled = isinstance(opt, torch.optim.AdamW) or g.get("decoupled_weight_decay")
            if decoupled and wd:
                # p *= (1 - lr wd), then p -= u  =>  W_b = (W_a + u) / (1 - lr wd)
                w_before = (w_after + u) / (1 - lr * wd)
            else:
                w_before = w_after + u  # L2 decay already sits inside m and v
        else:
            mom = float(g.get("momentum", 0.0) or 0.0)
            grad = p.grad
            if mom == 0:
                # p -= lr (grad + wd W_b)  =>  W_b (1 - lr wd) = W_a + lr grad
                w_before = (w_after + lr * grad) / (1 - lr * wd)
            else:
                buf = st.get("momentum_buffer")
                if buf is None:
                    out.append(None)
                    continue
                if g.get("nesterov"):
                    # d = grad + wd W_b + mom buf;  p -= lr d
                    w_before = (w_after + lr * (grad + mom * buf)) / (1 - lr * wd)
                else:
                    w_before = w_after + lr * buf
        out.append((w_after - w_before, w_before))
    return out


# ---- gradient noise scale ---------------------------------------------------------------------


def noise_scale_estimates(
    g_small_sq: Tensor, g_big_sq: Tensor, b_small: float, b_big: float
) -> tuple[Tensor, Tensor]:
    """McCandlish et al. (2018) eqs. A.2-A.3: unbiased ``(|G|², tr(Σ))`` from the squared norms
    of gradients averaged over ``b_small`` and ``b_big`` examples (tensors stay on the device)."""
    if not b_big > b_small > 0:
        raise ValueError(f"noise scale needs 0 < b_small < b_big, got {b_small}, {b_big}")
    g2 = (b_big * g_big_sq - b_small * g_small_sq) / (b_big - b_small)
    s = (g_small_sq - g_big_sq) / (1.0 / b_small - 1.0 / b_big)
    return g2, s


class NoiseScaleEMA:
    """Exponential moving averages of ``|G|²`` and ``tr(Σ)``; ``b_simple = EMA(tr Σ)/EMA(|G|²)``,
    bias-corrected like Adam's moments (so the first value is that step's own ratio). Device
    tensors, no sync."""

    def __init__(self, beta: float = 0.95) -> None:
        if not 0 <= beta < 1:
            raise ValueError(f"NoiseScaleEMA: beta must be in [0, 1), got {beta}")
        self.beta = beta
        self._g2: Tensor | None = None
        self._s: Tensor | None = None
        self._n = 0

    def update(self, g2: Tensor, s: Tensor) -> Tensor:
        b = self.beta
        if self._g2 is None or self._s is None:
            self._g2 = (1 - b) * g2
            self._s = (1 - b) * s
        else:
            self._g2 = b * self._g2 + (1 - b) * g2
            self._s = b * self._s + (1 - b) * s
        self._n += 1
        # the bias corrections cancel in the ratio
        return self._s / self._g2


__all__ = [
    "NoiseScaleEMA",
    "noise_scale_estimates",
    "optimizer_updates",
    "supports_exact_updates",
    "update_norms",
]
