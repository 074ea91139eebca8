"""Dawid–Skene (1979) in numpy: each rater's confusion matrix and the labels' priors by EM.

The same algorithm, initialisation and stopping rule as crowd-kit's `DawidSkene` (majority-vote
start, known gold labels clamped at every step, errors clipped at 1e-10 before normalising,
stopping when the evidence lower bound per vote gains less than `tol`), on integer arrays
instead of pandas joins: crowd-kit spends seconds per thousand votes on its group-bys, while the
statistics page must stay interactive at 100,000 votes. `tests/test_rater_quality.py` checks
the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EPS = 1e-10


@dataclass(frozen=True)
class DawidSkeneFit:
    labels: np.ndarray  # the label codes seen, ascending: the axes of `errors` and `priors`
    priors: np.ndarray  # (K,) P(true label)
    errors: np.ndarray  # (n_raters, K said, K true): P(rater says l | true k); 0 where never said
    probas: np.ndarray  # (n_items, K) posterior of each item's true label
    iterations: int

    def accuracy(self, rater: int) -> float:
        """The chance a vote of `rater` is right: sum_k prior_k * P(says k | true k)."""
        return float(self.priors @ np.diagonal(self.errors[rater]))


def fit_dawid_skene(item, rater, label, *, n_raters: int, gold: dict[int, int] | None = None,
                    n_iter: int = 100, tol: float = 1e-5) -> DawidSkeneFit:
    """EM over votes given as parallel integer arrays (`item` ids are any integers, `rater`
    indexes 0..n_raters-1, `label` any integer codes); `gold` maps item id -> true label code."""
    items, item_index = np.unique(np.asarray(item), return_inverse=True)
    labels, label_index = np.unique(np.asarray(label), return_inverse=True)
    rater = np.asarray(rater)
    n_items, k = len(items), len(labels)
    said = np.zeros((n_raters, k), dtype=bool)
    said[rater, label_index] = True  # crowd-kit keeps an error row only for (rater, label) seen
    clamp_rows, clamp_labels = _clamped(gold or {}, items, labels)

    probas = np.zeros((n_items, k))
    np.add.at(probas, (item_index, label_index), 1.0)
    probas /= probas.sum(axis=1, keepdims=True)
    probas[clamp_rows] = 0.0
    probas[clamp_rows, clamp_labels] = 1.0
    priors = probas.mean(axis=0)
    errors = _m_step(probas, item_index, rater, label_index, said)
    loss, iterations = -np.inf, 0
    for iterations in range(1, n_iter + 1):
        log_errors = np.log(np.where(errors > 0, errors, 1.0))  # unseen (rater, label): never looked up
        log_like = np.log(np.clip(priors, EPS, None)) + _sum_by(item_index, log_errors[rater, label_index], n_items)
        probas = np.exp(log_like - log_like.max(axis=1, keepdims=True))
        probas /= probas.sum(axis=1, keepdims=True)
        probas[clamp_rows] = 0.0
        probas[clamp_rows, clamp_labels] = 1.0
        priors = probas.mean(axis=0)
        errors = _m_step(probas, item_index, rater, label_index, said)
        new_loss = _lower_bound(probas, priors, errors, item_index, rater, label_index) / len(item_index)
        if new_loss - loss < tol:
            break
        loss = new_loss
    return DawidSkeneFit(labels=labels, priors=priors, errors=errors, probas=probas, iterations=iterations)


def _clamped(gold: dict[int, int], items: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    known = [(item, label) for item, label in gold.items() if label in labels]
    if not known:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    ids, truth = np.array(known).T
    rows = np.searchsorted(items, ids)
    present = (rows < len(items)) & (items[np.minimum(rows, len(items) - 1)] == ids)
    return rows[present], np.searchsorted(labels, truth[present])


def _sum_by(index: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """Row sums grouped by `index` (bincount per column: far faster than np.add.at)."""
    return np.stack([np.bincount(index, weights=values[:, c], minlength=n) for c in range(values.shape[1])], axis=1)


def _m_step(probas, item_index, rater, label_index, said) -> np.ndarray:
    n_raters, k = said.shape
    counts = _sum_by(rater * k + label_index, probas[item_index], n_raters * k).reshape(n_raters, k, k)
    counts = np.where(said[:, :, None], np.clip(counts, EPS, None), 0.0)
    return counts / counts.sum(axis=1, keepdims=True)


def _lower_bound(probas, priors, errors, item_index, rater, label_index) -> float:
    log_errors = np.log(np.where(errors > 0, errors, 1.0))
    joint = (probas[item_index] * (log_errors[rater, label_index] + np.log(np.clip(priors, EPS, None)))).sum()
    clipped = np.clip(probas, EPS, None)
    return float(joint - (np.log(clipped) * clipped).sum())
