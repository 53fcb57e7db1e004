"""Foal-Net (Li et al., Interspeech 2024): alignment before fusion (AVEL), cross-attention fusion,
and emotion-label matching (MEM), in the order data flows through them.

    audio, frames -> encoders -> per-modality projection -> AVEL (pooled, L2-normalised)
                  -> a2v / v2a cross-attention stacks -> masked mean pool -> fused classifier
                                                                          -> MEM heads (a2v, v2a)
                  -> audio-only / video-only heads

`forward` gives the six contract outputs (service/contract.py); `loss` is the training entry.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model_export.encoders import LiteAudioConfig, LiteVideoConfig, build_encoders, masked_mean
from service.contract import (
    LITE_SPEC,
    OUTPUT_AUDIO_PROBS,
    OUTPUT_MATCH_A2V,
    OUTPUT_MATCH_V2A,
    OUTPUT_PROBS,
    OUTPUT_SIMILARITY,
    OUTPUT_VIDEO_PROBS,
    PAPER_SPEC,
    ModelSpec,
)

TEMPERATURE_MIN, TEMPERATURE_MAX = 0.01, 1.0  # clamp of the learnable AVEL temperature


@dataclass
class FoalNetConfig:
    encoders: Literal["lite", "paper"] = "lite"
    spec: ModelSpec = LITE_SPEC
    dim: int = 128  # projection / attention width (paper: 512)
    heads: int = 4
    layers: int = 2
    dropout: float = 0.1  # projection and attention dropout (paper projection: 0.5)
    avel: bool = True
    mem: bool = True
    mem_weight: float = 0.1
    temperature_init: float = 0.07
    audio_encoder_dir: str | None = None  # paper: local WavLM directory
    video_encoder_dir: str | None = None  # paper: local CLIP directory
    lite_audio: LiteAudioConfig = field(default_factory=LiteAudioConfig)
    lite_video: LiteVideoConfig = field(default_factory=LiteVideoConfig)

    @property
    def num_classes(self) -> int:
        return len(self.spec.labels)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/pickle-able dict (what checkpoints store)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FoalNetConfig:
        data = dict(data)
        spec = data.get("spec", LITE_SPEC)
        if isinstance(spec, dict):
            spec = ModelSpec(**{**spec, "labels": tuple(spec["labels"])})
        data["spec"] = spec
        for key, sub in (("lite_audio", LiteAudioConfig), ("lite_video", LiteVideoConfig)):
            value = data.get(key)
            if isinstance(value, dict):
                data[key] = sub(**{k: tuple(v) if isinstance(v, list) else v for k, v in value.items()})
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def paper_config(audio_encoder_dir: str, video_encoder_dir: str, **overrides: Any) -> FoalNetConfig:
    """The paper's settings: WavLM + CLIP, 512-d, projection dropout 0.5, IEMOCAP labels."""
    base = {"encoders": "paper", "spec": PAPER_SPEC, "dim": 512, "dropout": 0.5}
    return FoalNetConfig(
        audio_encoder_dir=audio_encoder_dir, video_encoder_dir=video_encoder_dir, **{**base, **overrides}
    )


class Projection(nn.Module):
    """Linear -> GELU -> Linear -> Dropout, residual around the last three, LayerNorm (per token)."""

    def __init__(self, d_in: int, dim: int, dropout: float):
        super().__init__()
        self.proj = nn.Linear(d_in, dim)
        self.fc = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        p = self.proj(x)
        return self.norm(p + self.drop(self.fc(F.gelu(p))))


