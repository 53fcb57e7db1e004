"""Seeded augmentation for both branches, and the fixed "perturbed" condition used to check robustness.

Everything works on the raw inputs the ONNX graph takes (float32 16 kHz samples, uint8 faces), so the
in-graph normalisation (gain, log-mel standardisation, per-image standardisation) is identical in
training, evaluation and serving.
"""

from __future__ import annotations

import cv2
import numpy as np

from service.contract import ModelSpec


def crop_or_pad(audio: np.ndarray, size: int, rng: np.random.Generator | None) -> tuple[np.ndarray, int]:
    """A `size`-sample window: random crop (rng) or centre crop (None) of longer clips; zero-pad shorter."""
    if len(audio) >= size:
        start = int(rng.integers(0, len(audio) - size + 1)) if rng is not None else (len(audio) - size) // 2
        return audio[start : start + size], size
    out = np.zeros(size, dtype=np.float32)
    offset = int(rng.integers(0, min(size - len(audio), 1600) + 1)) if rng is not None else 0  # ≤ 0.1 s shift
    out[offset : offset + len(audio)] = audio
    return out, offset + len(audio)


def add_noise(audio: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """White-ish (random tilt) noise at the given SNR relative to the clip's power."""
    power = float(np.mean(audio**2)) + 1e-10
    noise = rng.standard_normal(len(audio)).astype(np.float32)
    if rng.random() < 0.5:  # brown-ish: more low-frequency energy, like room / traffic noise
        noise = np.cumsum(noise)
        noise -= np.convolve(noise, np.ones(401) / 401, mode="same")
    noise *= np.sqrt(power / (np.mean(noise**2) + 1e-10) / 10 ** (snr_db / 10))
    return audio + noise


def band_limit(audio: np.ndarray, low_hz: float, high_hz: float, sample_rate: int) -> np.ndarray:
    """Telephone/codec-like band limitation by zeroing FFT bins outside [low, high]."""
    spectrum = np.fft.rfft(audio)
    freqs = np.fft.rfftfreq(len(audio), 1.0 / sample_rate)
    spectrum[(freqs < low_hz) | (freqs > high_hz)] = 0
    return np.fft.irfft(spectrum, n=len(audio)).astype(np.float32)


def mu_law(audio: np.ndarray, bits: int = 8) -> np.ndarray:
    """Companding quantisation, the distortion of G.711-style codecs."""
    mu = 2**bits - 1
    x = np.clip(audio, -1.0, 1.0)
    q = np.round((np.sign(x) * np.log1p(mu * np.abs(x)) / np.log1p(mu) + 1) / 2 * mu) / mu * 2 - 1
    return (np.sign(q) * ((1 + mu) ** np.abs(q) - 1) / mu).astype(np.float32)


def speed(audio: np.ndarray, factor: float) -> np.ndarray:
    """Speed perturbation by linear resampling (tempo and pitch change together, as in Kaldi's recipe)."""
    n = max(1, round(len(audio) / factor))
    return np.interp(np.arange(n) * factor, np.arange(len(audio)), audio).astype(np.float32)


def augment_audio(audio: np.ndarray, spec: ModelSpec, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """One training view of a clip: speed, crop/shift, gain, noise, band limit / codec."""
    if rng.random() < 0.5:
        audio = speed(audio, float(rng.uniform(0.9, 1.1)))
    audio, length = crop_or_pad(audio, spec.window_samples, rng)
    audio = audio * np.float32(10 ** (rng.uniform(-12, 6) / 20))
    if rng.random() < 0.3:
        audio = add_noise(audio, float(rng.uniform(5, 35)), rng)
    if rng.random() < 0.15:
        audio = band_limit(
            audio, float(rng.uniform(50, 400)), float(rng.uniform(3000, 7000)), spec.sample_rate
        )
    if rng.random() < 0.1:
        audio = mu_law(audio)
    out = np.zeros_like(audio)
    out[:length] = np.clip(audio[:length], -1.0, 1.0)
    return out, length


def perturb_audio(audio: np.ndarray, spec: ModelSpec, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """The fixed robustness condition: 10 dB noise, telephone band (300–3400 Hz), 8-bit mu-law, −10 dB."""
    audio, length = crop_or_pad(audio, spec.window_samples, None)
    audio = add_noise(audio[:length], 10.0, rng)
    audio = mu_law(band_limit(audio, 300.0, 3400.0, spec.sample_rate) * np.float32(10 ** (-10 / 20)))
    out = np.zeros(spec.window_samples, dtype=np.float32)
    out[:length] = np.clip(audio, -1.0, 1.0)
    return out, length


def _affine(face: np.ndarray, shift: tuple[float, float], scale: float, angle: float) -> np.ndarray:
    size = face.shape[0]
    matrix = cv2.getRotationMatrix2D((size / 2, size / 2), angle, scale)
    matrix[:, 2] += shift
    out = cv2.warpAffine(face, matrix, (size, size), borderMode=cv2.BORDER_REPLICATE)
    return out.reshape(face.shape)


def augment_face(face: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 [S, S, C] -> a training view: crop jitter (shift/scale/rotate), flip, blur, light, contrast."""
    size = face.shape[0]
    out = _affine(
        face,
        (float(rng.uniform(-0.1, 0.1) * size), float(rng.uniform(-0.1, 0.1) * size)),
        float(rng.uniform(0.9, 1.15)),
        float(rng.uniform(-12, 12)),
    )
    if rng.random() < 0.5:
        out = out[:, ::-1]
    if rng.random() < 0.2:
        out = cv2.GaussianBlur(np.ascontiguousarray(out), (3, 3), float(rng.uniform(0.3, 1.2))).reshape(
            face.shape
        )
    x = out.astype(np.float32)
    x = (x - x.mean()) * rng.uniform(0.7, 1.3) + x.mean() + rng.uniform(-30, 30)
    if rng.random() < 0.2:
        x = 255.0 * (np.clip(x, 0, 255) / 255.0) ** rng.uniform(0.7, 1.4)
    return np.clip(x, 0, 255).astype(np.uint8)


def perturb_face(face: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The fixed robustness condition: off-centre crop, blur, dim low-contrast light, JPEG quality 20."""
    size = face.shape[0]
    sign = rng.choice([-1.0, 1.0], size=2)
    out = _affine(face, (float(sign[0] * 0.08 * size), float(sign[1] * 0.08 * size)), 1.08, 0.0)
    out = cv2.GaussianBlur(np.ascontiguousarray(out), (5, 5), 1.0).reshape(face.shape)
    x = (out.astype(np.float32) - 128.0) * 0.6 + 90.0
    out = np.clip(x, 0, 255).astype(np.uint8)
    _, buf = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, 20])
    return cv2.imdecode(buf, cv2.IMREAD_UNCHANGED).reshape(face.shape)


def render_frames(face: np.ndarray, count: int, rng: np.random.Generator, *, augment: bool) -> np.ndarray:
    """One face -> `count` frames with small seeded shifts/scales, so a pseudo-clip is not one still image."""
    base = augment_face(face, rng) if augment else face
    size = face.shape[0]
    frames = np.empty((count, *face.shape), dtype=np.uint8)
    for i in range(count):
        shift = rng.uniform(-0.04, 0.04, size=2) * size
        frames[i] = _affine(base, (float(shift[0]), float(shift[1])), float(rng.uniform(0.96, 1.04)), 0.0)
    return frames
