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
    TEMPERATURE_MIN,
    FoalNet,
    FoalNetConfig,
    load_checkpoint,
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
)

torch.set_num_threads(1)

SMALL_SPEC = replace(LITE_SPEC, window_s=0.5, frames_per_window=3)


def small_config(**overrides) -> FoalNetConfig:
    """The lite architecture at toy widths: same code paths, milliseconds per step."""
    base = {
        "spec": SMALL_SPEC,
        "dim": 16,
        "lite_audio": LiteAudioConfig(
            backbone="cnn", widths=(4, 8), convs_per_block=(1, 2), dim=16, pitch_bins=16
        ),
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


def test_pairs_that_disagree_train_the_fused_head_alone():
    """`agree` leaves a conflicting pair out of the unimodal CEs, AVEL and MEM, and in the fused CE."""
    s, f = SMALL_SPEC.window_samples, SMALL_SPEC.frames_per_window
    feeds = [batch(SMALL_SPEC, [s] * 4, [f] * 4, seed=3)[n] for n in INPUTS]
    labels = torch.tensor([0, 1, 2, 1])
    torch.manual_seed(0)
    model = FoalNet(small_config()).eval()  # no dropout: each row's embeddings do not depend on the batch
    _, every = model.loss(*feeds, labels)
    _, some = model.loss(*feeds, labels, torch.tensor([True, True, False, False]))
    _, first_two = model.loss(*(x[:2] for x in feeds), labels[:2])
    _, none = model.loss(*feeds, labels, torch.zeros(4, dtype=torch.bool))
    torch.testing.assert_close(some["ce"], every["ce"])
    for part in ("ce_audio", "ce_video", "avel"):
        torch.testing.assert_close(some[part], first_two[part], msg=part)
        assert none[part].item() == 0.0 and every[part].item() > 0.0, part
    assert none["mem"].item() == 0.0


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
