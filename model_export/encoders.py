"""Modality encoders: each maps a contract input to tokens [B, T, d] and a valid mask [B, T].

`lite` encoders are small and trained here (log-mel CNN for speech, VGG-ish CNN for 48 px face
crops); all preprocessing (gain normalisation, log-mel, per-utterance / per-image standardisation)
runs inside the graph with exportable ops, so the ONNX file takes raw samples and uint8 pixels.
`paper` encoders wrap `transformers` WavLM and CLIP loaded from local directories (never downloaded).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from service.contract import SAMPLE_RATE, ModelSpec

# Log-mel front end of the lite audio encoder (25 ms window, 10 ms hop at 16 kHz).
N_FFT = 400
HOP = 160
N_MELS = 64
TARGET_RMS = 0.1  # every utterance is scaled to this RMS over its valid samples
EPS = 1e-5

# CLIP's pixel statistics (openai/clip-vit-*), applied inside the paper graph.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class LiteAudioConfig:
    widths: tuple[int, ...] = (16, 32, 64)  # channels of the conv blocks; each block halves T and mels
    n_mels: int = N_MELS
    dim: int = 128  # token width out of the encoder
    dropout: float = 0.1
    spec_time_masks: int = 2  # SpecAugment masks, active only in training
    spec_time_width: int = 40  # frames (0.4 s)
    spec_freq_masks: int = 2
    spec_freq_width: int = 8  # mel bins


@dataclass
class LiteVideoConfig:
    # Sized for the latency budget (one 8-frame window <= 10 ms on 2 CPU threads, ~250 MMAC):
    # the parameters sit in the flatten -> Linear head, which costs almost no compute.
    widths: tuple[int, ...] = (24, 48, 96, 192)  # channels per VGG block; each block halves H and W
    convs_per_block: tuple[int, ...] = (1, 1, 2, 1)
    dim: int = 256  # token width (per frame) out of the encoder
    dropout: float = 0.3


def lengths_to_mask(lengths: Tensor, size: int) -> Tensor:
    """[B] valid counts -> bool [B, size] with True on valid positions."""
    return torch.arange(size, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean over axis 1 of x [B, T, d] where mask [B, T]; zero (not NaN) when nothing is valid."""
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


def mel_filterbank(
    n_mels: int, n_fft: int, sample_rate: int, fmin: float = 0.0, fmax: float | None = None
) -> np.ndarray:
    """Triangular HTK-mel filters [n_mels, n_fft // 2 + 1], area-normalised (Slaney)."""
    fmax = fmax or sample_rate / 2

    def hz_to_mel(f: np.ndarray) -> np.ndarray:
        return 2595.0 * np.log10(1.0 + f / 700.0)

    def mel_to_hz(m: np.ndarray) -> np.ndarray:
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)

    fft_freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(np.array(fmin)), hz_to_mel(np.array(fmax)), n_mels + 2))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (fft_freqs[None] - lower) / (centre - lower)
    falling = (upper - fft_freqs[None]) / (upper - centre)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    return (weights * (2.0 / (upper - lower))).astype(np.float32)


