"""Speech corpora for the audio branch under one label map: RAVDESS (English), nEMO (Polish), CASIA
(Mandarin). Splits are by speaker inside every corpus, and across corpora for leave-one-corpus-out.

Every clip is decoded by the service's own decoder (`data.load_audio`, cached). A corpus lacks some of
the 7 labels (only RAVDESS has disgust); its clips simply never carry them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model_export import data
from service.contract import LABELS_7, ModelSpec

DATA_ROOT = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
SPEECH_CORPORA: tuple[str, ...] = ("ravdess", "nemo", "casia")
DEFAULT_ROOTS: dict[str, Path] = {
    "ravdess": DATA_ROOT / "ravdess-speech",
    "nemo": DATA_ROOT / "nemo",
    "casia": DATA_ROOT / "casia",
}
# The classes all three corpora have: what the cross-corpus UA averages over.
SHARED_LABELS: tuple[str, ...] = ("neutral", "happy", "sad", "angry", "fearful", "surprised")

NEMO_EMOTIONS: dict[str, str] = {
    "anger": "angry",
    "fear": "fearful",
    "happiness": "happy",
    "neutral": "neutral",
    "sadness": "sad",
    "surprised": "surprised",
}
CASIA_EMOTIONS: dict[str, str] = {
    "angry": "angry",
    "fear": "fearful",
    "happy": "happy",
    "neutral": "neutral",
    "sad": "sad",
    "surprise": "surprised",
}
SPEECH_SUFFIXES = (".wav", ".flac", ".ogg", ".opus", ".mp3")

# Validation speakers inside each corpus (never trained on): both sexes where the corpus allows.
VAL_SPEAKERS: dict[str, frozenset[str]] = {
    "ravdess": frozenset({"17", "18", "19", "20"}),
    "nemo": frozenset({"IC0", "SM0"}),  # one female, one male of nine
    "casia": frozenset({"wangzhe"}),  # one of four (two female, two male)
}


@dataclass(frozen=True)
class Utterance:
    path: Path
    label: str
    corpus: str
    speaker: str


def _invalid(detail: str) -> Exception:
    return data._invalid(detail)


def scan_nemo(root: Path) -> list[Utterance]:
    """nEMO: `SPK_emotion_N.ogg` (or .wav) in one folder; speaker and label from the name."""
    root = Path(root)
    if not root.is_dir():
        raise _invalid(f"nEMO directory {root} does not exist")
    out = []
    for path in sorted(root.iterdir()):
        if path.suffix.lower() not in SPEECH_SUFFIXES:
            continue
        parts = path.stem.split("_")
        if len(parts) != 3 or parts[1] not in NEMO_EMOTIONS:
            raise _invalid(f"{path.name!r} is not a nEMO name SPEAKER_emotion_N")
        out.append(Utterance(path, NEMO_EMOTIONS[parts[1]], "nemo", parts[0]))
    if not out:
        raise _invalid(f"no nEMO clips found under {root}")
    return out


def scan_casia(root: Path) -> list[Utterance]:
    """CASIA: `<speaker>/<emotion>/*.ogg`; label = folder."""
    root = Path(root)
    if not root.is_dir():
        raise _invalid(f"CASIA directory {root} does not exist")
    out = []
    for path in sorted(root.glob("*/*/*")):
        if path.suffix.lower() not in SPEECH_SUFFIXES:
            continue
        emotion = path.parent.name
        if emotion not in CASIA_EMOTIONS:
            raise _invalid(f"unknown CASIA emotion folder {emotion!r}")
        out.append(Utterance(path, CASIA_EMOTIONS[emotion], "casia", path.parent.parent.name))
    if not out:
        raise _invalid(f"no CASIA clips found under {root}")
    return out


def scan_ravdess(root: Path) -> list[Utterance]:
    return [Utterance(it.path, it.label, "ravdess", str(it.group)) for it in data.scan_ravdess(root)]


SCANNERS = {"ravdess": scan_ravdess, "nemo": scan_nemo, "casia": scan_casia}


def parse_corpora(text: str) -> dict[str, Path]:
    """`"ravdess,nemo"` or `"nemo=/data/nemo,casia"` -> {name: root} (default roots where not given)."""
    out: dict[str, Path] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, root = part.partition("=")
        if name not in SCANNERS:
            raise _invalid(f"unknown speech corpus {name!r}; choose from {', '.join(SPEECH_CORPORA)}")
        out[name] = Path(root) if root else DEFAULT_ROOTS[name]
    if not out:
        raise _invalid("no speech corpus given")
    return out


@dataclass
class Speech:
    """Decoded clips with their label index, corpus and speaker (one row per clip)."""

    clips: list[np.ndarray]
    y: np.ndarray
    corpus: np.ndarray
    speaker: np.ndarray

    def __len__(self) -> int:
        return len(self.y)

    def take(self, keep: np.ndarray) -> Speech:
        idx = np.flatnonzero(keep)
        return Speech([self.clips[i] for i in idx], self.y[idx], self.corpus[idx], self.speaker[idx])

    def is_val(self, val_speakers: dict[str, frozenset[str]] = VAL_SPEAKERS) -> np.ndarray:
        return np.array([s in val_speakers.get(c, ()) for c, s in zip(self.corpus, self.speaker)], bool)


def load_speech(
    roots: dict[str, Path], spec: ModelSpec, cache: Path = data.DEFAULT_CACHE, labels: tuple[str, ...] = LABELS_7
) -> Speech:
    """Scan and decode every named corpus (one cache file per corpus)."""
    parts: list[Speech] = []
    for name, root in roots.items():
        utts = SCANNERS[name](root)
        clips = data.load_audio([data.Item(u.path, u.label) for u in utts], spec, cache)
        parts.append(
            Speech(
                clips,
                np.array([data.label_index(u.label, labels) for u in utts], np.int64),
                np.array([u.corpus for u in utts]),
                np.array([u.speaker for u in utts]),
            )
        )
    return Speech(
        [c for p in parts for c in p.clips],
        np.concatenate([p.y for p in parts]),
        np.concatenate([p.corpus for p in parts]),
        np.concatenate([p.speaker for p in parts]),
    )


class BalancedSampler:
    """Draws clip indices corpus-balanced, then class-balanced inside the corpus: every corpus and every
    class a corpus has is seen equally often, whatever the corpus sizes (nEMO is 4x RAVDESS)."""

    def __init__(self, corpus: np.ndarray, y: np.ndarray) -> None:
        self.groups = [
            [np.flatnonzero((corpus == c) & (y == k)) for k in np.unique(y[corpus == c])]
            for c in np.unique(corpus)
        ]

    def __call__(self, n: int, rng: np.random.Generator) -> np.ndarray:
        out = np.empty(n, np.int64)
        for i in range(n):
            classes = self.groups[rng.integers(len(self.groups))]
            members = classes[rng.integers(len(classes))]
            out[i] = members[rng.integers(len(members))]
        return out
