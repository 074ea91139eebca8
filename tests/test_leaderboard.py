"""Bradley-Terry leaderboard: against fits done differently, on simulated arenas, and at the edges."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from feedback_store.leaderboard import (
    ELO_SCALE,
    LeaderboardConfig,
    _bootstrap_wins,
    bradley_terry_leaderboard,
    fit_bradley_terry,
    outcome_scores,
    win_matrix,
)

PLAIN_MLE = LeaderboardConfig(n_bootstrap=0, prior_sd=1e7)  # effectively no prior


def simulate(rng, elo: np.ndarray, n_votes: int, tie_rate: float = 0.0):
    """Votes between random pairs of distinct policies whose true Elo ratings are `elo`."""
    p = len(elo)
    first = rng.integers(0, p, n_votes)
    second = (first + rng.integers(1, p, n_votes)) % p
    win = 1 / (1 + 10 ** ((elo[second] - elo[first]) / 400))
    u = rng.random(n_votes)
    decisive = np.where(rng.random(n_votes) < win, "a", "b")
    tie_kind = np.where(rng.random(n_votes) < 0.5, "tie", "both_bad")
    choices = np.where(u < tie_rate, tie_kind, decisive)
    return first, second, choices


def ratings_by_name(board) -> dict[str, float]:
    return {row.policy: row.rating for row in board.ratings}


def sklearn_elo(first, second, choices, p: int) -> np.ndarray:
    """Chatbot Arena's way: logistic regression on a +1/-1 design matrix, ties as half a win each way."""
    keep = first != second
    first, second, score = first[keep], second[keep], outcome_scores(choices[keep])
    x = np.zeros((len(first), p))
    x[np.arange(len(first)), first] = 1.0
    x[np.arange(len(first)), second] = -1.0
    model = LogisticRegression(fit_intercept=False, C=np.inf, tol=1e-12, max_iter=10_000)
    model.fit(np.vstack([x, x]), np.r_[np.ones(len(x)), np.zeros(len(x))], sample_weight=np.r_[score, 1 - score])
    coef = model.coef_[0]
    return ELO_SCALE * (coef - coef.mean()) + 1000


def zermelo_elo(first, second, choices, p: int, iterations: int = 5000) -> np.ndarray:
    """The classic minorise-maximise (Zermelo / Hunter 2004) iteration for Bradley-Terry strengths."""
    wins = win_matrix(first, second, outcome_scores(choices), p)
    games = wins + wins.T
    total = wins.sum(axis=1)
    gamma = np.ones(p)
    for _ in range(iterations):
        gamma = total / (games / (gamma[:, None] + gamma[None, :])).sum(axis=1)
        gamma /= np.exp(np.log(gamma).mean())
    log_gamma = np.log(gamma)
    return ELO_SCALE * (log_gamma - log_gamma.mean()) + 1000


@pytest.mark.parametrize("seed", range(4))
def test_ratings_equal_chatbot_arenas_logistic_regression_and_the_mm_iteration(seed):
    rng = np.random.default_rng(seed)
    truth = rng.normal(1000, 120, 5)
    first, second, choices = simulate(rng, truth, 1500, tie_rate=0.2)
    names = [f"policy{i}" for i in range(5)]
    board = ratings_by_name(bradley_terry_leaderboard(first, second, choices, names, PLAIN_MLE))
    ours = np.array([board[name] for name in names])
    np.testing.assert_allclose(ours, sklearn_elo(first, second, choices, 5), atol=1e-3)
    np.testing.assert_allclose(ours, zermelo_elo(first, second, choices, 5), atol=1e-3)
    # The default faint prior moves ratings backed by hundreds of votes by well under one Elo point.
    default = ratings_by_name(bradley_terry_leaderboard(first, second, choices, names,
                                                        LeaderboardConfig(n_bootstrap=0)))
    np.testing.assert_allclose([default[name] for name in names], ours, atol=0.5)


