"""Classification scores as the emotion-recognition literature reports them (torch-free).

UA (unweighted accuracy) is the mean per-class recall over the classes present in the truth; WA
(weighted accuracy) is plain accuracy; macro-F1 averages F1 over the same classes.
"""

from __future__ import annotations

import numpy as np


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
