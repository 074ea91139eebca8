"""Bradley-Terry ratings of policy versions from pairwise outcomes, as Chatbot Arena computes them.

Model: P(i beats j) = sigmoid(s_i - s_j). A tie (and a "both bad", which says no more about
the order of the two than a tie does) counts as half a win each way, which is what Arena's
logistic regression does by duplicating ties. Scores are fitted by maximum likelihood with
Newton's method on a table of win counts, so the cost depends on the number of policies,
not of votes.

A faint Gaussian prior on the scores (sd `prior_sd` Elo points, 1000 by default) keeps the
fit finite when one policy has won every game (where the plain MLE is infinite) and pins
down the offset between groups of policies never compared with each other. Its pull on
ratings backed by a few dozen votes is below a percent of their gap. For a policy that has
won (or lost) every one of its games, the size of its lead and its interval are set by that
prior, not measured: read them as "ahead by a lot", and collect games against stronger rivals.

Ratings are shown on the Elo scale: rating = 400 / ln(10) * s + offset, with the mean (or a
named anchor policy) at 1000. Confidence intervals come from a bootstrap over votes: all
resamples are drawn at once as multinomial counts over vote kinds (equivalent to resampling
rows) and fitted together by a batched Newton iteration.

With `LeaderboardConfig(style_control=True)` and the two responses' style features per vote,
each rating also gets a style-controlled one (feedback_store.style: Arena's logistic
regression on the policy difference plus length and markdown covariates), on the same Elo
scale and anchor, with its own bootstrap interval, and the board lists the fitted style
coefficients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.special import expit

ELO_SCALE = 400.0 / math.log(10.0)
BASE_RATING = 1000.0
_BACKTRACK_STEPS = 30


@dataclass(frozen=True)
class LeaderboardConfig:
    n_bootstrap: int = field(default=200, metadata={"help": "bootstrap resamples for the confidence intervals (0: none)"})
    seed: int = field(default=0, metadata={"help": "seed of the bootstrap's random generator"})
    confidence: float = field(default=0.95, metadata={"help": "confidence level of the intervals (percentile bootstrap)"})
    anchor: str | None = field(
        default=None, metadata={"help": "policy pinned at 1000 (default: the mean rating is 1000)"}
    )
    prior_sd: float = field(
        default=1000.0,
        metadata={"help": "sd of the Gaussian prior on ratings, Elo points; keeps a policy that always wins finite"},
    )
    style_control: bool = field(
        default=False,
        metadata={"help": "also fit style-controlled ratings (length and markdown covariates, as Chatbot Arena)"},
    )


@dataclass(frozen=True)
class PolicyRating:
    policy: str
    rating: float
    ci_low: float
    ci_high: float
    n: int  # votes that compared this policy with another one
    # Style-controlled rating and interval (feedback_store.style); None unless style control is on.
    controlled_rating: float | None = None
    controlled_ci_low: float | None = None
    controlled_ci_high: float | None = None

    def to_dict(self) -> dict:
        """The rating's fields; the controlled ones only when style control computed them."""
        return {k: v for k, v in self.__dict__.items() if not (k.startswith("controlled_") and v is None)}


@dataclass(frozen=True)
class StyleControl:
    """The style covariates' fitted coefficients (logit per standard deviation of (a-b)/(a+b))."""

    covariates: list  # of feedback_store.style.StyleCoefficient
    length_unit: str
    n: int  # votes in the fit

    def to_dict(self) -> dict:
        return {"covariates": [c.to_dict() for c in self.covariates], "length_unit": self.length_unit, "n": self.n}


