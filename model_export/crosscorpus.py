"""Speech scored per corpus, across corpora and through recording-chain changes (torch-free).

- `speech_report`: UA / WA of `audio_probs` per corpus, over all 7 outputs (what a user sees) and
  restricted to the 6 classes every corpus has (`SHARED_LABELS`: the cross-corpus figure);
- `robustness`: the same clips clean and through each `CONDITIONS` entry (loudness, band limit, real
  lossy codecs, reverberation, noise), so a change of recording chain shows as lost points;
- `loco_markdown`: the leave-one-corpus-out table (train on two corpora, test on the third).
Everything runs through the service's engine on one centred window per clip, as `foalnet eval` does.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from model_export import augment, corpora
from model_export.evaluate import speech_probs
from model_export.metrics import scores
from service.contract import ModelSpec

Condition = Callable[[list[np.ndarray], ModelSpec, np.random.Generator], list[np.ndarray]]


def _each(fn: Callable[[np.ndarray, ModelSpec, np.random.Generator], np.ndarray]) -> Condition:
    return lambda clips, spec, rng: [fn(c, spec, rng) for c in clips]


def _codec(name: str) -> Condition:
    return lambda clips, spec, rng: augment.codec_roundtrip(clips, name, spec.sample_rate)


CONDITIONS: dict[str, Condition] = {
    "clean": lambda clips, spec, rng: clips,
    "quiet (-30 dB)": _each(lambda c, s, r: c * np.float32(10 ** (-30 / 20))),
    "peak-normalised (-1 dBFS)": _each(lambda c, s, r: augment.peak_normalise(c)),
    "telephone band (300-3400 Hz)": _each(lambda c, s, r: augment.band_limit(c, 300.0, 3400.0, s.sample_rate)),
    "opus 12 kb/s": _codec("opus12k"),
    "mp3 32 kb/s": _codec("mp3_32k"),
    "aac 24 kb/s": _codec("aac24k"),
    "reverberant room (RT60 0.6 s)": _each(lambda c, s, r: augment.reverb(c, 0.6, s.sample_rate, r)),
    "noise (10 dB SNR)": _each(lambda c, s, r: augment.add_noise(c, 10.0, r)),
}
LOUDNESS = ("quiet (-30 dB)", "peak-normalised (-1 dBFS)")


def shared_classes(labels: tuple[str, ...]) -> np.ndarray:
    """Indices into `labels` of the 6 classes every corpus has (`SHARED_LABELS`), ascending."""
    return np.sort([labels.index(c) for c in corpora.SHARED_LABELS])


def shared_argmax(probs: np.ndarray, labels: tuple[str, ...]) -> np.ndarray:
    """Each row's argmax over the shared 6 classes only, as an index into `labels`."""
    shared = shared_classes(labels)
    return shared[probs[:, shared].argmax(-1)]


def corpus_scores(y: np.ndarray, probs: np.ndarray, labels: tuple[str, ...]) -> dict[str, float]:
    """UA/WA over all outputs, and UA/WA with the argmax restricted to the shared 6 classes."""
    k = len(labels)
    keep = np.isin(y, shared_classes(labels))
    all_classes = scores(y, probs.argmax(-1), k)
    six = scores(y[keep], shared_argmax(probs[keep], labels), k)
    return {"n": all_classes["n"], "ua": all_classes["ua"], "wa": all_classes["wa"], "ua6": six["ua"], "wa6": six["wa"]}


def speech_report(engine, speech: corpora.Speech, *, clips: list[np.ndarray] | None = None) -> dict[str, dict]:
    """{corpus: corpus_scores} for every corpus in `speech` (`clips` replaces the clips, e.g. perturbed)."""
    probs = speech_probs(engine, speech.clips if clips is None else clips)
    return {
        c: corpus_scores(speech.y[speech.corpus == c], probs[speech.corpus == c], engine.spec.labels)
        for c in np.unique(speech.corpus)
    }


def robustness(engine, speech: corpora.Speech, seed: int = 0) -> dict[str, dict[str, dict]]:
    """{condition: {corpus: corpus_scores}} for every entry of CONDITIONS, same clips each time."""
    out = {}
    for name, condition in CONDITIONS.items():
        clips = condition(speech.clips, engine.spec, np.random.default_rng(seed))
        out[name] = speech_report(engine, speech, clips=[np.clip(c, -1, 1).astype(np.float32) for c in clips])
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def robustness_markdown(table: dict[str, dict[str, dict]], key: str = "ua") -> str:
    """Rows: conditions; columns: corpora and their mean; each cell UA (and the change from clean)."""
    corpora_ = list(next(iter(table.values())))
    clean = {c: table["clean"][c][key] for c in corpora_}
    lines = [
        "| condition | " + " | ".join(corpora_) + " | mean | Δ mean |",
        "|---|" + "---|" * (len(corpora_) + 2),
    ]
    for name, row in table.items():
        mean = float(np.mean([row[c][key] for c in corpora_]))
        delta = mean - float(np.mean(list(clean.values())))
        lines.append(
            f"| {name} | " + " | ".join(_pct(row[c][key]) for c in corpora_) + f" | {_pct(mean)} | {100 * delta:+.1f} |"
        )
    return "\n".join(lines)


def loco_markdown(rows: dict[str, dict[str, dict]]) -> str:
    """`rows[held_out][model_name] = corpus_scores` -> a Markdown table (UA over 6 classes, UA over 7)."""
    models = list(next(iter(rows.values())))
    lines = [
        "| held-out corpus | " + " | ".join(f"{m}: UA6 / UA7" for m in models) + " |",
        "|---|" + "---|" * len(models),
    ]
    for corpus, by_model in rows.items():
        cells = [f"{_pct(by_model[m]['ua6'])} / {_pct(by_model[m]['ua'])}" for m in models]
        lines.append(f"| {corpus} (n={next(iter(by_model.values()))['n']}) | " + " | ".join(cells) + " |")
    means = [float(np.mean([rows[c][m]["ua6"] for c in rows])) for m in models]
    lines.append("| mean UA6 | " + " | ".join(_pct(m) for m in means) + " |")
    return "\n".join(lines)
