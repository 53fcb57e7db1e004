"""Foal-Net model: shapes, masking, AVEL targets, MEM negatives, training signal, and the paper
configuration's fidelity to the released code (each test named in docs/model.md's fidelity table)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from model_export.encoders import LiteAudioConfig, LiteVideoConfig
from model_export.losses import avel_loss, avel_targets, sample_negatives
from model_export.model import (
    PAPER_TEMPERATURE_INIT,
    TEMPERATURE_MIN,
    CrossAttention,
    FoalNet,
    FoalNetConfig,
    load_checkpoint,
    paper_config,
    save_checkpoint,
)
from service.contract import (
    INPUTS,
    LITE_SPEC,
    OUTPUT_AUDIO_PROBS,
    OUTPUT_PROBS,
    OUTPUT_SIMILARITY,
    OUTPUT_VIDEO_PROBS,
    OUTPUTS,
    PAPER_SPEC,
)

torch.set_num_threads(1)

SMALL_SPEC = replace(LITE_SPEC, window_s=0.5, frames_per_window=3)


def small_config(**overrides) -> FoalNetConfig:
    """The lite architecture at toy widths: same code paths, milliseconds per step."""
    base = {
        "spec": SMALL_SPEC,
        "dim": 16,
        "lite_audio": LiteAudioConfig(widths=(4, 8), convs_per_block=(1, 2), dim=16, pitch_bins=16),
        "lite_video": LiteVideoConfig(widths=(4, 8, 8, 8), convs_per_block=(1, 1, 1, 1), dim=16),
    }
    return FoalNetConfig(**{**base, **overrides})


def batch(spec, audio_len, frames_len, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b = len(audio_len)
    return {
        "audio": torch.randn(b, spec.window_samples, generator=g) * 0.1,
        "audio_len": torch.tensor(audio_len, dtype=torch.int64),
        "frames": torch.randint(0, 256, (b, *spec.frames_shape), generator=g, dtype=torch.uint8),
        "frames_len": torch.tensor(frames_len, dtype=torch.int64),
    }


@pytest.fixture
def model() -> FoalNet:
    torch.manual_seed(0)
    return FoalNet(small_config()).eval()


def run(model: FoalNet, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return model(*(feeds[name] for name in INPUTS))


def test_outputs_have_contract_names_shapes_and_no_nan_with_missing_modalities(model):
    s, f = SMALL_SPEC.window_samples, SMALL_SPEC.frames_per_window
    out = run(model, batch(SMALL_SPEC, [s, 0, s // 3, 0], [f, f, 0, 0]))
    assert list(out) == list(OUTPUTS)
    k = len(SMALL_SPEC.labels)
    for name, value in out.items():
        assert value.shape == ((4, k) if name.endswith("probs") else (4,)), name
        assert torch.isfinite(value).all(), name
    for name in (OUTPUT_PROBS, OUTPUT_AUDIO_PROBS, OUTPUT_VIDEO_PROBS):
        assert torch.allclose(out[name].sum(-1), torch.ones(4), atol=1e-5)
    # No embedding for a missing modality, so no agreement to report.
    assert out[OUTPUT_SIMILARITY][1:].abs().max() < 1e-6


def test_padding_content_never_reaches_the_outputs(model):
    s, f = SMALL_SPEC.window_samples, SMALL_SPEC.frames_per_window
    audio_len, frames_len = [s, s // 2, 0], [f, 1, 0]
    a, b = batch(SMALL_SPEC, audio_len, frames_len, seed=1), batch(SMALL_SPEC, audio_len, frames_len, seed=2)
    for i, (al, fl) in enumerate(zip(audio_len, frames_len, strict=True)):  # same valid part, other padding
        b["audio"][i, :al] = a["audio"][i, :al]
        b["frames"][i, :fl] = a["frames"][i, :fl]
    out_a, out_b = run(model, a), run(model, b)
    for name in OUTPUTS:
        assert torch.allclose(out_a[name][:2], out_b[name][:2], atol=1e-6), name
    # Row 2 has neither modality: everything about it is padding, so it is input-independent.
    for name in OUTPUTS:
        assert torch.allclose(out_a[name][2], out_b[name][2], atol=1e-6), name


def test_unimodal_heads_ignore_the_other_modality(model):
    s, f = SMALL_SPEC.window_samples, SMALL_SPEC.frames_per_window
    a = batch(SMALL_SPEC, [s, s], [f, 0], seed=3)
    other_video = {**a, "frames": batch(SMALL_SPEC, [s, s], [f, 0], seed=4)["frames"]}
    other_audio = {**a, "audio": batch(SMALL_SPEC, [s, s], [f, 0], seed=5)["audio"]}
    base = run(model, a)
    assert torch.allclose(run(model, other_video)[OUTPUT_AUDIO_PROBS], base[OUTPUT_AUDIO_PROBS], atol=1e-6)
    assert torch.allclose(run(model, other_audio)[OUTPUT_VIDEO_PROBS], base[OUTPUT_VIDEO_PROBS], atol=1e-6)
    # The fused head does see both.
    assert not torch.allclose(run(model, other_video)[OUTPUT_PROBS][0], base[OUTPUT_PROBS][0], atol=1e-6)


def test_a_still_clip_averages_the_logits_of_the_face_and_its_mirror_image(model):
    """Odd frames are shown mirrored, so a face repeated in every frame gets flip test-time augmentation."""
    f = SMALL_SPEC.frames_per_window
    face = batch(SMALL_SPEC, [0], [1], seed=6)["frames"][0, 0]  # [H, W, C] uint8
    still = {**batch(SMALL_SPEC, [0, 0], [f, f]), "frames_len": torch.tensor([2, 2])}  # frames 0 and 1
    still["frames"][0, :2] = face
    still["frames"][1, :2] = face.flip(1)
    out = run(model, still)
    assert torch.allclose(out[OUTPUT_VIDEO_PROBS][0], out[OUTPUT_VIDEO_PROBS][1], atol=1e-6)
    encoder = model.video_encoder
    with torch.no_grad():
        logits = model.video_head(encoder.embed_images(torch.stack([face, face.flip(1)])))
    assert torch.allclose(out[OUTPUT_VIDEO_PROBS][0], logits.mean(0).softmax(-1), atol=1e-6)


@pytest.mark.parametrize("f0", [90.0, 150.0, 240.0, 380.0])
def test_pitch_salience_peaks_at_the_pitch_of_a_voice_like_tone(f0):
    """A harmonic tone's salience is ~1 at its F0 row, low half an octave away; noise stays low."""
    from model_export.encoders import PITCH_FMAX, PITCH_FMIN, Periodicity, normalise_gain

    bins = 32
    rows = np.geomspace(PITCH_FMIN, PITCH_FMAX, bins)
    t = np.arange(32_000) / LITE_SPEC.sample_rate
    tone = sum(np.sin(2 * np.pi * f0 * h * t) / h for h in range(1, 10)).astype(np.float32)
    noise = np.random.default_rng(0).standard_normal(t.size).astype(np.float32)
    full = torch.tensor([t.size])
    pitch = Periodicity(bins, LiteAudioConfig().hop)
    with torch.no_grad():
        salience, noisy = (pitch(normalise_gain(torch.from_numpy(x)[None], full))[0] for x in (tone, noise))
    salience, noisy = salience[:, salience.shape[-1] // 2], noisy[:, noisy.shape[-1] // 2]  # middle frame
    assert salience[np.abs(np.log(rows / f0)).argmin()] > 0.85
    off = np.abs(np.log(rows / (f0 * 2**0.5))).argmin()  # a tritone up: no period of the tone
    assert salience[off] < 0.5
    assert noisy.max() < 0.6


def test_audio_is_gain_normalised(model):
    s, f = SMALL_SPEC.window_samples, SMALL_SPEC.frames_per_window
    quiet = batch(SMALL_SPEC, [s, s // 2], [f, f], seed=6)
    loud = {**quiet, "audio": quiet["audio"] * 8.0}
    a, b = run(model, quiet), run(model, loud)
    assert torch.allclose(a[OUTPUT_AUDIO_PROBS], b[OUTPUT_AUDIO_PROBS], atol=1e-4)


def test_silence_is_masked_like_padding():
    """Pauses far below the speech are zeroed and left out of the token mask, so a recording's
    noise floor (digital silence or none) does not reach the CNN; checkpoints from before the
    switch load with it off."""
    from model_export.encoders import LiteAudioEncoder

    torch.manual_seed(0)
    speech = torch.randn(1, 32_000) * 0.1  # 2 s of "speech"
    silent = torch.zeros(1, 16_000)
    padded = torch.cat([silent, speech, silent], dim=1)  # 1 s of digital silence either side
    encoder = LiteAudioEncoder(LiteAudioConfig()).eval()
    _, mask = encoder(padded, torch.tensor([64_000]))
    assert 6 <= int(mask.sum()) <= 7  # 2 of 4 s: 6 of 12 tokens, one more where a token straddles
    assert not mask[0, :2].any() and not mask[0, -2:].any()
    unmasked = LiteAudioEncoder(LiteAudioConfig(mask_silence=False)).eval()
    assert int(unmasked(padded, torch.tensor([64_000]))[1].sum()) == 12
    old = FoalNetConfig.from_dict({"lite_audio": {"silence_db": 40.0}})
    assert old.lite_audio.mask_silence is False and FoalNetConfig().lite_audio.mask_silence is True


def test_avel_targets_make_every_same_label_pair_a_positive():
    targets = avel_targets(torch.tensor([0, 1, 0, 2, 0]))
    third = 1 / 3
    assert torch.allclose(targets[0], torch.tensor([third, 0, third, 0, third]))
    assert torch.allclose(targets[1], torch.tensor([0.0, 1, 0, 0, 0]))
    assert torch.allclose(targets.sum(1), torch.ones(5))


def test_avel_loss_rewards_label_aligned_embeddings():
    labels = torch.tensor([0, 1, 0, 2, 1, 2])
    protos = torch.eye(3)
    aligned = avel_loss(protos[labels], protos[labels], labels, torch.tensor(0.1))
    crossed = avel_loss(protos[labels], protos[(labels + 1) % 3], labels, torch.tensor(0.1))
    assert aligned < crossed


def test_mem_negatives_never_share_the_anchor_label():
    g = torch.Generator().manual_seed(0)
    for seed in range(200):
        torch.manual_seed(seed)
        labels = torch.randint(0, 3, (8,), generator=g)
        valid = torch.rand(8, generator=g) > 0.2
        picks = sample_negatives(torch.randn(8, 8, generator=g) * 3, labels, valid)
        for i, j in enumerate(picks.tolist()):
            candidates = valid & (labels != labels[i]) & valid[i]
            if candidates.any():
                assert j >= 0 and valid[j] and labels[j] != labels[i]
            else:
                assert j == -1


def test_mem_negatives_are_drawn_by_similarity():
    labels = torch.tensor([0, 1, 2, 2])
    sim = torch.tensor([[0.0, 0.0, 3.0, 0.0]]).expand(4, 4)  # candidate 2 is the hardest negative for row 0
    torch.manual_seed(0)
    draws = torch.stack([sample_negatives(sim, labels, torch.ones(4, dtype=torch.bool)) for _ in range(300)])
    share = (draws[:, 0] == 2).float().mean().item()
    expected = np.exp(3) / (np.exp(3) + 2)  # softmax over the three different-label candidates
    assert abs(share - expected) < 0.08


def test_mem_skips_anchors_without_a_different_label_partner():
    torch.manual_seed(0)
    model = FoalNet(small_config()).train()
    s, f = SMALL_SPEC.window_samples, SMALL_SPEC.frames_per_window
    feeds = batch(SMALL_SPEC, [s, s, s], [f, f, f])
    total, parts = model.loss(*(feeds[n] for n in INPUTS), torch.tensor([2, 2, 2]))
    assert torch.isfinite(total) and torch.isfinite(parts["mem"])
    total.backward()


def test_loss_parts_follow_the_config():
    s, f = SMALL_SPEC.window_samples, SMALL_SPEC.frames_per_window
    feeds = batch(SMALL_SPEC, [s, s, 0, s], [f, 0, f, f])
    labels = torch.tensor([0, 1, 2, 1])
    torch.manual_seed(0)
    _, parts = FoalNet(small_config()).loss(*(feeds[n] for n in INPUTS), labels)
    assert {"ce", "ce_audio", "ce_video", "avel", "mem", "temperature"} <= set(parts)
    _, parts = FoalNet(small_config(avel=False, mem=False)).loss(*(feeds[n] for n in INPUTS), labels)
    assert "avel" not in parts and "mem" not in parts


def test_temperature_is_learnable_and_clamped():
    model = FoalNet(small_config())
    assert model.log_temperature.requires_grad
    with torch.no_grad():
        model.log_temperature.fill_(-20.0)
    assert model.temperature.item() == pytest.approx(TEMPERATURE_MIN)


def test_a_few_training_steps_lower_the_loss():
    torch.manual_seed(0)
    model = FoalNet(small_config(dropout=0.0)).train()
    s, f = SMALL_SPEC.window_samples, SMALL_SPEC.frames_per_window
    feeds = batch(SMALL_SPEC, [s] * 8, [f] * 8, seed=7)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):  # 12 steps were enough for a 0.72x drop, too close to the bar to be a stable test
        total, _ = model.loss(*(feeds[n] for n in INPUTS), labels)
        optim.zero_grad()
        total.backward()
        optim.step()
        losses.append(total.item())
    assert np.mean(losses[-3:]) < 0.75 * np.mean(losses[:3])


def test_checkpoint_round_trip(tmp_path: Path, model: FoalNet):
    path = save_checkpoint(model, tmp_path / "m.pt", stage="fused")
    loaded = load_checkpoint(path)
    assert loaded.cfg == model.cfg
    s, f = SMALL_SPEC.window_samples, SMALL_SPEC.frames_per_window
    feeds = batch(SMALL_SPEC, [s, 0], [f, 2])
    for name, value in run(model, feeds).items():
        assert torch.equal(run(loaded, feeds)[name], value), name


# ---- paper configuration with tiny random WavLM / CLIP (never downloaded) ----------------------


PAPER_SMALL = replace(PAPER_SPEC, window_s=1.0, frames_per_window=2)


def test_paper_forward_backward_freezes_conv_front_end_and_clip(paper_dirs):
    torch.manual_seed(0)
    model = FoalNet(paper_config(*paper_dirs, spec=PAPER_SMALL, dim=16)).train()
    assert model.cfg.spec.frame_mode == "clip_crop" and model.video_encoder.clip.training is False
    s, f = PAPER_SMALL.window_samples, PAPER_SMALL.frames_per_window
    feeds = batch(PAPER_SMALL, [s, s // 2, 0], [f, 0, 1])
    total, _ = model.loss(*(feeds[n] for n in INPUTS), torch.tensor([0, 1, 0]))
    assert torch.isfinite(total)
    total.backward()
    wavlm = model.audio_encoder.wavlm
    assert all(p.grad is None for p in wavlm.feature_extractor.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in wavlm.encoder.parameters())
    assert all(p.grad is None for p in model.video_encoder.parameters())
    model.eval()
    for name, value in run(model, feeds).items():
        assert torch.isfinite(value).all(), name


def test_paper_exports_with_parity(paper_dirs, tmp_path: Path):
    from model_export.export import export_onnx, read_spec, verify_parity

    torch.manual_seed(0)
    model = FoalNet(paper_config(*paper_dirs, spec=PAPER_SMALL, dim=16)).eval()
    path = export_onnx(model, tmp_path / "paper.onnx")
    assert read_spec(path) == PAPER_SMALL
    diffs = verify_parity(model, path, batch_sizes=(1, 3))
    assert max(diffs.values()) <= 1e-4


def test_paper_encoders_need_local_dirs():
    with pytest.raises(ValueError, match="audio_encoder_dir"):
        FoalNet(FoalNetConfig(encoders="paper", spec=PAPER_SPEC))


# ---- fidelity of the paper configuration to the released code (docs/model.md) -----------------


def paper_model(paper_dirs, **overrides) -> FoalNet:
    torch.manual_seed(0)
    return FoalNet(paper_config(*paper_dirs, spec=PAPER_SMALL, dim=16, **overrides))


def test_paper_config_is_the_released_structure(paper_dirs):
    cfg = paper_model(paper_dirs).cfg
    assert (cfg.pool_then_project, cfg.projection_bias, cfg.fusion_on, cfg.avel_targets) == (
        True,
        False,
        "raw",
        "binary",
    )
    assert (cfg.temperature, cfg.attention_dropout_on, cfg.unimodal_ce, cfg.mem_head) == (
        "paper",
        "output",
        False,
        "linear",
    )
    assert (cfg.dropout, cfg.attention_dropout, cfg.feature_dropout, cfg.mem_weight) == (0.5, 0.1, 0.1, 0.1)
    assert (cfg.heads, cfg.layers, paper_config("a", "v").dim) == (4, 2, 512)
    assert (PAPER_SPEC.window_s, PAPER_SPEC.frames_per_window, PAPER_SPEC.frame_mode) == (
        6.0,
        180,
        "clip_crop",
    )


def test_lite_defaults_keep_the_shipped_structure():
    """Old lite checkpoints load: same parameter names, the lite switches' defaults."""
    keys = set(FoalNet(small_config()).state_dict())
    assert {"log_temperature", "mem_a2v.hidden.weight", "audio_proj.proj.bias", "a2v.attn.0.k.weight"} <= keys
    assert not any(k.startswith("tau") for k in keys)
    cfg = FoalNetConfig()
    assert (cfg.pool_then_project, cfg.fusion_on, cfg.avel_targets, cfg.temperature, cfg.mem_head) == (
        False,
        "projected",
        "normalised",
        "clip",
        "mlp",
    )
    with pytest.raises(ValueError, match="mem_head"):
        FoalNetConfig(mem_head="deep")


def test_avel_loss_on_a_hand_made_batch_equals_the_formula():
    """3 x 3: labels (0, 1, 0), binary targets (not row-normalised), logits divided by tau."""
    za = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]), dim=-1)
    zv = torch.nn.functional.normalize(torch.tensor([[0.8, 0.6], [-1.0, 0.2], [1.0, 0.0]]), dim=-1)
    labels, tau = torch.tensor([0, 1, 0]), torch.tensor(PAPER_TEMPERATURE_INIT)
    a, v = za.numpy().astype(np.float64), zv.numpy().astype(np.float64)
    target = np.array([[1, 0, 1], [0, 1, 0], [1, 0, 1]], np.float64)

    def direction(s: np.ndarray) -> float:
        log_softmax = s - np.log(np.exp(s).sum(1, keepdims=True))
        return float(-(target * log_softmax).sum(1).mean())

    s = a @ v.T / np.log(1 / 0.07)
    expected = (direction(s) + direction(s.T)) / 2
    assert avel_loss(za, zv, labels, tau, normalise=False).item() == pytest.approx(expected, rel=1e-5)
    assert torch.equal(avel_targets(labels, normalise=False), torch.tensor(target, dtype=torch.float32))
    # The lite targets are that matrix divided by its row counts, so the two losses differ.
    assert avel_loss(za, zv, labels, tau).item() != pytest.approx(expected, rel=1e-3)


def test_paper_temperature_is_learnable_divides_and_is_not_clamped(paper_dirs):
    model = paper_model(paper_dirs)
    assert model.tau.requires_grad and model.tau.item() == pytest.approx(2.6593, abs=1e-4)
    with torch.no_grad():
        model.tau.fill_(40.0)
    assert model.temperature.item() == 40.0  # the lite (CLIP-style) temperature is clamped to 1.0
    clip = paper_model(paper_dirs, temperature="clip", temperature_init=0.07)
    assert clip.temperature.item() == pytest.approx(0.07) and not hasattr(clip, "tau")


def encoder_tokens(model: FoalNet, feeds: dict[str, torch.Tensor]):
    a, a_mask = model.audio_encoder(feeds["audio"], feeds["audio_len"])
    v, v_mask = model.video_encoder(feeds["frames"], feeds["frames_len"])
    return a, a_mask, v, v_mask


def test_paper_pools_before_projecting_and_fuses_raw_sequences(paper_dirs):
    from model_export.encoders import masked_mean

    model = paper_model(paper_dirs).eval()
    s, f = PAPER_SMALL.window_samples, PAPER_SMALL.frames_per_window
    feeds = batch(PAPER_SMALL, [s, s // 2], [f, 1], seed=8)
    with torch.no_grad():
        e = model.encode(*(feeds[n] for n in INPUTS))
        a, a_mask, v, v_mask = encoder_tokens(model, feeds)
        za = torch.nn.functional.normalize(model.audio_proj(masked_mean(a, a_mask)), dim=-1)
        zv = torch.nn.functional.normalize(model.video_proj(masked_mean(v, v_mask)), dim=-1)
        per_token = torch.nn.functional.normalize(masked_mean(model.audio_proj(a), a_mask), dim=-1)
    assert torch.allclose(e.za, za, atol=1e-6) and torch.allclose(e.zv, zv, atol=1e-6)
    assert not torch.allclose(e.za, per_token, atol=1e-3)  # project-then-pool (lite) is another thing
    assert torch.equal(e.a, a) and torch.equal(e.v, v)  # the stacks read the raw encoder sequences
    assert model.audio_proj.proj.bias is None and model.audio_proj.fc.bias is None


def test_paper_classifier_and_mem_heads_see_the_encoder_widths(paper_dirs):
    """WavLM-Large 1024 + CLIP ViT-L/14 768 in the paper; here the tiny encoders' 16 + 12."""
    model = paper_model(paper_dirs)
    da, dv = model.audio_encoder.dim, model.video_encoder.dim
    assert (da, dv) == (16, 12)  # conftest: WavLM hidden 16, CLIP projection_dim 12
    assert model.classifier.in_features == da + dv
    assert isinstance(model.mem_a2v, torch.nn.Linear) and (
        model.mem_a2v.in_features,
        model.mem_a2v.out_features,
    ) == (da, 2)
    assert isinstance(model.mem_v2a, torch.nn.Linear) and model.mem_v2a.in_features == dv
    a2v, v2a = model.a2v.attn[0], model.v2a.attn[0]
    assert (a2v.q.in_features, a2v.k.in_features, a2v.k.out_features) == (da, dv, da)  # video K/V -> 16
    assert (v2a.q.in_features, v2a.k.in_features, v2a.k.out_features) == (dv, da, dv)  # audio K/V -> 12
    assert len(model.a2v.attn) == 2 and model.a2v.attn[0].heads == 4
    assert model.audio_proj.proj.out_features == 16 and model.audio_proj.drop.p == 0.5


@pytest.mark.parametrize("place, zero_share", [("output", (0.35, 0.65)), ("weights", (0.0, 0.05))])
def test_attention_dropout_placement(place, zero_share):
    """Dropout after the output linear zeroes about p of the output; on the weights it zeroes none."""
    torch.manual_seed(0)
    attn = CrossAttention(16, 12, 4, 0.5, place).train()
    x, kv = torch.randn(4, 5, 16), torch.randn(4, 7, 12)
    out = attn(x, kv, torch.ones(4, 7, dtype=torch.bool))
    share = (out == 0).float().mean().item()
    assert zero_share[0] <= share <= zero_share[1]


def test_paper_unimodal_heads_do_not_train_the_encoders(paper_dirs):
    """unimodal_ce=False: the contract's audio/video heads learn on detached features, so the shared
    model gets gradients from CE(fused) + AVEL + λ·MEM only; --unimodal-ce restores the lite way."""
    s, f = PAPER_SMALL.window_samples, PAPER_SMALL.frames_per_window
    feeds = batch(PAPER_SMALL, [s, s], [f, f], seed=9)
    for unimodal_ce, reaches in ((False, False), (True, True)):
        model = paper_model(paper_dirs, unimodal_ce=unimodal_ce, feature_dropout=0.0).train()
        _, parts = model.loss(*(feeds[n] for n in INPUTS), torch.tensor([0, 1]))
        parts["ce_audio"].backward()
        assert model.audio_head.weight.grad.abs().sum() > 0
        wavlm = model.audio_encoder.wavlm.encoder.parameters()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in wavlm) == reaches


def test_paper_switches_turn_off_avel_and_mem(paper_dirs):
    s, f = PAPER_SMALL.window_samples, PAPER_SMALL.frames_per_window
    feeds = batch(PAPER_SMALL, [s, s, s], [f, f, f], seed=10)
    labels = torch.tensor([0, 1, 2])
    _, parts = paper_model(paper_dirs).loss(*(feeds[n] for n in INPUTS), labels)
    assert {"ce", "avel", "mem"} <= set(parts)
    _, parts = paper_model(paper_dirs, avel=False, mem=False).loss(*(feeds[n] for n in INPUTS), labels)
    assert "avel" not in parts and "mem" not in parts
