"""Foal-Net (Li et al., Interspeech 2024): alignment before fusion (AVEL), cross-attention fusion,
and emotion-label matching (MEM), in the order data flows through them.

    audio, frames -> encoders -> AVEL embeddings (projection + masked pool, L2-normalised)
                  -> a2v / v2a cross-attention stacks -> masked mean pool -> fused classifier
                                                                          -> MEM heads (a2v, v2a)
                  -> audio-only / video-only heads

Two configurations share this code. `paper_config()` is the released Foal-Net: pool then project
(no bias) for AVEL, fusion on the raw encoder sequences, binary AVEL targets, a learnable temperature
the logits are divided by, dropout on the attention output, linear MEM heads, loss CE + AVEL + λ·MEM.
The lite defaults keep the measured deviations of the shipped model (see docs/model.md, "fidelity").
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
from model_export.losses import avel_loss, masked_cross_entropy, sample_negatives
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

TEMPERATURE_MIN, TEMPERATURE_MAX = 0.01, 1.0  # clamp of the learnable CLIP-style temperature
PAPER_TEMPERATURE_INIT = math.log(1 / 0.07)  # ≈ 2.66: the released code's τ, divided by, unclamped


CHOICES: dict[str, tuple[str, ...]] = {  # the values of FoalNetConfig's string switches
    "fusion_on": ("raw", "projected"),
    "avel_targets": ("binary", "normalised"),
    "temperature": ("paper", "clip"),
    "attention_dropout_on": ("output", "weights"),
    "mem_head": ("linear", "mlp"),
}


@dataclass
class FoalNetConfig:
    """Every default is the lite model's; `paper_config()` sets the released Foal-Net's values."""

    encoders: Literal["lite", "paper"] = "lite"
    spec: ModelSpec = LITE_SPEC
    dim: int = 128  # AVEL projection width (and the lite fusion width); paper: 512
    heads: int = 4
    layers: int = 2
    dropout: float = 0.1  # projection dropout (and attention dropout unless attention_dropout is set)
    avel: bool = True
    mem: bool = True
    mem_weight: float = 0.1  # λ of MEM in the loss
    temperature_init: float = 0.07
    audio_encoder_dir: str | None = None  # paper: local WavLM directory
    video_encoder_dir: str | None = None  # paper: local CLIP directory
    lite_audio: LiteAudioConfig = field(default_factory=LiteAudioConfig)
    lite_video: LiteVideoConfig = field(default_factory=LiteVideoConfig)
    # Structure switches: lite default first, the released code's value in paper_config().
    pool_then_project: bool = False  # AVEL: project every token then pool / pool then project
    projection_bias: bool = True  # the projection's two linears have a bias (paper: none)
    fusion_on: Literal["raw", "projected"] = "projected"  # what the cross-attention stacks read
    avel_targets: Literal["binary", "normalised"] = "normalised"  # rows of same-label ones, or / count
    temperature: Literal["paper", "clip"] = "clip"  # paper: S / τ, τ learnable from 2.66, unclamped;
    # clip: S / exp(log τ) clamped to [TEMPERATURE_MIN, TEMPERATURE_MAX] from 0.07
    attention_dropout: float | None = None  # None: `dropout`; paper: 0.1
    attention_dropout_on: Literal["output", "weights"] = "weights"  # paper: after the output linear
    unimodal_ce: bool = True  # False: the audio/video heads learn on detached features (no gradient
    # into the encoders), so the shared model is trained by CE + AVEL + λ·MEM only, as in the paper
    mem_head: Literal["linear", "mlp"] = "mlp"  # paper: Linear(d -> 2)
    feature_dropout: float = 0.0  # on encoder tokens and the classifier input (paper: 0.1)

    def __post_init__(self) -> None:
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")

    @property
    def num_classes(self) -> int:
        return len(self.spec.labels)

    @property
    def frozen_audio_backbone(self) -> bool:  # a frozen pretrained voice encoder: only its adapter trains
        return self.encoders == "lite" and self.lite_audio.backbone == "whisper"

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
        if isinstance(data.get("lite_audio"), dict):  # fields older checkpoints did not save: what they meant
            # (before silence masking, pre-2.0.0; the Whisper backbone, 2.1.0; the choice of Whisper, 2.1.1)
            before = {"mask_silence": False, "backbone": "cnn", "whisper_model": "tiny.en"}
            data["lite_audio"] = {**before, **data["lite_audio"]}
        for key, sub in (("lite_audio", LiteAudioConfig), ("lite_video", LiteVideoConfig)):
            value = data.get(key)
            if isinstance(value, dict):
                data[key] = sub(**{k: tuple(v) if isinstance(v, list) else v for k, v in value.items()})
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


PAPER_STRUCTURE: dict[str, Any] = {
    "dim": 512,
    "heads": 4,
    "layers": 2,
    "dropout": 0.5,
    "attention_dropout": 0.1,
    "mem_weight": 0.1,
    "temperature_init": PAPER_TEMPERATURE_INIT,
    "pool_then_project": True,
    "projection_bias": False,
    "fusion_on": "raw",
    "avel_targets": "binary",
    "temperature": "paper",
    "attention_dropout_on": "output",
    "unimodal_ce": False,
    "mem_head": "linear",
    "feature_dropout": 0.1,  # the released code's WavLM `final_dropout` (transformers' default)
}


def paper_config(audio_encoder_dir: str, video_encoder_dir: str, **overrides: Any) -> FoalNetConfig:
    """The released Foal-Net: WavLM + CLIP, IEMOCAP labels, PAPER_STRUCTURE; overrides are deviations."""
    base = {"encoders": "paper", "spec": PAPER_SPEC, **PAPER_STRUCTURE}
    return FoalNetConfig(
        audio_encoder_dir=audio_encoder_dir, video_encoder_dir=video_encoder_dir, **{**base, **overrides}
    )


class Projection(nn.Module):
    """Linear -> GELU -> Linear -> Dropout, residual around the last three, LayerNorm (any leading dims)."""

    def __init__(self, d_in: int, dim: int, dropout: float, bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(d_in, dim, bias=bias)
        self.fc = nn.Linear(dim, dim, bias=bias)
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        p = self.proj(x)
        return self.norm(p + self.drop(self.fc(F.gelu(p))))


class CrossAttention(nn.Module):
    """Multi-head attention of queries [.., d_q] over keys/values [.., d_kv] projected to d_q, safe
    when a row has no valid key. Dropout on the attention weights (lite) or after the output linear
    (the released code)."""

    def __init__(self, d_q: int, d_kv: int, heads: int, dropout: float, dropout_on: str = "weights"):
        super().__init__()
        assert d_q % heads == 0, "the query width must be divisible by heads"
        self.heads, self.scale = heads, (d_q // heads) ** -0.5
        self.q, self.k, self.v, self.o = (nn.Linear(d, d_q) for d in (d_q, d_kv, d_kv, d_q))
        self.drop = nn.Dropout(dropout)
        self.drop_weights = dropout_on == "weights"

    def forward(self, x: Tensor, kv: Tensor, kv_mask: Tensor) -> Tensor:
        b, tq, d = x.shape
        tk, h = kv.shape[1], self.heads
        q = self.q(x).view(b, tq, h, d // h).transpose(1, 2)
        k = self.k(kv).view(b, tk, h, d // h).transpose(1, 2)
        v = self.v(kv).view(b, tk, h, d // h).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2)) * self.scale
        # A finite fill keeps softmax NaN-free when every key is masked; such rows are zeroed below.
        scores = scores.masked_fill(~kv_mask[:, None, None, :], torch.finfo(scores.dtype).min)
        attn = scores.softmax(-1)
        if self.drop_weights:
            attn = self.drop(attn)
        out = (attn @ v).transpose(1, 2).reshape(b, tq, d)
        has_key = kv_mask.any(1).to(out.dtype)[:, None, None]
        out = self.o(out) if self.drop_weights else self.drop(self.o(out))
        return out * has_key


class CrossAttentionStack(nn.Module):
    """`layers` x (cross-attention, residual, post-LayerNorm); only the query is updated layer to layer;
    no feed-forward and no positions, as in the paper."""

    def __init__(self, d_q: int, d_kv: int, heads: int, layers: int, dropout: float, dropout_on: str):
        super().__init__()
        self.attn = nn.ModuleList(
            CrossAttention(d_q, d_kv, heads, dropout, dropout_on) for _ in range(layers)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(d_q) for _ in range(layers))

    def forward(self, x: Tensor, x_mask: Tensor, kv: Tensor, kv_mask: Tensor) -> Tensor:
        """Pooled [B, d_q] over the valid query positions."""
        for attn, norm in zip(self.attn, self.norms, strict=True):
            x = norm(x + attn(x, kv, kv_mask))
        return masked_mean(x, x_mask)


class MatchHead(nn.Module):
    """MEM's 2-way head (no match / match) on a stack's pooled output. One hidden layer: "same
    emotion" is a product of the two modalities' evidence, which a linear read-out of the pooled
    stack could not learn (it stayed at chance, AUC ~0.5, in our lite runs); this one does."""

    def __init__(self, dim: int):
        super().__init__()
        self.hidden = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(F.gelu(self.hidden(x)))


@dataclass
class Encoded:
    """What fusion reads (tokens + masks), AVEL's embeddings, pooled encoder outputs, presence flags."""

    pa: Tensor  # [B, da] pooled encoder tokens: what the audio-only head reads
    pv: Tensor  # [B, dv] pooled encoder tokens: what the video-only head reads
    a: Tensor  # [B, Ta, d] fusion input: raw encoder tokens (paper) or projected ones (lite)
    a_mask: Tensor  # [B, Ta]
    v: Tensor  # [B, Tv, d']
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
            cfg.encoders, cfg.spec, cfg.lite_audio, cfg.lite_video, cfg.audio_encoder_dir,
            cfg.video_encoder_dir,
        )
        da, dv = self.audio_encoder.dim, self.video_encoder.dim
        self.audio_proj = Projection(da, cfg.dim, cfg.dropout, cfg.projection_bias)
        self.video_proj = Projection(dv, cfg.dim, cfg.dropout, cfg.projection_bias)
        if cfg.temperature == "paper":
            self.tau = nn.Parameter(torch.tensor(float(cfg.temperature_init)))
        else:
            self.log_temperature = nn.Parameter(torch.tensor(math.log(cfg.temperature_init)))
        qa, qv = (da, dv) if cfg.fusion_on == "raw" else (cfg.dim, cfg.dim)
        attn_drop = cfg.dropout if cfg.attention_dropout is None else cfg.attention_dropout
        stack = (cfg.heads, cfg.layers, attn_drop, cfg.attention_dropout_on)
        self.a2v = CrossAttentionStack(qa, qv, *stack)  # audio queries video
        self.v2a = CrossAttentionStack(qv, qa, *stack)  # video queries audio
        self.classifier = nn.Linear(qa + qv, k)
        match_head = MatchHead if cfg.mem_head == "mlp" else (lambda d: nn.Linear(d, 2))
        self.mem_a2v, self.mem_v2a = match_head(qa), match_head(qv)
        # The unimodal views read the encoders directly, before alignment and fusion, so training
        # those (the fusion stage) never changes what each modality says on its own.
        self.audio_head = nn.Linear(da, k)
        self.video_head = nn.Linear(dv, k)
        self.feature_drop = nn.Dropout(cfg.feature_dropout) if cfg.feature_dropout else None

    @property
    def temperature(self) -> Tensor:
        if self.cfg.temperature == "paper":
            return self.tau
        return self.log_temperature.exp().clamp(TEMPERATURE_MIN, TEMPERATURE_MAX)

    def encode(self, audio: Tensor, audio_len: Tensor, frames: Tensor, frames_len: Tensor) -> Encoded:
        a, a_mask = self.audio_encoder(audio, audio_len)
        v, v_mask = self.video_encoder(frames, frames_len)
        if self.feature_drop is not None:
            a, v = self.feature_drop(a), self.feature_drop(v)
        pa, pv = masked_mean(a, a_mask), masked_mean(v, v_mask)
        a_proj = v_proj = None
        if self.cfg.pool_then_project:  # the released code: pool the raw sequence, then project it
            has_a, has_v = a_mask.any(1, keepdim=True), v_mask.any(1, keepdim=True)
            za = F.normalize(self.audio_proj(pa), dim=-1) * has_a  # zero, not LayerNorm's bias, when
            zv = F.normalize(self.video_proj(pv), dim=-1) * has_v  # the modality is missing
        else:
            a_proj, v_proj = self.audio_proj(a), self.video_proj(v)
            za = F.normalize(masked_mean(a_proj, a_mask), dim=-1)
            zv = F.normalize(masked_mean(v_proj, v_mask), dim=-1)
        if self.cfg.fusion_on == "projected":
            a = a_proj if a_proj is not None else self.audio_proj(a)
            v = v_proj if v_proj is not None else self.video_proj(v)
        return Encoded(pa, pv, a, a_mask, v, v_mask, za, zv, a_mask.any(1), v_mask.any(1))

    def heads(self, e: Encoded) -> dict[str, Tensor]:
        """Logits of every head for the batch's own audio/video pairs."""
        fa = self.a2v(e.a, e.a_mask, e.v, e.v_mask)
        fv = self.v2a(e.v, e.v_mask, e.a, e.a_mask)
        fused = torch.cat([fa, fv], dim=-1)
        if self.feature_drop is not None:
            fused = self.feature_drop(fused)
        pa, pv = (e.pa, e.pv) if self.cfg.unimodal_ce else (e.pa.detach(), e.pv.detach())
        return {
            "fused": self.classifier(fused),
            "audio": self.audio_head(pa),
            "video": self.video_head(pv),
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
        self, audio: Tensor, audio_len: Tensor, frames: Tensor, frames_len: Tensor, labels: Tensor,
        agree: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Total = CE_fused + CE_audio + CE_video (+ AVEL) (+ mem_weight * MEM); parts for logging.

        Unimodal CEs count only samples that have that modality (with `unimodal_ce` off their heads read
        detached features, so they add no gradient to the shared model); AVEL and MEM only samples with
        both. `agree` (bool [B], default all) marks the pairs whose voice and face both show the label:
        the others (one branch shown wrong on purpose) train the fused head alone.
        """
        e = self.encode(audio, audio_len, frames, frames_len)
        logits = self.heads(e)
        agree = torch.ones_like(e.has_a) if agree is None else agree
        parts = {
            "ce": F.cross_entropy(logits["fused"], labels),
            "ce_audio": masked_cross_entropy(logits["audio"], labels, e.has_a & agree),
            "ce_video": masked_cross_entropy(logits["video"], labels, e.has_v & agree),
        }
        total = parts["ce"] + parts["ce_audio"] + parts["ce_video"]
        both = e.has_a & e.has_v & agree
        if self.cfg.avel:
            normalise = self.cfg.avel_targets == "normalised"
            parts["avel"] = avel_loss(e.za[both], e.zv[both], labels[both], self.temperature, normalise)
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


def save_checkpoint(model: FoalNet, path: str | Path, **extra: Any) -> Path:
    """`{"config": cfg.to_dict(), "state_dict": ..., **extra}`, the format `foalnet export` reads."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": model.cfg.to_dict(), "state_dict": model.state_dict(), **extra}, path)
    return path


def checkpoint_config(path: str | Path) -> FoalNetConfig:  # without building the model
    return FoalNetConfig.from_dict(torch.load(path, map_location="cpu", weights_only=False)["config"])


def load_checkpoint(path: str | Path, *, map_location: str = "cpu") -> FoalNet:
    """Rebuild a FoalNet from a checkpoint written by `save_checkpoint`, in eval mode."""
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    model = FoalNet(FoalNetConfig.from_dict(ckpt["config"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()
