"""Foal-Net on real audio-visual clips (the same clip's voice and face): the paper's recipe.

The video encoder is frozen in both configurations (CLIP in the paper; the lite face branch once its
stage is done), so each clip's frames go through it once (`embed_clips`) and training reads those
tokens; the audio encoder runs every step (WavLM is fine-tuned, as in the paper). The loop follows
the released code: AdamW (lr 1e-4, torch's default weight decay 0.01), constant learning rate, batch
16, class-balanced sampling with replacement, CE + AVEL + λ·MEM; unlike it, the epoch is selected on a
validation split that shares no speaker with training or test, and the test split is scored once,
after selection.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from model_export import augment, data
from model_export.av_corpora import Clip
from model_export.metrics import scores
from model_export.model import FoalNet
from model_export.paper_encoders import PrecomputedTokens

Log = Callable[[str], None]
HEADS = {"fused": "probs", "audio": "audio_probs", "video": "video_probs"}  # score name -> output


@dataclass
class FitConfig:
    epochs: int = 40
    batch: int = 16
    lr: float = 1e-4
    weight_decay: float = 0.01
    seed: int = 0


PAPER_FIT = FitConfig()
# Lite on real pairs: the lite fusion stage's schedule (its branches are pretrained and frozen).
LITE_FIT = FitConfig(epochs=8, batch=32, lr=1e-3, weight_decay=0.05)


@dataclass
class AVFeatures:
    """Decoded audio and frozen-encoder frame tokens of real clips."""

    clips: list[np.ndarray]  # float32 audio at the spec's rate, whole clip
    tokens: list[np.ndarray]  # float32 [n_i <= F, d] video tokens (n_i = 0: no face / no video)
    y: np.ndarray  # int64 label indices
    speakers: list[str]

    def subset(self, idx: np.ndarray) -> AVFeatures:
        return AVFeatures(
            [self.clips[i] for i in idx],
            [self.tokens[i] for i in idx],
            self.y[idx],
            [self.speakers[i] for i in idx],
        )

    def batch(
        self, idx: np.ndarray, window: int, rng: np.random.Generator | None, device: str
    ) -> tuple[Tensor, ...]:
        """(audio, audio_len, tokens, tokens_len, labels): audio cropped (random with rng, else
        centred) or zero-padded to the window; tokens zero-padded to the longest in the batch."""
        audio = np.zeros((len(idx), window), np.float32)
        audio_len = np.zeros(len(idx), np.int64)
        for row, i in enumerate(idx):
            audio[row], audio_len[row] = augment.crop_or_pad(self.clips[i], window, rng)
        lengths = np.array([len(self.tokens[i]) for i in idx], np.int64)
        tokens = np.zeros((len(idx), max(1, lengths.max()), self.tokens[idx[0]].shape[-1]), np.float32)
        for row, i in enumerate(idx):
            tokens[row, : lengths[row]] = self.tokens[i]
        tensors = (audio, audio_len, tokens, lengths, self.y[idx])
        return tuple(torch.from_numpy(t).to(device) for t in tensors)


@torch.no_grad()
def embed_clips(model: FoalNet, clips: list[Clip], device: str, log: Log) -> AVFeatures:
    """Decode every clip with the service's decoder and cropper and run its frames through the
    model's (frozen) video encoder once."""
    spec, encoder = model.cfg.spec, model.video_encoder.to(device).eval()
    items = [c.item for c in clips]
    audio, tokens = [], []
    start = time.time()
    for audio_i, frames in data.iter_av(items, spec):
        audio.append(audio_i)
        if len(frames):
            x, n = torch.from_numpy(frames)[None].to(device), torch.tensor([len(frames)], device=device)
            tokens.append(encoder(x, n)[0][0].float().cpu().numpy())
        else:
            tokens.append(np.zeros((0, encoder.dim), np.float32))
    log(f"embedded {len(items)} clips' frames in {time.time() - start:.0f}s")
    return AVFeatures(audio, tokens, data.labels_of(items, spec.labels), [c.speaker for c in clips])


