"""The fused momentum (EMA) update of the key encoder: ``key <- m * key + (1 - m) * query``.

All parameters move in one multi-tensor op per step instead of one small kernel per tensor.
On CUDA the update is captured once in a CUDA graph with ``m`` held in a device tensor, so a
changing momentum (MoCo v3's cosine schedule) replays the same graph with no re-capture.

Under a sharding backend (ZeRO-3, FSDP2) both encoders are sharded alike, and ``local_shard``
maps each parameter to this rank's shard of it: the update is then local, with no gather.

Moving or re-casting the modules after the first update is followed: the tensors are resolved anew, and
the graph captured again, when the parameters' storage has changed.

BN buffers (never sharded) follow ``buffer_policy``:
- ``own``: the key encoder keeps the statistics of its own forward passes (the MoCo papers);
- ``copy``: the key encoder's buffers are overwritten with the query encoder's (as they are before the step's
  forward: the update runs once per step, before the forward, on every engine);
- ``ema``: floating-point buffers are averaged like parameters; counters are copied.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

LocalShard = Callable[[nn.Parameter], torch.Tensor]

BUFFER_POLICIES = ("own", "copy", "ema")


class MomentumUpdater:
    """Moves ``target`` (the key encoder) towards ``online`` (the query encoder)."""

    def __init__(
        self,
        online: nn.Module,
        target: nn.Module,
        buffer_policy: str = "own",
        cuda_graph: bool = True,
        local_shard: LocalShard | None = None,
    ):
        if buffer_policy not in BUFFER_POLICIES:
            raise ValueError(f"buffer_policy must be one of {BUFFER_POLICIES}, got {buffer_policy!r}")
        self.online_module, self.target_module = online, target
        self.buffer_policy, self.cuda_graph, self.local_shard = buffer_policy, cuda_graph, local_shard
        self._bind()

    def _bind(self) -> None:
        """Resolve the tensors to move as the modules hold them now, and drop any captured graph."""
        online_params = dict(self.online_module.named_parameters())
        target_params = dict(self.target_module.named_parameters())
        if online_params.keys() != target_params.keys():
            raise ValueError("online and target modules must have the same parameter names")
        shard = self.local_shard or (lambda param: param)
        self.online = [shard(online_params[n]) for n in online_params]
        self.target = [shard(target_params[n]) for n in online_params]
        if any(o.shape != t.shape for o, t in zip(self.online, self.target, strict=True)):
            raise ValueError("online and target parameters must be sharded alike")
        online_buffers = dict(self.online_module.named_buffers())
        target_buffers = dict(self.target_module.named_buffers())
        names = list(online_buffers) if self.buffer_policy != "own" else []
        averaged = [n for n in names if self.buffer_policy == "ema" and online_buffers[n].is_floating_point()]
        copied = [n for n in names if n not in averaged]
        self.buffers_online = [online_buffers[n] for n in averaged]
        self.buffers_target = [target_buffers[n] for n in averaged]
        self.copy_src = [online_buffers[n] for n in copied]
        self.copy_dst = [target_buffers[n] for n in copied]
        device = self.target[0].device if self.target else torch.device("cpu")
        self.use_graph = self.cuda_graph and device.type == "cuda"
        self._weight = torch.zeros((), device=device)  # 1 - m, read by the captured graph
        self._graph: torch.cuda.CUDAGraph | None = None
        self._placement = self._current_placement()

    def _current_placement(self) -> tuple[int, ...]:
        """Where the parameters' storage lies now: moving or re-casting the modules (``.to()``, ``.double()``)
        swaps it, and the buffers with it. Under a sharding backend, which owns placement, it is not tracked."""
        if self.local_shard is not None:
            return ()
        return tuple(t.data_ptr() for t in self.online + self.target)

    @torch.no_grad()
    def _update_parameters(self, weight: torch.Tensor | float) -> None:
        if isinstance(weight, torch.Tensor):
            # Tensor-scalar overloads never sync with the host, so they can be graph-captured.
            delta = torch._foreach_sub(self.online, self.target)
            torch._foreach_mul_(delta, weight)
            torch._foreach_add_(self.target, delta)
        else:
            torch._foreach_lerp_(self.target, self.online, weight)

    @torch.no_grad()
    def __call__(self, momentum: float) -> None:
        """Move the parameters and the BN buffers (per the policy)."""
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        if self._placement != self._current_placement():  # moved or re-cast since the last call
            self._bind()
        if self.buffers_target:
            torch._foreach_lerp_(self.buffers_target, self.buffers_online, 1.0 - momentum)
        if self.copy_dst:
            torch._foreach_copy_(self.copy_dst, self.copy_src)
        if self._weight.device.type != "cuda":  # one lerp per tensor list; CPUs have no graphs
            self._update_parameters(1.0 - momentum)
            return
        self._weight.fill_(1.0 - momentum)  # on CUDA always through the device tensor: eager equals graph bitwise
        if not self.use_graph:
            self._update_parameters(self._weight)
            return
        if self._graph is None:
            # The first step runs eagerly on a side stream (also the warm-up), then is captured.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._update_parameters(self._weight)
            torch.cuda.current_stream().wait_stream(side)
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph):
                self._update_parameters(self._weight)
            return
        self._graph.replay()