def test_simulated_arena_recovers_the_order_and_the_intervals_cover_the_truth():
    truth = np.array([900.0, 1000.0, 1060.0, 1200.0])
    truth_centered = truth - truth.mean() + 1000
    names = ["base", "sft", "kto", "dpo"]
    covered, total = 0, 0
    for seed in range(20):
        rng = np.random.default_rng(1000 + seed)
        first, second, choices = simulate(rng, truth, 1500)
        board = bradley_terry_leaderboard(first, second, choices, names, LeaderboardConfig(seed=seed))
        assert [row.policy for row in board.ratings] == ["dpo", "kto", "sft", "base"]
        for row in board.ratings:
            true_rating = truth_centered[names.index(row.policy)]
            covered += row.ci_low <= true_rating <= row.ci_high
            total += 1
            assert row.ci_low <= row.rating <= row.ci_high
    # 95% intervals: 80 of them should miss about 4 times; allow sampling noise, not a broken bootstrap.
    assert covered / total >= 0.87, f"coverage {covered}/{total}"


def test_interval_width_shrinks_like_one_over_root_n():
    truth = np.array([950.0, 1050.0])
    widths = []
    for n in (400, 6400):
        first, second, choices = simulate(np.random.default_rng(n), truth, n)
        row = bradley_terry_leaderboard(first, second, choices, ["x", "y"]).ratings[0]
        widths.append(row.ci_high - row.ci_low)
    assert widths[0] / widths[1] == pytest.approx(4.0, rel=0.3)


def test_ties_and_both_bad_count_as_half_a_win_each_way():
    # One win each way and any number of ties: the two policies are level.
    board = bradley_terry_leaderboard(["x", "x", "x", "y"], ["y", "y", "y", "x"], ["a", "tie", "both_bad", "a"],
                                      config=PLAIN_MLE)
    assert ratings_by_name(board) == pytest.approx({"x": 1000.0, "y": 1000.0})
    # 2 wins + 2 ties for x vs 0 wins for y: x scored 3 of 4, so P(x beats y) = 0.75 at the optimum.
    board = bradley_terry_leaderboard(["x"] * 4, ["y"] * 4, ["a", "a", "tie", "both_bad"], config=PLAIN_MLE)
    gap = ratings_by_name(board)["x"] - ratings_by_name(board)["y"]
    assert 1 / (1 + 10 ** (-gap / 400)) == pytest.approx(0.75, abs=1e-6)
    assert board.predicted_win_rate[board.policies.index("x")][board.policies.index("y")] == pytest.approx(0.75)
    # both_bad is the same as tie.
    rng = np.random.default_rng(5)
    first, second, choices = simulate(rng, np.array([1000.0, 1100.0, 900.0]), 600, tie_rate=0.4)
    as_ties = np.where(choices == "both_bad", "tie", choices)
    assert ratings_by_name(bradley_terry_leaderboard(first, second, choices)) == pytest.approx(
        ratings_by_name(bradley_terry_leaderboard(first, second, as_ties)))


def test_a_policy_compared_with_itself_carries_no_information():
    rng = np.random.default_rng(2)
    first, second, choices = simulate(rng, np.array([1000.0, 1100.0, 900.0]), 500)
    names = ["p0", "p1", "p2", "lonely"]
    base = bradley_terry_leaderboard(first, second, choices, names)
    extra_first = np.r_[first, [0, 0, 1, 3, 3]]
    extra_second = np.r_[second, [0, 0, 1, 3, 3]]
    extra_choices = np.r_[choices, ["a", "a", "b", "a", "tie"]]
    more = bradley_terry_leaderboard(extra_first, extra_second, extra_choices, names)
    assert more == base  # same ratings, intervals, counts, matrices
    assert "lonely" not in more.policies  # only ever compared with itself: not ranked


def test_no_votes_and_a_single_policy_give_an_empty_board():
    empty = bradley_terry_leaderboard(np.array([], dtype=int), np.array([], dtype=int), np.array([]), ["a", "b"])
    assert empty.ratings == [] and empty.policies == []
    alone = bradley_terry_leaderboard(["a", "a"], ["a", "a"], ["a", "b"])
    assert alone.ratings == []


def test_a_policy_that_always_wins_gets_a_finite_rating_at_the_top():
    # champ beats base 30/30; base and other trade wins.
    first = ["champ"] * 30 + ["base"] * 20
    second = ["base"] * 30 + ["other"] * 20
    choices = ["a"] * 30 + ["a", "b"] * 10
    board = bradley_terry_leaderboard(first, second, choices)
    ratings = ratings_by_name(board)
    assert all(math.isfinite(v) for row in board.ratings for v in (row.rating, row.ci_low, row.ci_high))
    assert board.ratings[0].policy == "champ"
    # The faint prior caps the gap where the plain MLE would run off to infinity.
    assert 400 < ratings["champ"] - ratings["base"] < 2000
    assert board.ratings[0].ci_low > ratings["base"]
    plain = ratings_by_name(bradley_terry_leaderboard(first, second, choices, config=PLAIN_MLE))
    assert plain["champ"] - plain["base"] > ratings["champ"] - ratings["base"] + 1000


