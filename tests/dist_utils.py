"""Run a test body on real gloo process groups of several ranks."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moco_scale.dist.comm import free_port, set_local_rank_env


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple) -> None:
    set_local_rank_env(rank, world_size, port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable, world_size: int = 2, *args) -> None:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; a failure on any rank fails the test.

    ``fn`` must be a module-level function (it is pickled into spawned processes).
    """
    mp.spawn(_worker, args=(world_size, free_port(), fn, args), nprocs=world_size, join=True)
