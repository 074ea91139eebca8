"""Annotator quality, per rater: gold accuracy, leave-one-out agreement, left-pick rate, speed,
and a Dawid-Skene confusion estimate. `prefloop stats` shows it under `raters`.

For each rater (of the kinds asked for; simulated raters only when asked by name):

- `gold_accuracy`: the share of its votes on gold pairs (feedback_store.gold) that picked the
  known winner; a tie or "both bad" on a gold pair counts as wrong. `gold_ci_low/high` is the
  95 % Wilson score interval.
- `majority_agreement`: leave-one-out agreement with the others. On each comparison that other
  raters (of the kinds counted) also voted on and whose plurality among those others is unique,
  does this rater's choice (a / b / tie / both_bad) equal it? The rater's own vote never counts
  towards the majority it is compared with.
- `left_pick_rate`: among its decisive votes (a or b) with a recorded left side, the share that
  picked the response shown on the left (0.5 is unbiased).
- `median_time_ms`: median `time_spent_ms` of its votes (as in stats.throughput_stats).
- `ds_accuracy`, `ds_confusion`: Dawid-Skene (feedback_store.dawid_skene: crowd-kit's algorithm in
  numpy, checked against crowd-kit; EM over every counted vote, gold pairs' winners given as known
  true labels). `ds_confusion[true][said]` is the
  estimated P(rater says `said` | the true label is `true`); `ds_accuracy` is the
  prior-weighted diagonal, sum_k prior_k * P(says k | true k): the chance a vote of this rater
  is right.

`score` is the figure the threshold applies to: the gold accuracy once the rater has at least
`min_gold` gold votes, else the Dawid-Skene accuracy, else the majority agreement (and None
with none of them); `score_source` says which. `below_threshold` is `score < threshold`, the
admin-set `rater_quality_threshold` (feedback_store.app_settings, default 0.7).

Suggested weight (`prefloop raters weight --auto`, `auto_weights`): w = clip((2 * score - 1), 0, 1)
for two-way choices, i.e. 0 for a rater no better than a coin and 1 for a perfect one, linear in
between (the log-odds weight log(s / (1 - s)) of Dawid-Skene's optimal vote is near-linear in
that range and unbounded at 1). Raters with no score keep their weight.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy.stats import norm

from feedback_store.dawid_skene import fit_dawid_skene
from feedback_store.vote_table import CHOICES

DEFAULT_MIN_GOLD = 10


@dataclass(frozen=True)
class RaterQuality:
    rater: str
    kind: str
    votes: int
    gold_n: int
    gold_correct: int
    gold_accuracy: float
    gold_ci_low: float
    gold_ci_high: float
    majority_n: int
    majority_agreement: float
    left_n: int
    left_pick_rate: float
    median_time_ms: float
    ds_accuracy: float
    ds_confusion: dict = field(default_factory=dict)  # {true: {said: probability}}
    score: float | None = None
    score_source: str | None = None  # gold | dawid_skene | majority
    below_threshold: bool = False
    suggested_weight: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion k / n (NaN, NaN for n = 0)."""
    if n <= 0:
        return math.nan, math.nan
    z = float(norm.ppf(0.5 + confidence / 2))
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    low, high = max(0.0, centre - half), min(1.0, centre + half)
    return (0.0 if k == 0 else low), (1.0 if k == n else high)  # exact ends, not 1 - 1e-16


def suggested_weight(score: float | None) -> float | None:
    if score is None or score != score:
        return None
    return float(min(1.0, max(0.0, 2.0 * score - 1.0)))


def _leave_one_out(comparison: np.ndarray, rater: np.ndarray, choice: np.ndarray, n_raters: int):
    """Per rater: (items compared, items agreeing) with the plurality of the other voters."""
    c = len(CHOICES)
    items, item = np.unique(comparison, return_inverse=True)
    counts = np.zeros((len(items), c), dtype=np.int64)
    np.add.at(counts, (item, choice), 1)
    others = counts[item].copy()  # per vote: its comparison's counts ...
    others[np.arange(len(choice)), choice] -= 1  # ... less its own vote
    best = others.max(axis=1)
    unique_plurality = (best > 0) & ((others == best[:, None]).sum(axis=1) == 1)
    agrees = unique_plurality & (others.argmax(axis=1) == choice)
    n = np.bincount(rater[unique_plurality], minlength=n_raters)
    k = np.bincount(rater[agrees], minlength=n_raters)
    return n, k


