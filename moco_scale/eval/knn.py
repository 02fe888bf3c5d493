"""The weighted kNN monitor of fb/moco's colab notebook, memory-bounded and distributed.

A query's k nearest bank features by cosine similarity vote for their labels with weights
``exp(similarity / T)``; the class with the largest sum wins. The weights are computed as
``exp((similarity - the query's largest) / T)``, the same votes scaled by one factor per query, which
leaves the winner unchanged and cannot overflow (plain ``exp(1 / T)`` is inf in fp32 below T = 0.0113).
Queries are processed ``chunk`` at a time against ``bank_chunk`` bank rows at a time, keeping a
running top-k, so the similarity matrix in memory is at most ``chunk x (k + bank_chunk)``, on the
bank's device (the GPU when there is one).

Distributed, each rank keeps only its own share of the bank (N / W rows), and the queries of all
ranks are gathered: every rank finds the k nearest of each query in its share, the candidates of
all ranks are gathered and merged, and every rank computes the same votes, so the accuracy is the
same on every rank. Per rank that holds N / W bank rows and all Q queries in fp32: for ImageNet with
a ResNet-50 (2,048-d) on 8 GPUs, 1.3 GB of bank and 0.4 GB of queries, freed after the call.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moco_scale.config import EvalConfig
from moco_scale.data.labelled import eval_loader
from moco_scale.distributed.comm import all_gather_concat, world_size


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows in rank order; ranks may hold different numbers of rows (even none)."""
    if world_size() == 1:
        return tensor
    shapes = all_gather_concat(torch.tensor([list(tensor.shape)], device=tensor.device))
    rows, widths = shapes[:, 0].tolist(), shapes[:, 1:].amax(0).tolist()
    padded = tensor.new_zeros((max(rows), *widths))
    if tensor.numel():
        padded[: tensor.shape[0]] = tensor
    gathered = all_gather_concat(padded).view(len(rows), max(rows), *widths)
    return torch.cat([gathered[r, :n] for r, n in enumerate(rows)])


