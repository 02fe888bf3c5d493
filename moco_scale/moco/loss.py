"""InfoNCE, as the papers write it: pure functions of L2-normalised queries and keys.

MoCo v1/v2 score each query against its positive key and the K queued negatives (label 0);
MoCo v3 scores each query against every key of the global batch, its own key the positive, and
scales the loss by 2T. Each function returns the loss and the instance-discrimination accuracy
(how often the positive logit is the largest).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy over the candidates (in fp32), and the instance-discrimination accuracy."""
    logits = logits.float()
    accuracy = (logits.argmax(dim=1) == labels).float().mean()
    return F.cross_entropy(logits, labels), accuracy


def queue_info_nce(
    q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """v1/v2: logits ``[q.k, q.negatives] / T`` with the positive at index 0; ``negatives`` is (K, dim)."""
    positive = (q * k).sum(dim=1, keepdim=True)
    logits = torch.cat([positive, q @ negatives.T], dim=1) / temperature
    return info_nce(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


def in_batch_info_nce(
    q: torch.Tensor, keys: torch.Tensor, first_label: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """v3: ``q`` against all ``keys`` of the global batch; query i's positive is key ``first_label + i``.
    The loss is multiplied by 2T, as in MoCo v3."""
    logits = q @ keys.T / temperature
    labels = torch.arange(q.shape[0], device=q.device) + first_label
    loss, accuracy = info_nce(logits, labels)
    return loss * 2 * temperature, accuracy
