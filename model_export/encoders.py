"""Modality encoders: each maps a contract input to tokens [B, T, d] and a valid mask [B, T].

`lite` encoders: for speech a frozen pretrained Whisper encoder under a trained adapter (since 2.1.0)
or a log-mel CNN trained here (1.x, 2.0.0), for faces a VGG-ish CNN on 48 px crops trained here; all
preprocessing (gain normalisation, log-mel, per-utterance / per-image standardisation) runs inside the
graph with exportable ops, so the ONNX file takes raw samples and uint8 pixels.
`paper` encoders (`model_export/paper_encoders.py`) wrap `transformers` WavLM and CLIP loaded from
local directories (never downloaded).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from service.contract import SAMPLE_RATE, ModelSpec

# Log-mel front end of the lite audio encoder (25 ms window at 16 kHz; the hop is `LiteAudioConfig.hop`).
N_FFT = 400
N_MELS = 64
TARGET_RMS = 0.1  # every utterance is scaled to this RMS over its valid samples
EPS = 1e-5

# Pitch salience of the lite audio encoder (`Periodicity`): autocorrelation of 40 ms frames on the
# log-mel's frame grid, band-limited to the low harmonics, read at log-spaced pitch periods.
PITCH_WINDOW = 640  # 40 ms: 2.4 periods of the lowest pitch
PITCH_DFT = 1024  # >= window + longest period, so the autocorrelation does not wrap around
PITCH_BAND_HZ = 1000.0  # harmonics above this are dropped; the low ones carry F0
PITCH_FMIN, PITCH_FMAX = 60.0, 500.0


@dataclass
class LiteAudioConfig:
    # "whisper": a frozen pretrained Whisper encoder (model_export/whisper.py) under a trained adapter;
    # "cnn": the log-mel + pitch CNN below, trained from scratch (foalnet-lite 1.x and 2.0.0).
    backbone: Literal["cnn", "whisper"] = "whisper"
    # Which packaged Whisper (`whisper.PACKAGED`) and its shape; its first `whisper_layers` blocks run,
    # and all of their outputs are read.
    # Whisper base, the multilingual one, since 2.2.0 (tiny.en, "tiny.en", 384, 6, 4, shipped in 2.1.x;
    # docs/training.md, "The voice backbone", has what each measured).
    whisper_model: str = "base"
    whisper_dim: int = 512
    whisper_heads: int = 8
    whisper_layers: int = 6
    whisper_pool: int = 4  # Whisper tokens (20 ms) averaged, over speech only, into one token (80 ms)
    adapter_hidden: int = 256
    widths: tuple[int, ...] = (16, 32, 64, 128)  # channels of the conv blocks; each halves T and rows
    convs_per_block: tuple[int, ...] | None = None  # 3x3 convs in each block (None: one each)
    n_mels: int = N_MELS
    # Frame hop of the log-mel and pitch rows, in samples. 20 ms rather than the usual 10 halves both
    # DFT convs and the CNN; it is most of why one window fits the 10 ms budget on 2 CPU cores.
    hop: int = 320
    # Rows of pitch salience (`Periodicity`) stacked under the log-mel; 0 = log-mel only. With them
    # the branch learns about twice as fast and ends ~4 points of UA higher on unseen RAVDESS actors.
    pitch_bins: int = 32
    # Log-mel statistics ignore frames more than this many dB below the loudest (0 = use every frame);
    # with mask_silence those frames are padding too (docs/training.md: pauses told corpora apart).
    silence_db: float = 40.0
    mask_silence: bool = True
    dim: int = 128  # token width out of the encoder
    dropout: float = 0.1
    spec_time_masks: int = 2  # SpecAugment masks, active only in training
    spec_time_width: int = 20  # frames (0.4 s at the 20 ms hop)
    spec_freq_masks: int = 2
    spec_freq_width: int = 8  # mel bins


@dataclass
class LiteVideoConfig:
    # Sized for the latency budget and for training on a 2-core CPU: ~19 M multiply-adds a 48 px face
    # (~2.5 min a FER2013 epoch on one thread; 32-64-128-256 costs 4x that and ~10 min an epoch);
    # most parameters sit in the flatten -> Linear, which costs little.
    widths: tuple[int, ...] = (16, 32, 64, 128)  # channels per VGG block; each block halves H and W
    convs_per_block: tuple[int, ...] = (1, 2, 2, 1)
    dim: int = 128  # token width (per frame) out of the encoder
    dropout: float = 0.3
    # Show every odd frame of a clip mirrored (left-right). Free at inference: a still clip becomes
    # flip test-time augmentation (the head is linear on the frame-mean token, so this averages the
    # logits of the face and its mirror image); the branch is trained with random flips anyway.
    mirror_odd_frames: bool = True


def lengths_to_mask(lengths: Tensor, size: int) -> Tensor:
    """[B] valid counts -> bool [B, size] with True on valid positions."""
    return torch.arange(size, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


def masked_average(x: Tensor, weight: Tensor, dim: int) -> Tensor:
    """Mean of x along `dim` (kept) where the 0/1 `weight` (broadcastable) is 1; 0, not NaN, if nowhere."""
    return (x * weight).sum(dim, keepdim=True) / weight.sum(dim, keepdim=True).clamp_min(1.0)


def masked_standardise(x: Tensor, weight: Tensor, dim: int, eps: float) -> Tensor:
    """(x - mean) / sqrt(variance + eps), mean and (biased) variance over the weighted positions."""
    mean = masked_average(x, weight, dim)
    return (x - mean) / (masked_average((x - mean) ** 2, weight, dim) + eps).sqrt()


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean over axis 1 of x [B, T, d] where mask [B, T]; zero (not NaN) when nothing is valid."""
    return masked_average(x, mask.to(x.dtype).unsqueeze(-1), 1).squeeze(1)


