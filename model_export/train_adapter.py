"""The audio stage for a frozen backbone (the lite Whisper voice branch): only its adapter and the
audio head learn, on backbone outputs computed once per view of each clip and cached."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from model_export import augment, corpora
from model_export.encoders import masked_mean
from model_export.metrics import per_corpus_ua
from model_export.model import FoalNet
from model_export.train import Log, StageConfig, _batches, predict, run_stage

# A frozen audio backbone (the Whisper encoder) runs once per view instead of once per draw: every
# training clip gets its clean centred window and BACKBONE_VIEWS - 1 augmented ones, and training draws
# a clip, then one of its views. The views of a corpus are cached by the clips' content, so the
# leave-one-corpus-out runs reuse the ones the full run made.
BACKBONE_VIEWS = 4
TOKEN_DROP = 0.1  # share of a view's tokens dropped while training the adapter (SpecAugment's time masks)


def views_key(model: FoalNet, clips: list[np.ndarray], views: int, *, seed: int, codecs: bool) -> str:
    """What `backbone_views` depend on: the settings, the backbone's weights, each clip and its length.
    The weights are hashed by value: not by their sums (torch sums in an order that depends on its
    thread count), and with -0.0 read as 0.0 (they compute the same, and the stages' EMA copy of a
    frozen weight turns one into the other)."""
    enc, spec = model.audio_encoder, model.cfg.spec
    key = hashlib.sha1(f"{views} {seed} {codecs} {spec.window_samples} {enc.cfg}".encode())
    for weight in enc.whisper.state_dict().values():
        key.update((weight.detach().cpu() + 0.0).contiguous().numpy().tobytes())
    for clip in clips:
        key.update(np.int64(len(clip)).tobytes())
        key.update(np.ascontiguousarray(clip).view(np.uint8))
    return key.hexdigest()[:16]


def backbone_views(
    model: FoalNet, clips: list[np.ndarray], views: int, *, seed: int, codecs: bool, cache: Path
) -> tuple[np.ndarray, np.ndarray]:
    """float16 [N, views, T, D] backbone outputs and bool [N, views, T] masks of each clip's views
    (view 0 the clean centred window, the rest `augment.augment_audio`), cached by content."""
    enc, spec = model.audio_encoder, model.cfg.spec
    path = Path(cache) / f"backbone-views-{views_key(model, clips, views, seed=seed, codecs=codecs)}.npy"
    mask_path = path.with_suffix(".mask.npy")
    if path.is_file() and mask_path.is_file():
        return np.load(path, mmap_mode="r"), np.load(mask_path)
    rng = np.random.default_rng(seed)
    coded = augment.coded_copies(clips, spec, seed) if codecs and views > 1 else [None] * len(clips)
    windows = [
        augment.crop_or_pad(clip, spec.window_samples, None)
        if v == 0
        else augment.augment_audio(clip, spec, rng, c)
        for clip, c in zip(clips, coded)
        for v in range(views)
    ]
    enc.eval()
    feats, masks = [], []
    with torch.no_grad():
        for idx in _batches(len(windows), 32, None):
            audio = torch.from_numpy(np.stack([windows[i][0] for i in idx]))
            lengths = torch.tensor([windows[i][1] for i in idx], dtype=torch.int64)
            x, mask = enc.backbone(audio, lengths)
            feats.append(x.numpy().astype(np.float16))
            masks.append(mask.numpy())
    x, mask = np.concatenate(feats), np.concatenate(masks)
    x = x.reshape(len(clips), views, *x.shape[1:])
    mask = mask.reshape(len(clips), views, -1)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, x)
    np.save(mask_path, mask)
    return np.load(path, mmap_mode="r"), mask


class StackedViews:
    """Several corpora's memory-mapped `backbone_views` arrays read as one, rows in a given order, without
    copying them into memory: `x[rows, views]` gathers each row from the file it lives in. (The three
    corpora's training views are ~7 GB; concatenating them held that much resident memory per process.)"""

    def __init__(self, parts: list[np.ndarray], rows: list[np.ndarray]) -> None:
        self.parts = parts
        n = sum(len(r) for r in rows)
        self.part, self.local = np.empty(n, np.int64), np.empty(n, np.int64)
        for p, r in enumerate(rows):
            self.part[r], self.local[r] = p, np.arange(len(r))
        self.shape = (n, *parts[0].shape[1:]) if parts else (0,)
        self.dtype = parts[0].dtype if parts else np.dtype(np.float16)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: tuple[np.ndarray, np.ndarray | int]) -> np.ndarray:
        """rows [B] and views [B] (or one view for every row) -> [B, T, D]."""
        rows = np.asarray(key[0])
        views = np.broadcast_to(key[1], rows.shape)
        out = np.empty((len(rows), *self.shape[2:]), self.dtype)
        for p, part in enumerate(self.parts):
            sel = np.flatnonzero(self.part[rows] == p)
            if len(sel):
                out[sel] = part[self.local[rows[sel]], views[sel]]
        return out


