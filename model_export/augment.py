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
        padded = np.concatenate([np.zeros(1), np.cumsum(np.pad(noise, 200, mode="edge"))])
        noise -= (padded[401:] - padded[:-401]) / 401  # minus its 401-sample moving average
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


def room_impulse(rt60_s: float, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """A synthetic room impulse response: the direct path, then exponentially decaying noise whose
    level falls 60 dB in `rt60_s` (a diffuse tail, the part of reverberation that smears speech)."""
    n = max(2, int(rt60_s * sample_rate))
    t = np.arange(n) / sample_rate
    tail = rng.standard_normal(n) * np.exp(-6.9 * t / rt60_s)  # ln(1000) = 6.9: -60 dB at rt60
    tail[: int(0.002 * sample_rate)] = 0.0  # the first reflections arrive after the direct sound
    tail *= float(rng.uniform(0.3, 1.0)) / (np.sqrt(np.sum(tail**2)) + 1e-9)  # direct-to-reverb ratio
    tail[0] = 1.0
    return tail.astype(np.float32)


def reverb(audio: np.ndarray, rt60_s: float, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """The clip as heard in a room with the given reverberation time (same length, same RMS)."""
    rir = room_impulse(rt60_s, sample_rate, rng)
    n = 1 << (len(audio) + len(rir) - 2).bit_length()  # a power of two: FFT sizes with large primes are slow
    wet = np.fft.irfft(np.fft.rfft(audio, n) * np.fft.rfft(rir, n), n)[: len(audio)]  # a 1 s tail is 16k taps
    return (wet * np.sqrt(np.mean(audio**2) / (np.mean(wet**2) + 1e-12))).astype(np.float32)


def peak_normalise(audio: np.ndarray, peak: float = 0.89) -> np.ndarray:
    """Scaled so the largest sample is at `peak` (-1 dBFS by default), as editors' "normalise" does."""
    top = float(np.max(np.abs(audio))) if len(audio) else 0.0
    return audio * np.float32(peak / top) if top > 0 else audio


CODECS: dict[str, tuple[str, ...]] = {
    # name -> ffmpeg output options of a lossy round trip; each at a bitrate a phone or a video site uses
    "opus12k": ("-c:a", "libopus", "-b:a", "12k", "-f", "ogg"),
    "mp3_32k": ("-c:a", "libmp3lame", "-b:a", "32k", "-f", "mp3"),
    "aac24k": ("-c:a", "aac", "-b:a", "24k", "-f", "adts"),
}


def codec_roundtrip(clips: list[np.ndarray], codec: str, sample_rate: int) -> list[np.ndarray]:
    """Each clip encoded with a real lossy codec (ffmpeg) and decoded back, same length.

    The clips are joined with 0.1 s gaps and sent through one encoder / decoder pair (codecs work on
    20-40 ms frames, so a gap keeps neighbours apart), and the codec's delay is measured by
    cross-correlation and removed before the result is cut back into clips."""
    import subprocess

    from service.media import ffmpeg_exe

    gap = np.zeros(sample_rate // 10, np.float32)
    joined = np.concatenate([np.concatenate([c.astype(np.float32), gap]) for c in clips] or [gap])
    pcm = ("-f", "f32le", "-ac", "1", "-ar", str(sample_rate))
    encoded = subprocess.run(
        [ffmpeg_exe(), "-nostdin", "-v", "error", *pcm, "-i", "pipe:0", *CODECS[codec], "pipe:1"],
        input=np.clip(joined, -1, 1).tobytes(),
        capture_output=True,
        check=True,
    ).stdout
    decoded = np.frombuffer(
        subprocess.run(
            [ffmpeg_exe(), "-nostdin", "-v", "error", "-i", "pipe:0", *pcm, "pipe:1"],
            input=encoded,
            capture_output=True,
            check=True,
        ).stdout,
        np.float32,
    )
    probe = min(len(joined), 10 * sample_rate)
    corr = np.correlate(decoded[: probe + 4096], joined[:probe], mode="valid")
    delay = int(np.argmax(corr))
    decoded = np.concatenate([decoded[delay:], np.zeros(len(joined), np.float32)])
    out, start = [], 0
    for clip in clips:
        out.append(decoded[start : start + len(clip)].copy())
        start += len(clip) + len(gap)
    return out


def augment_audio(
    audio: np.ndarray, spec: ModelSpec, rng: np.random.Generator, coded: np.ndarray | None = None
) -> tuple[np.ndarray, int]:
    """One training view of a clip: codec (when a coded copy is given), speed, crop/shift, loudness,
    reverberation, noise, band limit, mu-law. Every step models a link of a recording chain."""
    if coded is not None and rng.random() < 0.3:
        audio = coded
    if rng.random() < 0.5:
        audio = speed(audio, float(rng.uniform(0.9, 1.1)))
    audio, length = crop_or_pad(audio, spec.window_samples, rng)
    if rng.random() < 0.2:
        audio = peak_normalise(audio)
    else:
        audio = audio * np.float32(10 ** (rng.uniform(-30, 6) / 20))
    if rng.random() < 0.25:
        audio[:length] = reverb(audio[:length], float(rng.uniform(0.2, 0.9)), spec.sample_rate, rng)
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


CODED_SHARE = 0.5  # training clips that get a lossy-codec copy (one codec each, seeded)


def coded_copies(
    clips: list[np.ndarray], spec: ModelSpec, seed: int, share: float = CODED_SHARE
) -> list[np.ndarray | None]:
    """A lossy-codec round trip (a real codec, chosen per clip) for `share` of the clips; None for the rest."""
    rng = np.random.default_rng(seed)
    pick = rng.integers(len(CODECS), size=len(clips))
    chosen = rng.random(len(clips)) < share
    out: list[np.ndarray | None] = [None] * len(clips)
    for c, codec in enumerate(CODECS):
        idx = np.flatnonzero(chosen & (pick == c))
        for i, coded in zip(idx, codec_roundtrip([clips[i] for i in idx], codec, spec.sample_rate)):
            out[i] = coded
    return out
