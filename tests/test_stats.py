"""Store statistics on a real database, checked against independent computations of the same figures."""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from datetime import datetime, timedelta, timezone

import krippendorff
import numpy as np
import pytest
from scipy.stats import binomtest
from sklearn.metrics import cohen_kappa_score
from sqlalchemy import update
from sqlalchemy.orm import aliased
from sqlmodel import select
from statsmodels.stats.inter_rater import fleiss_kappa as statsmodels_fleiss

from feedback_store.catalog import add_comparison, add_prompt, add_response, get_or_create_policy
from feedback_store.db import session_scope
from feedback_store.leaderboard import LeaderboardConfig, bradley_terry_leaderboard
from feedback_store.models import Comparison, PolicyVersion, Rater, Response, Vote
from feedback_store.raters import create_user, get_or_create_import_rater, get_or_create_judge
from feedback_store.stats import (
    CHOICES,
    RaterTable,
    StatsConfig,
    VoteColumns,
    agreement_stats,
    compute_stats,
    two_sided_fair_coin_p,
)
from feedback_store.votes import record_rating, record_vote
from labeling.cli import main

STRENGTH = {"base": 0.0, "sft": 0.8, "dpo": 1.6}
CONFIG = StatsConfig(min_overlap=3, leaderboard=LeaderboardConfig(n_bootstrap=100, seed=3))
T0 = datetime(2025, 3, 1, 9, 0, tzinfo=timezone.utc)


def noisy_choice(rng, strength_a: float, strength_b: float, noise: float) -> str:
    if rng.random() < noise:
        return str(rng.choice(CHOICES))
    return "a" if rng.random() < 1 / (1 + np.exp(strength_b - strength_a)) else "b"


@pytest.fixture
def world(engine):
    """3 policies, 12 prompts, 37 comparisons (one of a policy with itself); 3 annotators, a judge, an importer."""
    rng = np.random.default_rng(0)
    with session_scope(engine) as s:
        policies = {name: get_or_create_policy(name, session=s, base_model="tiny") for name in STRENGTH}
        comparisons = []
        for i in range(12):
            prompt, _ = add_prompt(f"question {i}", session=s)
            responses = {
                name: add_response(prompt.id, policy.id, f"{name} answers {i}", session=s)[0]
                for name, policy in policies.items()
            }
            for x, y in itertools.combinations(STRENGTH, 2):
                comparisons.append(add_comparison(responses[x], responses[y], session=s)[0])
        other_base, _ = add_response(prompt.id, policies["base"].id, "base answers again", session=s)
        comparisons.append(add_comparison(responses["base"], other_base, session=s)[0])
        humans = [create_user(name, "long enough", session=s) for name in ("alice", "bob", "carol")]
        judge = get_or_create_judge("judge-model", "pairwise-v1", session=s)
        importer = get_or_create_import_rater(session=s)
        policy_of = {r.id: r.policy_id for r in s.exec(select(Response))}
        strength_of = {p.id: STRENGTH[name] for name, p in policies.items()}

        def vote(comparison, rater, noise, **extra):
            sa, sb = strength_of[policy_of[comparison.response_a_id]], strength_of[policy_of[comparison.response_b_id]]
            left = comparison.response_a_id if rng.random() < 0.5 else comparison.response_b_id
            return record_vote(comparison.id, rater.id, noisy_choice(rng, sa, sb, noise), session=s,
                               left_response_id=left, **extra)

        for k, comparison in enumerate(comparisons):
            vote(comparison, humans[0], 0.2, time_spent_ms=1000 * (k + 1))
            vote(comparison, humans[1], 0.4)
            if k % 3 == 0:
                vote(comparison, humans[2], 0.3)
            if k % 2 == 0:
                vote(comparison, judge, 0.1)
            if k < 5:
                record_vote(comparison.id, importer.id, "a", session=s)
        # A changed vote counts once, with its latest choice.
        record_vote(comparisons[0].id, humans[1].id, "both_bad", session=s, left_response_id=comparisons[0].response_a_id)
        record_rating(comparisons[0].response_a_id, humans[0].id, True, session=s)
        record_rating(comparisons[0].response_b_id, humans[0].id, False, session=s)
        # alice votes in two sittings: 30 s apart, then a two-hour break.
        alice_votes = s.exec(select(Vote).where(Vote.rater_id == humans[0].id).order_by(Vote.id)).all()
        for j, v in enumerate(alice_votes):
            at = T0 + timedelta(seconds=30 * j + (7200 if j >= 20 else 0))
            s.execute(update(Vote).where(Vote.id == v.id).values(created_at=at))
    return engine


