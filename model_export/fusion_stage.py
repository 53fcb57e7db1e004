"""The lite fusion stage: both pretrained branches frozen, the rest of Foal-Net (projections, AVEL,
cross-attention fusion, MEM) trained on pseudo audio-visual pairs, a speech clip and a FER face.

A pair shows the voice and the face of one emotion, except for a share of conflicting pairs that show
one branch wrong as often as validation data finds it wrong (`conflict_shares`), so the fused head
weighs each branch by how far it can be trusted on data it never saw, not on its own training clips.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from model_export import corpora
from model_export.metrics import scores
from model_export.model import FoalNet
from model_export.train import Log, StageConfig, _batches, audio_batch, frames_batch, run_stage
from service.contract import ModelSpec

# Fusion-stage modality dropout: the share of training pairs whose audio (or, separately, face) is
# removed, so the fused head learns to use whichever evidence is there instead of following one branch.
MODALITY_DROPOUT = 0.15


@dataclass
class PseudoAV:
    """Speech clips paired with same-emotion faces; the pairing is redrawn (seeded) every time.
    `corpus` (optional) makes training draws corpus- and class-balanced. `views` (optional): a frozen
    backbone's cached outputs of every clip and their masks (`corpus_views`), which then stand in for
    the clips: training draws one of a clip's views, evaluation reads view 0 (the clean window)."""

    clips: list[np.ndarray]
    y: np.ndarray
    faces: np.ndarray
    face_y: np.ndarray
    corpus: np.ndarray | None = None
    views: tuple[np.ndarray, np.ndarray] | None = None
    conflict: tuple[float, float] = (0.0, 0.0)  # shares of training pairs with a wrong voice / face

    def __post_init__(self) -> None:
        self.by_label = {c: np.flatnonzero(self.face_y == c) for c in np.unique(self.y)}
        missing = [int(c) for c, ids in self.by_label.items() if len(ids) == 0]
        if missing:
            raise ValueError(f"no faces for label indices {missing}")
        corpus = self.corpus if self.corpus is not None else np.zeros(len(self.y), dtype="<U1")
        self.sampler = corpora.BalancedSampler(corpus, self.y)

    def partners(self, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return np.array([rng.choice(self.by_label[c]) for c in labels])

    def conflicts(self, idx: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        """(labels, face labels, agree) of training pairs: a share `conflict[0]` shows a face of another
        emotion that is the truth (the voice is wrong), a share `conflict[1]` one that is not (the face
        is wrong); the rest agree."""
        labels, agree = self.y[idx], np.ones(len(idx), dtype=bool)
        if not any(self.conflict):
            return labels, labels, agree
        draw = rng.random(len(idx))
        voice_wrong = draw < self.conflict[0]
        agree = draw >= sum(self.conflict)
        classes = np.array(sorted(self.by_label))
        shift = rng.integers(1, len(classes), size=len(idx))  # to any other class, uniformly
        other = classes[(np.searchsorted(classes, labels) + shift) % len(classes)]
        face_y = np.where(agree, labels, other)
        return np.where(voice_wrong, face_y, labels), face_y, agree

    def batch(self, idx: np.ndarray, spec: ModelSpec, rng: np.random.Generator, mode: str) -> tuple[Tensor, ...]:
        """(audio, audio_len, frames, frames_len, labels, agree). "train" draws balanced, augmented views and
        faces, a share of conflicting pairs (`conflicts`) and drops modalities; "augmented" draws `idx`
        as training views and faces, and nothing else; "clean" / "perturbed" as `audio_batch`."""
        drawn = "train" if mode == "augmented" else mode  # how the audio and faces are drawn
        if mode == "train":
            idx = self.sampler(len(idx), rng)
            labels, face_y, agree = self.conflicts(idx, rng)
        else:
            labels, face_y, agree = self.y[idx], self.y[idx], np.ones(len(idx), dtype=bool)
        if self.views is None:
            audio, audio_len = audio_batch(self.clips, idx, spec, rng, drawn)
        else:  # cached backbone outputs [B, T', D] and their masks [B, T'] in place of samples and lengths
            if drawn not in ("train", "clean"):
                raise ValueError(f"cached views have no {mode!r} audio")
            x, mask = self.views
            v = rng.integers(x.shape[1], size=len(idx)) if drawn == "train" else np.zeros(len(idx), dtype=int)
            audio, audio_len = torch.from_numpy(x[idx, v].astype(np.float32)), torch.from_numpy(mask[idx, v])
        frames, frames_len = frames_batch(self.faces, self.partners(face_y, rng), spec, rng, drawn)
        if mode == "train":
            drop = rng.random(len(idx))
            no_audio = torch.from_numpy(drop < MODALITY_DROPOUT)
            no_face = torch.from_numpy((drop >= MODALITY_DROPOUT) & (drop < 2 * MODALITY_DROPOUT))
            # lengths [B], or a mask [B, T'] for cached views: either way the row is emptied
            audio_len = audio_len.masked_fill(no_audio.view(-1, *[1] * (audio_len.dim() - 1)), 0)
            frames_len = frames_len.masked_fill(no_face, 0)
        return audio, audio_len, frames, frames_len, torch.from_numpy(labels), torch.from_numpy(agree)


@torch.no_grad()
def pair_probs(
    model: FoalNet, pairs: PseudoAV, mode: str = "clean", seed: int = 0, repeats: int = 1
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Labels and fused / audio / video probabilities of every pair, `repeats` times over (fixed seed, so
    the same pairs every call)."""
    model.eval()
    rng, spec = np.random.default_rng(seed), model.cfg.spec
    probs: dict[str, list[np.ndarray]] = {"fused": [], "audio": [], "video": []}
    truth = []
    for _ in range(repeats):
        for idx in _batches(len(pairs.clips), 32, None):
            audio, audio_len, frames, frames_len, y, _ = pairs.batch(idx, spec, rng, mode)
            out = model(audio, audio_len, frames, frames_len)
            for name, key in (("fused", "probs"), ("audio", "audio_probs"), ("video", "video_probs")):
                probs[name].append(out[key].numpy())
            truth.append(y.numpy())
    return np.concatenate(truth), {name: np.concatenate(p) for name, p in probs.items()}


def evaluate_pairs(model: FoalNet, pairs: PseudoAV, mode: str = "clean", seed: int = 0, repeats: int = 1) -> dict:
    """Fused / audio / video scores on pairs (validation ones unless `mode` says otherwise)."""
    y, probs = pair_probs(model, pairs, mode, seed, repeats)
    return {name: scores(y, p.argmax(-1), model.cfg.num_classes) for name, p in probs.items()}


def conflict_shares(model: FoalNet, train: PseudoAV, val: PseudoAV) -> tuple[float, float]:
    """`PseudoAV.conflict` that makes each branch as often right in fusion training as on validation
    data: 1 - UA on validation / UA on training draws, voice and face. Shown only its own training clips,
    where the voice adapter is right ~96 % of the time (~68 % for unseen speakers, ~43 % for an unseen
    corpus), the fused head learned to follow the voice even where the face was the better bet."""
    seen, unseen = evaluate_pairs(model, train, "augmented"), evaluate_pairs(model, val)
    return tuple(max(0.0, 1.0 - unseen[b]["ua"] / max(seen[b]["ua"], 1e-9)) for b in ("audio", "video"))


def train_fusion(
    model: FoalNet,
    train: PseudoAV,
    val: PseudoAV,
    cfg: StageConfig,
    ckpt: Path,
    log: Log,
    *,
    freeze_encoders: bool = True,
    conflict: bool = True,
) -> dict[str, float]:
    """Projections, AVEL, fusion and MEM on pseudo pairs. The pretrained branches (encoders and their
    unimodal heads) stay frozen by default, so the shipped per-modality views are exactly what the branch
    stages selected, and the stage costs a third of end-to-end training. `conflict`: show conflicting
    pairs at the shares `conflict_shares` measures (off: every pair agrees, the 2.3.0 recipe)."""
    spec = model.cfg.spec
    if freeze_encoders:
        for branch in (model.audio_encoder, model.video_encoder, model.audio_head, model.video_head):
            branch.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]

    train.conflict = conflict_shares(model, train, val) if conflict else (0.0, 0.0)
    log(f"fusion: conflicting pairs, voice wrong {train.conflict[0]:.3f}, face wrong {train.conflict[1]:.3f}")

    def step_loss(m: FoalNet, idx: np.ndarray, rng: np.random.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        if freeze_encoders:  # frozen means eval mode too: BN statistics and dropout as pretrained
            m.audio_encoder.eval()
            m.video_encoder.eval()
        total, parts = m.loss(*train.batch(idx, spec, rng, "train"))
        return total, {k: v.detach() for k, v in parts.items()}

    def validate(m: FoalNet) -> dict[str, float]:
        res = evaluate_pairs(m, val)
        return {
            "ua": res["fused"]["ua"],
            "wa": res["fused"]["wa"],
            "audio_ua": res["audio"]["ua"],
            "video_ua": res["video"]["ua"],
        }

    return run_stage(model, params, len(train.clips), step_loss, validate, cfg, ckpt, log, "fusion")