@dataclass(frozen=True)
class Leaderboard:
    """Ratings sorted best first; the matrices follow `policies` (the same order) in rows and columns."""

    ratings: list[PolicyRating]
    policies: list[str]
    games: list[list[int]]  # games[i][j]: votes between policies i and j
    win_rate: list[list[float | None]]  # row's wins over column, ties as half; None where never compared
    predicted_win_rate: list[list[float]]  # the same under the fitted Bradley-Terry model
    style: StyleControl | None = None  # the style coefficients, when style control is on

    def to_dict(self) -> dict:
        result = {
            "ratings": [r.to_dict() for r in self.ratings],
            "policies": self.policies,
            "games": self.games,
            "win_rate": self.win_rate,
            "predicted_win_rate": self.predicted_win_rate,
        }
        if self.style is not None:
            result["style_control"] = self.style.to_dict()
        return result


def outcome_scores(choices) -> np.ndarray:
    """Score of the first policy for vote choices 'a' / 'b' / 'tie' / 'both_bad': 1, 0, 0.5, 0.5."""
    choices = np.asarray(choices).astype(str)
    known = np.isin(choices, ["a", "b", "tie", "both_bad"])
    if not known.all():
        raise ValueError(f"unknown vote choice {str(choices[~known][0])!r}")
    return np.where(choices == "a", 1.0, np.where(choices == "b", 0.0, 0.5))


def win_matrix(first, second, score, n_players: int) -> np.ndarray:
    """W[i, j] = what i scored against j (a win 1, a tie 0.5), summed over games; self-games dropped."""
    first, second = np.asarray(first, dtype=np.int64), np.asarray(second, dtype=np.int64)
    score = np.asarray(score, dtype=float)
    keep = first != second
    first, second, score = first[keep], second[keep], score[keep]
    size = n_players * n_players
    wins = np.bincount(first * n_players + second, weights=score, minlength=size)
    wins += np.bincount(second * n_players + first, weights=1.0 - score, minlength=size)
    return wins.reshape(n_players, n_players)


def _log_sigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x)


def _objective(scores: np.ndarray, wins: np.ndarray, l2: float) -> np.ndarray:
    diff = scores[..., :, None] - scores[..., None, :]
    return -(wins * _log_sigmoid(diff)).sum(axis=(-2, -1)) + l2 * (scores * scores).sum(axis=-1)


def fit_bradley_terry(wins: np.ndarray, *, l2: float = 1e-6, max_iter: int = 100, tol: float = 1e-10) -> np.ndarray:
    """Penalised maximum-likelihood Bradley-Terry scores (natural-log units, mean zero).

    `wins` is one P x P win matrix or a stack (B, P, P) fitted at once. Minimises
    -sum_ij W_ij log sigmoid(s_i - s_j) + l2 * |s|^2 by Newton's method with backtracking;
    the objective is convex, so this converges to the unique optimum (unique because l2 > 0,
    which also makes the scores sum to zero)."""
    if l2 <= 0:
        raise ValueError("l2 must be positive (it fixes the scores' offset)")
    wins = np.asarray(wins, dtype=float)
    single = wins.ndim == 2
    wins = wins[None] if single else wins
    batch, p, _ = wins.shape
    games = wins + wins.transpose(0, 2, 1)
    scored = wins.sum(axis=2)
    scores = np.zeros((batch, p))
    eye = np.eye(p)
    for _ in range(max_iter):
        prob = expit(scores[:, :, None] - scores[:, None, :])
        grad = -(scored - (games * prob).sum(axis=2)) + 2 * l2 * scores
        curvature = games * prob * (1 - prob)
        hessian = -curvature + eye * (curvature.sum(axis=2) + 2 * l2)[:, :, None]
        step = np.linalg.solve(hessian, -grad[..., None])[..., 0]
        # Backtracking (Armijo), per batch element: most take the full Newton step at once.
        current = _objective(scores, wins, l2)
        slope = (grad * step).sum(axis=1)
        length = np.full(batch, 0.5**_BACKTRACK_STEPS)
        accepted = np.zeros(batch, dtype=bool)
        for halvings in range(_BACKTRACK_STEPS):
            t = 0.5**halvings
            ok = ~accepted & (_objective(scores + t * step, wins, l2) <= current + 1e-4 * t * slope)
            length[ok] = t
            accepted |= ok
            if accepted.all():
                break
        moved = length[:, None] * step
        scores = scores + moved
        if np.abs(moved).max(initial=0.0) < tol:
            break
    scores -= scores.mean(axis=1, keepdims=True)  # exact zero mean, removing rounding drift
    return scores[0] if single else scores


