"""A stopping signal: how much a round's predictions on the unlabeled pool agree with the
previous round's ("stabilizing predictions", Bloodgood & Vijay-Shanker, CoNLL 2009: stop once
Cohen's kappa between consecutive models on a stop set stays above about 0.99).

numpy only. The caller passes the two rounds' predictions of the same images, row for row.
"""

from __future__ import annotations

import numpy as np


def cohen_kappa(prev: np.ndarray, curr: np.ndarray, num_classes: int) -> float | None:
    """Cohen's kappa of two int label vectors [N] in ``0..num_classes-1``:
    ``(p_o - p_e) / (1 - p_e)``, ``p_o`` the observed agreement, ``p_e`` the chance agreement
    from the two marginals. 1.0 when both are one and the same constant class (``p_e = 1``,
    where the formula is 0/0 and sklearn returns nan); None for N = 0."""
    n = len(prev)
    if n == 0:
        return None
    p_o = float(np.mean(prev == curr))
    p_e = float(
        np.dot(np.bincount(prev, minlength=num_classes), np.bincount(curr, minlength=num_classes))
    ) / (n * n)
    if p_e >= 1.0:  # both predict one and the same class everywhere: p_o is 1 too
        return 1.0
    return (p_o - p_e) / (1.0 - p_e)


def _classes(name: str, a: np.ndarray, num_classes: int) -> np.ndarray:
    arr = np.asarray(a)
    if not np.issubdtype(arr.dtype, np.integer) or ((arr < 0) | (arr >= num_classes)).any():
        raise ValueError(f"{name} must hold class indices in 0..{num_classes - 1}")
    return arr.astype(np.int64)


def prediction_agreement(
    prev: np.ndarray, curr: np.ndarray, num_classes: int
) -> dict[str, float | int | None]:
    """Agreement of consecutive rounds' predictions of the same N images.

    Classification: ``prev``, ``curr`` int [N] predicted classes; returns ``kappa`` (Cohen's,
    :func:`cohen_kappa`), ``agreement`` (fraction of equal predictions) and ``n``.
    Segmentation: bool/{0,1} masks [N, H, W] (``num_classes`` is ignored); returns ``dice``
    (mean per-image Dice, 1 for two empty masks), ``agreement`` (mean per-image fraction of
    equal pixels), ``kappa`` (Cohen's kappa over all N*H*W pixels) and ``n``.
    Values are None when N = 0.
    """
    a, b = np.asarray(prev), np.asarray(curr)
    if a.shape != b.shape:
        raise ValueError(f"prev and curr must have the same shape, got {a.shape} and {b.shape}")
    n = int(a.shape[0]) if a.ndim else 0
    if a.ndim == 1:
        a, b = _classes("prev", a, num_classes), _classes("curr", b, num_classes)
        agreement = float(np.mean(a == b)) if n else None
        return {"kappa": cohen_kappa(a, b, num_classes), "agreement": agreement, "n": n}
    if a.ndim != 3:
        raise ValueError(f"predictions must be classes [N] or masks [N, H, W], got {a.shape}")
    a, b = a.reshape(n, -1) > 0, b.reshape(n, -1) > 0
    if n == 0:
        return {"kappa": None, "agreement": None, "dice": None, "n": 0}
    inter, total = (a & b).sum(1), a.sum(1) + b.sum(1)
    dice = np.where(total > 0, 2.0 * inter / np.maximum(total, 1), 1.0)
    return {
        "kappa": cohen_kappa(a.ravel().astype(np.int64), b.ravel().astype(np.int64), 2),
        "agreement": float((a == b).mean(1).mean()),
        "dice": float(dice.mean()),
        "n": n,
    }