@contextlib.contextmanager
def precomputed_video(model: FoalNet) -> Iterator[FoalNet]:
    """The model with its video encoder replaced by the tokens `embed_clips` computed."""
    encoder = model.video_encoder
    model.video_encoder = PrecomputedTokens(encoder.dim)
    try:
        yield model
    finally:
        model.video_encoder = encoder


@torch.no_grad()
def score(model: FoalNet, feats: AVFeatures, device: str) -> dict[str, dict]:
    """Fused / audio / video scores (centre-cropped audio); call inside `precomputed_video`."""
    model.eval()
    window, k = model.cfg.spec.window_samples, model.cfg.num_classes
    preds: dict[str, list[np.ndarray]] = {name: [] for name in HEADS}
    for start in range(0, len(feats.y), 16):
        idx = np.arange(start, min(start + 16, len(feats.y)))
        out = model(*feats.batch(idx, window, None, device)[:4])
        for name, key in HEADS.items():
            preds[name].append(out[key].argmax(-1).cpu().numpy())
    return {name: scores(feats.y, np.concatenate(p), k) for name, p in preds.items()}


def fit(
    model: FoalNet,
    train: AVFeatures,
    val: AVFeatures,
    cfg: FitConfig,
    log: Log,
    device: str,
    *,
    freeze_branches: bool = False,
    name: str = "paper",
) -> dict[str, Any]:
    """Train on `train` and leave the model at the epoch with the best validation fused UA.

    `freeze_branches` (lite): the pretrained audio encoder and both unimodal heads stay as they are
    (the audio encoder in eval mode), as in the lite fusion stage. Returns the selected epoch's
    validation scores."""
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    window = model.cfg.spec.window_samples
    with precomputed_video(model.to(device)):
        if freeze_branches:
            for branch in (model.audio_encoder, model.audio_head, model.video_head):
                branch.requires_grad_(False)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        counts = np.bincount(train.y, minlength=model.cfg.num_classes).astype(np.float64)
        p = 1.0 / counts[train.y]
        p /= p.sum()
        best: dict[str, Any] = {"val_ua": -1.0}
        best_state: dict[str, Tensor] = {}
        for epoch in range(1, cfg.epochs + 1):
            model.train()
            if freeze_branches:
                model.audio_encoder.eval()
            order = rng.choice(len(train.y), size=len(train.y), p=p)  # class-balanced, with replacement
            sums: dict[str, float] = {}
            steps, start = 0, time.time()
            for first in range(0, len(order), cfg.batch):
                total, parts = model.loss(*train.batch(order[first : first + cfg.batch], window, rng, device))
                opt.zero_grad(set_to_none=True)
                total.backward()
                opt.step()
                steps += 1
                for key, value in {"loss": total, **parts}.items():
                    sums[key] = sums.get(key, 0.0) + float(value.detach())
            res = score(model, val, device)["fused"]
            log(
                f"{name} epoch {epoch}/{cfg.epochs} "
                + " ".join(f"{k} {v / steps:.4f}" for k, v in sums.items())
                + f" | val ua {res['ua']:.4f} wa {res['wa']:.4f} | {time.time() - start:.0f}s"
            )
            if res["ua"] > best["val_ua"]:
                best = {"epoch": epoch, "val_ua": res["ua"], "val_wa": res["wa"]}
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        model.load_state_dict(best_state)
    log(f"{name}: selected epoch {best['epoch']} on validation " + json.dumps(best))
    return best


def evaluate_split(model: FoalNet, feats: AVFeatures, device: str) -> dict[str, float]:
    """UA / WA of every head on a held-out split, named test_<head>_<metric>."""
    with precomputed_video(model):
        res = score(model, feats, device)
    return {f"test_{head}_{key}": res[head][key] for head in res for key in ("ua", "wa")}
