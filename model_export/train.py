"""The training loop every trainer shares: stage settings, batching, the numpy -> torch batch makers,
unimodal logits through the model, `run_stage` (AdamW, one-cycle LR, EMA, best-epoch selection,
resume) and the run log. The lite stages are `train_lite`, the paper / real audio-visual protocol
`protocol`, the command `train_cli`."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from model_export import augment
from model_export.encoders import masked_mean
from model_export.model import FoalNet, save_checkpoint
from service.contract import ModelSpec

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
    epoch_clips: int = 0  # training draws an epoch (0 = the training set's size; balanced samplers redraw)


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
    n_train = cfg.epoch_clips or n_train
    steps_per_epoch = max(1, n_train // cfg.batch)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch, pct_start=0.15
    )
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
    best: dict[str, float] = {"ua": -1.0}
    stale, first = 0, 1
    resume = ckpt.with_suffix(".resume.pt")  # written every epoch; a stopped run continues from it
    if resume.is_file():
        state = torch.load(resume, weights_only=False)
        for obj, key in ((model, "model"), (ema, "ema"), (opt, "opt"), (sched, "sched")):
            obj.load_state_dict(state[key])
        rng.bit_generator.state, best, stale, first = state["rng"], state["best"], state["stale"], state["epoch"] + 1
        torch.set_rng_state(state["torch_rng"])
        log(f"{name}: resumed from {resume} after epoch {state['epoch']}")
    with Progress(
        TextColumn(f"[bold]{name}[/] epoch {{task.fields[epoch]}}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        transient=True,
    ) as progress:
        task = progress.add_task(name, total=steps_per_epoch, epoch=0, info="")
        for epoch in range(first, cfg.epochs + 1):
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
            torch.save(
                {
                    "model": model.state_dict(),
                    "ema": ema.state_dict(),
                    "opt": opt.state_dict(),
                    "sched": sched.state_dict(),
                    "rng": rng.bit_generator.state,
                    "torch_rng": torch.get_rng_state(),
                    "best": best,
                    "stale": stale,
                    "epoch": epoch,
                },
                resume,
            )
    resume.unlink(missing_ok=True)
    log(
        f"{name}: {'kept' if cfg.keep == 'last' else 'best'} epoch {int(best['epoch'])} val "
        + json.dumps({k: round(v, 4) for k, v in best.items()})
    )
    return best


# ---------------------------------------------------------------- logging


def _file_log(path: Path) -> Log:
    from rich.console import Console

    console = Console()
    path.parent.mkdir(parents=True, exist_ok=True)

    def log(line: str) -> None:
        console.print(line, markup=False, highlight=False)
        with path.open("a") as handle:
            handle.write(f"{time.strftime('%H:%M:%S')} {line}\n")

    return log