def dft_basis(window: Tensor, bins: int, n_dft: int) -> Tensor:
    """conv1d weights [2 * bins, 1, len(window)] of a windowed DFT: the real parts of the first
    `bins` frequencies of an `n_dft`-point DFT, then the imaginary parts (built in float64)."""
    n, k = torch.arange(len(window), dtype=torch.float64), torch.arange(bins, dtype=torch.float64)
    angle = 2 * math.pi * k.unsqueeze(1) * n / n_dft
    return torch.cat([torch.cos(angle) * window, -torch.sin(angle) * window]).float().unsqueeze(1)


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


def normalise_gain(audio: Tensor, audio_len: Tensor) -> Tensor:
    """Zero the padding and scale each utterance to TARGET_RMS over its valid samples."""
    valid = lengths_to_mask(audio_len, audio.shape[1]).to(audio.dtype)
    x = audio * valid  # padding content never reaches the model
    rms = masked_average(x * x, valid, 1).sqrt()
    return x * (TARGET_RMS / (rms + EPS))


class LogMel(nn.Module):
    """Gain-normalised waveform -> log-mel [B, n_mels, T] using conv1d with a fixed DFT basis."""

    def __init__(
        self, hop: int, n_fft: int = N_FFT, n_mels: int = N_MELS, sample_rate: int = SAMPLE_RATE
    ):
        super().__init__()
        self.n_fft, self.hop = n_fft, hop
        window = torch.hann_window(n_fft, periodic=True, dtype=torch.float64)
        self.register_buffer("dft", dft_basis(window, n_fft // 2 + 1, n_fft), persistent=False)
        self.register_buffer(
            "mel", torch.from_numpy(mel_filterbank(n_mels, n_fft, sample_rate)), persistent=False
        )

    def frame_lengths(self, audio_len: Tensor, frames: int) -> Tensor:
        """Frames whose window starts inside the valid samples."""
        return ((audio_len + self.hop - 1) // self.hop).clamp(0, frames)

    def forward(self, x: Tensor, audio_len: Tensor) -> tuple[Tensor, Tensor]:
        """x: gain-normalised samples (`normalise_gain`)."""
        spec = F.conv1d(x.unsqueeze(1), self.dft, stride=self.hop)  # [B, 2 * bins, T]
        re, im = spec.chunk(2, dim=1)
        power = re * re + im * im
        logmel = torch.log(torch.matmul(self.mel, power) + 1e-6)  # [B, n_mels, T]
        frame_len = self.frame_lengths(audio_len, logmel.shape[-1])
        return logmel, frame_len


class Periodicity(nn.Module):
    """Pitch salience [B, bins, T] on the log-mel's frame grid (same hop, same frame centres).

    Per 40 ms Hann frame: the power spectrum below PITCH_BAND_HZ (a DFT conv, like `LogMel`), then
    its cosine transform (Wiener-Khinchin) read directly at `bins` log-spaced pitch periods between
    PITCH_FMIN and PITCH_FMAX, divided by the zero-lag power and by the window's own autocorrelation
    (Boersma 1993). A voiced frame peaks near 1 at its F0 row (and its subharmonics); a log-F0 axis
    makes a pitch change a shift, which the CNN handles like a formant shift in the log-mel rows.
    """

    def __init__(self, bins: int, hop: int, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE):
        super().__init__()
        self.hop = hop
        # Centre each pitch frame where the log-mel frame of the same index is centred.
        self.pad = (PITCH_WINDOW - n_fft) // 2
        k = torch.arange(math.ceil(PITCH_BAND_HZ * PITCH_DFT / sample_rate), dtype=torch.float64)
        window = torch.hann_window(PITCH_WINDOW, periodic=False, dtype=torch.float64)
        self.register_buffer("dft", dft_basis(window, len(k), PITCH_DFT), persistent=False)
        periods = sample_rate / torch.logspace(
            math.log10(PITCH_FMIN), math.log10(PITCH_FMAX), bins, dtype=torch.float64
        )
        one_sided = torch.where(k == 0, 1.0, 2.0)  # each bin above DC stands for +f and -f
        lag_basis = one_sided * torch.cos(2 * math.pi * periods.unsqueeze(1) * k / PITCH_DFT)
        w = window.numpy()
        own = np.correlate(w, w, mode="full")[PITCH_WINDOW - 1 :] / float(w @ w)
        window_corr = np.interp(periods.numpy(), np.arange(PITCH_WINDOW), own)
        lag_basis = lag_basis / torch.from_numpy(window_corr).unsqueeze(1)
        self.register_buffer("lag_basis", lag_basis.float(), persistent=False)  # [bins, K]
        self.register_buffer("zero_lag", one_sided.float().unsqueeze(0), persistent=False)  # [1, K]

    def forward(self, x: Tensor) -> Tensor:
        """x: gain-normalised samples [B, S] -> [B, bins, T]."""
        spec = F.conv1d(F.pad(x, (self.pad, self.pad)).unsqueeze(1), self.dft, stride=self.hop)
        re, im = spec.chunk(2, dim=1)
        power = re * re + im * im  # [B, K, T]
        return torch.matmul(self.lag_basis, power) / (torch.matmul(self.zero_lag, power) + 1e-3)


def speech_frames(logmel: Tensor, frame_len: Tensor, silence_db: float = 0.0) -> Tensor:
    """[B, 1, T] float mask of the valid frames; with `silence_db` > 0 only those whose energy is
    within that many dB of the utterance's loudest frame."""
    valid = lengths_to_mask(frame_len, logmel.shape[-1]).unsqueeze(1)  # [B, 1, T]
    if silence_db <= 0:
        return valid.to(logmel.dtype)
    energy = torch.logsumexp(logmel, dim=1, keepdim=True)  # log of the frame's mel power
    loudest = energy.masked_fill(~valid, -1e4).amax(-1, keepdim=True)
    return (valid & (energy > loudest - silence_db * math.log(10) / 10)).to(logmel.dtype)


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


def vgg_blocks(c_in: int, widths: tuple[int, ...], convs: tuple[int, ...]) -> tuple[nn.Sequential, int]:
    """VGG-style blocks: `convs[i]` conv-BN-ReLU layers of `widths[i]` channels, then a 2x2 max-pool;
    returns the stack and its output channels."""
    layers: list[nn.Module] = []
    for width, count in zip(widths, convs, strict=True):
        for _ in range(count):
            layers.append(conv_bn(c_in, width))
            c_in = width
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers), c_in


class LiteAudioEncoder(nn.Module):
    """Raw 16 kHz samples -> log-mel -> conv blocks (each halves time and mels) -> time tokens."""

    def __init__(self, cfg: LiteAudioConfig):
        super().__init__()
        self.cfg = cfg
        self.logmel = LogMel(cfg.hop, n_mels=cfg.n_mels)
        self.pitch = Periodicity(cfg.pitch_bins, cfg.hop) if cfg.pitch_bins else None
        self.cnn, c_in = vgg_blocks(1, cfg.widths, cfg.convs_per_block or (1,) * len(cfg.widths))
        self.stride = 2 ** len(cfg.widths)
        mels_out = (cfg.n_mels + cfg.pitch_bins) // self.stride
        self.out = nn.Sequential(
            nn.Dropout(cfg.dropout), nn.Linear(c_in * mels_out, cfg.dim), nn.ReLU(inplace=True)
        )
        self.dim = cfg.dim

    def forward(self, audio: Tensor, audio_len: Tensor) -> tuple[Tensor, Tensor]:
        wave = normalise_gain(audio, audio_len)
        logmel, frame_len = self.logmel(wave, audio_len)
        # Per-utterance, per-bin standardisation with statistics from the speech frames only; the frames
        # kept as input are those (mask_silence) or every valid one, the rest -> 0 like padding.
        speech = speech_frames(logmel, frame_len, self.cfg.silence_db)
        kept = speech if self.cfg.mask_silence else speech_frames(logmel, frame_len)
        x = masked_standardise(logmel, speech, -1, EPS) * kept
        if self.training and (self.cfg.spec_time_masks or self.cfg.spec_freq_masks):
            x = spec_augment(x, frame_len, self.cfg)
        if self.pitch is not None:  # rows under the log-mel: [B, n_mels + pitch_bins, T]
            x = torch.cat([x, self.pitch(wave) * kept], dim=1)
        x = self.cnn(x.unsqueeze(1))  # [B, C, rows', T']
        b, c, m, t = x.shape
        tokens = self.out(x.permute(0, 3, 1, 2).reshape(b, t, c * m))
        # A token is kept when any frame under it is; an utterance always keeps its loudest frame.
        token_mask = F.max_pool1d(kept, self.stride, self.stride, ceil_mode=True)[:, 0, :t] > 0
        return tokens, token_mask


class LiteVideoEncoder(nn.Module):
    """uint8 face crops [B, F, H, W, 1] -> per-image standardisation -> shared VGG-ish CNN -> frame tokens."""

    def __init__(self, cfg: LiteVideoConfig, frame_size: int, channels: int):
        super().__init__()
        self.cnn, c_in = vgg_blocks(channels, cfg.widths, cfg.convs_per_block)
        side = frame_size // 2 ** len(cfg.widths)
        self.out = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(cfg.dropout),
            nn.Linear(c_in * side * side, cfg.dim),
            nn.ReLU(inplace=True),
        )
        self.dim = cfg.dim
        self.mirror_odd_frames = cfg.mirror_odd_frames

    def embed_images(self, images: Tensor) -> Tensor:
        """uint8 [N, H, W, C] -> [N, dim]; also what a FER-only pre-training loop calls."""
        x = images.permute(0, 3, 1, 2).float() / 255.0
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        std = x.std(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) / (std + 1e-3)
        return self.out(self.cnn(x))

    def forward(self, frames: Tensor, frames_len: Tensor) -> tuple[Tensor, Tensor]:
        b, f = frames.shape[:2]
        if self.mirror_odd_frames and f > 1:
            odd = (torch.arange(f, device=frames.device) % 2 == 1).view(1, f, 1, 1, 1)
            frames = torch.where(odd, frames.flip(3), frames)  # [B, F, H, W, C]: W is axis 3
        tokens = self.embed_images(frames.flatten(0, 1)).reshape(b, f, -1)
        return tokens, lengths_to_mask(frames_len, f)


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
        from model_export.whisper import WhisperAudioEncoder  # it builds on this module

        audio = WhisperAudioEncoder(audio_cfg) if audio_cfg.backbone == "whisper" else LiteAudioEncoder(audio_cfg)
        return audio, LiteVideoEncoder(video_cfg, spec.frame_size, spec.channels)
    if kind == "paper":
        from model_export.paper_encoders import CLIPFrameEncoder, WavLMEncoder

        if not audio_dir or not video_dir:
            raise ValueError("paper encoders need audio_encoder_dir (WavLM) and video_encoder_dir (CLIP)")
        return WavLMEncoder(audio_dir), CLIPFrameEncoder(video_dir)
    raise ValueError(f"unknown encoders {kind!r}: expected 'lite' or 'paper'")
