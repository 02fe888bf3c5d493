"""Momentum Contrast, as in the papers.

- MoCo v1 (He et al., 2019): a query encoder, a momentum key encoder, a queue of K negative keys,
  InfoNCE with temperature T, and shuffle-BN on the key side.
- MoCo v2 (Chen et al., 2020): the same with a 2-layer MLP head.
- MoCo v3 (Chen et al., 2021): no queue; a 3-layer projector and a 2-layer predictor on the
  query side, in-batch keys from all ranks as negatives, a symmetrised loss.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from moco_scale.config import MocoConfig
from moco_scale.distributed import shuffle
from moco_scale.distributed.comm import all_gather_concat, rank
from moco_scale.moco.batchnorm import convert_batchnorm
from moco_scale.moco.loss import in_batch_info_nce
from moco_scale.moco.momentum import LocalShard, MomentumUpdater
from moco_scale.moco.queue import KeyQueue, ShardedKeyQueue
from moco_scale.models.init import ShardWriter, initialise


class MocoOutput(NamedTuple):
    loss: torch.Tensor
    inst_acc: torch.Tensor  # how often the positive key wins among all candidates


def mlp(in_dim: int, hidden_dim: int, out_dim: int, layers: int, last_bn: bool) -> nn.Sequential:
    """Linear-BN-ReLU blocks (v3 style), ending in a linear layer and optionally an affine-free BN."""
    blocks: list[nn.Module] = []
    for i in range(layers):
        d_in = in_dim if i == 0 else hidden_dim
        d_out = out_dim if i == layers - 1 else hidden_dim
        blocks.append(nn.Linear(d_in, d_out, bias=False))
        if i < layers - 1:
            blocks += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        elif last_bn:
            blocks.append(nn.BatchNorm1d(d_out, affine=False))
    return nn.Sequential(*blocks)


def projection_head(version: str, in_dim: int, hidden_dim: int, out_dim: int) -> nn.Module:
    """v1: linear. v2: 2-layer MLP. v3: 3-layer MLP with BN."""
    if version == "v1":
        return nn.Linear(in_dim, out_dim)
    if version == "v2":
        return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))
    return mlp(in_dim, hidden_dim, out_dim, layers=3, last_bn=True)


class MoCo(nn.Module):
    """Query encoder, momentum key encoder and (v1/v2) a queue. One training step is
    ``momentum_update(m)``, then ``forward(view1, view2, step)`` for the loss; the engine makes both calls.

    Args:
        backbone: the query backbone, returning pooled features of size ``backbone.feature_dim``.
        cfg: the ``moco`` config section: version, dim, mlp_dim (0: the backbone's feature width),
            queue_size (K), shard_queue (K / world_size keys per rank, :class:`ShardedKeyQueue`),
            temperature, shuffle_bn ("shuffle", "sync" or "none"), bn_groups (virtual BN groups for
            shuffle-BN in a single process) and key_bn_buffers (see :class:`MomentumUpdater`).
        world_size: number of ranks; picks the shuffle-BN flavour.
        cuda_graph_ema: capture the momentum update in a CUDA graph (see :class:`MomentumUpdater`).
        shuffle_seed: seed of the shared key permutation.
        key_channels_last: feed the key encoder channels-last images (its no-grad forward is ~1.2x
            faster so on the CPU, where the query's forward + backward is not).
        key_backbone: a second build of the backbone for the key encoder, where copying the query
            encoder is not possible (under ``deepspeed.zero.Init``); call :meth:`initialise` before use.
    """

    def __init__(
        self,
        backbone: nn.Module,
        cfg: MocoConfig,
        *,
        world_size: int = 1,
        cuda_graph_ema: bool = True,
        shuffle_seed: int = 0,
        key_channels_last: bool = False,
        key_backbone: nn.Module | None = None,
    ):
        super().__init__()
        self.version = cfg.version
        self.temperature = cfg.temperature
        self.shuffle_keys = cfg.shuffle_bn == "shuffle"
        self.shuffle_seed = shuffle_seed
        self.key_channels_last = key_channels_last
        feature_dim, hidden_dim = backbone.feature_dim, cfg.mlp_dim or backbone.feature_dim
        device = next(backbone.parameters()).device

        def encoder(trunk: nn.Module) -> nn.Sequential:
            built = nn.Sequential()
            built.add_module("backbone", trunk)
            built.add_module("head", projection_head(cfg.version, feature_dim, hidden_dim, cfg.dim))
            return convert_batchnorm(built, cfg.shuffle_bn, world_size, cfg.bn_groups, device)

        self.encoder_q = encoder(backbone)
        self.predictor = mlp(cfg.dim, hidden_dim, cfg.dim, layers=2, last_bn=False) if cfg.version == "v3" else None
        if self.predictor is not None:
            convert_batchnorm(self.predictor, cfg.shuffle_bn, world_size, cfg.bn_groups, device)
        # ZeRO-3 partitions parameters as they are created, and a copy of partitioned ones is unusable: there
        # the key encoder is a second build, and initialise() makes it the query encoder's equal.
        self.encoder_k = encoder(key_backbone) if key_backbone is not None else copy.deepcopy(self.encoder_q)
        self.encoder_k.requires_grad_(False)
        queue_type = ShardedKeyQueue if cfg.shard_queue else KeyQueue
        self.queue = queue_type(cfg.queue_size, cfg.dim) if cfg.version != "v3" else None
        self.key_bn_buffers = cfg.key_bn_buffers
        self.cuda_graph_ema = cuda_graph_ema
        self._updater: MomentumUpdater | None = None
        self._local_shard: LocalShard | None = None

    def initialise(self, seed: int, writer: ShardWriter | None = None) -> None:
        """Every tensor drawn anew from ``seed`` by name (``moco_scale/models/init.py``), written whole or, with a
        sharding backend's ``writer``, into this rank's shards. The key encoder starts as the query encoder: it
        is drawn under the query's names."""
        for encoder in (self.encoder_q, self.encoder_k):
            backbone = encoder.backbone
            initialise(backbone, seed, [backbone.init_rule], writer, prefix="encoder_q.backbone.")
            initialise(encoder.head, seed, [], writer, prefix="encoder_q.head.")
        if self.predictor is not None:
            initialise(self.predictor, seed, [], writer, prefix="predictor.")
        if self.queue is not None:
            initialise(self.queue, seed, [self.queue.init_rule], writer, prefix="queue.")

    def use_local_shards(self, local_shard: LocalShard) -> None:
        """Set by a sharding backend: the momentum update then runs on each parameter's local shard."""
        self._local_shard, self._updater = local_shard, None

    def momentum_update(self, momentum: float) -> None:
        """key encoder <- momentum * key encoder + (1 - momentum) * query encoder (BN buffers per
        ``key_bn_buffers``). The engine calls it once per step, before :meth:`forward`."""
        if self._updater is None:  # built on first use, after the engine has placed the module
            self._updater = MomentumUpdater(
                self.encoder_q, self.encoder_k, self.key_bn_buffers, self.cuda_graph_ema, self._local_shard
            )
        self._updater(momentum)

    def encode_queries(self, x: torch.Tensor) -> torch.Tensor:
        """q: the query encoder's output (v3: through the predictor), not normalised."""
        q = self.encoder_q(x)
        return self.predictor(q) if self.predictor is not None else q

    @torch.no_grad()
    def encode_keys(self, x: torch.Tensor, step: int) -> torch.Tensor:
        """k: the key encoder's normalised output; with shuffle-BN the batch is shuffled across the ranks (or
        the BN groups) on the way in and unshuffled on the way out, by the plan this step draws."""
        if not self.shuffle_keys:
            return F.normalize(self._key_encoder(x), dim=1)
        plan = shuffle.plan_for_step(self.shuffle_seed, step, x.shape[0], x.device)
        k = self._key_encoder(shuffle.shuffle(x, plan))
        return F.normalize(shuffle.unshuffle(k, plan), dim=1)

    def _key_encoder(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder_k(x.contiguous(memory_format=torch.channels_last) if self.key_channels_last else x)

    def contrast(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """InfoNCE of the queries against their keys, in fp32: v1/v2 with the queue's keys as negatives; v3
        with the keys of the whole global batch, each query's own key the positive. Returns (loss, inst_acc)."""
        with torch.autocast(q.device.type, enabled=False):
            q, k = F.normalize(q.float(), dim=1), k.float()
            if self.queue is not None:
                return self.queue.info_nce(q, k, self.temperature)
            return in_batch_info_nce(q, all_gather_concat(k), q.shape[0] * rank(), self.temperature)

    def forward(self, view1: torch.Tensor, view2: torch.Tensor, step: int) -> MocoOutput:
        if self.version == "v3":  # symmetrised: each view's query against the other view's key
            q1, q2 = self.encode_queries(view1), self.encode_queries(view2)
            k1, k2 = self.encode_keys(view1, step), self.encode_keys(view2, step)
            (loss_12, acc_12), (loss_21, acc_21) = self.contrast(q1, k2), self.contrast(q2, k1)
            return MocoOutput(loss_12 + loss_21, (acc_12 + acc_21) / 2)
        q = self.encode_queries(view1)
        k = self.encode_keys(view2, step)
        loss, inst_acc = self.contrast(q, k)
        self.queue.enqueue(k)
        return MocoOutput(loss, inst_acc)
