"""Style control for the Bradley-Terry leaderboard, in the manner of Chatbot Arena (LMSYS, Aug 2024).

A policy can climb a plain leaderboard by writing longer, more heavily formatted answers if the
raters prefer those regardless of content. Style control fits one logistic regression of the
outcome on the policy indicator difference *and* style covariates of the two responses:

    P(first beats second) = sigmoid(s_first - s_second + x . beta)

with, per covariate, x = (a - b) / (a + b) (0 where both are 0), scaled to unit standard
deviation. The policies' coefficients `s` are the style-controlled ratings: what is left of a
policy's lead once length and markdown are accounted for; `beta` says how much each style
covariate buys (logit per standard deviation). Covariates (`STYLE_FEATURES`): the response's
length in characters, and its markdown headers, bold spans and list items (counted outside
fenced code blocks, as Arena does).

One difference from Arena: the covariates are scaled but not centred. Arena shows the two
answers in random order, so the mean difference is about zero anyway; this store keeps each
pair in canonical order (response_a_id < response_b_id, usually the older policy first), and
subtracting the mean would turn "which response was stored first" into a covariate.

Ties and "both bad" count half a win each way (a soft label of 0.5), like the raw leaderboard.
The fit is scipy.optimize.minimize (trust-exact: the exact gradient and Hessian of the convex
penalised likelihood) on votes grouped by comparison; the bootstrap resamples votes (as
N of the N votes with replacement) and refits all resamples together by a batched Newton
iteration started from the full-data optimum (the raw leaderboard's approach), which gives the
same optimum as scipy's, far faster than one scipy call per resample.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit

STYLE_FEATURES = ("length", "headers", "bold", "list_items")
LENGTH_UNIT = "characters"

_CODE_BLOCK = re.compile(r"```.*?```", re.DOTALL)
_HEADER = re.compile(r"^[ \t]{0,3}#{1,6}[ \t]+\S", re.MULTILINE)
_BOLD = re.compile(r"\*\*[^*\n]+?\*\*|__[^_\n]+?__")
_LIST_ITEM = re.compile(r"^[ \t]*(?:[-*+]|\d+[.)])[ \t]+\S", re.MULTILINE)


def style_features(text: str) -> tuple[int, int, int, int]:
    """(length in characters, markdown headers, bold spans, list items) of one response."""
    prose = _CODE_BLOCK.sub("", text)
    return (len(text), len(_HEADER.findall(prose)), len(_BOLD.findall(prose)), len(_LIST_ITEM.findall(prose)))


def style_feature_table(texts) -> np.ndarray:
    """(n, len(STYLE_FEATURES)) float array of style_features over `texts`."""
    rows = [style_features(t or "") for t in texts]
    return np.array(rows, dtype=float).reshape(len(rows), len(STYLE_FEATURES))


def normalized_differences(features_a: np.ndarray, features_b: np.ndarray) -> np.ndarray:
    """(a - b) / (a + b) per covariate; 0 where a + b is 0."""
    a, b = np.asarray(features_a, dtype=float), np.asarray(features_b, dtype=float)
    total = a + b
    return np.divide(a - b, total, out=np.zeros_like(total), where=total != 0)


@dataclass(frozen=True)
class StyleCoefficient:
    name: str
    coefficient: float  # logit per standard deviation of the normalized difference; NaN if the covariate never varies
    ci_low: float
    ci_high: float
    sd: float  # standard deviation (about zero) of (a - b) / (a + b): coefficient / sd is per unit of it

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class StyleFit:
    scores: np.ndarray  # (P,) policy coefficients, natural-log units, mean zero
    beta: np.ndarray  # (k,) style coefficients (0 for dropped covariates)
    boot_scores: np.ndarray | None  # (B, P)
    boot_beta: np.ndarray | None  # (B, k)
    sd: np.ndarray  # (k,) scale of each covariate; 0 = never varies, dropped


def _group_votes(first, second, covariates):
    """Votes with identical (first, second, covariates) rows share one regression row:
    returns the rows' (first, second, X) and, per vote, its row index."""
    rows = np.column_stack([first, second, covariates]).astype(float)
    if len(rows) == 0:
        return first[:0], second[:0], covariates[:0], np.zeros(0, dtype=np.int64)
    order = np.lexsort(rows.T[::-1])
    ordered = rows[order]
    new_row = np.ones(len(rows), dtype=bool)
    new_row[1:] = (ordered[1:] != ordered[:-1]).any(axis=1)
    row_of_vote = np.empty(len(rows), dtype=np.int64)
    row_of_vote[order] = np.cumsum(new_row) - 1
    unique = ordered[new_row]
    return unique[:, 0].astype(np.int64), unique[:, 1].astype(np.int64), unique[:, 2:], row_of_vote


def _design(first, second, X, n_players):
    """The regression's design matrix: e_first - e_second for the policies, then the covariates."""
    rows = np.arange(len(first))
    design = np.zeros((len(first), n_players + X.shape[1]))
    design[rows, first] += 1.0
    design[rows, second] -= 1.0
    design[:, n_players:] = X
    return design


def _penalty(n_players, k, l2, l2_style):
    return np.concatenate([np.full(n_players, l2), np.full(k, l2_style)])


def _objective(theta, design, wins, games, penalty):
    """Negative penalised log-likelihood; theta (..., d), wins/games (..., n)."""
    z = theta @ design.T
    return (np.sum(wins * np.logaddexp(0.0, -z) + (games - wins) * np.logaddexp(0.0, z), axis=-1)
            + np.sum(penalty * theta * theta, axis=-1))