def read_votes(engine) -> list[dict]:
    """The votes, read the plain ORM way, for the independent computations below."""
    ra, rb = aliased(Response), aliased(Response)
    with session_scope(engine) as s:
        rows = s.exec(
            select(Vote, Rater, Comparison, ra.policy_id, rb.policy_id)
            .join(Rater, Rater.id == Vote.rater_id)
            .join(Comparison, Comparison.id == Vote.comparison_id)
            .join(ra, ra.id == Comparison.response_a_id)
            .join(rb, rb.id == Comparison.response_b_id)
        ).all()
        return [
            dict(comparison=c.id, rater=r.name, kind=r.kind.value, choice=v.choice.value, left=v.left_response_id,
                 response_a=c.response_a_id, response_b=c.response_b_id, policy_a=pa, policy_b=pb)
            for v, r, c, pa, pb in rows
        ]


def test_counts(world):
    with session_scope(world) as s:
        counts = compute_stats(session=s, config=CONFIG).counts
    assert (counts.prompts, counts.responses, counts.comparisons, counts.ratings, counts.raters, counts.policies) == (
        12, 37, 37, 2, 5, 3)
    # alice 37 + bob 37 + carol 13 + judge 19 + import 5; the revised vote is still one vote.
    assert counts.votes == 111
    assert counts.votes_by_kind == {"human": 87, "judge": 19, "import": 5}
    assert counts.raters_by_kind == {"human": 3, "judge": 1, "import": 1}


def test_agreement_matches_scikit_learn_statsmodels_and_krippendorff(world):
    votes = [v for v in read_votes(world) if v["kind"] == "human"]
    by_item = defaultdict(dict)
    for v in votes:
        by_item[v["comparison"]][v["rater"]] = CHOICES.index(v["choice"])
    with session_scope(world) as s:
        agreement = compute_stats(session=s, config=CONFIG).agreement

    raters = ["alice", "bob", "carol"]
    expected_pairs = {}
    for x, y in itertools.combinations(raters, 2):
        shared = [item for item in by_item.values() if x in item and y in item]
        expected_pairs[(x, y)] = (len(shared), cohen_kappa_score([i[x] for i in shared], [i[y] for i in shared]))
    assert {(p.rater_a, p.rater_b): (p.n, pytest.approx(p.kappa)) for p in agreement.pairwise} == {
        k: (n, pytest.approx(kappa)) for k, (n, kappa) in expected_pairs.items()}

    # Fleiss on the most common number of raters per comparison: 2 (24 comparisons; 13 have 3).
    assert (agreement.fleiss_raters_per_item, agreement.fleiss_items) == (2, 24)
    table = np.array([np.bincount(list(item.values()), minlength=4) for item in by_item.values() if len(item) == 2])
    assert agreement.fleiss_kappa == pytest.approx(statsmodels_fleiss(table))

    matrix = np.array([[item.get(r, np.nan) for item in by_item.values()] for r in raters], dtype=float)
    expected_alpha = krippendorff.alpha(reliability_data=matrix, level_of_measurement="nominal",
                                        value_domain=[0, 1, 2, 3])
    assert agreement.krippendorff_alpha == pytest.approx(expected_alpha)
    assert agreement.raters == 3 and agreement.items_multi == 37


