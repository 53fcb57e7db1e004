"""`foalnet train`: the lite model in three stages, or the paper model on IEMOCAP / a manifest.

lite (what ships):
  1. `audio`: the audio branch (lite encoder -> pooled tokens -> audio head) with CE on RAVDESS speech
     (training actors only), selected on validation-actor UA;
  2. `video`: the video branch (per-frame CNN -> pooled tokens -> video head) with CE on FER2013 train,
     selected on FER val UA;
  3. `fusion`: both branches loaded and frozen, then the rest of Foal-Net (projections, AVEL, fusion,
     MEM) trained on pseudo audio-visual pairs (a speech clip + a FER face of the same emotion rendered
     into F frames), selected on the validation pairs' fused UA.
Stages 1 and 2 are independent (run them as two processes to use two cores). Every stage keeps an
exponential moving average (EMA) of the weights and evaluates / saves that. Checkpoints are
`model.save_checkpoint` files (`audio.pt`, `video.pt`, `fused.pt` under --out).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F
import typer
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from model_export import augment, data
from model_export.encoders import masked_mean
from model_export.metrics import scores
from model_export.model import FoalNet, FoalNetConfig, load_checkpoint, save_checkpoint
from service.contract import LITE_SPEC, ModelSpec

Log = Callable[[str], None]


@dataclass
class StageConfig:
    epochs: int
    batch: int
    lr: float
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    ema_decay: float = 0.99
    seed: int = 0
    patience: int = 0  # early stopping on validation UA; 0 = run every epoch
    keep: str = "best"  # "best": the epoch (EMA or live) with the best validation UA; "last": the final EMA


def seed_everything(seed: int) -> np.random.Generator:
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def _batches(n: int, size: int, rng: np.random.Generator | None) -> Iterator[np.ndarray]:
    order = rng.permutation(n) if rng is not None else np.arange(n)
    stop = n - size + 1 if rng is not None and n >= size else n  # training drops the ragged tail
    for start in range(0, max(stop, 1), size):
        yield order[start : start + size]


# ---------------------------------------------------------------- batch makers (numpy -> torch)


def audio_batch(
    clips: list[np.ndarray], idx: np.ndarray, spec: ModelSpec, rng: np.random.Generator, mode: str
) -> tuple[Tensor, Tensor]:
    """mode: "train" (augmented view), "clean" (centre crop) or "perturbed" (fixed degradation)."""
    out = np.zeros((len(idx), spec.window_samples), dtype=np.float32)
    lengths = np.zeros(len(idx), dtype=np.int64)
    for row, i in enumerate(idx):
        if mode == "train":
            out[row], lengths[row] = augment.augment_audio(clips[i], spec, rng)
        elif mode == "perturbed":
            out[row], lengths[row] = augment.perturb_audio(clips[i], spec, rng)
        else:
            out[row], lengths[row] = augment.crop_or_pad(clips[i], spec.window_samples, None)
    return torch.from_numpy(out), torch.from_numpy(lengths)


def face_batch(faces: np.ndarray, idx: np.ndarray, rng: np.random.Generator, mode: str) -> Tensor:
    if mode == "train":
        return torch.from_numpy(np.stack([augment.augment_face(faces[i], rng) for i in idx]))
    if mode == "perturbed":
        return torch.from_numpy(np.stack([augment.perturb_face(faces[i], rng) for i in idx]))
    return torch.from_numpy(faces[idx])


def frames_batch(
    faces: np.ndarray, idx: np.ndarray, spec: ModelSpec, rng: np.random.Generator, mode: str
) -> tuple[Tensor, Tensor]:
    """Pseudo-clips: each face rendered into F frames with small seeded shifts/scales."""
    f = spec.frames_per_window
    out = np.stack(
        [
            augment.render_frames(
                augment.perturb_face(faces[i], rng) if mode == "perturbed" else faces[i],
                f,
                rng,
                augment=mode == "train",
            )
            for i in idx
        ]
    )
    return torch.from_numpy(out), torch.full((len(idx),), f, dtype=torch.int64)


# ---------------------------------------------------------------- unimodal logits through the model


def audio_logits(model: FoalNet, audio: Tensor, audio_len: Tensor) -> Tensor:
    tokens, mask = model.audio_encoder(audio, audio_len)
    return model.audio_head(masked_mean(tokens, mask))


def face_logits(model: FoalNet, faces: Tensor) -> Tensor:
    """Single images as one-frame clips through the video encoder, projection and video head."""
    ones = torch.ones(len(faces), dtype=torch.int64)
    tokens, mask = model.video_encoder(faces.unsqueeze(1), ones)
    return model.video_head(masked_mean(tokens, mask))


def class_weights(y: np.ndarray, k: int) -> Tensor:
    """Inverse-frequency weights, mean 1 (RAVDESS neutral+calm is 1.5x the other classes)."""
    counts = np.bincount(y, minlength=k).astype(np.float64)
    w = counts.sum() / (k * np.maximum(counts, 1))
    return torch.tensor(w / w.mean(), dtype=torch.float32)


@torch.no_grad()
def predict(model: nn.Module, n: int, batch: int, make: Callable[[np.ndarray], Tensor]) -> np.ndarray:
    """Argmax predictions of `make(idx) -> logits` over 0..n-1 in eval mode."""
    model.eval()
    return np.concatenate([make(idx).argmax(-1).numpy() for idx in _batches(n, batch, None)])


# ---------------------------------------------------------------- the generic stage loop


def run_stage(
    model: FoalNet,
    params: list[nn.Parameter],
    n_train: int,
    step_loss: Callable[[FoalNet, np.ndarray, np.random.Generator], tuple[Tensor, dict[str, Tensor]]],
    validate: Callable[[FoalNet], dict[str, float]],
    cfg: StageConfig,
    ckpt: Path,
    log: Log,
    name: str,
    extra: dict | None = None,
) -> dict[str, float]:
    """AdamW + one-cycle LR + EMA; validate the EMA and the live weights each epoch; keep the best by
    validation `ua` (`cfg.keep == "last"`: the final EMA, whatever its score)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    rng = seed_everything(cfg.seed)
    steps_per_epoch = max(1, n_train // cfg.batch)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch, pct_start=0.15
    )
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
    best: dict[str, float] = {"ua": -1.0}
    stale = 0
    with Progress(
        TextColumn(f"[bold]{name}[/] epoch {{task.fields[epoch]}}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        transient=True,
    ) as progress:
        task = progress.add_task(name, total=steps_per_epoch, epoch=0, info="")
        for epoch in range(1, cfg.epochs + 1):
            model.train()
            progress.reset(task, total=steps_per_epoch, epoch=epoch, info="")
            sums: dict[str, float] = {}
            start = time.time()
            for step, idx in enumerate(_batches(n_train, cfg.batch, rng)):
                if step >= steps_per_epoch:
                    break
                total, parts = step_loss(model, idx, rng)
                opt.zero_grad(set_to_none=True)
                total.backward()
                nn.utils.clip_grad_norm_(params, 5.0)
                opt.step()
                sched.step()
                ema.update_parameters(model)
                for key, value in {"loss": total.detach(), **parts}.items():
                    sums[key] = sums.get(key, 0.0) + float(value)
                progress.update(task, advance=1, info=f"loss {sums['loss'] / (step + 1):.3f}")
            # Both the EMA and the live weights are candidates: a short run's EMA can still lag.
            vals = {"ema": validate(ema.module), "live": validate(model)}
            pick = max(vals, key=lambda key: vals[key]["ua"])
            val = vals[pick]
            means = {k: v / steps_per_epoch for k, v in sums.items()}
            log(
                f"{name} epoch {epoch}/{cfg.epochs} "
                + " ".join(f"{k} {v:.4f}" for k, v in means.items())
                + "".join(
                    f" | val {tag} " + " ".join(f"{k} {v:.4f}" for k, v in res.items())
                    for tag, res in vals.items()
                )
                + f" | {time.time() - start:.0f}s"
            )
            if cfg.keep == "last":
                if epoch == cfg.epochs:
                    best = {**vals["ema"], "epoch": float(epoch), "ema": 1.0}
                    save_checkpoint(ema.module, ckpt, stage=name, val=best, **(extra or {}))
            elif val["ua"] > best["ua"]:
                best, stale = {**val, "epoch": float(epoch), "ema": float(pick == "ema")}, 0
                save_checkpoint(
                    ema.module if pick == "ema" else model, ckpt, stage=name, val=best, **(extra or {})
                )
            else:
                stale += 1
                if cfg.patience and stale >= cfg.patience:
                    log(f"{name}: early stop, no validation UA gain for {stale} epochs")
                    break
    log(
        f"{name}: {'kept' if cfg.keep == 'last' else 'best'} epoch {int(best['epoch'])} val "
        + json.dumps({k: round(v, 4) for k, v in best.items()})
    )
    return best


# ---------------------------------------------------------------- lite stages


def train_audio(
    model: FoalNet,
    train_clips: list[np.ndarray],
    y_train: np.ndarray,
    val_clips: list[np.ndarray],
    y_val: np.ndarray,
    cfg: StageConfig,
    ckpt: Path,
    log: Log,
) -> dict[str, float]:
    spec, k = model.cfg.spec, model.cfg.num_classes
    weights = class_weights(y_train, k)
    params = [p for m in (model.audio_encoder, model.audio_head) for p in m.parameters()]

    def step_loss(m: FoalNet, idx: np.ndarray, rng: np.random.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        audio, lengths = audio_batch(train_clips, idx, spec, rng, "train")
        loss = F.cross_entropy(
            audio_logits(m, audio, lengths),
            torch.from_numpy(y_train[idx]),
            weight=weights,
            label_smoothing=cfg.label_smoothing,
        )
        return loss, {"ce_audio": loss.detach()}

    def validate(m: FoalNet) -> dict[str, float]:
        rng = np.random.default_rng(0)
        pred = predict(
            m,
            len(val_clips),
            64,
            lambda idx: audio_logits(m, *audio_batch(val_clips, idx, spec, rng, "clean")),
        )
        return _summary(scores(y_val, pred, k))

    return run_stage(model, params, len(train_clips), step_loss, validate, cfg, ckpt, log, "audio")


def train_video(
    model: FoalNet,
    faces: np.ndarray,
    y_train: np.ndarray,
    val_faces: np.ndarray,
    y_val: np.ndarray,
    cfg: StageConfig,
    ckpt: Path,
    log: Log,
) -> dict[str, float]:
    k = model.cfg.num_classes
    params = [p for m in (model.video_encoder, model.video_head) for p in m.parameters()]

    def step_loss(m: FoalNet, idx: np.ndarray, rng: np.random.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        loss = F.cross_entropy(
            face_logits(m, face_batch(faces, idx, rng, "train")),
            torch.from_numpy(y_train[idx]),
            label_smoothing=cfg.label_smoothing,
        )
        return loss, {"ce_video": loss.detach()}

    def validate(m: FoalNet) -> dict[str, float]:
        rng = np.random.default_rng(0)
        pred = predict(
            m, len(val_faces), 256, lambda idx: face_logits(m, face_batch(val_faces, idx, rng, "clean"))
        )
        return _summary(scores(y_val, pred, k))

    return run_stage(model, params, len(faces), step_loss, validate, cfg, ckpt, log, "video")


@dataclass
class PseudoAV:
    """Speech clips paired with same-emotion faces; the pairing is redrawn (seeded) every time."""

    clips: list[np.ndarray]
    y: np.ndarray
    faces: np.ndarray
    face_y: np.ndarray

    def __post_init__(self) -> None:
        self.by_label = {c: np.flatnonzero(self.face_y == c) for c in np.unique(self.y)}
        missing = [int(c) for c, ids in self.by_label.items() if len(ids) == 0]
        if missing:
            raise ValueError(f"no faces for label indices {missing}")

    def partners(self, idx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return np.array([rng.choice(self.by_label[self.y[i]]) for i in idx])

    def batch(
        self, idx: np.ndarray, spec: ModelSpec, rng: np.random.Generator, mode: str
    ) -> tuple[Tensor, ...]:
        audio, audio_len = audio_batch(self.clips, idx, spec, rng, mode)
        frames, frames_len = frames_batch(self.faces, self.partners(idx, rng), spec, rng, mode)
        return audio, audio_len, frames, frames_len, torch.from_numpy(self.y[idx])


@torch.no_grad()
def evaluate_pairs(
    model: FoalNet, pairs: PseudoAV, mode: str = "clean", seed: int = 0, repeats: int = 1
) -> dict:
    """Fused / audio / video scores on validation pairs (fixed seed, so the same pairs every call)."""
    model.eval()
    rng, k, spec = np.random.default_rng(seed), model.cfg.num_classes, model.cfg.spec
    preds: dict[str, list[np.ndarray]] = {"fused": [], "audio": [], "video": []}
    truth = []
    for _ in range(repeats):
        for idx in _batches(len(pairs.clips), 32, None):
            audio, audio_len, frames, frames_len, y = pairs.batch(idx, spec, rng, mode)
            out = model(audio, audio_len, frames, frames_len)
            preds["fused"].append(out["probs"].argmax(-1).numpy())
            preds["audio"].append(out["audio_probs"].argmax(-1).numpy())
            preds["video"].append(out["video_probs"].argmax(-1).numpy())
            truth.append(y.numpy())
    y_all = np.concatenate(truth)
    return {name: scores(y_all, np.concatenate(p), k) for name, p in preds.items()}


def train_fusion(
    model: FoalNet,
    train: PseudoAV,
    val: PseudoAV,
    cfg: StageConfig,
    ckpt: Path,
    log: Log,
    *,
    freeze_encoders: bool = True,
) -> dict[str, float]:
    """Projections, AVEL, fusion and MEM on pseudo pairs. The pretrained branches (encoders and their
    unimodal heads) stay frozen by default: 960 speech clips an epoch paired with a few FER faces would
    mostly unteach the FER-trained face branch, move both heads to RAVDESS's class balance, and cost 3x."""
    spec = model.cfg.spec
    if freeze_encoders:
        for branch in (model.audio_encoder, model.video_encoder, model.audio_head, model.video_head):
            branch.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]

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


def _summary(s: dict) -> dict[str, float]:
    return {"ua": s["ua"], "wa": s["wa"], "macro_f1": s["macro_f1"]}


def merge_branches(audio_ckpt: Path, video_ckpt: Path) -> FoalNet:
    """A fresh FoalNet with each pretrained branch copied in: the audio checkpoint's config with the
    video checkpoint's video encoder sizes (the two stages may have been run with different sizes)."""
    audio_model, video_model = load_checkpoint(audio_ckpt), load_checkpoint(video_ckpt)
    if audio_model.cfg.spec != video_model.cfg.spec:
        raise ValueError(f"{audio_ckpt} and {video_ckpt} were trained for different model specs")
    model = FoalNet(replace(audio_model.cfg, lite_video=video_model.cfg.lite_video))
    state = model.state_dict()
    for prefix, source in (("audio_", audio_model), ("video_", video_model)):
        state.update({k: v for k, v in source.state_dict().items() if k.startswith(prefix)})
    model.load_state_dict(state)
    return model


# ---------------------------------------------------------------- data loading for lite


def lite_data(
    ravdess: Path | None, fer: Path | None, val_actors: set[int], spec: ModelSpec, cache: Path
) -> dict[str, np.ndarray | list[np.ndarray]]:
    """Decoded (cached) speech split by actor and FER faces, for whichever of the two is given."""
    out: dict[str, np.ndarray | list[np.ndarray]] = {}
    if ravdess is not None:
        items = data.scan_ravdess(ravdess)  # all actors: one cache file whatever the split
        clips, labels = data.load_audio(items, spec, cache), data.labels_of(items, spec.labels)
        is_val = np.array([it.group in val_actors for it in items])
        if is_val.all() or not is_val.any():
            raise ValueError(f"actor split {sorted(val_actors)} leaves an empty train or validation set")
        out |= {
            "a_train": [c for c, v in zip(clips, is_val) if not v],
            "ya_train": labels[~is_val],
            "a_val": [c for c, v in zip(clips, is_val) if v],
            "ya_val": labels[is_val],
        }
    if fer is not None:
        f_train, f_val = data.scan_fer(fer, "train"), data.scan_fer(fer, "val")
        out |= {
            "f_train": data.load_faces(f_train, spec, cache),
            "yf_train": data.labels_of(f_train, spec.labels),
            "f_val": data.load_faces(f_val, spec, cache),
            "yf_val": data.labels_of(f_val, spec.labels),
        }
    return out


def _file_log(path: Path) -> Log:
    from rich.console import Console

    console = Console()
    path.parent.mkdir(parents=True, exist_ok=True)

    def log(line: str) -> None:
        console.print(line, markup=False, highlight=False)
        with path.open("a") as handle:
            handle.write(f"{time.strftime('%H:%M:%S')} {line}\n")

    return log


STAGES = ("audio", "video", "fusion")
# MEM weight of the lite fusion stage. The paper's 0.1 (FoalNetConfig's default) leaves the MEM heads
# at chance on pseudo pairs in 8-16 epochs; at 1.0 they learn to tell matched from mismatched pairs
# (validation AUC ~0.7) and the fused accuracy is unchanged.
LITE_MEM_WEIGHT = 1.0
DEFAULTS = {
    "audio": StageConfig(epochs=60, batch=16, lr=4e-3, ema_decay=0.97, label_smoothing=0.05),
    "video": StageConfig(epochs=36, batch=128, lr=3e-3, ema_decay=0.99),
    # Fusion keeps its last epoch: its validation UA is flat within noise after a few epochs while
    # the MEM heads keep learning, so picking the best UA would mostly pick an untrained MEM.
    "fusion": StageConfig(epochs=8, batch=32, lr=1e-3, ema_decay=0.98, keep="last"),
}


def train_lite(
    ravdess: Path,
    fer: Path,
    out: Path,
    *,
    stages: tuple[str, ...] = STAGES,
    val_actors: set[int],
    epochs: dict[str, int] | None = None,
    seed: int = 0,
    cache: Path = data.DEFAULT_CACHE,
    model_cfg: FoalNetConfig | None = None,
    log: Log | None = None,
    stage_overrides: dict[str, dict] | None = None,
    init: dict[str, Path] | None = None,
    mem_weight: float = LITE_MEM_WEIGHT,
) -> dict[str, dict[str, float]]:
    """Run the chosen lite stages; each reads the previous stages' checkpoints from `out`.
    `init` continues the audio / video stage from an earlier checkpoint (a second, shorter schedule);
    `mem_weight` is λ of the fusion stage's loss."""
    log = log or _file_log(out / "train.log")
    spec = LITE_SPEC
    d = lite_data(
        ravdess if {"audio", "fusion"} & set(stages) else None,
        fer if {"video", "fusion"} & set(stages) else None,
        val_actors,
        spec,
        cache,
    )
    results = {}
    for stage in stages:
        cfg = StageConfig(
            **{**DEFAULTS[stage].__dict__, "seed": seed, **(stage_overrides or {}).get(stage, {})}
        )
        if epochs and stage in epochs:
            cfg.epochs = epochs[stage]
        log(f"stage {stage}: {cfg}" + (f" mem_weight={mem_weight}" if stage == "fusion" else ""))
        torch.manual_seed(seed)  # the fresh weights of every stage (fusion: projections, stacks, heads)
        if stage == "fusion":
            model = merge_branches(out / "audio.pt", out / "video.pt")
            model.cfg = replace(model.cfg, mem_weight=mem_weight)
            train_pairs = PseudoAV(d["a_train"], d["ya_train"], d["f_train"], d["yf_train"])
            val_pairs = PseudoAV(d["a_val"], d["ya_val"], d["f_val"], d["yf_val"])
            results[stage] = train_fusion(model, train_pairs, val_pairs, cfg, out / "fused.pt", log)
            continue
        start = (init or {}).get(stage)
        model = load_checkpoint(start).train() if start else FoalNet(model_cfg or FoalNetConfig())
        if stage == "audio":
            results[stage] = train_audio(
                model, d["a_train"], d["ya_train"], d["a_val"], d["ya_val"], cfg, out / "audio.pt", log
            )
        else:
            results[stage] = train_video(
                model, d["f_train"], d["yf_train"], d["f_val"], d["yf_val"], cfg, out / "video.pt", log
            )
    return results


# ---------------------------------------------------------------- paper: real audio-visual clips


@dataclass
class AVSet:
    """Decoded real clips: full audio, F face crops / frames each, labels."""

    clips: list[np.ndarray]
    frames: np.ndarray
    frames_len: np.ndarray
    y: np.ndarray

    @classmethod
    def load(cls, items: list[data.Item], spec: ModelSpec) -> AVSet:
        clips, frames, frames_len = data.load_av(items, spec)
        return cls(clips, frames, frames_len, data.labels_of(items, spec.labels))

    def batch(
        self, idx: np.ndarray, spec: ModelSpec, rng: np.random.Generator, mode: str, device: str
    ) -> tuple[Tensor, ...]:
        audio, audio_len = audio_batch(self.clips, idx, spec, rng, mode)
        tensors = (
            audio,
            audio_len,
            torch.from_numpy(self.frames[idx]),
            torch.from_numpy(self.frames_len[idx]),
            torch.from_numpy(self.y[idx]),
        )
        return tuple(t.to(device) for t in tensors)


@torch.no_grad()
def score_av(model: FoalNet, av: AVSet, device: str) -> dict[str, dict]:
    model.eval()
    spec, k, rng = model.cfg.spec, model.cfg.num_classes, np.random.default_rng(0)
    keys = {"fused": "probs", "audio": "audio_probs", "video": "video_probs"}
    preds: dict[str, list[np.ndarray]] = {name: [] for name in keys}
    for idx in _batches(len(av.y), 16, None):
        out = model(*av.batch(idx, spec, rng, "clean", device)[:4])
        for name, key in keys.items():
            preds[name].append(out[key].argmax(-1).cpu().numpy())
    return {name: scores(av.y, np.concatenate(p), k) for name, p in preds.items()}


def train_paper(
    model: FoalNet,
    train: AVSet,
    val: AVSet,
    test: AVSet | None,
    cfg: StageConfig,
    out: Path,
    log: Log,
    device: str,
) -> dict[str, float]:
    """The paper's recipe: all heads and losses end to end, class-balanced batches, selection on the
    validation split (from the training sessions); the test split is scored once, after selection."""
    model.to(device)
    spec = model.cfg.spec
    counts = np.bincount(train.y, minlength=model.cfg.num_classes).astype(np.float64)
    p = (1.0 / counts[train.y]) / (1.0 / counts[train.y]).sum()

    def step_loss(m: FoalNet, idx: np.ndarray, rng: np.random.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        balanced = rng.choice(len(train.y), size=len(idx), p=p)  # class-balanced sampling, as in the paper
        total, parts = m.loss(*train.batch(balanced, spec, rng, "train", device))
        return total, {k: v.detach() for k, v in parts.items()}

    def validate(m: FoalNet) -> dict[str, float]:
        res = score_av(m, val, device)["fused"]
        return {"ua": res["ua"], "wa": res["wa"]}

    params = [q for q in model.parameters() if q.requires_grad]
    best = run_stage(model, params, len(train.y), step_loss, validate, cfg, out / "fused.pt", log, "paper")
    if test is not None:
        res = score_av(load_checkpoint(out / "fused.pt", map_location=device), test, device)
        best |= {f"test_{name}_{key}": res[name][key] for name in res for key in ("ua", "wa")}
        log(
            "paper: test split (scored once, after selection) "
            + json.dumps({k: round(v, 4) for k, v in best.items()})
        )
    return best


def paper_items(
    iemocap: Path | None, manifest: Path | None, test_session: int, seed: int
) -> tuple[list[data.Item], list[data.Item], list[data.Item]]:
    """(train, val, test) items: an IEMOCAP leave-one-session-out fold, or a manifest split 90/10 (no test)."""
    from service.contract import LABELS_IEMOCAP

    if iemocap is not None:
        train, val, test = data.iemocap_fold(data.scan_iemocap(iemocap), test_session, seed=seed)
        return (
            data.iemocap_items(train, iemocap),
            data.iemocap_items(val, iemocap),
            data.iemocap_items(test, iemocap),
        )
    if manifest is None:
        raise ValueError("the paper configuration needs --iemocap or --manifest")
    items = data.read_manifest(manifest, LABELS_IEMOCAP)
    order = np.random.default_rng(seed).permutation(len(items))
    n_val = max(1, len(items) // 10)
    return [items[i] for i in order[n_val:]], [items[i] for i in order[:n_val]], []


# ---------------------------------------------------------------- CLI


def register(app) -> None:
    @app.command("train")
    def train_command(
        config: Annotated[
            str, typer.Option(help="lite (RAVDESS + FER pseudo-pairs) or paper (WavLM + CLIP)")
        ] = "lite",
        ravdess: Annotated[Path, typer.Option(help="RAVDESS speech (Actor_XX/)")] = Path(
            "../shared/data/ravdess-speech"
        ),
        fer: Annotated[Path, typer.Option(help="FER2013 (train/ and val/ class folders)")] = Path(
            "../shared/data/fer2013"
        ),
        val_actors: Annotated[str, typer.Option(help="RAVDESS validation actors, e.g. 17-20")] = "17-20",
        stage: Annotated[
            list[str] | None, typer.Option(help="lite stages to run, in order (default: audio video fusion)")
        ] = None,
        epochs: Annotated[
            list[str] | None,
            typer.Option(help="per-stage epochs, e.g. --epochs audio=30 (paper: --epochs paper=40)"),
        ] = None,
        init: Annotated[
            list[str] | None,
            typer.Option(help="continue a stage from a checkpoint, e.g. --init video=runs/lite/video.pt"),
        ] = None,
        lr: Annotated[
            list[str] | None, typer.Option(help="per-stage peak learning rate, e.g. --lr video=1e-3")
        ] = None,
        out: Annotated[Path, typer.Option(help="checkpoints and train.log go here")] = Path("runs/lite"),
        export: Annotated[
            Path | None, typer.Option(help="after the fusion stage, export the best model to this ONNX path")
        ] = None,
        mem_weight: Annotated[
            float | None,
            typer.Option(help=f"λ of the MEM loss (default: lite fusion {LITE_MEM_WEIGHT}, paper 0.1)"),
        ] = None,
        seed: Annotated[int, typer.Option()] = 0,
        device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
        threads: Annotated[int, typer.Option(help="torch intra-op threads (0 = torch's default)")] = 0,
        cache: Annotated[Path, typer.Option(help="decoded-media cache (gitignored)")] = data.DEFAULT_CACHE,
        iemocap: Annotated[
            Path | None, typer.Option(help="paper: IEMOCAP release root (Session1..5)")
        ] = None,
        manifest: Annotated[Path | None, typer.Option(help="paper: CSV path,label of real videos")] = None,
        test_session: Annotated[int, typer.Option(help="paper + IEMOCAP: the held-out session (1-5)")] = 5,
        audio_encoder: Annotated[Path | None, typer.Option(help="paper: local WavLM directory")] = None,
        video_encoder: Annotated[Path | None, typer.Option(help="paper: local CLIP vision directory")] = None,
    ) -> None:
        """Train Foal-Net; logs CE / AVEL / MEM per epoch and keeps the best validation-UA checkpoint."""
        if threads:
            torch.set_num_threads(threads)
        if device not in ("cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
            raise typer.BadParameter(f"device {device!r} is not available here: use cpu or cuda")
        if config == "lite" and device != "cpu":
            raise typer.BadParameter("the lite stages run on the CPU; --device cuda is for --config paper")
        per_stage = dict(e.split("=", 1) for e in epochs or [])
        stage = stage or list(STAGES)
        if config == "lite":
            unknown = [s for s in stage if s not in STAGES]
            if unknown:
                raise typer.BadParameter(f"unknown stage(s) {unknown}; choose from {STAGES}")
            results = train_lite(
                ravdess,
                fer,
                out,
                stages=tuple(stage),
                val_actors=data.parse_actors(val_actors),
                epochs={k: int(v) for k, v in per_stage.items()},
                seed=seed,
                cache=cache,
                init={k: Path(v) for k, v in (e.split("=", 1) for e in init or [])},
                stage_overrides={k: {"lr": float(v)} for k, v in (e.split("=", 1) for e in lr or [])},
                mem_weight=LITE_MEM_WEIGHT if mem_weight is None else mem_weight,
            )
            typer.echo(json.dumps(results, indent=2))
            if export is not None and "fusion" in stage:
                from model_export.export import export_onnx, verify_parity

                model = load_checkpoint(out / "fused.pt")
                export_onnx(model, export, spec=model.cfg.spec)
                typer.echo(json.dumps({"exported": str(export), "parity": verify_parity(model, export)}))
            return
        if config != "paper":
            raise typer.BadParameter(f"unknown config {config!r}: expected lite or paper")
        if audio_encoder is None or video_encoder is None:
            raise typer.BadParameter(
                "--config paper needs --audio-encoder (WavLM dir) and --video-encoder (CLIP dir)"
            )
        from model_export.model import paper_config

        overrides = {} if mem_weight is None else {"mem_weight": mem_weight}
        model = FoalNet(paper_config(str(audio_encoder), str(video_encoder), **overrides))
        log = _file_log(out / "train.log")
        train_items, val_items, test_items = paper_items(iemocap, manifest, test_session, seed)
        spec = model.cfg.spec
        sets = [AVSet.load(items, spec) if items else None for items in (train_items, val_items, test_items)]
        cfg = StageConfig(
            epochs=int(per_stage.get("paper", 40)), batch=16, lr=1e-4, ema_decay=0.999, seed=seed
        )
        best = train_paper(model, sets[0], sets[1], sets[2], cfg, out, log, device)
        typer.echo(json.dumps(best, indent=2))
