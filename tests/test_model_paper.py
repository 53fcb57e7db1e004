"""The paper configuration's fidelity to the released Foal-Net code, with tiny random WavLM / CLIP
encoders (never downloaded); each test is named in docs/model.md's fidelity table."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from model_export.losses import avel_loss, avel_targets  # noqa: E402
from model_export.model import (  # noqa: E402
    PAPER_TEMPERATURE_INIT,
    CrossAttention,
    FoalNet,
    FoalNetConfig,
    paper_config,
)
from service.contract import (  # noqa: E402
    INPUTS,
    PAPER_SPEC,
)
from tests.test_model import batch, run, small_config  # noqa: E402

torch.set_num_threads(1)


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