def test_agreement_with_many_raters_per_comparison_matches_independent_code():
    # Straight from columns (no database): up to 9 raters on a comparison, many missing.
    rng = np.random.default_rng(42)
    n_items, n_raters = 300, 9
    truth = rng.integers(0, 4, n_items)
    labels = np.where(rng.random((n_items, n_raters)) < 0.35, rng.integers(0, 4, (n_items, n_raters)), truth[:, None])
    present = rng.random((n_items, n_raters)) < 0.6
    item, rater = np.nonzero(present)
    shuffle = rng.permutation(len(item))
    item, rater = item[shuffle], rater[shuffle]
    n = len(item)
    columns = VoteColumns(comparison=item + 100, rater=rater, choice=labels[item, rater], left=np.full(n, -1),
                          response_a=np.zeros(n, int), response_b=np.ones(n, int), policy_a=np.zeros(n, int),
                          policy_b=np.ones(n, int), time_spent_ms=np.full(n, np.nan), created_s=np.zeros(n))
    table = RaterTable(ids=np.arange(n_raters), names=[f"r{i}" for i in range(n_raters)], kinds=["human"] * n_raters)
    result = agreement_stats(columns, table, StatsConfig(min_overlap=1))

    assert len(result.pairwise) == n_raters * (n_raters - 1) // 2
    for pair in result.pairwise:
        x, y = int(pair.rater_a[1:]), int(pair.rater_b[1:])
        both = present[:, x] & present[:, y]
        assert pair.n == both.sum()
        assert pair.kappa == pytest.approx(cohen_kappa_score(labels[both, x], labels[both, y]))
    data = np.where(present, labels, np.nan).T
    assert result.krippendorff_alpha == pytest.approx(
        krippendorff.alpha(reliability_data=data, level_of_measurement="nominal", value_domain=[0, 1, 2, 3]))
    m = result.fleiss_raters_per_item
    rows = present.sum(axis=1) == m
    counts = np.array([np.bincount(labels[i][present[i]], minlength=4) for i in np.flatnonzero(rows)])
    assert result.fleiss_items == rows.sum() and np.bincount(present.sum(axis=1)).argmax() == m
    assert result.fleiss_kappa == pytest.approx(statsmodels_fleiss(counts))


def test_position_bias_is_the_left_pick_rate_with_a_binomial_test(world):
    expected = defaultdict(lambda: [0, 0])
    for v in read_votes(world):
        if v["choice"] in ("a", "b") and v["left"] is not None:
            picked = v["response_a"] if v["choice"] == "a" else v["response_b"]
            expected[v["rater"]][0] += 1
            expected[v["rater"]][1] += picked == v["left"]
    with session_scope(world) as s:
        bias = compute_stats(session=s, config=CONFIG).position_bias
    assert {row.rater for row in bias} == {"alice", "bob", "carol", "judge:judge-model@pairwise-v1"}  # import: no sides
    for row in bias:
        n, k = expected[row.rater]
        assert (row.n, row.left_picks) == (n, k)
        assert row.left_rate == pytest.approx(k / n)
        assert row.p_value == pytest.approx(binomtest(k, n, 0.5).pvalue)


def test_the_vectorised_p_value_is_scipys_binomtest():
    for n in (1, 2, 3, 7, 10, 25, 40):
        k = np.arange(n + 1)
        expected = [binomtest(int(i), n, 0.5).pvalue for i in k]
        np.testing.assert_allclose(two_sided_fair_coin_p(k, np.full_like(k, n)), expected, rtol=1e-9)


def test_throughput_counts_active_time_only(world):
    with session_scope(world) as s:
        rows = {row.rater: row for row in compute_stats(session=s, config=CONFIG).throughput}
    alice = rows["alice"]
    # 37 votes in two sittings of 20 and 17, 30 s apart: 35 gaps of 30 s; the two-hour break does not count.
    assert alice.votes == 37
    assert alice.active_hours == pytest.approx(35 * 30 / 3600, rel=1e-6)
    assert alice.votes_per_hour == pytest.approx(120.0, rel=1e-6)
    assert alice.median_time_spent_ms == 19_000.0  # 1000, 2000, ..., 37000 ms
    assert rows["bob"].votes == 37 and np.isnan(rows["bob"].median_time_spent_ms)


