"""Run a test body on real gloo process groups of several ranks."""

from __future__ import annotations

from collections.abc import Callable

import torch.multiprocessing as mp

from moco_scale.distributed.comm import free_port, join_local_gloo, leave_if_groups_linger, shutdown_distributed


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple) -> None:
    join_local_gloo(rank, world_size, port)
    try:
        fn(rank, world_size, *args)
    finally:
        shutdown_distributed()
    leave_if_groups_linger(0)  # as launchers/pretrain.py ends a rank (tests/test_shutdown.py)


def run_ranks(fn: Callable, world_size: int = 2, *args) -> None:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; a failure on any rank fails the test.

    ``fn`` must be a module-level function (it is pickled into spawned processes).
    """
    mp.spawn(_worker, args=(world_size, free_port(), fn, args), nprocs=world_size, join=True)
