"""Inter-rater agreement for nominal labels: Cohen's kappa, Fleiss' kappa, Krippendorff's alpha.

Labels are integer category codes 0..C-1. Every statistic here is computed from counts
(a confusion matrix, or an items x categories table), so callers can build those counts
from database columns with one `np.bincount` and never loop over rows in Python.

A coefficient is *undefined* (returned as NaN, like scikit-learn does) when its chance
agreement is total: e.g. both raters only ever used one category. Perfect observed
agreement with some variety of labels gives 1.0.
"""

from __future__ import annotations

import numpy as np


def label_codes(labels, n_categories: int | None = None) -> tuple[np.ndarray, int]:
    """Integer codes from an array of codes where NaN (or any negative number) means missing.

    Returns (codes with -1 for missing, number of categories)."""
    values = np.asarray(labels, dtype=float)
    missing = np.isnan(values) | (values < 0)
    present = values[~missing]
    if present.size and not np.all(present == np.round(present)):
        raise ValueError("labels must be integer category codes (or NaN for missing)")
    codes = np.where(missing, -1, np.nan_to_num(values, nan=-1)).astype(np.int64)
    largest = int(codes.max()) + 1 if codes.size else 0
    if n_categories is None:
        n_categories = largest
    elif largest > n_categories:
        raise ValueError(f"label code {largest - 1} is outside the {n_categories} categories")
    return codes, n_categories


def confusion_matrix(x, y, n_categories: int | None = None) -> np.ndarray:
    """C x C counts of (x label, y label) over the items both raters labelled."""
    x_codes, c1 = label_codes(x, n_categories)
    y_codes, c2 = label_codes(y, n_categories)
    if x_codes.shape != y_codes.shape:
        raise ValueError(f"the two raters' label arrays differ in length ({x_codes.size} vs {y_codes.size})")
    n = max(c1, c2)
    both = (x_codes >= 0) & (y_codes >= 0)
    return np.bincount(x_codes[both] * n + y_codes[both], minlength=n * n).reshape(n, n)


def percent_agreement_from_confusion(confusion: np.ndarray) -> np.ndarray | float:
    """Share of items on which the two raters agree; works on a stack (..., C, C)."""
    confusion = np.asarray(confusion, dtype=float)
    total = confusion.sum(axis=(-2, -1))
    agree = np.trace(confusion, axis1=-2, axis2=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, agree / np.where(total > 0, total, 1), np.nan)[()]


def cohen_kappa_from_confusion(confusion: np.ndarray) -> np.ndarray | float:
    """Cohen's kappa from a confusion matrix, or from a stack of them (..., C, C) at once."""
    confusion = np.asarray(confusion, dtype=float)
    total = confusion.sum(axis=(-2, -1))
    safe_total = np.where(total > 0, total, 1.0)
    observed = np.trace(confusion, axis1=-2, axis2=-1) / safe_total
    rows = confusion.sum(axis=-1) / safe_total[..., None]
    cols = confusion.sum(axis=-2) / safe_total[..., None]
    expected = (rows * cols).sum(axis=-1)
    defined = (total > 0) & (expected < 1 - 1e-12)
    with np.errstate(invalid="ignore", divide="ignore"):
        kappa = (observed - expected) / np.where(defined, 1 - expected, 1.0)
    return np.where(defined, kappa, np.nan)[()]


def cohen_kappa(x, y, n_categories: int | None = None) -> float:
    """Cohen's kappa between two raters over the items both labelled (NaN marks a missing label)."""
    return float(cohen_kappa_from_confusion(confusion_matrix(x, y, n_categories)))


def category_counts(labels, n_categories: int | None = None) -> np.ndarray:
    """items x raters codes (NaN = missing) -> items x categories: how many raters chose each."""
    codes, n = label_codes(labels, n_categories)
    if codes.ndim != 2:
        raise ValueError("expected a 2-D items x raters array of labels")
    items = np.broadcast_to(np.arange(codes.shape[0])[:, None], codes.shape)
    keep = codes >= 0
    flat = items[keep] * n + codes[keep]
    return np.bincount(flat, minlength=codes.shape[0] * n).reshape(codes.shape[0], n)


def fleiss_kappa(counts: np.ndarray) -> float:
    """Fleiss' kappa from an items x categories table in which every item has the same number of
    ratings (at least two). NaN when undefined (no items, or a single category used throughout)."""
    counts = np.asarray(counts, dtype=float)
    if counts.ndim != 2:
        raise ValueError("expected an items x categories table of counts")
    if counts.shape[0] == 0:
        return float("nan")
    per_item = counts.sum(axis=1)
    m = per_item[0]
    if not np.all(per_item == m):
        raise ValueError("Fleiss' kappa needs the same number of ratings for every item")
    if m < 2:
        raise ValueError("Fleiss' kappa needs at least two ratings per item")
    item_agreement = ((counts * counts).sum(axis=1) - m) / (m * (m - 1))
    observed = item_agreement.mean()
    shares = counts.sum(axis=0) / counts.sum()
    expected = float((shares * shares).sum())
    if expected >= 1 - 1e-12:
        return float("nan")
    return float((observed - expected) / (1 - expected))


def krippendorff_alpha_from_counts(counts: np.ndarray) -> float:
    """Krippendorff's alpha (nominal) from an items x categories table; items may have any number
    of ratings, those with fewer than two are not pairable and do not count."""
    counts = np.asarray(counts, dtype=float)
    if counts.ndim != 2:
        raise ValueError("expected an items x categories table of counts")
    m = counts.sum(axis=1)
    pairable = m >= 2
    counts, m = counts[pairable], m[pairable]
    if counts.shape[0] == 0:
        return float("nan")
    # Coincidence matrix: every ordered pair of values from different raters in a unit,
    # weighted 1 / (m_u - 1) so each unit contributes m_u pairable values.
    weights = 1.0 / (m - 1)
    coincidence = np.einsum("u,uc,uk->ck", weights, counts, counts) - np.diag(weights @ counts)
    marginals = coincidence.sum(axis=1)
    n = marginals.sum()
    observed_disagreement = coincidence.sum() - np.trace(coincidence)
    expected_disagreement = (marginals.sum() ** 2 - (marginals * marginals).sum()) / (n - 1)
    if expected_disagreement <= 1e-12:
        return float("nan")
    return float(1 - observed_disagreement / expected_disagreement)


def krippendorff_alpha(labels, n_categories: int | None = None) -> float:
    """Krippendorff's alpha (nominal) over an items x raters array of codes, NaN for missing."""
    return krippendorff_alpha_from_counts(category_counts(labels, n_categories))
