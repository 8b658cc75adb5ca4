"""What per-unit statistics add to tracing, against the default set, on bench_overhead's models.

Configurations, interleaved round-robin on the same model (medians over rounds):

  a  no tracing
  b  dnntrace, everything every step            activations_every=1
  u  b + per-unit statistics                     units=True (every 10th step, top-k 8,
                                                 gradients, attribution)
  v  the same every step                         units={"every": 1}
  n  b + NaN/Inf origin                          on_anomaly="record"

(every configuration records activations every step, ``activations_every=1``, as the default
set did before it recorded them every 10th step; per-unit statistics sample every 10th step
either way)

Prints per model the step time, the overhead of b over a, of u, v and n over b, and the target
ratios (u - b) / (b - a) and (v - b) / (b - a) (per-unit statistics ÷ default-set overhead;
target ≤ 30 %), the per-unit device buffers and the bytes on disk per step.

    python bench/bench_units.py                # 20 steps x 5 rounds
    python bench/bench_units.py --quick
    python bench/bench_units.py --device cuda --models gpt2,resnet   (bench/gpu_check.sh)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
import bench_overhead  # noqa: E402
import dnntrace  # noqa: E402
from bench_overhead import _cases, train_steps  # noqa: E402
from dnntrace.capture.units import UnitStats  # noqa: E402

_ALL = {"activations_every": 1}
CONFIGS = {
    "a": {},
    "b": {**_ALL},
    "u": {**_ALL, "units": True},
    "v": {**_ALL, "units": {"every": 1}},
    "n": {**_ALL, "on_anomaly": "record"},
}


class _Run:
    def __init__(self, tr: dnntrace.Tracer | None) -> None:
        self.tr = tr

    def after_backward(self, i: int) -> None:
        return None

    def after_step(self, i: int, loss: torch.Tensor) -> None:
        return None

    def close(self) -> dict | None:
        return self.tr.close() if self.tr is not None else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", default="mlp,cnn,transformer")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (%(default)s)")
    args = ap.parse_args(argv)
    bench_overhead.DEVICE = torch.device(args.device)
    if args.quick:
        args.steps, args.rounds = 8, 2
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    work = tempfile.mkdtemp(prefix="dnntrace-bench-units-")
    cases = _cases()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.device}; "
        f"{args.steps} steps x {args.rounds} rounds"
    )
    lines = [
        "| model | a ms | b ms | u ms | v ms | n ms | b−a ms | u−b ms | v−b ms | n−b ms "
        "| (u−b)/(b−a) | (v−b)/(b−a) | unit buffers KiB | disk KB/step b → u → v |",
        "|" + "---|" * 14,
    ]
    for name in args.models.split(","):
        case = cases[name]
        torch.manual_seed(0)
        model = case.make().to(bench_overhead.DEVICE)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        means: dict[str, list[float]] = {c: [] for c in CONFIGS}
        disk: dict[str, float] = {}
        buffers = 0
        cfgs = list(CONFIGS)
        for r in range(-1, args.rounds):  # round -1 warms up, untimed
            order = cfgs[r % len(cfgs) :] + cfgs[: r % len(cfgs)]
            for c in order:
                path = os.path.join(work, f"{name}-{c}-{r}.arrow")
                tr = None
                if c != "a":
                    tr = dnntrace.enable(model, path, host_buffers=64, **CONFIGS[c])
                run = _Run(tr)
                times = train_steps(model, opt, case, run, args.steps, seed=r)  # type: ignore[arg-type]
                st = run.close()
                if r < 0:
                    continue
                means[c].append(sum(times) / len(times))
                if st is not None:
                    disk[c] = st["bytes"] / max(st["steps_written"], 1)
                    assert st["steps_dropped"] == 0, (name, c, st)
                if c == "v" and tr is not None:
                    ext = next(e for e in tr.extensions if isinstance(e, UnitStats))
                    buffers = sum(
                        s.act.numel() * 8
                        + s.grad.numel() * 8
                        + (3 * s.topk.values.numel() * 4 if s.topk is not None else 0)
                        for s in ext.states.values()
                    )
        med = {c: statistics.median(v) for c, v in means.items()}
        base = med["b"] - med["a"]

        over = {c: f"{(med[c] - med['b']) * 1e3:+.1f}" for c in "uvn"}
        ratio = {c: f"{(med[c] - med['b']) / base:.0%}" if base > 0 else "n/a" for c in "uv"}
        print(
            f"  {name}: round means ms "
            + "; ".join(
                f"{c} [{', '.join(f'{t * 1e3:.1f}' for t in v)}]" for c, v in means.items()
            ),
            flush=True,
        )
        ms = " | ".join(f"{med[c] * 1e3:.1f}" for c in "abuvn")
        kb = " → ".join(f"{disk.get(c, 0) / 1e3:.0f}" for c in "buv")
        lines.append(
            f"| {name} | {ms} | {base * 1e3:+.1f} | {over['u']} | {over['v']} | {over['n']} "
            f"| {ratio['u']} | {ratio['v']} | {buffers / 1024:.0f} | {kb} |"
        )
    print()
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
