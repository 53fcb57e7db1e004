"""A tiny end-to-end lite training run (all three stages) on generated RAVDESS / FER trees."""

from __future__ import annotations

import re
import wave
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from model_export import train_lite
from model_export.encoders import LiteAudioConfig, LiteVideoConfig
from model_export.model import FoalNetConfig, load_checkpoint
from service.contract import LITE_SPEC

EMOTIONS = {"01": 220.0, "05": 660.0}  # neutral, angry: a learnable cue (pitch)
FACES = {"neutral": 60, "angry": 200}  # and brightness of a face-like blob
VAL = {"ravdess": frozenset({"3"})}  # validation speakers of the tiny tree


def _tree(root: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    t = np.arange(16_000) / 16_000
    for actor in (1, 2, 3):
        folder = root / "ravdess" / f"Actor_{actor:02d}"
        folder.mkdir(parents=True)
        for code, freq in EMOTIONS.items():
            for rep in (1, 2):
                pcm = 0.3 * np.sin(2 * np.pi * freq * t) + rng.normal(0, 0.01, t.size)
                with wave.open(str(folder / f"03-01-{code}-01-01-0{rep}-{actor:02d}.wav"), "wb") as handle:
                    handle.setnchannels(1)
                    handle.setsampwidth(2)
                    handle.setframerate(16_000)
                    handle.writeframes((pcm * 32767).astype(np.int16).tobytes())
    for split in ("train", "val"):
        for label, level in FACES.items():
            folder = root / "fer" / split / label
            folder.mkdir(parents=True)
            for i in range(8):
                face = rng.integers(0, 40, (48, 48), dtype=np.uint8)
                cv2.circle(face, (24, 24), 14, level, -1)
                cv2.imwrite(str(folder / f"{i}.jpg"), face)
    return root / "ravdess", root / "fer"


def _losses(lines: list[str], stage: str) -> list[float]:
    return [
        float(re.search(r" loss ([\d.]+)", ln).group(1)) for ln in lines if ln.startswith(f"{stage} epoch")
    ]


def test_tiny_lite_run_lowers_loss_and_writes_checkpoints(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    ravdess, fer = _tree(tmp_path)
    tiny = FoalNetConfig(
        spec=LITE_SPEC,
        dim=16,
        heads=2,
        layers=1,
        lite_audio=LiteAudioConfig(backbone="cnn", widths=(4, 8), dim=16),
        lite_video=LiteVideoConfig(widths=(4, 8), convs_per_block=(1, 1), dim=16),
    )
    lines: list[str] = []
    out = tmp_path / "run"
    results = train_lite.train_lite(
        {"ravdess": ravdess},
        fer,
        out,
        val_speakers=VAL,
        epochs={"audio": 4, "video": 3, "fusion": 2},
        seed=0,
        cache=tmp_path / "cache",
        model_cfg=tiny,
        log=lines.append,
        stage_overrides={
            "audio": {"batch": 4, "lr": 1e-2},
            "video": {"batch": 8, "lr": 1e-2},
            "fusion": {"batch": 4},
        },
    )
    audio = _losses(lines, "audio")
    assert len(audio) == 4 and audio[-1] < audio[0]
    assert _losses(lines, "video")[-1] < _losses(lines, "video")[0]
    assert any(
        " avel " in ln and " mem " in ln for ln in lines if ln.startswith("fusion epoch")
    )  # parts logged
    assert any(ln.startswith("fusion: conflicting pairs, voice wrong") for ln in lines)
    assert set(results) == {"audio", "video", "fusion"} and 0.0 <= results["fusion"]["ua"] <= 1.0
    for name in ("audio.pt", "video.pt", "fused.pt"):
        assert (out / name).is_file()
    # A second, shorter schedule can continue a branch from its checkpoint.
    again = train_lite.train_lite(
        {"ravdess": ravdess},
        fer,
        tmp_path / "more",
        stages=("audio",),
        val_speakers=VAL,
        epochs={"audio": 1},
        cache=tmp_path / "cache",
        log=lines.append,
        init={"audio": out / "audio.pt"},
        stage_overrides={"audio": {"batch": 4}},
    )
    assert 0.0 <= again["audio"]["ua"] <= 1.0
    assert load_checkpoint(tmp_path / "more" / "audio.pt").cfg.lite_audio == tiny.lite_audio
    fused = load_checkpoint(out / "fused.pt")
    assert fused.cfg.mem_weight == train_lite.LITE_MEM_WEIGHT  # the lite fusion stage's λ, not the paper's
    # The fusion stage keeps both pretrained branches frozen (encoders and unimodal heads): the
    # shipped per-modality views are exactly what the branch stages selected.
    for branch, parts in (
        ("audio", ("audio_encoder", "audio_head")),
        ("video", ("video_encoder", "video_head")),
    ):
        pretrained = load_checkpoint(out / f"{branch}.pt")
        for part in parts:
            for key, value in getattr(pretrained, part).state_dict().items():
                assert torch.equal(value, getattr(fused, part).state_dict()[key]), f"{part}.{key}"


def test_ablation_on_frozen_tiny_encoders(tmp_path: Path) -> None:
    """`ablate`: four variants x seeds on cached tokens of a tiny trained model, Markdown table out."""
    from model_export import ablate

    torch.set_num_threads(1)
    ravdess, fer = _tree(tmp_path)
    tiny = FoalNetConfig(
        spec=LITE_SPEC,
        dim=16,
        heads=2,
        layers=1,
        lite_audio=LiteAudioConfig(backbone="cnn", widths=(4,), dim=16),
        lite_video=LiteVideoConfig(widths=(4,), convs_per_block=(1,), dim=16),
    )
    out = tmp_path / "run"
    train_lite.train_lite(
        {"ravdess": ravdess},
        fer,
        out,
        val_speakers=VAL,
        epochs={"audio": 1, "video": 1, "fusion": 1},
        cache=tmp_path / "cache",
        model_cfg=tiny,
        log=lambda _: None,
    )
    lines: list[str] = []
    results = ablate.ablate(
        out / "fused.pt",
        ravdess,
        fer,
        val_actors={3},
        seeds=(0, 1),
        epochs=1,
        views=1,
        faces_per_class=3,
        val_repeats=2,
        cache=tmp_path / "cache",
        log=lines.append,
    )
    assert list(results) == list(ablate.VARIANTS)
    assert all(len(r["ua"]) == 2 and all(0.0 <= u <= 1.0 for u in r["ua"]) for r in results.values())
    table = ablate.markdown(results, "setup")
    rows = [ln for ln in table.splitlines() if ln.startswith("|")]
    assert len(rows) == 6 and all("±" in r for r in rows[2:])  # header, rule and four variants


def test_merge_branches_takes_each_branch_with_its_own_sizes(tmp_path: Path) -> None:
    """The audio and video stages may run with different encoder sizes; fusion starts from both."""
    from model_export.model import FoalNet, save_checkpoint

    small = FoalNetConfig(
        dim=16,
        lite_audio=LiteAudioConfig(backbone="cnn", widths=(4, 8), dim=16),
        lite_video=LiteVideoConfig(widths=(4,), convs_per_block=(1,), dim=16),
    )
    older = replace(small.spec, version="0.9.0")  # a branch trained under an earlier release label
    wide = FoalNetConfig(
        **{**small.__dict__, "spec": older, "lite_video": LiteVideoConfig(widths=(8, 8), convs_per_block=(1, 1))}
    )
    audio, video = FoalNet(small), FoalNet(wide)
    save_checkpoint(audio, tmp_path / "audio.pt")
    save_checkpoint(video, tmp_path / "video.pt")
    merged = train_lite.merge_branches(tmp_path / "audio.pt", tmp_path / "video.pt")
    assert merged.cfg.lite_audio == small.lite_audio and merged.cfg.lite_video == wide.lite_video
    assert merged.cfg.spec.version == small.spec.version
    save_checkpoint(FoalNet(replace(wide, spec=replace(older, frames_per_window=3))), tmp_path / "other.pt")
    with pytest.raises(ValueError, match="different model specs"):  # preprocessing must agree
        train_lite.merge_branches(tmp_path / "audio.pt", tmp_path / "other.pt")
    for part, source in (("audio_encoder", audio), ("video_encoder", video), ("video_head", video)):
        for key, value in getattr(source, part).state_dict().items():
            assert torch.equal(value, getattr(merged, part).state_dict()[key]), f"{part}.{key}"
