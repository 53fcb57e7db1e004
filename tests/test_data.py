"""Dataset layouts, label mapping, speaker splits, augmentation and metrics (no real data needed)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from model_export import augment, data
from model_export.metrics import auc, scores
from service.contract import LABELS_7, LITE_SPEC
from service.errors import ApiError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.parametrize(
    ("name", "label", "actor"),
    [
        ("03-01-01-01-01-01-01.wav", "neutral", 1),
        ("03-01-02-02-01-02-12.flac", "neutral", 12),  # calm -> neutral
        ("03-01-05-02-02-01-20.wav", "angry", 20),
        ("03-01-06-01-01-01-07.flac", "fearful", 7),
        ("03-01-08-01-01-01-24.wav", "surprised", 24),
    ],
)
def test_ravdess_names(name: str, label: str, actor: int) -> None:
    assert data.parse_ravdess_name(name) == (label, actor)


@pytest.mark.parametrize("name", ["03-01-09-01-01-01-01.wav", "foo.wav", "03-01-01-01-01-01.wav"])
def test_ravdess_bad_names(name: str) -> None:
    with pytest.raises(ApiError):
        data.parse_ravdess_name(name)


def test_actor_ranges() -> None:
    assert data.parse_actors("17-20") == {17, 18, 19, 20}
    assert data.parse_actors("1,3,5-6") == {1, 3, 5, 6}
    with pytest.raises(ApiError):
        data.parse_actors("a-b")


def _ravdess_tree(root: Path, actors: range) -> None:
    for actor in actors:
        folder = root / f"Actor_{actor:02d}"
        folder.mkdir(parents=True)
        for emotion in ("01", "02", "05"):
            (folder / f"03-01-{emotion}-01-01-01-{actor:02d}.wav").write_bytes(b"")
        (folder / "notes.txt").write_text("not audio")


def test_scan_and_split_by_actor(tmp_path: Path) -> None:
    _ravdess_tree(tmp_path, range(1, 7))
    items = data.scan_ravdess(tmp_path)
    assert len(items) == 18 and {it.label for it in items} == {"neutral", "angry"}
    train, val = data.split_by_actor(items, {5, 6})
    assert {it.group for it in train} == {1, 2, 3, 4} and {it.group for it in val} == {5, 6}
    assert {it.group for it in data.scan_ravdess(tmp_path, {2})} == {2}
    folds = data.actor_folds(list(range(1, 21)), 4)
    assert sorted(a for f in folds for a in f) == list(range(1, 21))
    assert all(len(f) == 5 for f in folds)


def test_fer_layout_and_manifest(tmp_path: Path) -> None:
    for split in ("train", "val"):
        for cls in ("fear", "surprise", "happy"):
            (tmp_path / split / cls).mkdir(parents=True)
            cv2.imwrite(str(tmp_path / split / cls / "a.jpg"), np.full((48, 48), 100, np.uint8))
    items = data.scan_fer(tmp_path, "val")
    assert sorted(it.label for it in items) == ["fearful", "happy", "surprised"]
    faces = data.load_faces(items, LITE_SPEC, tmp_path / "cache")
    assert faces.shape == (3, 48, 48, 1) and faces.dtype == np.uint8
    assert abs(int(faces[0].mean()) - 100) <= 1
    assert (tmp_path / "cache").is_dir()  # cached for the next epoch / run
    (tmp_path / "val" / "contempt").mkdir()
    with pytest.raises(ApiError):
        data.scan_fer(tmp_path, "val")

    csv = tmp_path / "m.csv"
    csv.write_text("path,label\nclips/a.mp4,happy\n/abs/b.mp4,sad\n")
    rows = data.read_manifest(csv)
    assert rows[0].path == tmp_path / "clips" / "a.mp4" and rows[1].path == Path("/abs/b.mp4")
    csv.write_text("path,label\na.mp4,bored\n")
    with pytest.raises(ApiError):
        data.read_manifest(csv)


def test_metrics() -> None:
    y = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    p = np.array([0, 0, 0, 1, 1, 1, 2, 0])
    s = scores(y, p, 7)
    assert s["n"] == 8
    assert s["wa"] == pytest.approx(6 / 8)
    assert s["ua"] == pytest.approx((3 / 4 + 1 + 1 / 2) / 3)  # only classes present in the truth
    assert np.array(s["confusion"]).sum() == 8 and s["confusion"][0][1] == 1
    assert 0 < s["macro_f1"] < 1


def test_auc() -> None:
    assert auc(np.array([0.9, 0.8]), np.array([0.1, 0.2, 0.3])) == 1.0
    assert auc(np.array([0.1]), np.array([0.9])) == 0.0
    assert auc(np.array([0.5, 0.5]), np.array([0.5])) == 0.5  # ties count half
    # 3 of the 4 (positive, negative) pairs are ordered right.
    assert auc(np.array([0.2, 0.6]), np.array([0.1, 0.4])) == pytest.approx(0.75)


def test_augmentation_is_seeded_and_bounded() -> None:
    rng = np.random.default_rng(0)
    clip = (0.3 * np.sin(np.arange(40_000) / 20)).astype(np.float32)
    a1, n1 = augment.augment_audio(clip, LITE_SPEC, np.random.default_rng(1))
    a2, n2 = augment.augment_audio(clip, LITE_SPEC, np.random.default_rng(1))
    assert np.array_equal(a1, a2) and n1 == n2
    assert a1.shape == (LITE_SPEC.window_samples,) and np.abs(a1).max() <= 1.0 and not a1[n1:].any()
    p, n = augment.perturb_audio(clip, LITE_SPEC, rng)
    assert n == len(clip) and not np.allclose(p[:n], clip)
    face = np.tile(np.arange(48, dtype=np.uint8)[None, :, None] * 5, (48, 1, 1))
    frames = augment.render_frames(face, 8, np.random.default_rng(3), augment=True)
    assert frames.shape == (8, 48, 48, 1) and frames.dtype == np.uint8
    assert len({f.tobytes() for f in frames}) > 1  # small shifts: not one still image
    assert np.array_equal(frames, augment.render_frames(face, 8, np.random.default_rng(3), augment=True))
    assert augment.perturb_face(face, rng).shape == face.shape


@pytest.mark.data
def test_real_ravdess_layout() -> None:
    root = SHARED / "ravdess-speech"
    if not root.is_dir():
        pytest.skip("shared RAVDESS data not present")
    items = data.scan_ravdess(root)
    assert len(items) == 1200 and {it.label for it in items} == set(LABELS_7)
    train, val = data.split_by_actor(items, data.parse_actors("17-20"))
    assert len(val) == 240 and not {it.group for it in train} & {it.group for it in val}