def extract_features(
    backbone: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    gather: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised fp32 features and labels of ``batches``, on ``device``, gathered from all ranks in rank
    order when ``gather`` and a process group is initialised.

    The backbone runs in eval mode (BN uses its running statistics) without gradients, and gets its
    train/eval mode back afterwards.
    """
    was_training = backbone.training
    backbone.eval()
    features, labels = [], []
    try:
        with torch.no_grad():
            for images, batch_labels in batches:
                features.append(F.normalize(backbone(images.to(device, non_blocking=True)).float(), dim=1))
                labels.append(batch_labels.to(device, torch.long))
    finally:
        backbone.train(was_training)
    local_features = torch.cat(features) if features else torch.zeros(0, 0, device=device)
    local_labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=device)
    if gather and dist.is_initialized():
        return gather_rows(local_features), gather_rows(local_labels[:, None])[:, 0]
    return local_features, local_labels


def _nearest(
    queries: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, k: int, bank_chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Similarities and labels of each query's (up to) ``k`` nearest bank rows: a running top-k over bank chunks."""
    sims = queries.new_empty(len(queries), 0)
    labels = bank_labels.new_empty(len(queries), 0)
    for start in range(0, len(bank), bank_chunk):
        chunk_sims = queries @ bank[start : start + bank_chunk].T
        chunk_labels = bank_labels[start : start + bank_chunk].expand(len(queries), -1)
        sims, labels = torch.cat([sims, chunk_sims], 1), torch.cat([labels, chunk_labels], 1)
        sims, index = sims.topk(min(k, sims.shape[1]), dim=1)
        labels = labels.gather(1, index)
    return sims, labels


def _merge_across_ranks(sims: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest among every rank's candidates for the same queries (identical on every rank)."""
    padded_sims = sims.new_full((len(sims), k), float("-inf"))
    padded_labels = labels.new_zeros((len(labels), k))
    padded_sims[:, : sims.shape[1]], padded_labels[:, : labels.shape[1]] = sims, labels
    ranks = world_size()
    all_sims = all_gather_concat(padded_sims).view(ranks, len(sims), k).permute(1, 0, 2).reshape(len(sims), -1)
    all_labels = all_gather_concat(padded_labels).view(ranks, len(sims), k).permute(1, 0, 2).reshape(len(sims), -1)
    top_sims, index = all_sims.topk(k, dim=1)
    return top_sims, all_labels.gather(1, index)


Labelled = tuple[torch.Tensor, torch.Tensor]  # normalised features and their labels, as extract_features gives


def knn_predict(
    bank: Labelled,
    queries: torch.Tensor,
    num_classes: int,
    *,
    k: int = 200,
    temperature: float = 0.1,
    chunk: int = 256,
    bank_chunk: int = 65536,
    sharded_bank: bool = False,
) -> torch.Tensor:
    """Weighted-kNN class of each query (normalised features), computed on the bank's device.

    With ``sharded_bank`` every rank passes its own share of the bank and the same queries.
    """
    features, labels_of_bank = bank
    bank_size = len(features)
    if sharded_bank:
        bank_size = int(all_gather_concat(torch.tensor([bank_size], device=features.device)).sum())
    if bank_size == 0:
        raise ValueError("the kNN feature bank is empty")
    k = min(k, bank_size)
    predictions = []
    for start in range(0, len(queries), chunk):
        batch = queries[start : start + chunk].to(features.device)
        sims, labels = _nearest(batch, features, labels_of_bank, k, bank_chunk)
        if sharded_bank:
            sims, labels = _merge_across_ranks(sims, labels, k)
        weights = ((sims - sims.amax(1, keepdim=True)) / temperature).exp()
        votes = sims.new_zeros(len(batch), num_classes).scatter_add_(1, labels, weights)
        predictions.append(votes.argmax(1))
    return torch.cat(predictions) if predictions else labels_of_bank.new_zeros(0)


def knn_top1(
    bank: Labelled,
    queries: Labelled,
    num_classes: int,
    *,
    k: int = 200,
    temperature: float = 0.1,
    chunk: int = 256,
    bank_chunk: int = 65536,
    sharded_bank: bool = False,
) -> float:
    """Weighted-kNN top-1 accuracy of the labelled queries against the bank, in percent."""
    features, labels = queries
    if len(features) == 0:
        raise ValueError("no test features to classify")
    predicted = knn_predict(
        bank,
        features,
        num_classes,
        k=k,
        temperature=temperature,
        chunk=chunk,
        bank_chunk=bank_chunk,
        sharded_bank=sharded_bank,
    )
    return 100.0 * (predicted == labels.to(predicted.device)).sum().item() / len(features)


class KnnMonitor:
    """kNN top-1 of a backbone: bank from a labelled training input, queries from a held-out one, with the
    ``eval`` section's batch size, k and temperature.

    Built once (every rank, with its rank and the world size); ``monitor(backbone)`` is a collective
    call that all ranks make together and that returns the same percentage on each. The backbone's
    features are computed on the device of its parameters, in eval mode, and its mode is restored.
    """

    def __init__(
        self,
        bank_inputs: list[str],
        query_inputs: list[str],
        image_size: int,
        settings: EvalConfig,
        rank: int,
        world_size: int,
        *,
        workers: int = 0,
        pin_memory: bool = False,
    ):
        batch = settings.batch_size
        self.bank = eval_loader(bank_inputs, image_size, batch, rank, world_size, workers, pin_memory)
        self.queries = eval_loader(query_inputs, image_size, batch, rank, world_size, workers, pin_memory)
        self.sharded = world_size > 1
        self.k, self.temperature = settings.knn_k, settings.knn_temperature

    @property
    def bad_samples(self) -> int:
        """Samples of this rank's share that the last call skipped for failing to decode (bank and queries)."""
        return self.bank.bad_samples + self.queries.bad_samples

    def _label_range(self, labels: torch.Tensor) -> tuple[int, int]:
        """Smallest and largest label over all ranks."""
        extremes = torch.tensor(
            [-labels.min().item(), labels.max().item()] if len(labels) else [0, 0], device=labels.device
        )
        if self.sharded:
            dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
        return -int(extremes[0]), int(extremes[1])

    def __call__(self, backbone: nn.Module) -> float:
        device = next(backbone.parameters()).device
        bank, bank_labels = extract_features(backbone, self.bank, device, gather=False)
        queries, query_labels = extract_features(backbone, self.queries, device, gather=self.sharded)
        lowest, highest = self._label_range(torch.cat([bank_labels, query_labels]))
        if lowest < 0:
            raise ValueError("the kNN monitor needs labelled samples: some have no cls")
        return knn_top1(
            (bank, bank_labels),
            (queries, query_labels),
            highest + 1,
            k=self.k,
            temperature=self.temperature,
            sharded_bank=self.sharded,
        )