class CrossAttention(nn.Module):
    """Multi-head attention of queries over keys/values, safe when a row has no valid key."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        assert dim % heads == 0, "dim must be divisible by heads"
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, kv: Tensor, kv_mask: Tensor) -> Tensor:
        b, tq, d = x.shape
        tk, h = kv.shape[1], self.heads
        q = self.q(x).view(b, tq, h, d // h).transpose(1, 2)
        k = self.k(kv).view(b, tk, h, d // h).transpose(1, 2)
        v = self.v(kv).view(b, tk, h, d // h).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2)) * self.scale
        # A finite fill keeps softmax NaN-free when every key is masked; such rows are zeroed below.
        scores = scores.masked_fill(~kv_mask[:, None, None, :], torch.finfo(scores.dtype).min)
        attn = self.drop(scores.softmax(-1))
        out = (attn @ v).transpose(1, 2).reshape(b, tq, d)
        has_key = kv_mask.any(1).to(out.dtype)[:, None, None]
        return self.o(out) * has_key


class CrossAttentionStack(nn.Module):
    """`layers` x (cross-attention, residual, post-LayerNorm); no feed-forward, as in the paper."""

    def __init__(self, dim: int, heads: int, layers: int, dropout: float):
        super().__init__()
        self.attn = nn.ModuleList(CrossAttention(dim, heads, dropout) for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers))

    def forward(self, x: Tensor, x_mask: Tensor, kv: Tensor, kv_mask: Tensor) -> Tensor:
        """Pooled [B, dim] over the valid query positions."""
        for attn, norm in zip(self.attn, self.norms, strict=True):
            x = norm(x + attn(x, kv, kv_mask))
        return masked_mean(x, x_mask)


class MatchHead(nn.Module):
    """MEM's 2-way head (no match / match) on a stack's pooled output. One hidden layer: "same
    emotion" is a product of the two modalities' evidence, which a linear read-out of the pooled
    stack could not learn (it stayed at chance, AUC ~0.5, in our runs); this one does."""

    def __init__(self, dim: int):
        super().__init__()
        self.hidden = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(F.gelu(self.hidden(x)))


@dataclass
class Encoded:
    """Per-modality projected tokens, masks, pooled L2-normalised embeddings and presence flags."""

    pa: Tensor  # [B, da] pooled encoder tokens: what the audio-only head reads
    pv: Tensor  # [B, dv] pooled encoder tokens: what the video-only head reads
    a: Tensor  # [B, Ta, dim]
    a_mask: Tensor  # [B, Ta]
    v: Tensor  # [B, Tv, dim]
    v_mask: Tensor  # [B, Tv]
    za: Tensor  # [B, dim] unit norm (zero when audio is missing)
    zv: Tensor  # [B, dim]
    has_a: Tensor  # bool [B]
    has_v: Tensor  # bool [B]


class FoalNet(nn.Module):
    def __init__(self, cfg: FoalNetConfig):
        super().__init__()
        self.cfg = cfg
        k = cfg.num_classes
        self.audio_encoder, self.video_encoder = build_encoders(
            cfg.encoders,
            cfg.spec,
            cfg.lite_audio,
            cfg.lite_video,
            cfg.audio_encoder_dir,
            cfg.video_encoder_dir,
        )
        self.audio_proj = Projection(self.audio_encoder.dim, cfg.dim, cfg.dropout)
        self.video_proj = Projection(self.video_encoder.dim, cfg.dim, cfg.dropout)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(cfg.temperature_init)))
        self.a2v = CrossAttentionStack(cfg.dim, cfg.heads, cfg.layers, cfg.dropout)
        self.v2a = CrossAttentionStack(cfg.dim, cfg.heads, cfg.layers, cfg.dropout)
        self.classifier = nn.Linear(2 * cfg.dim, k)
        self.mem_a2v = MatchHead(cfg.dim)
        self.mem_v2a = MatchHead(cfg.dim)
        # The unimodal views read the encoders directly, before alignment and fusion, so training
        # those (the fusion stage) never changes what each modality says on its own.
        self.audio_head = nn.Linear(self.audio_encoder.dim, k)
        self.video_head = nn.Linear(self.video_encoder.dim, k)

    @property
    def temperature(self) -> Tensor:
        return self.log_temperature.exp().clamp(TEMPERATURE_MIN, TEMPERATURE_MAX)

    def encode(self, audio: Tensor, audio_len: Tensor, frames: Tensor, frames_len: Tensor) -> Encoded:
        a, a_mask = self.audio_encoder(audio, audio_len)
        v, v_mask = self.video_encoder(frames, frames_len)
        pa, pv = masked_mean(a, a_mask), masked_mean(v, v_mask)
        a, v = self.audio_proj(a), self.video_proj(v)
        za = F.normalize(masked_mean(a, a_mask), dim=-1)
        zv = F.normalize(masked_mean(v, v_mask), dim=-1)
        return Encoded(pa, pv, a, a_mask, v, v_mask, za, zv, a_mask.any(1), v_mask.any(1))

    def heads(self, e: Encoded) -> dict[str, Tensor]:
        """Logits of every head for the batch's own audio/video pairs."""
        fa = self.a2v(e.a, e.a_mask, e.v, e.v_mask)
        fv = self.v2a(e.v, e.v_mask, e.a, e.a_mask)
        return {
            "fused": self.classifier(torch.cat([fa, fv], dim=-1)),
            "audio": self.audio_head(e.pa),
            "video": self.video_head(e.pv),
            "mem_a2v": self.mem_a2v(fa),
            "mem_v2a": self.mem_v2a(fv),
        }

    def forward(
        self, audio: Tensor, audio_len: Tensor, frames: Tensor, frames_len: Tensor
    ) -> dict[str, Tensor]:
        """The six contract outputs, keyed by their contract names."""
        e = self.encode(audio, audio_len, frames, frames_len)
        logits = self.heads(e)
        return {
            OUTPUT_PROBS: logits["fused"].softmax(-1),
            OUTPUT_AUDIO_PROBS: logits["audio"].softmax(-1),
            OUTPUT_VIDEO_PROBS: logits["video"].softmax(-1),
            OUTPUT_SIMILARITY: (e.za * e.zv).sum(-1),
            OUTPUT_MATCH_A2V: logits["mem_a2v"].softmax(-1)[:, 1],
            OUTPUT_MATCH_V2A: logits["mem_v2a"].softmax(-1)[:, 1],
        }

    def loss(
        self, audio: Tensor, audio_len: Tensor, frames: Tensor, frames_len: Tensor, labels: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Total = CE_fused + CE_audio + CE_video (+ AVEL) (+ mem_weight * MEM); parts for logging.

        Unimodal CEs count only samples that have that modality; AVEL and MEM only samples with both.
        """
        e = self.encode(audio, audio_len, frames, frames_len)
        logits = self.heads(e)
        parts = {
            "ce": F.cross_entropy(logits["fused"], labels),
            "ce_audio": masked_cross_entropy(logits["audio"], labels, e.has_a),
            "ce_video": masked_cross_entropy(logits["video"], labels, e.has_v),
        }
        total = parts["ce"] + parts["ce_audio"] + parts["ce_video"]
        both = e.has_a & e.has_v
        if self.cfg.avel:
            parts["avel"] = avel_loss(e.za[both], e.zv[both], labels[both], self.temperature)
            total = total + parts["avel"]
        if self.cfg.mem:
            parts["mem"] = self.mem_loss(e, logits, labels, both)
            total = total + self.cfg.mem_weight * parts["mem"]
        parts["temperature"] = self.temperature.detach()
        return total, parts

    def mem_loss(self, e: Encoded, logits: dict[str, Tensor], labels: Tensor, both: Tensor) -> Tensor:
        """2-way CE over own pairs (match) and hard different-label pairs (no match), both directions."""
        sim = (e.za @ e.zv.T).detach() / self.temperature  # [B, B], row i: audio i vs video j
        a2v_neg = sample_negatives(sim, labels, both)  # video partner for each audio anchor
        v2a_neg = sample_negatives(sim.T, labels, both)  # audio partner for each video anchor
        ones = torch.ones_like(labels)
        losses = []
        for own, neg, stack, head, q, qm, kv, kvm in (
            (logits["mem_a2v"], a2v_neg, self.a2v, self.mem_a2v, e.a, e.a_mask, e.v, e.v_mask),
            (logits["mem_v2a"], v2a_neg, self.v2a, self.mem_v2a, e.v, e.v_mask, e.a, e.a_mask),
        ):
            anchors = (neg >= 0).nonzero().squeeze(1)
            partners = neg[anchors]
            neg_logits = head(stack(q[anchors], qm[anchors], kv[partners], kvm[partners]))
            all_logits = torch.cat([own[both], neg_logits])
            targets = torch.cat([ones[both], torch.zeros_like(partners)])
            losses.append(F.cross_entropy(all_logits, targets) if len(targets) else own.sum() * 0.0)
        return (losses[0] + losses[1]) / 2


def masked_cross_entropy(logits: Tensor, labels: Tensor, keep: Tensor) -> Tensor:
    """Mean CE over rows where keep; zero (with a graph) when no row is kept."""
    per_row = F.cross_entropy(logits, labels, reduction="none") * keep.to(logits.dtype)
    return per_row.sum() / keep.sum().clamp_min(1)


def avel_targets(labels: Tensor) -> Tensor:
    """Emotion-aware targets [B, B]: every same-label pair is a positive; rows sum to 1."""
    same = (labels[:, None] == labels[None, :]).float()
    return same / same.sum(1, keepdim=True)


def avel_loss(za: Tensor, zv: Tensor, labels: Tensor, temperature: Tensor) -> Tensor:
    """Mean over both directions of -sum(target * log_softmax(S / tau)) on unit embeddings."""
    if len(labels) == 0:
        return temperature * 0.0
    sim = za @ zv.T / temperature
    targets = avel_targets(labels)
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


def save_checkpoint(model: FoalNet, path: str | Path, **extra: Any) -> Path:
    """`{"config": cfg.to_dict(), "state_dict": ..., **extra}`, the format `foalnet export` reads."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": model.cfg.to_dict(), "state_dict": model.state_dict(), **extra}, path)
    return path


def load_checkpoint(path: str | Path, *, map_location: str = "cpu") -> FoalNet:
    """Rebuild a FoalNet from a checkpoint written by `save_checkpoint`, in eval mode."""
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    model = FoalNet(FoalNetConfig.from_dict(ckpt["config"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()
