"""Start N ranks of a command the way torchrun does (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), on CPU.

Tests use it instead of torchrun when they need each rank's own exit code and output: torchrun merges them and
adds its own failure report. Every rank gets one intra-op thread (see conftest.py) and the repository on its
PYTHONPATH; a job still running after `timeout` seconds is killed and reported as a hang.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "dist_worker.py"


@dataclass
class RankResult:
    rank: int
    returncode: int
    stdout: str
    stderr: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return {**env, **(extra or {})}


def launch(world_size: int, argv: list[str], timeout: float = 120.0, env: dict[str, str] | None = None,
           stop_when_rank_exits: int | None = None) -> tuple[list[RankResult], float]:
    """Run `python ARGV` as `world_size` ranks; returns every rank's result and the wall-clock seconds.

    `stop_when_rank_exits`: once that rank has exited, kill the others (a test of what that rank reports while
    a peer is stuck). Fails the calling test when the job does not end within `timeout`.
    """
    port = str(free_port())
    procs = []
    start = time.perf_counter()
    for rank in range(world_size):
        ranks = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                 "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        procs.append(subprocess.Popen([sys.executable, *argv], env=rank_env({**(env or {}), **ranks}), cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        if stop_when_rank_exits is not None:
            procs[stop_when_rank_exits].wait(timeout=timeout)
            for p in procs:
                if p.poll() is None:
                    p.kill()
        outputs = [p.communicate(timeout=max(1.0, timeout - (time.perf_counter() - start))) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        raise AssertionError(f"the {world_size}-rank job did not end within {timeout} s (a hang)") from None
    seconds = time.perf_counter() - start
    return [RankResult(r, p.returncode, out, err) for r, (p, (out, err)) in enumerate(zip(procs, outputs))], seconds
