"""Run a test body on real gloo process groups of several ranks."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import torch.distributed as dist
import torch.multiprocessing as mp

from moco_scale.dist.comm import free_port, join_local_gloo


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple) -> None:
    join_local_gloo(rank, world_size, port)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()
    # Passed: leave without the interpreter's teardown. A finished rank was seen to abort there now and
    # then ("terminate called without an active exception", SIGABRT: a native thread destroyed while
    # joinable), which failed a test whose every assertion had passed. A failure raises before this line.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(fn: Callable, world_size: int = 2, *args) -> None:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; a failure on any rank fails the test.

    ``fn`` must be a module-level function (it is pickled into spawned processes).
    """
    mp.spawn(_worker, args=(world_size, free_port(), fn, args), nprocs=world_size, join=True)