def test_judge_vs_human_agreement_over_vote_pairs(world):
    votes = read_votes(world)
    collapse = {"a": "a", "b": "b", "tie": "tie", "both_bad": "tie"}
    humans = defaultdict(list)
    for v in votes:
        if v["kind"] == "human":
            humans[v["comparison"]].append(collapse[v["choice"]])
    pairs = [(collapse[v["choice"]], h) for v in votes if v["kind"] == "judge" for h in humans[v["comparison"]]]
    judged = {v["comparison"] for v in votes if v["kind"] == "judge" and humans[v["comparison"]]}
    with session_scope(world) as s:
        result = compute_stats(session=s, config=CONFIG).judge_vs_human
    assert (result.n_pairs, result.n_comparisons) == (len(pairs), len(judged))
    assert result.percent_agreement == pytest.approx(np.mean([j == h for j, h in pairs]))
    assert result.kappa == pytest.approx(
        cohen_kappa_score([j for j, _ in pairs], [h for _, h in pairs], labels=["a", "b", "tie"]))
    decisive = [(j, h) for j, h in pairs if j != "tie" and h != "tie"]
    assert result.decisive_agreement == pytest.approx(np.mean([j == h for j, h in decisive]))
    assert [row.judge for row in result.by_judge] == ["judge:judge-model@pairwise-v1"]
    assert result.by_judge[0].kappa == pytest.approx(result.kappa)


def test_leaderboard_from_the_store(world):
    votes = read_votes(world)
    with session_scope(world) as s:
        stats = compute_stats(session=s, config=CONFIG)
        policy_names = {p.id: p.name for p in s.exec(select(PolicyVersion))}
    board = stats.leaderboard
    assert [row.policy for row in board.ratings] == ["dpo", "sft", "base"]  # the true order
    informative = [v for v in votes if v["policy_a"] != v["policy_b"]]
    assert sum(row.n for row in board.ratings) == 2 * len(informative)  # each vote counts for both policies
    expected = bradley_terry_leaderboard(
        [policy_names[v["policy_a"]] for v in votes], [policy_names[v["policy_b"]] for v in votes],
        [v["choice"] for v in votes], ["base", "sft", "dpo"], CONFIG.leaderboard)
    assert board == expected
    # Restricting to human votes changes what is counted.
    with session_scope(world) as s:
        humans_only = compute_stats(session=s, config=StatsConfig(leaderboard_kinds=("human",))).leaderboard
    human_votes = [v for v in informative if v["kind"] == "human"]
    assert sum(row.n for row in humans_only.ratings) == 2 * len(human_votes)


def test_an_empty_store_gives_zeros_and_undefined_figures_not_errors(engine):
    with session_scope(engine) as s:
        result = compute_stats(session=s).to_dict()
    assert result["counts"]["votes"] == 0 and result["leaderboard"] == []
    assert result["agreement"]["krippendorff_alpha"] is None and result["judge_vs_human"]["kappa"] is None
    assert result["position_bias"] == [] and result["throughput"] == []
    json.dumps(result, allow_nan=False)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="unknown rater kind 'robot'"):
        StatsConfig(agreement_kinds=("robot",))


def test_cli_prints_one_json_object_and_a_readable_summary(world, db_url, capsys):
    assert main(["stats", "--db", db_url, "--json", "--bootstrap", "50"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"counts", "agreement", "position_bias", "leaderboard", "judge_vs_human"} <= set(result)
    assert result["counts"]["votes"] == 111
    assert [row["policy"] for row in result["leaderboard"]] == ["dpo", "sft", "base"]
    assert set(result["leaderboard"][0]) == {"policy", "rating", "ci_low", "ci_high", "n"}
    assert result["win_rate"]["policies"] == ["base", "sft", "dpo"]

    assert main(["stats", "--db", db_url, "--anchor", "base"]) == 0
    text = capsys.readouterr().out
    for expected in ("Leaderboard", "dpo", "Fleiss", "Krippendorff", "Judge vs human", "alice", "left-pick"):
        assert expected in text
    assert "1000" in text  # the anchor's rating

    assert main(["stats", "--db", db_url, "--anchor", "gpt-9"]) == 2
    assert "anchor policy 'gpt-9' has no votes" in capsys.readouterr().err
    assert main(["stats", "--db", db_url, "--leaderboard-raters", "humans"]) == 2
    assert "unknown rater kind 'humans'" in capsys.readouterr().err