def _dawid_skene(comparison, rater, choice, gold_truth: dict[int, int], n_raters: int, n_iter: int):
    """Dawid-Skene over every counted vote: per rater index, (accuracy, confusion dict)."""
    if len(comparison) == 0:
        return {}
    fit = fit_dawid_skene(comparison, rater, choice, n_raters=n_raters, gold=gold_truth, n_iter=n_iter)
    labels = [CHOICES[int(code)] for code in fit.labels]
    result = {}
    for r in np.unique(rater):
        seen = fit.errors[r].sum(axis=1) > 0  # labels this rater said at least once
        confusion = {
            true: {labels[s]: float(fit.errors[r, s, t]) for s in np.flatnonzero(seen)}
            for t, true in enumerate(labels)
        }
        result[int(r)] = (fit.accuracy(int(r)), confusion)
    return result


def rater_quality(
    votes,
    raters,
    *,
    kinds=("human", "judge", "import"),
    threshold: float = 0.7,
    min_gold: int = DEFAULT_MIN_GOLD,
    ds_iterations: int = 100,
) -> list[RaterQuality]:
    """Quality per rater with votes, from `stats.VoteColumns` (gold votes included: `votes.gold`
    holds each vote's gold winner, 0 = a, 1 = b, -1 = not gold) and `stats.RaterTable`."""
    if len(votes):
        votes = votes.subset(raters.of_kinds(set(kinds))[votes.rater] & (votes.choice >= 0))
    n_raters = len(raters.ids)
    if not len(votes):
        return []
    rater, choice = votes.rater, votes.choice
    n_votes = np.bincount(rater, minlength=n_raters)

    on_gold = votes.gold >= 0
    gold_n = np.bincount(rater[on_gold], minlength=n_raters)
    gold_k = np.bincount(rater[on_gold & (choice == votes.gold)], minlength=n_raters)

    majority_n, majority_k = _leave_one_out(votes.comparison, rater, choice, n_raters)

    decisive = (choice <= 1) & (votes.left >= 0)
    picked = np.where(choice == 0, votes.response_a, votes.response_b)
    left_n = np.bincount(rater[decisive], minlength=n_raters)
    left_k = np.bincount(rater[decisive & (picked == votes.left)], minlength=n_raters)

    gold_truth = {int(c): int(g) for c, g in zip(votes.comparison[on_gold], votes.gold[on_gold])}
    ds = _dawid_skene(votes.comparison, rater, choice, gold_truth, n_raters, ds_iterations)

    rows = []
    for r in np.flatnonzero(n_votes):
        spent = votes.time_spent_ms[rater == r]
        spent = spent[~np.isnan(spent)]
        low, high = wilson_interval(int(gold_k[r]), int(gold_n[r]))
        ds_accuracy, confusion = ds.get(int(r), (math.nan, {}))
        gold_accuracy = gold_k[r] / gold_n[r] if gold_n[r] else math.nan
        majority = majority_k[r] / majority_n[r] if majority_n[r] else math.nan
        if gold_n[r] >= min_gold:
            score, source = float(gold_accuracy), "gold"
        elif ds_accuracy == ds_accuracy:
            score, source = float(ds_accuracy), "dawid_skene"
        elif majority == majority:
            score, source = float(majority), "majority"
        else:
            score, source = None, None
        rows.append(RaterQuality(
            rater=raters.names[r],
            kind=raters.kinds[r],
            votes=int(n_votes[r]),
            gold_n=int(gold_n[r]),
            gold_correct=int(gold_k[r]),
            gold_accuracy=float(gold_accuracy),
            gold_ci_low=low,
            gold_ci_high=high,
            majority_n=int(majority_n[r]),
            majority_agreement=float(majority),
            left_n=int(left_n[r]),
            left_pick_rate=float(left_k[r] / left_n[r]) if left_n[r] else math.nan,
            median_time_ms=float(np.median(spent)) if len(spent) else math.nan,
            ds_accuracy=float(ds_accuracy),
            ds_confusion=confusion,
            score=score,
            score_source=source,
            below_threshold=bool(score is not None and score < threshold),
            suggested_weight=suggested_weight(score),
        ))
    return rows


def auto_weights(*, session, kinds=("human", "judge", "import", "simulated"), min_gold: int = DEFAULT_MIN_GOLD,
                 apply: bool = True) -> dict[str, float]:
    """Set every scored rater's `weight` to its suggested weight (see the module docstring);
    returns {rater name: new weight}. Raters without a score are left as they are."""
    from sqlmodel import select

    from feedback_store.app_settings import quality_threshold
    from feedback_store.models import Rater
    from feedback_store.vote_table import load_raters, load_votes

    table = load_raters(session=session)
    rows = rater_quality(load_votes(table, session=session), table, kinds=kinds,
                         threshold=quality_threshold(session=session), min_gold=min_gold)
    weights = {row.rater: row.suggested_weight for row in rows if row.suggested_weight is not None}
    if apply:
        for rater in session.exec(select(Rater).where(Rater.name.in_(list(weights)))):
            rater.weight = weights[rater.name]
            session.add(rater)
        session.flush()
    return weights
