"""Curvature of the loss: Hessian-vector products, the top Hessian eigenvalue, the trace.

Power iteration on Hessian-vector products as in PyHessian (Yao, Gholami, Keutzer & Mahoney
2020): ``v ← Hv/‖Hv‖`` until the Rayleigh quotient ``vᵀHv`` changes by less than ``tol``
(relative). It converges to the eigenvalue of largest magnitude (negative when the loss is
locally concave along it). Hutchinson (1989): ``tr(H) = E[vᵀHv]`` for Rademacher ``v``.

Each HVP is one double-backward pass (Pearlmutter 1994) through the graph of ``∇L`` built once
per estimate: ``closure()`` returns the loss (a forward pass on a batch the caller chooses); the
gradient is taken with ``create_graph=True`` and reused (under the math attention backend: the
fused ones have no double backward). Parameters' ``.grad`` are not touched.
Convergence checks read the eigenvalue on the host (one sync per iteration): run it every N steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel


@dataclass(frozen=True)
class HessianEigen:
    eigenvalue: float
    vector: list[Tensor]  # unit-norm over all parameters
    iterations: int  # Hessian-vector products used
    seconds: float
    converged: bool


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    return sum((x * y).sum() for x, y in zip(a, b, strict=True))  # type: ignore[return-value]


def _normalize(v: Sequence[Tensor]) -> list[Tensor]:
    n = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(v))))
    return [x / (n + 1e-30) for x in v]


class HVP:
    """``H·v`` for the Hessian of ``closure()`` with respect to ``params`` at their current
    values; the gradient graph is built once (one forward and backward) and reused."""

    def __init__(self, closure: Callable[[], Tensor], params: Sequence[Tensor]) -> None:
        self.params = [p for p in params if p.requires_grad]
        # fused attention kernels have no double backward: build the graph with the math one
        with torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]):
            loss = closure()
            self.loss = loss.detach()
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        self._grads = [
            g if g is not None else torch.zeros_like(p)
            for g, p in zip(grads, self.params, strict=True)
        ]
        self.calls = 0

    def __call__(self, v: Sequence[Tensor]) -> list[Tensor]:
        self.calls += 1
        used = [i for i, g in enumerate(self._grads) if g.requires_grad]
        out = [torch.zeros_like(p) for p in self.params]
        if used:
            hv = torch.autograd.grad(
                [self._grads[i] for i in used],
                self.params,
                grad_outputs=[v[i] for i in used],
                retain_graph=True,
                allow_unused=True,
            )
            out = [h.detach() if h is not None else o for h, o in zip(hv, out, strict=True)]
        return out


def top_hessian_eigenvalue(
    closure: Callable[[], Tensor],
    params: Sequence[Tensor],
    *,
    iters: int = 50,
    tol: float = 1e-3,
    v0: Sequence[Tensor] | None = None,
    seed: int = 0,
) -> HessianEigen:
    """The Hessian eigenvalue of largest magnitude by power iteration (PyHessian, Yao et al.
    2020). ``v0`` warm-starts it (for example the previous estimate's vector)."""
    t0 = time.perf_counter()
    hvp = HVP(closure, params)
    ps = hvp.params
    if v0 is not None and len(v0) == len(ps):
        v = _normalize([x.detach().clone() for x in v0])
    else:
        g = torch.Generator(device="cpu").manual_seed(seed)
        v = _normalize([torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device) for p in ps])
    lam = float("nan")
    converged = False
    for _ in range(max(1, iters)):
        hv = hvp(v)
        new = float(_dot(hv, v))  # Rayleigh quotient with the unit v (host sync)
        v = _normalize(hv)
        if lam == lam and abs(new - lam) <= tol * (abs(new) + 1e-12):
            lam = new
            converged = True
            break
        lam = new
    return HessianEigen(lam, v, hvp.calls, time.perf_counter() - t0, converged)


def hutchinson_trace(
    closure: Callable[[], Tensor], params: Sequence[Tensor], *, samples: int = 32, seed: int = 0
) -> tuple[float, float]:
    """Hutchinson's (1989) estimate of ``tr(H)``: the mean of ``vᵀHv`` over ``samples``
    Rademacher vectors, with its standard error."""
    hvp = HVP(closure, params)
    g = torch.Generator(device="cpu").manual_seed(seed)
    vals = []
    for _ in range(samples):
        v = [
            (torch.randint(0, 2, p.shape, generator=g).to(p.dtype) * 2 - 1).to(p.device)
            for p in hvp.params
        ]
        vals.append(float(_dot(hvp(v), v)))
    t = torch.tensor(vals, dtype=torch.float64)
    se = float(t.std() / len(vals) ** 0.5) if len(vals) > 1 else float("nan")
    return float(t.mean()), se


__all__ = ["HVP", "HessianEigen", "hutchinson_trace", "top_hessian_eigenvalue"]
