"""Real audio-visual corpora in their own layouts (CREMA-D, RAVDESS audio-visual, a CSV manifest) on
generated clips: scanning, label mapping, speaker-grouped splits, and `foalnet train --corpus` for the
lite (pretrained tiny branches) and paper (tiny random WavLM / CLIP) configurations."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from bench.media import ffmpeg, make_clip
from model_export import av_corpora, data
from service.contract import LABELS_7, LABELS_IEMOCAP
from service.errors import ApiError

ACTORS = ("1001", "1002", "1003", "1004")


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One real clip of each kind (a face and a voice), copied under every corpus name."""
    root = tmp_path_factory.mktemp("media")
    mp4 = make_clip(root / "face.mp4", seconds=1.5, audio="tone")
    wav = make_clip(root / "voice.wav", seconds=1.5, video=None, audio="tone")
    flv = root / "face.flv"
    ffmpeg("-i", str(mp4), "-an", "-c:v", "flv", str(flv), timeout_s=60)
    return {"mp4": mp4, "wav": wav, "flv": flv}


@pytest.fixture(scope="module")
def crema(media: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("crema-d")
    (root / "AudioWAV").mkdir()
    (root / "VideoFlash").mkdir()
    names = [f"{a}_DFA_{e}_XX" for a in ACTORS for e in ("ANG", "NEU")] + ["1001_IEO_DIS_HI"]
    for name in names:
        shutil.copy(media["wav"], root / "AudioWAV" / f"{name}.wav")
        shutil.copy(media["flv"], root / "VideoFlash" / f"{name}.flv")
    shutil.copy(media["wav"], root / "AudioWAV" / "1002_ITS_SAD_XX.wav")  # no video: skipped
    return root


@pytest.fixture(scope="module")
def ravdess_av(media: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ravdess-av")
    for actor in (1, 2, 3, 4):
        folder = root / f"Video_Speech_Actor_{actor:02d}" / f"Actor_{actor:02d}"
        folder.mkdir(parents=True)
        for emotion in ("01", "05"):
            shutil.copy(media["mp4"], folder / f"01-01-{emotion}-01-01-01-{actor:02d}.mp4")
        for decoy in ("02-01-05", "03-01-05", "01-02-05"):  # video only, audio only, song
            shutil.copy(media["mp4"], folder / f"{decoy}-01-01-01-{actor:02d}.mp4")
    return root


@pytest.fixture(scope="module")
def manifest(media: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("manifest")
    shutil.copy(media["mp4"], root / "a.mp4")
    rows = ["path,label,speaker,split"]
    for i, (label, split) in enumerate(
        [
            ("angry", "train"),
            ("neutral", "train"),
            ("angry", "train"),
            ("neutral", "train"),
            ("angry", "val"),
            ("neutral", "val"),
            ("angry", "test"),
            ("neutral", "test"),
        ]
    ):
        rows.append(f"a.mp4,{label},s{i // 2},{split}")
    (root / "clips.csv").write_text("\n".join(rows) + "\n")
    return root / "clips.csv"


def test_crema_d_pairs_audio_and_video_by_name(crema: Path) -> None:
    clips = av_corpora.scan_corpus("crema-d", crema, LABELS_7)
    assert len(clips) == 9 and {c.speaker for c in clips} == set(ACTORS)
    assert all(c.item.path.suffix == ".wav" and c.item.video.suffix == ".flv" for c in clips)
    assert {c.item.label for c in clips} == {"angry", "neutral", "disgust"}
    four = av_corpora.scan_corpus("crema-d", crema, LABELS_IEMOCAP)  # the paper's classes: no disgust
    assert len(four) == 8


def test_ravdess_av_keeps_audio_visual_speech_only(ravdess_av: Path) -> None:
    clips = av_corpora.scan_corpus("ravdess-av", ravdess_av, LABELS_7)
    assert len(clips) == 8 and all(c.item.path.name.startswith("01-01-") for c in clips)
    assert {c.speaker for c in clips} == {"01", "02", "03", "04"}
    assert {c.item.label for c in clips} == {"neutral", "angry"}


def test_manifest_splits_and_errors(manifest: Path, tmp_path: Path) -> None:
    clips = av_corpora.scan_corpus("manifest", manifest, LABELS_IEMOCAP)
    train, val, test = av_corpora.speaker_split(clips)
    assert (len(train), len(val), len(test)) == (4, 2, 2)  # the manifest's own split
    bad = tmp_path / "bad.csv"
    for text, message in (
        ("path,label,split\na.mp4,angry,dev\n", "split 'dev'"),
        ("path,label,split\na.mp4,angry,train\na.mp4,angry,\n", "every row or for none"),
        ("path,label\na.mp4,fearful\n", "not one of"),
        ("path\na.mp4\n", "columns path,label"),
    ):
        bad.write_text(text)
        with pytest.raises(ApiError, match=message):
            av_corpora.read_av_manifest(bad, LABELS_IEMOCAP)


def test_speaker_split_never_shares_a_speaker(crema: Path) -> None:
    clips = av_corpora.scan_corpus("crema-d", crema, LABELS_7)
    parts = av_corpora.speaker_split(clips, seed=3)
    speakers = [{clips[i].speaker for i in part} for part in parts]
    assert all(speakers) and not (
        speakers[0] & speakers[1] or speakers[0] & speakers[2] or speakers[1] & speakers[2]
    )
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(clips)))
    with pytest.raises(ApiError, match="at least 3 speakers"):
        av_corpora.speaker_split(clips[:2])


def test_clips_decode_through_the_service(crema: Path) -> None:
    """The same path as serving: the wav's audio, the flv's frames cropped to faces (lite spec)."""
    from service.contract import LITE_SPEC

    clips = av_corpora.scan_corpus("crema-d", crema, LABELS_7)[:2]
    decoded = list(data.iter_av([c.item for c in clips], LITE_SPEC))
    for audio, frames in decoded:
        assert abs(len(audio) - 1.5 * LITE_SPEC.sample_rate) < 200
        assert (
            1 <= len(frames) <= LITE_SPEC.frames_per_window and frames.shape[1:] == LITE_SPEC.frames_shape[1:]
        )


# ---- `foalnet train --corpus KIND DIR` end to end -------------------------------------------


def _run(args: list[str]) -> str:
    typer = pytest.importorskip("typer")
    from typer.testing import CliRunner

    from model_export import train_cli

    app = typer.Typer()
    train_cli.register(app)

    @app.callback()
    def main() -> None:
        """test app"""

    result = CliRunner().invoke(app, [*args, "--threads", "1"])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def lite_branches(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Tiny lite audio / video branch checkpoints (what the lite audio and video stages write)."""
    torch = pytest.importorskip("torch")
    from model_export.encoders import LiteAudioConfig, LiteVideoConfig
    from model_export.model import FoalNet, FoalNetConfig, save_checkpoint

    torch.manual_seed(0)
    cfg = FoalNetConfig(
        dim=16,
        heads=2,
        layers=1,
        lite_audio=LiteAudioConfig(backbone="cnn", widths=(4, 8), dim=16),
        lite_video=LiteVideoConfig(widths=(4, 8), convs_per_block=(1, 1), dim=16),
    )
    root = tmp_path_factory.mktemp("branches")
    model = FoalNet(cfg)
    return save_checkpoint(model, root / "audio.pt"), save_checkpoint(model, root / "video.pt")


@pytest.mark.parametrize("kind", ["crema-d", "ravdess-av", "manifest"])
def test_lite_trains_the_fused_head_on_real_pairs(kind, request, tmp_path: Path, lite_branches) -> None:
    torch = pytest.importorskip("torch")
    from model_export.model import load_checkpoint

    root = {"crema-d": "crema", "ravdess-av": "ravdess_av", "manifest": "manifest"}[kind]
    audio_ckpt, video_ckpt = lite_branches
    out = tmp_path / "run"
    corpus = str(request.getfixturevalue(root))
    _run(
        ["train", "--config", "lite", "--corpus", kind, corpus, "--epochs", "fusion=1", "--no-mem",
         "--init", f"audio={audio_ckpt}", "--init", f"video={video_ckpt}", "--out", str(out)]
    )  # fmt: skip
    summary = json.loads((out / "corpus.json").read_text())
    run = summary["folds"][0]
    assert run["epoch"] == 1 and run["n_train"] and run["n_val"] and run["n_test"]
    fused, branch = load_checkpoint(out / "fused.pt"), load_checkpoint(audio_ckpt)
    assert fused.cfg.encoders == "lite" and fused.cfg.mem is False
    for key, value in branch.state_dict().items():  # the pretrained branches stay as they were
        if key.split(".")[0] in ("audio_encoder", "video_encoder", "audio_head", "video_head"):
            assert torch.equal(value, fused.state_dict()[key]), key
    assert "# Foal-Net (lite configuration) on real audio-visual pairs" in (out / "corpus.md").read_text()


def test_paper_trains_on_crema_d(tmp_path: Path, crema: Path, paper_dirs: tuple[str, str]) -> None:
    pytest.importorskip("torch")
    from model_export.model import load_checkpoint

    out = tmp_path / "run"
    wavlm, clip = paper_dirs
    _run(
        ["train", "--config", "paper", "--corpus", "crema-d", str(crema), "--epochs", "paper=1",
         "--audio-encoder", wavlm, "--video-encoder", clip, "--out", str(out)]
    )  # fmt: skip
    run = json.loads((out / "corpus.json").read_text())["folds"][0]
    assert run["n_train"] + run["n_val"] + run["n_test"] == 8  # disgust is not one of the paper's 4 classes
    assert {"test_fused_ua", "test_audio_ua", "test_video_ua"} <= set(run)
    assert load_checkpoint(out / "fused.pt").cfg.spec.labels == LABELS_IEMOCAP
