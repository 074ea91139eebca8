"""Style control (feedback_store.style), the leaderboard per prompt tag and the judge's length bias.

Simulated arenas: a policy that wins only by writing longer answers must fall back to level with
style control on, while a genuinely better policy keeps its lead; the fit equals scikit-learn's
logistic regression; the bootstrap intervals cover the truth. On a real store (SQLite and
PostgreSQL): per-tag boards and the longer-answer win counts, checked by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from feedback_store.catalog import add_comparison, add_prompt, add_response, get_or_create_policy
from feedback_store.db import session_scope
from feedback_store.leaderboard import ELO_SCALE, LeaderboardConfig, bradley_terry_leaderboard
from feedback_store.raters import create_user, get_or_create_judge
from feedback_store.stats import StatsConfig, compute_stats
from feedback_store.style import (
    STYLE_FEATURES,
    _design,
    _fit_batched,
    _fit_scipy,
    _group_votes,
    _penalty,
    fit_style_controlled,
    normalized_differences,
    style_features,
)
from feedback_store.votes import record_vote
from labeling.cli import main
from labeling.cli.stats_command import render

POLICIES = ["base", "verbose", "better"]


def arena(seed: int, *, quality: dict[str, float], long_policy: str | None, length_effect: float, n: int = 3000):
    """Votes between random pairs of POLICIES. Each response's length is lognormal, three times
    longer for `long_policy`; P(first wins) = sigmoid(q_first - q_second + length_effect * (a-b)/(a+b))."""
    rng = np.random.default_rng(seed)
    first = rng.integers(0, 3, n)
    second = (first + rng.integers(1, 3, n)) % 3
    base_length = rng.lognormal(5.5, 0.6, size=(n, 2))
    stretch = np.array([3.0 if name == long_policy else 1.0 for name in POLICIES])
    length_a, length_b = base_length[:, 0] * stretch[first], base_length[:, 1] * stretch[second]
    q = np.array([quality[name] for name in POLICIES])
    ratio = (length_a - length_b) / (length_a + length_b)
    win = 1 / (1 + np.exp(-(q[first] - q[second] + length_effect * ratio)))
    u = rng.random(n)
    choices = np.where(u < 0.1, "tie", np.where(u < 0.1 + 0.9 * win, "a", "b"))
    markdown = rng.poisson(1.0, size=(n, 2, 3)).astype(float)  # headers, bold, lists: no effect
    style_a = np.column_stack([length_a, markdown[:, 0]])
    style_b = np.column_stack([length_b, markdown[:, 1]])
    names = np.array(POLICIES)
    return names[first], names[second], choices, style_a, style_b, ratio


def board_of(seed, n_bootstrap=100, **arena_args):
    first, second, choices, style_a, style_b, _ = arena(seed, **arena_args)
    config = LeaderboardConfig(n_bootstrap=n_bootstrap, seed=seed, style_control=True)
    board = bradley_terry_leaderboard(first, second, choices, POLICIES, config, style_a, style_b)
    return board, {row.policy: row for row in board.ratings}


def test_a_policy_that_wins_only_by_length_drops_to_level_with_style_control():
    board, rows = board_of(1, quality={"base": 0.0, "verbose": 0.0, "better": 0.6}, long_policy="verbose",
                           length_effect=2.0)
    raw_gap = rows["verbose"].rating - rows["base"].rating
    controlled_gap = rows["verbose"].controlled_rating - rows["base"].controlled_rating
    assert raw_gap > 60  # length alone buys a clear raw lead...
    assert abs(controlled_gap) < 25  # ...which style control takes away
    assert rows["verbose"].controlled_ci_low < rows["base"].controlled_rating < rows["verbose"].controlled_ci_high
    # The better policy keeps its lead over base (truth: 0.6 logit = 104 Elo).
    better_gap = rows["better"].controlled_rating - rows["base"].controlled_rating
    assert better_gap == pytest.approx(0.6 * ELO_SCALE, abs=35)
    length = board.style.covariates[STYLE_FEATURES.index("length")]
    assert length.ci_low > 0 and length.coefficient == pytest.approx(2.0 * length.sd, rel=0.25)
    for name in ("headers", "bold", "list_items"):  # markdown had no effect: near zero, beside length's
        c = board.style.covariates[STYLE_FEATURES.index(name)]
        assert abs(c.coefficient) < 0.15 < length.coefficient


def test_a_genuinely_better_policy_keeps_its_lead_and_raw_equals_controlled_without_a_length_effect():
    board, rows = board_of(2, quality={"base": 0.0, "verbose": 0.0, "better": 0.8}, long_policy="verbose",
                           length_effect=0.0)
    assert board.ratings[0].policy == "better"
    for name in POLICIES:
        assert rows[name].controlled_rating == pytest.approx(rows[name].rating, abs=20)
    assert rows["better"].controlled_rating - rows["base"].controlled_rating == pytest.approx(0.8 * ELO_SCALE, abs=40)
    assert rows["better"].controlled_ci_low > max(rows["base"].controlled_ci_high, rows["verbose"].controlled_ci_high)
    length = board.style.covariates[0]
    assert abs(length.coefficient) < 0.2  # no length effect (logit per sd; 2.0 per unit in the test above)


def test_controlled_intervals_cover_the_truth():
    quality = {"base": 0.0, "verbose": 0.2, "better": 0.7}
    truth = np.array(list(quality.values())) * ELO_SCALE
    truth += 1000 - truth.mean()
    covered = total = 0
    for seed in range(4):
        board, rows = board_of(10 + seed, n_bootstrap=100, quality=quality, long_policy="verbose",
                               length_effect=1.5, n=1500)
        for name, value in zip(POLICIES, truth):
            total += 1
            covered += rows[name].controlled_ci_low <= value <= rows[name].controlled_ci_high
        length = board.style.covariates[0]
        total += 1
        covered += length.ci_low <= 1.5 * length.sd <= length.ci_high
    assert covered >= total - 2  # 95% intervals: at most a couple of misses in 16


def test_the_fit_is_scikit_learns_logistic_regression_and_the_batched_bootstrap_fit_is_scipys():
    first, second, choices, style_a, style_b, _ = arena(3, quality={"base": 0, "verbose": 0.3, "better": 0.6},
                                                        long_policy="verbose", length_effect=1.0, n=800)
    index = {name: i for i, name in enumerate(POLICIES)}
    f, s = np.array([index[x] for x in first]), np.array([index[x] for x in second])
    score = np.where(choices == "a", 1.0, np.where(choices == "b", 0.0, 0.5))
    covariates = normalized_differences(style_a, style_b)
    fit = fit_style_controlled(f, s, score, covariates, 3, l2=1e-6, l2_style=1e-6)
    # scikit-learn: ties duplicated as half a win each way, no intercept, C matching the penalty.
    design = np.zeros((len(f), 3 + covariates.shape[1]))
    design[np.arange(len(f)), f] = 1
    design[np.arange(len(f)), s] = -1
    design[:, 3:] = covariates / fit.sd
    X = np.vstack([design, design])
    y = np.concatenate([np.ones(len(f)), np.zeros(len(f))])
    weights = np.concatenate([score, 1 - score])
    model = LogisticRegression(C=1 / (2 * 1e-6), fit_intercept=False, tol=1e-12, max_iter=10_000)
    model.fit(X, y, sample_weight=weights)
    coef = model.coef_[0]
    np.testing.assert_allclose(fit.scores, coef[:3] - coef[:3].mean(), atol=2e-4)
    np.testing.assert_allclose(fit.beta, coef[3:], atol=2e-4)

    rows_first, rows_second, X_rows, row_of_vote = _group_votes(f, s, covariates / fit.sd)
    design_rows = _design(rows_first, rows_second, X_rows, 3)
    penalty = _penalty(3, X_rows.shape[1], 1e-3, 1e-6)
    rng = np.random.default_rng(0)
    games = np.stack([np.bincount(row_of_vote[rng.integers(0, len(f), len(f))], minlength=len(design_rows))
                      for _ in range(3)]).astype(float)
    wins = games * rng.random(games.shape)
    start = _fit_scipy(design_rows, wins.sum(0) / 3, games.sum(0) / 3, penalty, np.zeros(design_rows.shape[1]))
    batched = _fit_batched(design_rows, wins, games, penalty, start)
    for b in range(3):
        np.testing.assert_allclose(batched[b], _fit_scipy(design_rows, wins[b], games[b], penalty, start), atol=1e-6)


def test_style_features_count_markdown_outside_code_blocks():
    text = ("# Title\n\nSome **bold** and __also bold__ text.\n\n## Part\n- one\n- two\n* three\n1. first\n"
            "2) second\n\n```\n# not a header\n- not an item\n**not bold**\n```\n#hashtag is no header\n")
    assert style_features(text) == (len(text), 2, 2, 5)
    assert style_features("") == (0, 0, 0, 0)
    np.testing.assert_allclose(normalized_differences([[3, 0]], [[1, 0]]), [[0.5, 0.0]])


def test_style_control_needs_the_features_and_ignores_covariates_that_never_differ():
    with pytest.raises(ValueError, match="style features"):
        bradley_terry_leaderboard(["x", "y"], ["y", "x"], ["a", "a"], config=LeaderboardConfig(style_control=True))
    same = np.ones((4, 4))
    board = bradley_terry_leaderboard(["x", "y", "x", "y"], ["y", "x", "y", "x"], ["a", "b", "a", "tie"],
                                      config=LeaderboardConfig(n_bootstrap=20, style_control=True),
                                      style_first=same, style_second=same)
    assert all(np.isnan(c.coefficient) for c in board.style.covariates)
    empty = bradley_terry_leaderboard([], [], [], config=LeaderboardConfig(style_control=True),
                                      style_first=np.zeros((0, 4)), style_second=np.zeros((0, 4)))
    assert empty.ratings == [] and empty.style is None
    for row in board.ratings:  # nothing to control for: the controlled rating is the raw one
        assert row.controlled_rating == pytest.approx(row.rating, abs=0.5)


# ---- on a store -----------------------------------------------------------------------------


def _pair(s, prompt_text, tags, policies, texts):
    prompt, _ = add_prompt(prompt_text, session=s, tags=tags)
    r1, _ = add_response(prompt.id, policies[0].id, texts[0], session=s)
    r2, _ = add_response(prompt.id, policies[1].id, texts[1], session=s)
    comparison, _ = add_comparison(r1, r2, session=s)
    return comparison, r1, r2


def test_leaderboard_by_tag_splits_the_votes(engine, db_url, capsys):
    with session_scope(engine) as s:
        alpha, beta = (get_or_create_policy(name, session=s, base_model="tiny") for name in ("alpha", "beta"))
        alice = create_user("alice", "long enough", session=s)
        for i in range(8):  # alpha wins on math, beta on code; an untagged pair counts only overall
            for tag, winner in (("math", alpha), ("code", beta)):
                comparison, r1, _ = _pair(s, f"{tag} {i}", [tag], (alpha, beta), (f"a {tag} {i}", f"b {tag} {i}"))
                won_by_first = (r1.policy_id == winner.id)
                record_vote(comparison.id, alice.id, "a" if won_by_first else "b", session=s)
        comparison, _, _ = _pair(s, "both tags", ["math", "code"], (alpha, beta), ("a both", "b both"))
        record_vote(comparison.id, alice.id, "tie", session=s)
        comparison, _, _ = _pair(s, "untagged", [], (alpha, beta), ("a none", "b none"))
        record_vote(comparison.id, alice.id, "a", session=s)
        stats = compute_stats(session=s, config=StatsConfig(leaderboard=LeaderboardConfig(n_bootstrap=20)))
    boards = stats.leaderboard_by_tag
    assert list(boards) == ["code", "math"]
    assert [r.policy for r in boards["math"].ratings] == ["alpha", "beta"]
    assert [r.policy for r in boards["code"].ratings] == ["beta", "alpha"]
    assert [r.n for r in boards["math"].ratings] == [9, 9]  # 8 math votes and the two-tag tie
    assert sum(r.n for r in stats.leaderboard.ratings) == 2 * 18

    assert main(["stats", "--db", db_url, "--json", "--bootstrap", "20"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [row["policy"] for row in result["leaderboard_by_tag"]["code"]] == ["beta", "alpha"]
    assert "leaderboard_style_control" not in result  # style control off by default
    assert set(result["leaderboard"][0]) == {"policy", "rating", "ci_low", "ci_high", "n"}
    assert main(["stats", "--db", db_url, "--by-tag", "--bootstrap", "20"]) == 0
    text = capsys.readouterr().out
    assert "tag 'math'" in text and "tag 'code'" in text


def test_length_bias_counts_judge_and_human_votes_on_the_same_pairs(engine, db_url, capsys):
    with session_scope(engine) as s:
        p, q = (get_or_create_policy(name, session=s, base_model="tiny") for name in ("p", "q"))
        human = create_user("hugo", "long enough", session=s)
        judge = get_or_create_judge("judge-model", "v1", session=s)
        other_judge = get_or_create_judge("judge-model", "v2", session=s)
        short, long_ = "short", "a much longer answer"

        def pair(i, texts):
            return _pair(s, f"prompt {i}", [], (p, q), texts)[0]

        # (texts, judge vote, human vote); the first response is the stored "a".
        cases = [
            ((long_ + " 0", short), "a", "a"),  # longer wins for both
            ((long_ + " 1", short), "a", "b"),  # judge: longer; human: shorter
            ((short, long_ + " 2"), "b", "b"),  # longer wins for both
            ((short, long_ + " 3"), "b", "tie"),  # judge: longer; human tie (counted apart)
            ((short, long_ + " 4"), "a", "a"),  # shorter wins for both
            (("same 5", "same 6"), "a", "a"),  # equal length: left out
        ]
        for i, (texts, judge_choice, human_choice) in enumerate(cases):
            comparison = pair(i, texts)
            record_vote(comparison.id, judge.id, judge_choice, session=s)
            record_vote(comparison.id, human.id, human_choice, session=s)
        only_human = pair(10, (long_ + " 10", short))  # no judge vote: left out
        record_vote(only_human.id, human.id, "a", session=s)
        only_judge = pair(11, (long_ + " 11", short))
        record_vote(only_judge.id, other_judge.id, "a", session=s)  # no human vote: left out
        gold = pair(12, (long_ + " 12", short))
        gold.gold_winner = "a"  # a gold pair: left out of everything but rater quality
        s.add(gold)
        s.flush()
        record_vote(gold.id, judge.id, "a", session=s)
        record_vote(gold.id, human.id, "a", session=s)
        stats = compute_stats(session=s, config=StatsConfig(leaderboard=LeaderboardConfig(n_bootstrap=0)))
    bias = stats.length_bias
    assert bias.n_comparisons == 5 and bias.equal_length == 1
    assert (bias.judge.votes, bias.judge.longer_wins, bias.judge.ties) == (5, 4, 0)
    assert (bias.human.votes, bias.human.longer_wins, bias.human.ties) == (4, 2, 1)
    assert bias.judge.rate == pytest.approx(0.8) and bias.human.rate == pytest.approx(0.5)
    assert bias.human.p_value == pytest.approx(1.0)
    assert [row.rater for row in bias.by_judge] == ["judge:judge-model@v1"]

    assert main(["stats", "--db", db_url, "--json", "--bootstrap", "0"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["length_bias"]["judge"]["longer_wins"] == 4 and result["length_bias"]["human"]["votes"] == 4
    render(stats)  # the human output, without a third Dawid-Skene fit (slow on this tiny store: rater_quality)
    assert "Length bias" in capsys.readouterr().out


def test_style_control_from_the_store_and_the_cli(engine, db_url, capsys):
    rng = np.random.default_rng(5)
    with session_scope(engine) as s:
        plain, wordy = (get_or_create_policy(name, session=s, base_model="tiny") for name in ("plain", "wordy"))
        raters = [create_user(f"r{k}", "long enough", session=s) for k in range(3)]
        for i in range(80):
            n_plain, n_wordy = int(rng.integers(5, 40)), int(rng.integers(5, 120))
            comparison, r1, r2 = _pair(s, f"q {i}", [], (plain, wordy),
                                       ("x" * n_plain + f" {i}", "y" * n_wordy + f" {i}"))
            ratio = (len(r1.text) - len(r2.text)) / (len(r1.text) + len(r2.text))
            for rater in raters:  # these raters like length, and nothing else
                first_wins = rng.random() < 1 / (1 + np.exp(-4 * ratio))
                record_vote(comparison.id, rater.id, "a" if first_wins else "b", session=s)
    assert main(["stats", "--db", db_url, "--json", "--bootstrap", "30", "--style-control"]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = {row["policy"]: row for row in result["leaderboard"]}
    assert {"controlled_rating", "controlled_ci_low", "controlled_ci_high"} <= set(rows["wordy"])
    assert [c["name"] for c in result["leaderboard_style_control"]["covariates"]] == list(STYLE_FEATURES)
    assert result["leaderboard_style_control"]["covariates"][0]["coefficient"] > 1
    raw_gap = rows["wordy"]["rating"] - rows["plain"]["rating"]
    controlled_gap = rows["wordy"]["controlled_rating"] - rows["plain"]["controlled_rating"]
    assert abs(controlled_gap) < raw_gap
    assert main(["stats", "--db", db_url, "--bootstrap", "30", "--style-control"]) == 0
    text = capsys.readouterr().out
    assert "controlled" in text and "Style coefficients" in text
