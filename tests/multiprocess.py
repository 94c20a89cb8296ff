"""Run a worker script in several processes joined by a gloo process group on 127.0.0.1.

Each worker gets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT`` and ``OUT`` (a
directory for its results) in its environment, and the names ``rank``, ``world``, ``out``
(a pathlib.Path) and ``dist`` already bound, the process group initialized with a bounded
timeout. The worker body is followed by a barrier, ``destroy_process_group`` and
``os._exit(0)``: skipping interpreter finalization avoids gloo's worker threads racing Python's
teardown (which can abort a process that has already finished its work with "terminate called
without an active exception"). Every process is killed if the group does not finish in time, so
a test never hangs.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[1])

PROLOGUE = """
import datetime, os, pathlib, sys
sys.path.insert(0, os.environ["MOE_EXT_ROOT"])
import torch, torch.distributed as dist
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
out = pathlib.Path(os.environ["OUT"])
dist.init_process_group("gloo", rank=rank, world_size=world,
                        timeout=datetime.timedelta(seconds=float(os.environ["COLLECTIVE_TIMEOUT"])))
"""

EPILOGUE = """
dist.barrier()
dist.destroy_process_group()
sys.stdout.flush(); sys.stderr.flush()
os._exit(0)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(
    body: str,
    world: int,
    out: Path,
    *,
    timeout: float = 240.0,
    collective_timeout: float = 60.0,
    env: dict[str, str] | None = None,
    expect_failure: bool = False,
) -> list[str]:
    """Run ``body`` on ``world`` ranks; returns each rank's stderr.

    Unless ``expect_failure``, asserts every rank exited 0. With ``expect_failure``, asserts every
    rank exited non-zero (the body is expected to raise on every rank, never to hang).
    """
    script = PROLOGUE + textwrap.dedent(body) + EPILOGUE
    base = dict(
        os.environ,
        MOE_EXT_ROOT=ROOT,
        OUT=str(out),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        COLLECTIVE_TIMEOUT=str(collective_timeout),
        OMP_NUM_THREADS="1",
        **(env or {}),
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            env=dict(base, RANK=str(rank)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for rank in range(world)
    ]
    errors = []
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=timeout)
            errors.append(err.decode(errors="replace"))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for rank, (proc, err) in enumerate(zip(procs, errors, strict=True)):
        if expect_failure:
            assert proc.returncode != 0, f"rank {rank} succeeded where a failure was expected"
        else:
            assert proc.returncode == 0, f"rank {rank} exited {proc.returncode}:\n{err[-3000:]}"
    return errors