class LogMel(nn.Module):
    """Gain-normalised waveform -> log-mel [B, n_mels, T] using conv1d with a fixed DFT basis."""

    def __init__(
        self, n_fft: int = N_FFT, hop: int = HOP, n_mels: int = N_MELS, sample_rate: int = SAMPLE_RATE
    ):
        super().__init__()
        self.n_fft, self.hop = n_fft, hop
        n = torch.arange(n_fft, dtype=torch.float64)
        k = torch.arange(n_fft // 2 + 1, dtype=torch.float64).unsqueeze(1)
        window = torch.hann_window(n_fft, periodic=True, dtype=torch.float64)
        angle = 2 * math.pi * k * n / n_fft
        basis = torch.cat([torch.cos(angle) * window, -torch.sin(angle) * window])  # [2 * bins, n_fft]
        self.register_buffer("dft", basis.float().unsqueeze(1), persistent=False)
        self.register_buffer(
            "mel", torch.from_numpy(mel_filterbank(n_mels, n_fft, sample_rate)), persistent=False
        )

    def frame_lengths(self, audio_len: Tensor, frames: int) -> Tensor:
        """Frames whose window starts inside the valid samples."""
        return ((audio_len + self.hop - 1) // self.hop).clamp(0, frames)

    def forward(self, audio: Tensor, audio_len: Tensor) -> tuple[Tensor, Tensor]:
        valid = lengths_to_mask(audio_len, audio.shape[1]).to(audio.dtype)
        x = audio * valid  # padding content never reaches the model
        rms = ((x * x).sum(1, keepdim=True) / valid.sum(1, keepdim=True).clamp_min(1.0)).sqrt()
        x = x * (TARGET_RMS / (rms + EPS))
        spec = F.conv1d(x.unsqueeze(1), self.dft, stride=self.hop)  # [B, 2 * bins, T]
        re, im = spec.chunk(2, dim=1)
        power = re * re + im * im
        logmel = torch.log(torch.matmul(self.mel, power) + 1e-6)  # [B, n_mels, T]
        frame_len = self.frame_lengths(audio_len, logmel.shape[-1])
        return logmel, frame_len


def normalise_utterance(logmel: Tensor, frame_len: Tensor) -> Tensor:
    """Per-utterance, per-mel-bin mean/variance normalisation over valid frames; padding -> 0."""
    mask = lengths_to_mask(frame_len, logmel.shape[-1]).to(logmel.dtype).unsqueeze(1)  # [B, 1, T]
    count = mask.sum(-1, keepdim=True).clamp_min(1.0)
    mean = (logmel * mask).sum(-1, keepdim=True) / count
    var = (((logmel - mean) * mask) ** 2).sum(-1, keepdim=True) / count
    return (logmel - mean) / (var + EPS).sqrt() * mask


def spec_augment(x: Tensor, frame_len: Tensor, cfg: LiteAudioConfig) -> Tensor:
    """Zero random time and mel bands of x [B, n_mels, T] (training only)."""
    b, n_mels, t = x.shape
    keep = torch.ones_like(x)
    pos_t = torch.arange(t, device=x.device)
    pos_f = torch.arange(n_mels, device=x.device)
    for _ in range(cfg.spec_time_masks):
        width = torch.randint(0, cfg.spec_time_width + 1, (b, 1), device=x.device)
        start = (torch.rand(b, 1, device=x.device) * (frame_len.unsqueeze(1) - width).clamp_min(0)).long()
        keep = keep * ~((pos_t >= start) & (pos_t < start + width)).unsqueeze(1)
    for _ in range(cfg.spec_freq_masks):
        width = torch.randint(0, cfg.spec_freq_width + 1, (b, 1), device=x.device)
        start = (torch.rand(b, 1, device=x.device) * (n_mels - width)).long()
        keep = keep * ~((pos_f >= start) & (pos_f < start + width)).unsqueeze(-1)
    return x * keep


def conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
    )


class LiteAudioEncoder(nn.Module):
    """Raw 16 kHz samples -> log-mel -> conv blocks (each halves time and mels) -> time tokens."""

    def __init__(self, cfg: LiteAudioConfig):
        super().__init__()
        self.cfg = cfg
        self.logmel = LogMel(n_mels=cfg.n_mels)
        blocks, c_in = [], 1
        for width in cfg.widths:
            blocks += [conv_bn(c_in, width), nn.MaxPool2d(2)]
            c_in = width
        self.cnn = nn.Sequential(*blocks)
        self.stride = 2 ** len(cfg.widths)
        mels_out = cfg.n_mels // self.stride
        self.out = nn.Sequential(
            nn.Dropout(cfg.dropout), nn.Linear(c_in * mels_out, cfg.dim), nn.ReLU(inplace=True)
        )
        self.dim = cfg.dim

    def forward(self, audio: Tensor, audio_len: Tensor) -> tuple[Tensor, Tensor]:
        logmel, frame_len = self.logmel(audio, audio_len)
        x = normalise_utterance(logmel, frame_len)
        if self.training and (self.cfg.spec_time_masks or self.cfg.spec_freq_masks):
            x = spec_augment(x, frame_len, self.cfg)
        x = self.cnn(x.unsqueeze(1))  # [B, C, mels', T']
        b, c, m, t = x.shape
        tokens = self.out(x.permute(0, 3, 1, 2).reshape(b, t, c * m))
        token_len = ((frame_len + self.stride - 1) // self.stride).clamp(0, t)
        return tokens, lengths_to_mask(token_len, t)


class LiteVideoEncoder(nn.Module):
    """uint8 face crops [B, F, H, W, 1] -> per-image standardisation -> shared VGG-ish CNN -> frame tokens."""

    def __init__(self, cfg: LiteVideoConfig, frame_size: int, channels: int):
        super().__init__()
        layers, c_in = [], channels
        for width, convs in zip(cfg.widths, cfg.convs_per_block, strict=True):
            for _ in range(convs):
                layers.append(conv_bn(c_in, width))
                c_in = width
            layers.append(nn.MaxPool2d(2))
        self.cnn = nn.Sequential(*layers)
        side = frame_size // 2 ** len(cfg.widths)
        self.out = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(cfg.dropout),
            nn.Linear(c_in * side * side, cfg.dim),
            nn.ReLU(inplace=True),
        )
        self.dim = cfg.dim

    def embed_images(self, images: Tensor) -> Tensor:
        """uint8 [N, H, W, C] -> [N, dim]; also what a FER-only pre-training loop calls."""
        x = images.permute(0, 3, 1, 2).float() / 255.0
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        std = x.std(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) / (std + 1e-3)
        return self.out(self.cnn(x))

    def forward(self, frames: Tensor, frames_len: Tensor) -> tuple[Tensor, Tensor]:
        b, f = frames.shape[:2]
        tokens = self.embed_images(frames.flatten(0, 1)).reshape(b, f, -1)
        return tokens, lengths_to_mask(frames_len, f)


class WavLMEncoder(nn.Module):
    """transformers WavLM from a local directory; conv feature encoder frozen, the rest trainable."""

    def __init__(self, model_dir: str):
        super().__init__()
        from transformers import WavLMModel

        self.wavlm = WavLMModel.from_pretrained(model_dir, local_files_only=True)
        self.wavlm.freeze_feature_encoder()
        # Large checkpoints (layer-norm feature extractor) take an attention mask; base ones must not.
        self.use_mask = self.wavlm.config.feat_extract_norm == "layer"
        self.dim = self.wavlm.config.hidden_size

    def forward(self, audio: Tensor, audio_len: Tensor) -> tuple[Tensor, Tensor]:
        valid = lengths_to_mask(audio_len, audio.shape[1])
        v = valid.to(audio.dtype)
        count = v.sum(1, keepdim=True).clamp_min(1.0)
        mean = (audio * v).sum(1, keepdim=True) / count
        var = (((audio - mean) * v) ** 2).sum(1, keepdim=True) / count
        x = (audio - mean) / (var + 1e-7).sqrt() * v  # what Wav2Vec2FeatureExtractor(do_normalize) does
        out = self.wavlm(x, attention_mask=valid.long() if self.use_mask else None).last_hidden_state
        token_len = self.wavlm._get_feat_extract_output_lengths(audio_len).clamp(0, out.shape[1])
        return out, lengths_to_mask(token_len, out.shape[1])


class CLIPFrameEncoder(nn.Module):
    """Frozen transformers CLIP vision tower on whole RGB frames; pooled embedding per frame."""

    def __init__(self, model_dir: str):
        super().__init__()
        from transformers import CLIPVisionModel

        self.clip = CLIPVisionModel.from_pretrained(model_dir, local_files_only=True)
        self.clip.requires_grad_(False)
        self.clip.eval()
        self.size = self.clip.config.image_size
        self.dim = self.clip.config.hidden_size
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> CLIPFrameEncoder:
        super().train(mode)
        self.clip.eval()  # frozen: never in training mode
        return self

    def forward(self, frames: Tensor, frames_len: Tensor) -> tuple[Tensor, Tensor]:
        b, f = frames.shape[:2]
        x = frames.flatten(0, 1).permute(0, 3, 1, 2).float() / 255.0
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        x = (x - self.mean) / self.std
        pooled = self.clip(pixel_values=x).pooler_output  # [B * F, hidden]
        return pooled.reshape(b, f, -1), lengths_to_mask(frames_len, f)


def build_encoders(
    kind: str,
    spec: ModelSpec,
    audio_cfg: LiteAudioConfig,
    video_cfg: LiteVideoConfig,
    audio_dir: str | None,
    video_dir: str | None,
) -> tuple[nn.Module, nn.Module]:
    """The (audio, video) encoder pair for `kind`; each has `.dim` and forward(x, len) -> (tokens, mask)."""
    if kind == "lite":
        return LiteAudioEncoder(audio_cfg), LiteVideoEncoder(video_cfg, spec.frame_size, spec.channels)
    if kind == "paper":
        if not audio_dir or not video_dir:
            raise ValueError("paper encoders need audio_encoder_dir (WavLM) and video_encoder_dir (CLIP)")
        return WavLMEncoder(audio_dir), CLIPFrameEncoder(video_dir)
    raise ValueError(f"unknown encoders {kind!r}: expected 'lite' or 'paper'")