def test_anchor_pins_one_policy_at_1000_and_keeps_the_gaps():
    rng = np.random.default_rng(9)
    first, second, choices = simulate(rng, np.array([1000.0, 1150.0, 950.0]), 800)
    names = ["base", "dpo", "kto"]
    by_mean = ratings_by_name(bradley_terry_leaderboard(first, second, choices, names))
    anchored = bradley_terry_leaderboard(first, second, choices, names, LeaderboardConfig(anchor="base"))
    by_base = ratings_by_name(anchored)
    assert by_base["base"] == pytest.approx(1000.0)
    assert by_base["dpo"] - by_base["kto"] == pytest.approx(by_mean["dpo"] - by_mean["kto"])
    base_row = next(row for row in anchored.ratings if row.policy == "base")
    assert base_row.ci_low == pytest.approx(1000.0) and base_row.ci_high == pytest.approx(1000.0)
    with pytest.raises(ValueError, match="anchor policy 'nope'"):
        bradley_terry_leaderboard(first, second, choices, names, LeaderboardConfig(anchor="nope"))


def test_win_rate_matrix():
    board = bradley_terry_leaderboard(["x", "x", "x", "y", "z"], ["y", "y", "y", "x", "x"],
                                      ["a", "b", "tie", "a", "b"], config=PLAIN_MLE)
    i = {name: k for k, name in enumerate(board.policies)}
    assert board.games[i["x"]][i["y"]] == 4 and board.games[i["y"]][i["x"]] == 4
    assert board.win_rate[i["x"]][i["y"]] == pytest.approx(1.5 / 4)
    assert board.win_rate[i["y"]][i["x"]] == pytest.approx(2.5 / 4)
    assert board.win_rate[i["x"]][i["z"]] == 1.0
    assert board.win_rate[i["y"]][i["z"]] is None and board.win_rate[i["x"]][i["x"]] is None
    assert [row.n for row in board.ratings if row.policy == "x"] == [5]


def test_bootstrap_is_seeded_and_resamples_every_vote_count():
    rng = np.random.default_rng(4)
    first, second, choices = simulate(rng, np.array([1000.0, 1100.0, 900.0]), 300, tie_rate=0.2)
    same = [bradley_terry_leaderboard(first, second, choices, config=LeaderboardConfig(seed=1)) for _ in range(2)]
    assert same[0] == same[1]
    other = bradley_terry_leaderboard(first, second, choices, config=LeaderboardConfig(seed=2))
    assert other.ratings[0].ci_low != same[0].ratings[0].ci_low
    resampled = _bootstrap_wins(first, second, outcome_scores(choices), 3, 50, np.random.default_rng(0))
    assert np.allclose(resampled.sum(axis=(1, 2)), 300)  # each resample has exactly N votes
    full = win_matrix(first, second, outcome_scores(choices), 3)
    assert np.allclose(resampled.mean(axis=0), full, rtol=0.15)


def test_batched_fit_equals_one_at_a_time():
    rng = np.random.default_rng(11)
    stack = rng.integers(0, 30, (6, 4, 4)).astype(float)
    stack[:, range(4), range(4)] = 0
    stack[2, 0, :] = 0  # policy 0 never wins in this one
    batched = fit_bradley_terry(stack, l2=1e-3)
    single = np.stack([fit_bradley_terry(w, l2=1e-3) for w in stack])
    np.testing.assert_allclose(batched, single, atol=1e-9)
    np.testing.assert_allclose(batched.sum(axis=1), 0, atol=1e-9)


def test_disconnected_groups_still_get_finite_ratings():
    board = bradley_terry_leaderboard(["a", "c"], ["b", "d"], ["a", "a"])
    assert len(board.ratings) == 4
    assert all(math.isfinite(row.rating) for row in board.ratings)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="unknown vote choice 'left'"):
        bradley_terry_leaderboard(["a"], ["b"], ["left"])
    with pytest.raises(ValueError, match="same length"):
        bradley_terry_leaderboard(["a", "b"], ["b"], ["a"])
