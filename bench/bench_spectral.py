"""What the issue-6 statistics cost on the demo transformer (CPU or GPU).

1. Per-step spectral statistics (σ_max by one warm-started power-iteration step per matrix,
   Frobenius norm, stable rank): step time with default tracing vs default tracing +
   ``WeightSpectra(every=1, full_every=0)``, interleaved round-robin in the same run, medians
   of round means; the added % (issue target ≤ 2 %). Also the cost of the power-iteration
   step alone (``torch.utils.benchmark``), which is what the step-time difference estimates.
2. Full spectra: one background job (SVD of every weight matrix + power-law fit), timed
   synchronously; and the training step time while full spectra run every step in the
   background (worst case) vs without.
3. One Hessian top-eigenvalue estimate (HVP power iteration, 20 iterations) on one batch.
4. Update ratio (optimizer-state reconstruction) and the other extensions, per sampled step.

    python bench/bench_spectral.py                # ~3-5 minutes on 2 cores
    python bench/bench_spectral.py --steps 10 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
from torch import nn
from torch.utils import benchmark

import dnntrace
from dnntrace.capture import spectral as SP
from dnntrace.demo import CharTransformer
from dnntrace.stats.curvature import top_hessian_eigenvalue
from dnntrace.stats.spectral import PowerIteration, fit_power_law

CONFIGS = {
    "base": ("dnntrace default", lambda: []),
    "spectral": ("default + sigma_max/stable rank", lambda: [SP.WeightSpectra(1, 0)]),
    "full": ("default + full spectra every step", lambda: [SP.WeightSpectra(10**9, 1)]),
    "ratio": ("default + update ratio", lambda: [SP.UpdateRatio()]),
}


def batch(g: torch.Generator, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(0, 256, (32, 65), generator=g).to(device)
    return x[:, :-1], x[:, 1:]


def run(
    cfg: str,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    steps: int,
    seed: int,
    workdir: str,
    device: torch.device,
) -> float:
    g = torch.Generator().manual_seed(seed)
    data = [batch(g, device) for _ in range(steps)]
    exts = CONFIGS[cfg][1]()
    path = os.path.join(workdir, f"{cfg}.arrow")
    times = []
    with dnntrace.enable(model, path, extensions=exts, host_buffers=16) as tr:
        for x, y in data:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    if tr.stats()["disabled"]:
        raise RuntimeError(f"tracing was disabled: {tr.stats()['disabled']}")
    return sum(times) / len(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--configs", default="base,spectral,full,ratio")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    device = torch.device(args.device)
    configs = args.configs.split(",")
    torch.manual_seed(0)
    model = CharTransformer().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    mats = [p for p in model.parameters() if p.dim() >= 2]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} "
        f"cores, device {device}; CharTransformer: {sum(p.numel() for p in model.parameters())}"
        f" parameters, {len(mats)} weight matrices; {args.steps} steps x {args.rounds} rounds"
    )
    workdir = tempfile.mkdtemp(prefix="dnntrace-bench-spectral-")
    for cfg in configs:  # warm-up
        run(cfg, model, opt, 2, 999, workdir, device)
    means: dict[str, list[float]] = {c: [] for c in configs}
    for r in range(args.rounds):
        order = configs[r % len(configs) :] + configs[: r % len(configs)]
        for cfg in order:
            means[cfg].append(run(cfg, model, opt, args.steps, r, workdir, device))
    base = statistics.median(means["base"])
    print("\n| config | step ms (median of round means) | added vs default |")
    print("|---|---|---|")
    for cfg in configs:
        med = statistics.median(means[cfg])
        print(f"| {CONFIGS[cfg][0]} | {med * 1e3:.1f} | {100 * (med / base - 1):+.2f} % |")
    for cfg in configs:
        print(f"  {cfg}: round means ms {[round(t * 1e3, 1) for t in means[cfg]]}")

    pi = PowerIteration(mats)
    pi.step()
    t = benchmark.Timer("pi.step()", globals={"pi": pi}).blocked_autorange(min_run_time=1.0)
    print(
        f"\npower-iteration step alone ({len(mats)} matrices, + Frobenius norms): "
        f"{t.median * 1e6:.0f} µs = {100 * t.median / base:.2f} % of the default step"
    )

    ext = SP.WeightSpectra(1, 0)
    with dnntrace.enable(model, os.path.join(workdir, "oe.arrow"), extensions=[ext]) as tr:

        def hook() -> None:
            ext.on_step_end(tr)
            tr._vectors.clear()  # what the flush would take: keep the list from growing

        t = benchmark.Timer("hook()", globals={"hook": hook}).blocked_autorange(min_run_time=1.0)
    print(
        f"WeightSpectra.on_step_end (power iteration + 33 vector rows recorded): "
        f"{t.median * 1e6:.0f} µs = {100 * t.median / base:.2f} % of the default step"
    )

    from dnntrace.capture.spectral import _BlasThreads

    snaps = [p.detach().double().cpu().numpy() for p in mats]
    t0 = time.perf_counter()
    with _BlasThreads():  # as the background worker runs it
        for w in snaps:
            s = np.linalg.svd(w.reshape(w.shape[0], -1), compute_uv=False)
            fit_power_law(s * s)
    full = time.perf_counter() - t0
    print(
        f"full spectra job (SVD + power-law fit of {len(mats)} matrices, background thread): "
        f"{full * 1e3:.0f} ms = {full / base:.1f} default steps"
    )

    g = torch.Generator().manual_seed(1)
    x, y = batch(g, device)

    def closure() -> torch.Tensor:
        return nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())

    res = top_hessian_eigenvalue(closure, list(model.parameters()), iters=20, tol=0.0)
    print(
        f"Hessian top eigenvalue ({res.iterations} HVPs, one batch of 32x64): "
        f"{res.seconds:.2f} s = {res.seconds / base:.1f} default steps; λ = {res.eigenvalue:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
