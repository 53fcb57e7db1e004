"""Classification scores as the emotion-recognition literature reports them (torch-free).

UA (unweighted accuracy) is the mean per-class recall over the classes present in the truth; WA
(weighted accuracy) is plain accuracy; macro-F1 averages F1 over the same classes. `auc` scores the
agreement outputs: how well a score separates matched from mismatched audio-visual pairs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from model_export.corpora import Speech


def confusion(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> np.ndarray:
    """[k, k] counts, rows = truth, columns = prediction."""
    matrix = np.zeros((k, k), dtype=np.int64)
    np.add.at(matrix, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return matrix


def scores(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> dict:
    """{"ua", "wa", "macro_f1", "n", "confusion"}; classes absent from the truth are left out of UA/F1."""
    matrix = confusion(y_true, y_pred, k)
    support = matrix.sum(1)
    present = support > 0
    tp = np.diag(matrix).astype(np.float64)
    recall = tp / np.maximum(support, 1)
    precision = tp / np.maximum(matrix.sum(0), 1)
    f1 = np.where(tp > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    n = int(support.sum())
    return {
        "ua": float(recall[present].mean()) if n else 0.0,
        "wa": float(tp.sum() / n) if n else 0.0,
        "macro_f1": float(f1[present].mean()) if n else 0.0,
        "n": n,
        "confusion": matrix.tolist(),
    }


def auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """ROC AUC: the probability that a positive scores above a negative (ties count half), from the
    Mann-Whitney rank sum; 0.5 is chance."""
    scores_all = np.concatenate([positive, negative]).astype(np.float64)
    order = scores_all.argsort(kind="mergesort")
    ranks = np.empty(len(scores_all))
    ranks[order] = np.arange(1, len(scores_all) + 1)
    for value in np.unique(scores_all):  # average ranks over ties
        tied = scores_all == value
        ranks[tied] = ranks[tied].mean()
    n_pos, n_neg = len(positive), len(negative)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def per_corpus_ua(val: Speech, pred: np.ndarray, k: int) -> dict[str, float]:
    """Validation UA per corpus and their mean (`ua`, what the audio stages select on)."""
    per = {c: scores(val.y[val.corpus == c], pred[val.corpus == c], k)["ua"] for c in np.unique(val.corpus)}
    return {"ua": float(np.mean(list(per.values()))), **{f"{c}_ua": v for c, v in per.items()}}
