"""Real audio-visual corpora (the same clip's voice and face): CREMA-D, RAVDESS audio-visual, IEMOCAP
and a generic CSV manifest, as `Clip`s with a speaker, split by speaker.

Layouts (nothing is downloaded; the user points at their copy):
- CREMA-D: `AudioWAV/1001_DFA_ANG_XX.wav` + `VideoFlash/1001_DFA_ANG_XX.flv` (actor, sentence,
  emotion, level); a clip whose other half is missing is skipped.
- RAVDESS audio-visual: `**/01-01-EE-II-SS-RR-AA.mp4` (modality 01 = audio+video, vocal channel 01 =
  speech); video-only (02), audio-only (03) and song files are skipped.
- manifest: a CSV with `path,label` and optional `speaker,split` columns (split: train/val/test, all
  given or all blank).
Emotions map onto the configuration's labels; a clip whose emotion the configuration does not have
(e.g. CREMA-D disgust for the paper's 4 IEMOCAP classes) is left out and counted.
"""

from __future__ import annotations

import csv
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model_export import data
from service.errors import ApiError, ErrorCode

CORPORA: tuple[str, ...] = ("crema-d", "ravdess-av", "manifest")
SPLITS: tuple[str, ...] = ("train", "val", "test")

CREMA_EMOTIONS: dict[str, str] = {
    "ANG": "angry",
    "DIS": "disgust",
    "FEA": "fearful",
    "HAP": "happy",
    "NEU": "neutral",
    "SAD": "sad",
}
CREMA_NAME = re.compile(r"^(?P<actor>\d{4})_(?P<sentence>[A-Z]{3})_(?P<emo>[A-Z]{3})_(?P<level>[A-Z]{2})$")
RAVDESS_AV_MODALITY, RAVDESS_SPEECH = "01", "01"


@dataclass(frozen=True)
class Clip:
    """One labelled audio-visual clip (`item`: media, label, span) and who speaks in it."""

    item: data.Item
    speaker: str
    split: str = ""  # the corpus's own split, "" when splits are drawn by speaker


def _invalid(detail: str) -> ApiError:
    return ApiError(ErrorCode.INVALID_REQUEST, detail)


def _keep(clips: list[Clip], labels: tuple[str, ...], where: Path) -> list[Clip]:
    """The clips whose label the configuration has; refuses an empty result."""
    kept = [c for c in clips if c.item.label in labels]
    if not kept:
        dropped = Counter(c.item.label for c in clips)
        raise _invalid(f"no clips with the labels {', '.join(labels)} under {where} (found {dict(dropped)})")
    return kept


def scan_crema_d(root: Path, labels: tuple[str, ...]) -> list[Clip]:
    """CREMA-D clips: audio from AudioWAV/, frames from VideoFlash/ (same stem), actor = speaker."""
    root = Path(root)
    audio_dir, video_dir = root / "AudioWAV", root / "VideoFlash"
    if not audio_dir.is_dir() or not video_dir.is_dir():
        raise _invalid(f"CREMA-D needs {audio_dir} and {video_dir}")
    videos = {p.stem: p for p in video_dir.glob("*.flv")}
    clips = []
    for wav in sorted(audio_dir.glob("*.wav")):
        match = CREMA_NAME.match(wav.stem)
        if match is None or match.group("emo") not in CREMA_EMOTIONS or wav.stem not in videos:
            continue
        label = CREMA_EMOTIONS[match.group("emo")]
        actor = match.group("actor")
        clips.append(Clip(data.Item(wav, label, int(actor), video=videos[wav.stem]), actor))
    if not clips:
        raise _invalid(f"no CREMA-D pairs AudioWAV/<name>.wav + VideoFlash/<name>.flv under {root}")
    return _keep(clips, labels, root)


def scan_ravdess_av(root: Path, labels: tuple[str, ...]) -> list[Clip]:
    """RAVDESS audio-visual speech clips (modality 01, vocal channel 01) anywhere under `root`."""
    root = Path(root)
    if not root.is_dir():
        raise _invalid(f"RAVDESS directory {root} does not exist")
    clips = []
    for path in sorted(root.rglob("*.mp4")):
        match = data.RAVDESS_NAME.match(path.stem)
        if match is None or (match.group(1), match.group(2)) != (RAVDESS_AV_MODALITY, RAVDESS_SPEECH):
            continue
        label, actor = data.parse_ravdess_name(path.name)
        clips.append(Clip(data.Item(path, label, actor), f"{actor:02d}"))
    if not clips:
        raise _invalid(f"no RAVDESS audio-visual speech clips 01-01-EE-II-SS-RR-AA.mp4 under {root}")
    return _keep(clips, labels, root)


def read_av_manifest(path: Path, labels: tuple[str, ...]) -> list[Clip]:
    """`path,label[,speaker][,split]` rows; relative paths are taken from the CSV's folder. Without a
    speaker column every clip is its own speaker (so a drawn split is by clip: say so in reports)."""
    path = Path(path)
    if not path.is_file():
        raise _invalid(f"manifest {path} does not exist")
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        columns = set(reader.fieldnames or ())
        if not {"path", "label"} <= columns:
            raise _invalid(f"manifest {path} needs a header with the columns path,label[,speaker][,split]")
        clips = []
        for n, row in enumerate(reader, start=2):
            media = Path(row["path"])
            data.label_index(row["label"], labels)
            split = (row.get("split") or "").strip().lower()
            if split and split not in SPLITS:
                raise _invalid(f"manifest {path} line {n}: split {split!r} is not one of {', '.join(SPLITS)}")
            speaker = (row.get("speaker") or "").strip() or f"clip{n}"
            media = media if media.is_absolute() else path.parent / media
            clips.append(Clip(data.Item(media, row["label"]), speaker, split))
    if not clips:
        raise _invalid(f"manifest {path} lists no videos")
    given = {bool(c.split) for c in clips}
    if given == {True, False}:
        raise _invalid(f"manifest {path}: give a split for every row or for none")
    return clips


def scan_corpus(kind: str, root: Path, labels: tuple[str, ...]) -> list[Clip]:
    """`kind` in CORPORA; `root` is the corpus folder (the CSV file for a manifest)."""
    scanners = {"crema-d": scan_crema_d, "ravdess-av": scan_ravdess_av, "manifest": read_av_manifest}
    if kind not in scanners:
        raise _invalid(f"unknown corpus {kind!r}: choose from {', '.join(CORPORA)}")
    return scanners[kind](root, labels)


def speaker_split(
    clips: list[Clip], *, seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.1
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test) clip indices. The corpus's own split when it has one; otherwise whole
    speakers drawn (seeded) for validation and test, so no speaker is on two sides."""
    if clips and clips[0].split:
        return tuple(np.array([i for i, c in enumerate(clips) if c.split == s], int) for s in SPLITS)
    speakers = sorted({c.speaker for c in clips})
    if len(speakers) < 3:
        raise _invalid(f"a speaker-grouped split needs at least 3 speakers, found {len(speakers)}")
    order = np.random.default_rng(seed).permutation(speakers).tolist()
    n_test = max(1, round(test_fraction * len(speakers)))
    n_val = max(1, round(val_fraction * len(speakers)))
    test, val = set(order[:n_test]), set(order[n_test : n_test + n_val])
    side = ["test" if c.speaker in test else "val" if c.speaker in val else "train" for c in clips]
    return tuple(np.array([i for i, s in enumerate(side) if s == name], int) for name in SPLITS)
