"""Process-group set-up (NCCL on GPU, gloo on CPU) and the few collectives MoCo needs."""

from __future__ import annotations

import datetime
import functools
import gc
import os
import socket
import sys
import types
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A free TCP port on loopback, for a rendezvous on this machine."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def set_local_rank_env(rank: int, world_size: int, port: int) -> None:
    """The environment a launcher gives rank ``rank`` of a ``world_size``-rank job on this machine,
    for processes spawned without one (tests, benchmarks)."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )


def join_local_gloo(rank: int, world_size: int, port: int) -> None:
    """Join a ``world_size``-rank gloo group on this machine as rank ``rank`` of processes spawned without a
    launcher (tests, benchmarks), with one torch thread per rank so the ranks do not fight over cores."""
    set_local_rank_env(rank, world_size, port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)


def resolve_device(preference: str, local_rank: int) -> torch.device:
    """``auto`` picks this rank's GPU when CUDA is present, else the CPU."""
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("engine.device=cuda but CUDA is not available")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(device_preference: str = "auto", timeout_s: float | None = None) -> DistInfo:
    """Join the process group described by the launcher's environment (deepspeed, torchrun),
    or form a group of one for a plain ``python`` run. ``timeout_s`` bounds every collective: a rank
    that died or hangs ends the others' wait with an error after that long (None: the backend's default)."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    device = resolve_device(device_preference, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        # Ranks sharing a box split its cores instead of oversubscribing them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            rank=rank,
            world_size=world,
            device_id=device if device.type == "cuda" else None,
            timeout=None if timeout_s is None else datetime.timedelta(seconds=timeout_s),
        )
    return DistInfo(rank, world, local_rank, local_world, device)


def shutdown_distributed() -> None:
    """Destroy every process group, and drop the references that libraries keep to them.

    ``destroy_process_group`` alone leaves a group alive while DeepSpeed (module globals, a method's
    default argument) or DTensor (memoised redistribution plans and mesh layouts) still holds it. Its
    native threads (gloo's transport loop and work threads) are then torn down by interpreter
    finalization instead of joined here, and a finished rank was seen to abort there now and then
    ("terminate called without an active exception"). ``native_group_threads`` checks the result.
    """
    if dist.is_initialized():
        dist.destroy_process_group()
    with warnings.catch_warnings():  # looking at torch.distributed.reduce_op warns that it is deprecated
        warnings.simplefilter("ignore", FutureWarning)
        for name, module in list(sys.modules.items()):
            if module is not None and name.startswith(("deepspeed.", "torch.distributed.")):
                _forget_groups(module)
    if "torch.distributed.tensor" in sys.modules:  # DTensor's plan caches hold the mesh, and it the group
        from torch.distributed.tensor import _redistribute, debug

        _redistribute.clear_redistribute_planner_cache()
        debug._clear_sharding_prop_cache()
    gc.collect()  # groups held only by reference cycles (modules, optimizers) go now, not at exit


def _forget_groups(namespace: object) -> None:
    """Drop the process groups a module or class holds: in its globals, in its functions' default
    arguments and in its memoised functions' caches."""
    for attr, value in list(vars(namespace).items()):
        if isinstance(value, dist.ProcessGroup):
            setattr(namespace, attr, None)
            continue
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if isinstance(value, functools._lru_cache_wrapper):
            value.cache_clear()
        elif isinstance(value, types.FunctionType) and value.__defaults__:
            value.__defaults__ = tuple(None if isinstance(d, dist.ProcessGroup) else d for d in value.__defaults__)
        elif isinstance(value, type) and value.__module__ == getattr(namespace, "__name__", None):
            _forget_groups(value)


def native_group_threads() -> list[str]:
    """Names of this process's native threads that belong to a process group (gloo, NCCL, the
    rendezvous store); empty after ``shutdown_distributed``. Linux only (empty elsewhere)."""
    tasks = "/proc/self/task"
    if not os.path.isdir(tasks):
        return []
    names = []
    for tid in os.listdir(tasks):
        try:
            with open(f"{tasks}/{tid}/comm") as comm:
                names.append(comm.read().strip())
        except OSError:  # the thread ended while we looked
            continue
    return sorted(n for n in names if n.startswith(("gloo", "pt_gloo", "pt_nccl", "pt_tcpstore")))


def leave_if_groups_linger(code: int = 0) -> None:
    """Call after ``shutdown_distributed`` as a rank's last act: return if no process group is left, else
    exit now with ``code``, skipping interpreter finalization, which must not be the one to destroy a live
    group. DeepSpeed ZeRO-3 is the known case: its per-module autograd functions keep the model, and
    through its parameters the group, alive until the interpreter ends."""
    if native_group_threads():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


# torch >= 2.14 renamed all_gather_into_tensor; keep older releases (a GPU box's torch) working.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@torch.no_grad()
def all_gather_concat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dim 0, in rank order (no gradient)."""
    if world_size() == 1:
        return tensor
    tensor = tensor.contiguous()
    out = torch.empty((world_size() * tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    _all_gather_single(out, tensor)
    return out


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward hands every rank the summed gradient of its own rows."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rows = tensor.shape[0]
        return all_gather_concat(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # Every rank's loss may depend on every gathered row: sum the ranks' gradients, keep our rows.
        # (all_reduce then slice, as gloo has no reduce-scatter.)
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[rank() * ctx.rows : (rank() + 1) * ctx.rows]


class _AllReduceSumWithGrad(torch.autograd.Function):
    """Sum over ranks; the result feeds every rank's loss, so the gradient is summed the same way."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """:func:`all_gather_concat` that gradients flow through, back to the rank that owns each row."""
    return tensor if world_size() == 1 else _AllGatherWithGrad.apply(tensor)


def all_reduce_sum_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of every rank's ``tensor``, differentiable: each rank's input gets the gradient of all ranks' losses."""
    return tensor if world_size() == 1 else _AllReduceSumWithGrad.apply(tensor)
