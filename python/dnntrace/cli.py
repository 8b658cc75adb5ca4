"""``dnntrace`` command line: ``dnntrace info TRACE``, ``dnntrace landscape FACTORY --out F``.

Bad input (missing, empty, truncated or foreign files, bad arguments) gives one line on stderr and
a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import numpy as np


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


def info(path: str, as_json: bool = False) -> int:
    from .storage import TraceError, load

    try:
        tr = load(path)
    except TraceError as e:
        print(f"dnntrace info: {e}", file=sys.stderr)
        return 2
    meta = tr.metadata
    steps = tr.steps
    rows = tr.table.num_rows
    size = os.path.getsize(path)
    anomalies = tr.anomalies()
    scalar_anomalies = _scalar_anomalies(tr.table)
    report: dict[str, Any] = {
        "path": path,
        "size_bytes": size,
        "rows": rows,
        "bytes_per_row": size / rows if rows else None,
        "steps": len(steps),
        "first_step": int(steps[0]) if len(steps) else None,
        "last_step": int(steps[-1]) if len(steps) else None,
        "truncated": tr.truncated,
        "modules": tr.modules,
        "kinds": tr.kinds,
        "layout": tr.layout.to_dict(),
        "torch_version": meta.get("torch_version"),
        "dnntrace_version": meta.get("dnntrace_version"),
        "rank": meta.get("rank"),
        "world_size": meta.get("world_size"),
        "anomalies": anomalies,
        "scalar_anomalies": scalar_anomalies,
    }
    if as_json:
        print(json.dumps(report, indent=2))
        return 0
    span = f"{report['first_step']}..{report['last_step']}" if len(steps) else "none"
    print(f"{path}: {_human(size)}, {rows} rows ({_human(report['bytes_per_row'] or 0)}/row)")
    print(
        f"  steps      {len(steps)} ({span})"
        + ("  [truncated: torn last batch]" if tr.truncated else "")
    )
    print(
        f"  histogram  k={tr.layout.k} window 2^{tr.layout.emin}..2^"
        f"{tr.layout.emin + tr.layout.octaves}"
    )
    print(
        f"  written by dnntrace {meta.get('dnntrace_version')} with torch "
        f"{meta.get('torch_version')} on {meta.get('host')} (rank {meta.get('rank')} of "
        f"{meta.get('world_size')})"
    )
    print(f"  kinds      {', '.join(tr.kinds)}")
    types = {m["name"]: m["type"] for m in tr.module_tree}
    print(f"  modules    {len(tr.modules)}")
    for m in tr.modules[:40]:
        print(f"    {m or '(model)':<40} {types.get(m, '')}")
    if len(tr.modules) > 40:
        print(f"    ... {len(tr.modules) - 40} more")
    for a in scalar_anomalies:
        print(
            f"  scalar     {a['name']!r} is not finite at {a['steps']} of its "
            f"{a['of']} steps, first at step {a['step']}"
        )
    if anomalies:
        print("  anomalies (first non-finite value per kind, the innermost module that had it):")
        for a in anomalies:
            print(
                f"    step {a['step']:>6}  {a['kind']:<16} {a['module'] or '(model)'}  "
                f"nan={a['nan_count']} inf={a['inf_count']}"
            )
    elif scalar_anomalies:
        print("  anomalies  none in the model's tensors (see the scalars above)")
    else:
        print("  anomalies  none (no NaN or Inf recorded)")
    return 0


def _scalar_anomalies(table: Any) -> list[dict[str, Any]]:
    """Per scalar (loss, lr, ...) with a NaN or Inf: the first step and how many steps."""
    import pyarrow.compute as pc

    from .storage import kinds as K

    if table.num_rows == 0:
        return []
    kind = table.column("kind").cast("string")
    t = table.filter(pc.equal(kind, K.SCALAR))
    bad = pc.greater(
        pc.add(pc.add(t.column("nan_count"), t.column("posinf_count")), t.column("neginf_count")),
        0,
    )
    names = t.column("tensor").cast("string").to_pylist()
    steps = t.column("step").to_pylist()
    out: dict[str, dict[str, Any]] = {}
    for name, step, b in zip(names, steps, bad.to_pylist(), strict=True):
        a = out.setdefault(name, {"name": name, "step": None, "steps": 0, "of": 0})
        a["of"] += 1
        if b:
            a["steps"] += 1
            a["step"] = step if a["step"] is None else min(a["step"], step)
    return [a for a in out.values() if a["steps"]]


def landscape(args: Any) -> int:
    import importlib

    from .storage import TraceError

    mod_name, _, fn_name = args.factory.partition(":")
    if not mod_name or not fn_name:
        print("dnntrace landscape: factory must be module:function", file=sys.stderr)
        return 2
    if args.steps < 2:
        print("dnntrace landscape: --steps must be >= 2", file=sys.stderr)
        return 2
    sys.path.insert(0, os.getcwd())
    try:
        factory = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        print(f"dnntrace landscape: cannot load {args.factory}: {e}", file=sys.stderr)
        return 2
    from .capture.spectral import landscape as run

    model, loss_fn = factory()
    try:
        grid = run(
            model,
            loss_fn,
            args.out,
            trace=args.trace,
            directions=args.directions,
            seed=args.seed,
            steps=args.steps,
            span=args.span,
            progress=not args.no_progress,
        )
    except (TraceError, ValueError, FileNotFoundError) as e:
        print(f"dnntrace landscape: {e}", file=sys.stderr)
        return 2
    print(
        f"{args.out}: {args.steps}x{args.steps} grid, loss {np.nanmin(grid.loss):.4g}.."
        f"{np.nanmax(grid.loss):.4g}, {grid.seconds:.1f} s"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dnntrace", description="dnntrace trace files")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p_info = sub.add_parser("info", help="modules, steps, size and anomalies of a trace")
    p_info.add_argument("trace")
    p_info.add_argument("--json", action="store_true", help="machine-readable output")
    p_land = sub.add_parser(
        "landscape",
        help="loss on a 2-D grid along a run's directions (Li et al. 2018), written as a trace",
    )
    p_land.add_argument(
        "factory", help="module:function returning (model, loss_fn); loss_fn(model) -> loss"
    )
    p_land.add_argument("--out", required=True, help="landscape trace to write")
    p_land.add_argument("--trace", help="training trace (directions' seed and filter norms)")
    p_land.add_argument("--directions", choices=["random", "pca"], default="random")
    p_land.add_argument("--seed", type=int, default=None)
    p_land.add_argument("--steps", type=int, default=21, help="grid points per axis")
    p_land.add_argument("--span", type=float, default=1.0, help="grid half-width")
    p_land.add_argument("--no-progress", action="store_true")
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:  # argparse already printed a one-line usage error
        return int(e.code or 0)
    if args.cmd == "info":
        return info(args.trace, args.json)
    if args.cmd == "landscape":
        return landscape(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
