"""Distributed test helpers: start real 2-rank gloo runs on 127.0.0.1, each with timeouts."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).with_name("_ddp_worker.py")
WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_ranks(mode: str, out: Path, steps: int = 4, timeout: float = 90.0) -> list[int]:
    """Starts ``WORLD`` worker processes and returns their exit codes (killed after
    ``timeout`` seconds, so nothing hangs)."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                mode,
                str(r),
                str(WORLD),
                str(port),
                str(out),
                str(steps),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(WORLD)
    ]
    codes = []
    logs = []
    for p in procs:
        try:
            stdout, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            stdout, _ = p.communicate(timeout=10)
        codes.append(p.returncode)
        logs.append(stdout.decode(errors="replace"))
    (out / "log.txt").write_text("\n\n".join(logs))
    return codes
