"""The lite model (what ships) in three stages; `foalnet train --config lite` runs them.

1. `audio`: the audio branch (lite encoder -> pooled tokens -> audio head) on every speech corpus given
   (RAVDESS, nEMO, CASIA), drawn corpus- and class-balanced, with recording-chain augmentation (loudness,
   reverberation, real lossy codecs, noise, band limits); selected on the mean over corpora of the
   validation speakers' UA. `hold_out` leaves one corpus out entirely (the cross-corpus protocol).
   With the frozen Whisper backbone (the default) only its adapter and the head learn, on cached
   backbone outputs of a few views per clip (`train_audio_adapter`); the CNN learns end to end.
2. `video`: the face branch on FER2013 framed the way the service crops video faces, with the FER+ vote
   distribution as its target; selected on validation UA against the FER+ majority label.
3. `fusion`: both branches loaded and frozen, then the rest of Foal-Net (projections, AVEL, fusion, MEM)
   on pseudo audio-visual pairs (a speech clip of any corpus + a FER face of the same emotion rendered
   into F frames), with modality dropout and conflicting pairs so the fused head weighs each branch by
   how often it is right on data it never saw (`model_export/fusion_stage.py`).
Stages 1 and 2 are independent (run them as two processes to use two cores). Each keeps an EMA of the
weights; checkpoints are `audio.pt`, `video.pt`, `fused.pt` under `out`, with a resume file per epoch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from model_export import augment, corpora, data, faces_data
from model_export.export import video_branch_from_onnx
from model_export.fusion_stage import PseudoAV, train_fusion
from model_export.metrics import per_corpus_ua, scores
from model_export.model import FoalNet, FoalNetConfig, checkpoint_config, load_checkpoint
from model_export.train import (
    Log,
    StageConfig,
    _file_log,
    audio_batch,
    audio_logits,
    face_batch,
    face_logits,
    predict,
    run_stage,
)
from model_export.train_adapter import BACKBONE_VIEWS, corpus_views, train_audio_adapter
from model_export.weight_storage import round_for_storage
from service.contract import LITE_SPEC, ModelSpec

STAGES = ("audio", "video", "fusion")
# MEM weight of the lite fusion stage. The paper's 0.1 leaves the MEM heads at chance on pseudo pairs
# in 8-16 epochs; at 1.0 they learn to tell matched from mismatched pairs (validation AUC ~0.7).
LITE_MEM_WEIGHT = 1.0
DEFAULTS = {
    # An audio "epoch" is 2,400 balanced draws (RAVDESS alone was 960 clips; nEMO is 4x that); 2.0.0's
    # branch peaked at epoch 16 of 18 (an earlier 24-epoch run without silence masking at 20).
    "audio": StageConfig(epochs=18, batch=16, lr=4e-3, ema_decay=0.97, label_smoothing=0.05, epoch_clips=2400),
    "video": StageConfig(epochs=24, batch=128, lr=3e-3, ema_decay=0.99, label_smoothing=0.05),
    # Fusion keeps its last epoch: its validation UA is flat within noise after a few epochs while
    # the MEM heads keep learning, so picking the best UA would mostly pick an untrained MEM.
    "fusion": StageConfig(epochs=6, batch=32, lr=1e-3, ema_decay=0.98, keep="last", epoch_clips=2400),
}


def _summary(s: dict) -> dict[str, float]:
    return {"ua": s["ua"], "wa": s["wa"], "macro_f1": s["macro_f1"]}


def train_audio(
    model: FoalNet,
    train: corpora.Speech,
    val: corpora.Speech,
    cfg: StageConfig,
    ckpt: Path,
    log: Log,
    coded: list[np.ndarray | None] | None = None,
) -> dict[str, float]:
    """The audio branch on every corpus in `train`, drawn corpus- and class-balanced (so no class weights);
    `coded[i]`: a lossy-codec copy of clip i for augmentation. Selected on the mean over corpora of the
    validation speakers' UA, so no corpus (or language) outweighs another."""
    spec, k = model.cfg.spec, model.cfg.num_classes
    params = [p for m in (model.audio_encoder, model.audio_head) for p in m.parameters()]
    sampler = corpora.BalancedSampler(train.corpus, train.y)

    def step_loss(m: FoalNet, idx: np.ndarray, rng: np.random.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        picks = sampler(len(idx), rng)
        views = [augment.augment_audio(train.clips[i], spec, rng, coded[i] if coded else None) for i in picks]
        audio = torch.from_numpy(np.stack([v[0] for v in views]))
        lengths = torch.tensor([v[1] for v in views], dtype=torch.int64)
        loss = F.cross_entropy(
            audio_logits(m, audio, lengths), torch.from_numpy(train.y[picks]), label_smoothing=cfg.label_smoothing
        )
        return loss, {"ce_audio": loss.detach()}

    def validate(m: FoalNet) -> dict[str, float]:
        rng = np.random.default_rng(0)
        pred = predict(
            m, len(val), 64, lambda idx: audio_logits(m, *audio_batch(val.clips, idx, spec, rng, "clean"))
        )
        return per_corpus_ua(val, pred, k)

    return run_stage(model, params, len(train), step_loss, validate, cfg, ckpt, log, "audio")


def soft_cross_entropy(logits: Tensor, targets: Tensor, smoothing: float = 0.0) -> Tensor:
    """Cross-entropy against a target distribution (FER+'s vote shares), optionally smoothed."""
    targets = targets * (1 - smoothing) + smoothing / targets.shape[1]
    return -(targets * logits.log_softmax(-1)).sum(-1).mean()


def train_video(
    model: FoalNet,
    faces: np.ndarray,
    targets: np.ndarray,
    val_faces: np.ndarray,
    y_val: np.ndarray,
    cfg: StageConfig,
    ckpt: Path,
    log: Log,
) -> dict[str, float]:
    """The face branch against `targets` [N, K] (vote distributions); validated on hard labels `y_val`."""
    k = model.cfg.num_classes
    params = [p for m in (model.video_encoder, model.video_head) for p in m.parameters()]

    def step_loss(m: FoalNet, idx: np.ndarray, rng: np.random.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        logits = face_logits(m, face_batch(faces, idx, rng, "train"))
        loss = soft_cross_entropy(logits, torch.from_numpy(targets[idx]), cfg.label_smoothing)
        return loss, {"ce_video": loss.detach()}

    def validate(m: FoalNet) -> dict[str, float]:
        rng = np.random.default_rng(0)
        pred = predict(
            m, len(val_faces), 256, lambda idx: face_logits(m, face_batch(val_faces, idx, rng, "clean"))
        )
        return _summary(scores(y_val, pred, k))

    return run_stage(model, params, len(faces), step_loss, validate, cfg, ckpt, log, "video")


def fresh_model(cfg: FoalNetConfig) -> FoalNet:
    """A new FoalNet; a pretrained audio backbone gets its pretrained weights, rounded as the exported
    file will store them (`round_for_storage`), so its adapter learns on the states the file computes."""
    model = FoalNet(cfg)
    if cfg.frozen_audio_backbone:
        model.audio_encoder.load_pretrained()
        round_for_storage(model)
    return model


def merge_branches(audio_ckpt: Path, video_ckpt: Path) -> FoalNet:
    """A fresh FoalNet with each pretrained branch copied in: the audio checkpoint's config with the
    video checkpoint's video encoder sizes (the two stages may have been run with different sizes).
    The branches must share the spec's preprocessing; its release version is the audio checkpoint's."""
    audio_model = load_checkpoint(audio_ckpt)
    from_onnx = Path(video_ckpt).suffix == ".onnx"
    video_model = video_branch_from_onnx(video_ckpt) if from_onnx else load_checkpoint(video_ckpt)
    audio_spec, video_spec = audio_model.cfg.spec, video_model.cfg.spec
    if replace(video_spec, version=audio_spec.version) != audio_spec:
        raise ValueError(f"{audio_ckpt} and {video_ckpt} were trained for different model specs")
    model = FoalNet(replace(audio_model.cfg, lite_video=video_model.cfg.lite_video))
    state = model.state_dict()
    for branch, source in (("audio", audio_model), ("video", video_model)):  # encoder and unimodal head
        keep = (f"{branch}_encoder.", f"{branch}_head.")
        state.update({k: v for k, v in source.state_dict().items() if k.startswith(keep)})
    model.load_state_dict(state)
    return model


# ---------------------------------------------------------------- data


@dataclass
class LiteData:
    """What the stages read: speech split by speaker (and corpus), faces with targets."""

    s_train: corpora.Speech | None = None
    s_val: corpora.Speech | None = None
    coded: list[np.ndarray | None] | None = None
    f_train: np.ndarray | None = None
    tf_train: np.ndarray | None = None  # FER+ target distributions [N, K]
    f_val: np.ndarray | None = None
    yf_val: np.ndarray | None = None  # FER+ majority labels (FER2013 label where FER+ has none)

    @property
    def yf_train(self) -> np.ndarray:
        return self.tf_train.argmax(1)


def lite_data(
    speech: dict[str, Path] | None,
    fer: Path | None,
    spec: ModelSpec,
    cache: Path,
    *,
    val_speakers: dict[str, frozenset[str]] = corpora.VAL_SPEAKERS,
    hold_out: str | None = None,
    codecs: bool = False,
    seed: int = 0,
) -> LiteData:
    """Decoded (cached) speech split by speaker inside each corpus (a `hold_out` corpus is dropped from
    both sides), and FER faces framed like the service's crops with FER+ targets."""
    out = LiteData()
    if speech is not None:
        everything = corpora.load_speech({k: v for k, v in speech.items() if k != hold_out}, spec, cache)
        is_val = everything.is_val(val_speakers)
        if is_val.all() or not is_val.any():
            raise ValueError(f"speaker split {val_speakers} leaves an empty train or validation set")
        out.s_train, out.s_val = everything.take(~is_val), everything.take(is_val)
        out.coded = augment.coded_copies(out.s_train.clips, spec, seed) if codecs else None
    if fer is not None:
        train_items, val_items = data.scan_fer(fer, "train"), data.scan_fer(fer, "val")
        targets, usable = faces_data.ferplus_targets(fer, "train", train_items, spec.labels)
        out.f_train = faces_data.load_framed_faces(train_items, spec, cache)[usable]
        out.tf_train = targets[usable]
        out.f_val = faces_data.load_framed_faces(val_items, spec, cache)
        out.yf_val = faces_data.ferplus_targets(fer, "val", val_items, spec.labels)[0].argmax(1)
    return out


def train_lite(
    speech: dict[str, Path],
    fer: Path,
    out: Path,
    *,
    stages: tuple[str, ...] = STAGES,
    val_speakers: dict[str, frozenset[str]] = corpora.VAL_SPEAKERS,
    hold_out: str | None = None,
    epochs: dict[str, int] | None = None,
    seed: int = 0,
    cache: Path = data.DEFAULT_CACHE,
    model_cfg: FoalNetConfig | None = None,
    log: Log | None = None,
    stage_overrides: dict[str, dict] | None = None,
    init: dict[str, Path] | None = None,
    mem_weight: float = LITE_MEM_WEIGHT,
    codecs: bool = True,
    conflict: bool = True,
) -> dict[str, dict[str, float]]:
    """Run the chosen lite stages; each reads the previous stages' checkpoints from `out`.
    `init` continues the audio / video stage from an earlier checkpoint (a second, shorter schedule);
    `mem_weight` is λ of the fusion stage's loss; `codecs` adds real-codec copies to audio augmentation;
    `conflict` as `train_fusion`'s."""
    log = log or _file_log(out / "train.log")
    spec = LITE_SPEC
    model_cfg = model_cfg or FoalNetConfig()
    audio_start = (init or {}).get("audio")
    frozen_audio = (checkpoint_config(audio_start) if audio_start else model_cfg).frozen_audio_backbone
    d = lite_data(
        speech if {"audio", "fusion"} & set(stages) else None,
        fer if {"video", "fusion"} & set(stages) else None,
        spec,
        cache,
        val_speakers=val_speakers,
        hold_out=hold_out,
        codecs=codecs and "audio" in stages and not frozen_audio,  # the cached views make their own
        seed=seed,
    )
    results: dict[str, dict[str, float]] = {}
    runners: dict[str, Callable[[FoalNet, StageConfig], dict[str, float]]] = {
        "audio": lambda m, cfg: (
            train_audio_adapter(m, d.s_train, d.s_val, cfg, out / "audio.pt", log, codecs=codecs, cache=cache)
            if m.cfg.frozen_audio_backbone
            else train_audio(m, d.s_train, d.s_val, cfg, out / "audio.pt", log, d.coded)
        ),
        "video": lambda m, cfg: train_video(m, d.f_train, d.tf_train, d.f_val, d.yf_val, cfg, out / "video.pt", log),
    }
    for stage in stages:
        cfg = StageConfig(**{**DEFAULTS[stage].__dict__, "seed": seed, **(stage_overrides or {}).get(stage, {})})
        if epochs and stage in epochs:
            cfg.epochs = epochs[stage]
        log(f"stage {stage}: {cfg}" + (f" mem_weight={mem_weight}" if stage == "fusion" else ""))
        torch.manual_seed(seed)  # the fresh weights of every stage (fusion: projections, stacks, heads)
        if stage == "fusion":
            branches = {"audio": out / "audio.pt", "video": out / "video.pt", **(init or {})}
            model = merge_branches(branches["audio"], branches["video"])
            model.cfg = replace(model.cfg, mem_weight=mem_weight)
            views = {"train": None, "val": None}
            if model.cfg.frozen_audio_backbone:  # the adapter alone runs, on the audio stage's cached views
                views["train"] = corpus_views(
                    model, d.s_train, BACKBONE_VIEWS, seed=seed, codecs=codecs, cache=cache
                )
                views["val"] = corpus_views(model, d.s_val, 1, seed=seed, codecs=False, cache=cache)
            train_pairs = PseudoAV(
                d.s_train.clips, d.s_train.y, d.f_train, d.yf_train, d.s_train.corpus, views["train"]
            )
            val_pairs = PseudoAV(d.s_val.clips, d.s_val.y, d.f_val, d.yf_val, views=views["val"])
            results[stage] = train_fusion(
                model, train_pairs, val_pairs, cfg, out / "fused.pt", log, conflict=conflict
            )
            continue
        start = (init or {}).get(stage)
        model = load_checkpoint(start).train() if start else fresh_model(model_cfg)
        results[stage] = runners[stage](model, cfg)
    return results