def corpus_views(
    model: FoalNet, speech: corpora.Speech, views: int, *, seed: int, codecs: bool, cache: Path
) -> tuple[StackedViews, np.ndarray]:
    """`backbone_views` corpus by corpus (one cache file each), in `speech`'s row order: the states as a
    `StackedViews` over the cache files, the masks [N, views, T] in memory."""
    rows = [np.flatnonzero(speech.corpus == c) for c in dict.fromkeys(speech.corpus)]
    parts = [
        backbone_views(model, [speech.clips[i] for i in r], views, seed=seed, codecs=codecs, cache=cache)
        for r in rows
    ]
    order = np.argsort(np.concatenate(rows), kind="stable")
    return StackedViews([p[0] for p in parts], rows), np.concatenate([p[1] for p in parts])[order]


def train_audio_adapter(
    model: FoalNet,
    train: corpora.Speech,
    val: corpora.Speech,
    cfg: StageConfig,
    ckpt: Path,
    log: Log,
    *,
    codecs: bool,
    cache: Path,
) -> dict[str, float]:
    """`train_audio` for a frozen backbone: the adapter and the audio head learn on cached views."""
    k, enc = model.cfg.num_classes, model.audio_encoder
    params = [p for m in (enc.adapter, model.audio_head) for p in m.parameters()]
    sampler = corpora.BalancedSampler(train.corpus, train.y)
    x_train, m_train = corpus_views(model, train, BACKBONE_VIEWS, seed=cfg.seed, codecs=codecs, cache=cache)
    x_val, m_val = corpus_views(model, val, 1, seed=cfg.seed, codecs=False, cache=cache)
    log(f"backbone views: train {x_train.shape}, validation {x_val.shape}")

    def logits(m: FoalNet, x: np.ndarray, mask: np.ndarray) -> Tensor:
        tokens, kept = m.audio_encoder.adapt(torch.from_numpy(x.astype(np.float32)), torch.from_numpy(mask))
        return m.audio_head(masked_mean(tokens, kept))

    def step_loss(m: FoalNet, idx: np.ndarray, rng: np.random.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        picks = sampler(len(idx), rng)
        v = rng.integers(BACKBONE_VIEWS, size=len(picks))
        mask = m_train[picks, v]
        kept = mask & (rng.random(mask.shape) >= TOKEN_DROP)
        emptied = ~kept.any(1)
        kept[emptied] = mask[emptied]  # a view that lost every token keeps them all
        loss = F.cross_entropy(
            logits(m, x_train[picks, v], kept),
            torch.from_numpy(train.y[picks]),
            label_smoothing=cfg.label_smoothing,
        )
        return loss, {"ce_audio": loss.detach()}

    def validate(m: FoalNet) -> dict[str, float]:
        pred = predict(m, len(val), 256, lambda idx: logits(m, x_val[idx, 0], m_val[idx, 0]))
        return per_corpus_ua(val, pred, k)

    return run_stage(model, params, len(train), step_loss, validate, cfg, ckpt, log, "audio")
