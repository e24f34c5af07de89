"""Spawning gloo ranks with a deadline and one retry.

torch's 2-process gloo spawn hangs about one run in six on a busy 2-core machine (a rank stuck in
the rendezvous or in process start-up). A test that waits forever tells nothing, so ranks are
joined with a deadline, killed when it passes, and the whole spawn is tried once more on a fresh
port and a fresh output folder. A second hang (or a rank that fails) fails the test.
"""

from __future__ import annotations

import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

PROCESS_GROUP_TIMEOUT_S = 60  # init_process_group / collectives inside a rank
JOIN_TIMEOUT_S = 240  # the whole spawn: start-up (imports) and every scenario


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SpawnHang(RuntimeError):
    pass


def _spawn_once(fn: Callable[..., None], args: tuple[Any, ...], nprocs: int, timeout: float) -> None:
    context = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            for process in context.processes:
                process.join(5)
            raise SpawnHang(f"{nprocs} ranks did not finish within {timeout:.0f} s")


def spawn_ranks(
    fn: Callable[..., None],
    make_args: Callable[[int, Path], tuple[Any, ...]],
    out: Path,
    *,
    nprocs: int = 2,
    timeout: float = JOIN_TIMEOUT_S,
    retries: int = 1,
) -> Path:
    """Run ``fn(rank, *make_args(port, folder))`` in ``nprocs`` spawned processes; returns the folder
    the ranks wrote to. A hang past ``timeout`` kills the ranks and retries (``retries`` times) on a
    new port and folder; a rank's exception propagates (no retry: that is a real failure)."""
    for attempt in range(retries + 1):
        folder = out / f"attempt{attempt}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        try:
            _spawn_once(fn, make_args(free_port(), folder), nprocs, timeout)
            return folder
        except SpawnHang:
            if attempt == retries:
                raise
    raise AssertionError("unreachable")