def _fit_scipy(design, wins, games, penalty, x0):
    """One fit with scipy.optimize.minimize (trust-exact: exact gradient and Hessian)."""

    def value_and_grad(theta):
        z = design @ theta
        residual = games * expit(z) - wins
        return (float(np.sum(wins * np.logaddexp(0.0, -z) + (games - wins) * np.logaddexp(0.0, z))
                      + penalty @ (theta * theta)),
                design.T @ residual + 2 * penalty * theta)

    def hessian(theta):
        p = expit(design @ theta)
        return (design.T * (games * p * (1 - p))) @ design + np.diag(2 * penalty)

    result = minimize(value_and_grad, x0, jac=True, hess=hessian, method="trust-exact", options={"gtol": 1e-9})
    return result.x


def _fit_batched(design, wins, games, penalty, x0, *, max_iter=50, tol=1e-9):
    """Many fits at once (wins/games (B, n)), by Newton's method with per-fit backtracking,
    from x0 (the full-data optimum, so a few steps suffice). Same optimum as _fit_scipy."""
    batch, d = wins.shape[0], design.shape[1]
    theta = np.repeat(x0[None], batch, axis=0)
    outer = (design[:, :, None] * design[:, None, :]).reshape(len(design), d * d)
    ridge = np.diag(2 * penalty)
    active = np.ones(batch, dtype=bool)
    for _ in range(max_iter):
        idx = np.flatnonzero(active)
        if not len(idx):
            break
        th, w, g = theta[idx], wins[idx], games[idx]
        p = expit(th @ design.T)
        grad = (g * p - w) @ design + 2 * penalty * th
        hess = ((g * p * (1 - p)) @ outer).reshape(len(idx), d, d) + ridge
        step = -np.linalg.solve(hess, grad[..., None])[..., 0]
        slope = np.sum(grad * step, axis=1)
        length = np.ones(len(idx))
        # Newton decrement below 1e-10: converged (the full step is taken). A step that moves no
        # coefficient by more than 0.25 (logit) is in Newton's region of fast convergence from a
        # warm start and is taken whole; only larger ones are checked (Armijo, with backtracking).
        done = -slope < 1e-10
        checked = np.flatnonzero(~done & (np.abs(step).max(axis=1) > 0.25))
        if len(checked):
            current = _objective(th[checked], design, w[checked], g[checked], penalty)
            refused = np.arange(len(checked))
            for halvings in range(31):
                t = 0.5**halvings
                c = checked[refused]
                trial = _objective(th[c] + t * step[c], design, w[c], g[c], penalty)
                length[c] = t
                refused = refused[trial > current[refused] + 1e-4 * t * slope[c]]
                if not len(refused):
                    break
            length[checked[refused]] = 0.0  # no decrease at all: stuck at rounding
        moved = length[:, None] * step
        theta[idx] = th + moved
        active[idx] = ~done & (np.abs(moved).max(axis=1) >= tol)
    return theta


def fit_style_controlled(
    first, second, score, covariates, n_players: int, *, l2: float, l2_style: float = 1e-6,
    n_bootstrap: int = 0, rng: np.random.Generator | None = None,
) -> StyleFit:
    """Penalised logistic regression of `score` (1 / 0.5 / 0 for the first policy) on the policy
    difference and the covariates (normalized differences, one column each), with bootstrap refits.

    `l2` is the raw leaderboard's penalty on the policy scores (its faint prior); the style
    coefficients get a negligible one (`l2_style`) that only keeps a degenerate fit finite."""
    first, second = np.asarray(first, dtype=np.int64), np.asarray(second, dtype=np.int64)
    score = np.asarray(score, dtype=float)
    covariates = np.asarray(covariates, dtype=float).reshape(len(first), -1)
    sd = np.sqrt(np.mean(covariates**2, axis=0)) if len(first) else np.zeros(covariates.shape[1])
    sd = np.where(sd > 1e-12, sd, 0.0)
    scaled = np.divide(covariates, sd, out=np.zeros_like(covariates), where=sd > 0)
    kept = sd > 0
    r_first, r_second, X, row_of_vote = _group_votes(first, second, scaled[:, kept])
    n_rows, k = len(r_first), X.shape[1]
    design = _design(r_first, r_second, X, n_players)
    penalty = _penalty(n_players, k, l2, l2_style)
    games = np.bincount(row_of_vote, minlength=n_rows).astype(float)
    wins = np.bincount(row_of_vote, score, minlength=n_rows)
    theta = _fit_scipy(design, wins, games, penalty, np.zeros(n_players + k))

    def split(theta_):
        s = theta_[..., :n_players]
        beta = np.full(theta_.shape[:-1] + (len(kept),), np.nan)
        beta[..., kept] = theta_[..., n_players:]
        return s - s.mean(axis=-1, keepdims=True), beta

    boot = None
    if n_bootstrap > 0:
        rng = rng if rng is not None else np.random.default_rng()
        n_votes = len(score)
        boot = np.empty((n_bootstrap, n_players + k))
        chunk = max(1, int(4_000_000 // max(n_votes, n_rows, 1)))  # keeps each (chunk, votes) array near 32 MB
        for start in range(0, n_bootstrap, chunk):
            size = min(chunk, n_bootstrap - start)
            drawn = rng.integers(0, n_votes, size=(size, n_votes))  # each resample: N votes with replacement
            index = ((np.arange(size) * n_rows)[:, None] + row_of_vote[drawn]).ravel()
            g = np.bincount(index, minlength=size * n_rows).reshape(size, n_rows).astype(float)
            w = np.bincount(index, score[drawn].ravel(), size * n_rows).reshape(size, n_rows)
            boot[start : start + size] = _fit_batched(design, w, g, penalty, theta)
    scores, beta = split(theta)
    boot_scores, boot_beta = split(boot) if boot is not None else (None, None)
    return StyleFit(scores=scores, beta=beta, boot_scores=boot_scores, boot_beta=boot_beta, sd=sd)