def _to_elo(scores: np.ndarray, anchor_index: int | None) -> np.ndarray:
    ratings = ELO_SCALE * scores
    if anchor_index is None:
        offset = BASE_RATING - ratings.mean(axis=-1, keepdims=True)
    else:
        offset = BASE_RATING - ratings[..., anchor_index : anchor_index + 1]
    return ratings + offset


def _bootstrap_wins(first, second, score, n_players: int, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(n_resamples, P, P) win matrices, each from N votes drawn with replacement from the N given."""
    # A vote's kind is (first, second, outcome); an integer key makes np.unique fast.
    keys, counts = np.unique((first * n_players + second) * 3 + np.rint(score * 2).astype(np.int64),
                             return_counts=True)
    draws = rng.multinomial(len(first), counts / counts.sum(), size=n_resamples)  # (B, kinds)
    i, j, s = keys // 3 // n_players, keys // 3 % n_players, keys % 3 / 2
    size = n_players * n_players
    base = (np.arange(n_resamples) * size)[:, None]
    flat = np.bincount((base + i * n_players + j).ravel(), weights=(draws * s).ravel(), minlength=n_resamples * size)
    flat += np.bincount((base + j * n_players + i).ravel(), weights=(draws * (1 - s)).ravel(),
                        minlength=n_resamples * size)
    return flat.reshape(n_resamples, n_players, n_players)


def bradley_terry_leaderboard(
    policy_first,
    policy_second,
    choices,
    policy_names: list[str] | None = None,
    config: LeaderboardConfig = LeaderboardConfig(),
    style_first=None,
    style_second=None,
) -> Leaderboard:
    """Leaderboard from votes: for each vote the two policies (as names, or indexes into
    `policy_names`) and the choice ('a' = the first won, 'b', 'tie', 'both_bad').

    With `config.style_control`, `style_first` and `style_second` are each vote's two responses'
    style features, (n_votes, len(feedback_store.style.STYLE_FEATURES)) arrays (see
    style.style_feature_table), and every rating also gets a style-controlled one.

    Votes of a policy against itself carry no information and are dropped; policies left
    with no votes are not ranked."""
    first = np.asarray(policy_first)
    second = np.asarray(policy_second)
    if first.shape != second.shape or first.shape != np.shape(choices):
        raise ValueError("policy_first, policy_second and choices must have the same length")
    if policy_names is None:
        policy_names = sorted(set(first.tolist()) | set(second.tolist()))
    if first.dtype.kind in "iu":
        first_idx, second_idx = first.astype(np.int64), second.astype(np.int64)
    else:
        index = {name: i for i, name in enumerate(policy_names)}
        first_idx = np.array([index[name] for name in first.tolist()], dtype=np.int64)
        second_idx = np.array([index[name] for name in second.tolist()], dtype=np.int64)
    score = outcome_scores(choices)
    informative = first_idx != second_idx
    first_idx, second_idx, score = first_idx[informative], second_idx[informative], score[informative]
    if config.style_control:
        if style_first is None or style_second is None:
            raise ValueError("style control needs the style features of both responses of every vote")
        style_first, style_second = (
            np.asarray(x, dtype=float).reshape(len(first), -1)[informative] if len(first)
            else np.zeros((0, np.shape(x)[-1] if np.ndim(x) == 2 else 0)) for x in (style_first, style_second))

    # Rank only the policies that played someone else, re-indexed 0..P-1.
    present = np.unique(np.concatenate([first_idx, second_idx]))
    names = [policy_names[i] for i in present]
    remap = np.full(len(policy_names), -1, dtype=np.int64)
    remap[present] = np.arange(len(present))
    first_idx, second_idx = remap[first_idx], remap[second_idx]
    p = len(names)
    if p < 2:
        return Leaderboard(ratings=[], policies=names, games=[[0] * p for _ in range(p)],
                           win_rate=[[None] * p for _ in range(p)], predicted_win_rate=[[0.5] * p for _ in range(p)])
    if config.anchor is not None and config.anchor not in names:
        raise ValueError(f"anchor policy {config.anchor!r} has no votes against another policy")
    anchor_index = names.index(config.anchor) if config.anchor is not None else None
    l2 = 0.5 / (config.prior_sd / ELO_SCALE) ** 2

    wins = win_matrix(first_idx, second_idx, score, p)
    scores = fit_bradley_terry(wins, l2=l2)
    ratings = _to_elo(scores, anchor_index)

    if config.n_bootstrap > 0:
        rng = np.random.default_rng(config.seed)
        resampled = fit_bradley_terry(
            _bootstrap_wins(first_idx, second_idx, score, p, config.n_bootstrap, rng), l2=l2
        )
        tail = (1 - config.confidence) / 2 * 100
        low, high = np.percentile(_to_elo(resampled, anchor_index), [tail, 100 - tail], axis=0)
    else:
        low = high = np.full(p, np.nan)

    games = wins + wins.T
    n_votes = games.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = np.where(games > 0, wins / np.where(games > 0, games, 1), np.nan)
    predicted = 1.0 / (1.0 + np.exp(-(scores[:, None] - scores[None, :])))
    order = np.argsort(-ratings, kind="stable")
    controlled, style = (None, None) if not config.style_control else _style_controlled(
        first_idx, second_idx, score, style_first, style_second, p, l2, anchor_index, config)
    rows = [
        PolicyRating(names[i], float(ratings[i]), float(low[i]), float(high[i]), int(round(n_votes[i])),
                     *((None, None, None) if controlled is None else (float(c[i]) for c in controlled)))
        for i in order
    ]
    return Leaderboard(
        ratings=rows,
        policies=names,
        games=np.rint(games).astype(int).tolist(),
        win_rate=[[None if np.isnan(v) else float(v) for v in row] for row in rate],
        predicted_win_rate=predicted.tolist(),
        style=style,
    )


def _style_controlled(first, second, score, style_first, style_second, p, l2, anchor_index, config):
    """(ratings, ci_low, ci_high) controlled for style, on the Elo scale, and the coefficients."""
    from feedback_store.style import (
        LENGTH_UNIT,
        STYLE_FEATURES,
        StyleCoefficient,
        fit_style_controlled,
        normalized_differences,
    )

    covariates = normalized_differences(style_first, style_second)
    fit = fit_style_controlled(first, second, score, covariates, p, l2=l2, n_bootstrap=config.n_bootstrap,
                               rng=np.random.default_rng([config.seed, 1]))
    ratings = _to_elo(fit.scores, anchor_index)
    tail = (1 - config.confidence) / 2 * 100
    if fit.boot_scores is not None:
        low, high = np.percentile(_to_elo(fit.boot_scores, anchor_index), [tail, 100 - tail], axis=0)
        beta_low, beta_high = np.percentile(fit.boot_beta, [tail, 100 - tail], axis=0)
    else:
        low = high = np.full(p, np.nan)
        beta_low = beta_high = np.full(len(fit.beta), np.nan)
    coefficients = [
        StyleCoefficient(name, float(fit.beta[j]), float(beta_low[j]), float(beta_high[j]), float(fit.sd[j]))
        for j, name in enumerate(STYLE_FEATURES)
    ]
    return (ratings, low, high), StyleControl(coefficients, LENGTH_UNIT, len(score))
