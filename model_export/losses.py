"""Foal-Net's training losses on plain tensors: masked CE, AVEL (emotion-aware contrastive) and MEM's
hard-negative sampling. `model.FoalNet.loss` combines them; tests pin each formula on its own."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def masked_cross_entropy(logits: Tensor, labels: Tensor, keep: Tensor) -> Tensor:
    """Mean CE over rows where keep; zero (with a graph) when no row is kept."""
    per_row = F.cross_entropy(logits, labels, reduction="none") * keep.to(logits.dtype)
    return per_row.sum() / keep.sum().clamp_min(1)


def avel_targets(labels: Tensor, normalise: bool = True) -> Tensor:
    """Emotion-aware targets [B, B]: 1 for every same-label pair. `normalise` (lite, SupCon style)
    divides each row by its count so rows sum to 1; the released Foal-Net code does not."""
    same = (labels[:, None] == labels[None, :]).float()
    return same / same.sum(1, keepdim=True) if normalise else same


def avel_loss(za: Tensor, zv: Tensor, labels: Tensor, temperature: Tensor, normalise: bool = True) -> Tensor:
    """Mean over both directions of -mean_i sum_j target_ij * log_softmax(S_i)_j, S = za zv^T / tau,
    on unit embeddings."""
    if len(labels) == 0:
        return temperature * 0.0
    sim = za @ zv.T / temperature
    targets = avel_targets(labels, normalise)
    a2v = -(targets * sim.log_softmax(1)).sum(1).mean()
    v2a = -(targets * sim.T.log_softmax(1)).sum(1).mean()
    return (a2v + v2a) / 2


def sample_negatives(sim: Tensor, labels: Tensor, valid: Tensor) -> Tensor:
    """For each anchor row i, a partner j with labels[j] != labels[i] (both valid), drawn with
    probability softmax(sim[i]) over those candidates; -1 where the anchor has none."""
    allowed = (labels[:, None] != labels[None, :]) & valid[:, None] & valid[None, :]
    has = allowed.any(1)
    probs = sim.masked_fill(~allowed, float("-inf"))
    probs = torch.where(has[:, None], probs, torch.zeros_like(probs)).softmax(1)
    picks = torch.multinomial(probs, 1).squeeze(1)
    return torch.where(has, picks, torch.full_like(picks, -1))
