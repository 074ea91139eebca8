"""Simulated annotators (labeling.simulate): through the app's queue and vote path, following
their rule, with the noise and left bias they were given; kept out of exports and stats unless
asked; and migration 0005 (rater kind `simulated`, gold columns) on SQLite and PostgreSQL."""

from __future__ import annotations

import random

import numpy as np
import pytest
from alembic import command
from sqlmodel import select

from feedback_store.catalog import add_comparison, add_prompt, add_response, get_or_create_policy
from feedback_store.db import alembic_config, engine_for, session_scope, upgrade
from feedback_store.export import Selection, export_dpo
from feedback_store.models import Assignment, Comparison, Rater, RaterKind, Response, Vote
from feedback_store.stats import StatsConfig, compute_stats
from feedback_store.votes import record_vote
from labeling.simulate import SimulatedRater, get_or_create_simulated, make_raters, simulate

_WORDS = "the quick brown fox jumps over a lazy dog while seven clever cats watch from the warm window".split()


def _text(rng: random.Random) -> str:
    sentences = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 10))).capitalize() + "."
                 for _ in range(rng.randint(2, 5))]
    return " ".join(sentences)


def make_pairs(session, n: int, seed: int = 0) -> list[Comparison]:
    """n train prompts, each with two multi-sentence answers of different lengths."""
    rng = random.Random(seed)
    base, tuned = (get_or_create_policy(name, session=session, base_model="tiny") for name in ("base", "tuned"))
    made = []
    for i in range(n):
        prompt, _ = add_prompt(f"question {seed}-{i}?", session=session, split="train")
        one = _text(rng)
        two = _text(rng)
        while len(two) == len(one):
            two = _text(rng)
        r1, _ = add_response(prompt.id, base.id, one, session=session)
        r2, _ = add_response(prompt.id, tuned.id, two, session=session)
        made.append(add_comparison(r1, r2, session=session)[0])
    return made


def _votes(session, name: str) -> list[Vote]:
    rater = session.exec(select(Rater).where(Rater.name == name)).one()
    return list(session.exec(select(Vote).where(Vote.rater_id == rater.id).order_by(Vote.id)))


def test_simulated_votes_go_through_the_queue_and_are_idempotent(sqlite_url):
    engine = engine_for(sqlite_url)
    with session_scope(engine) as s:
        make_pairs(s, 12)
    raters = make_raters(2, rule="shorter")
    report = simulate(engine, raters, votes_per_rater=5, seed=1)
    assert report.votes == {r.name: 5 for r in raters}
    with session_scope(engine) as s:
        for spec in raters:
            votes = _votes(s, spec.name)
            assert len({v.comparison_id for v in votes}) == 5  # five different pairs each
            assert all(v.left_response_id is not None and v.time_spent_ms > 0 for v in votes)
            assert all(v.idempotency_key == f"sim:{spec.name}:{v.comparison_id}" for v in votes)
        assert s.exec(select(Assignment)).all() == []  # every reservation released by its vote
        assert {c.human_votes for c in s.exec(select(Comparison))} == {0}  # not human votes
        kinds = {r.kind for r in s.exec(select(Rater))}
        assert kinds == {RaterKind.simulated}
        # A retried submission (same key) returns the stored vote and adds nothing.
        first = _votes(s, raters[0].name)[0]
        again = record_vote(first.comparison_id, first.rater_id, "tie", session=s, idempotency_key=first.idempotency_key)
        assert again.id == first.id and again.choice == first.choice
        assert len(s.exec(select(Vote)).all()) == 10
    # A second run continues the same raters on the pairs they have not judged, then runs dry.
    again = simulate(engine, raters, votes_per_rater=100, seed=2)
    assert again.votes == {r.name: 7 for r in raters}
    with session_scope(engine) as s:
        assert all(len(_votes(s, r.name)) == 12 for r in raters)


def test_rule_noise_and_left_bias_show_up_as_given(sqlite_url):
    engine = engine_for(sqlite_url)
    with session_scope(engine) as s:
        make_pairs(s, 80, seed=3)
    exact = SimulatedRater("exact", rule="shorter")
    noisy = SimulatedRater("noisy", rule="shorter", noise=0.3)
    leftish = SimulatedRater("leftish", rule="shorter", left_bias=0.6)
    report = simulate(engine, [exact, noisy, leftish], votes_per_rater=80, seed=7)
    assert report.total == 240
    with session_scope(engine) as s:
        texts = {r.id: r.text for r in s.exec(select(Response))}
        pairs = {c.id: c for c in s.exec(select(Comparison))}

        def follows_rule(vote):
            pair = pairs[vote.comparison_id]
            a, b = len(texts[pair.response_a_id].strip()), len(texts[pair.response_b_id].strip())
            return vote.choice.value == ("a" if a < b else "b")

        assert all(follows_rule(v) for v in _votes(s, "exact"))  # noise 0: exactly the rule
        noisy_votes = _votes(s, "noisy")
        flipped = sum(not follows_rule(v) for v in noisy_votes)
        assert flipped == report.flips["noisy"]
        # Binomial(80, 0.3): mean 24, sd 4.1; a fixed seed, and a 4-sd band around the mean.
        assert 8 <= flipped <= 40
        left = [v for v in _votes(s, "leftish")]
        left_rate = np.mean([(v.left_response_id == (pairs[v.comparison_id].response_a_id if v.choice.value == "a"
                                                      else pairs[v.comparison_id].response_b_id)) for v in left])
        assert abs(left_rate - (0.6 + 0.4 * 0.5)) < 0.15  # Q + (1 - Q) / 2 = 0.8
        exact_left = np.mean([(v.left_response_id == (pairs[v.comparison_id].response_a_id if v.choice.value == "a"
                                                       else pairs[v.comparison_id].response_b_id))
                              for v in _votes(s, "exact")])
        assert abs(exact_left - 0.5) < 0.15
        # The same figure in stats, once simulated raters are asked for.
        stats = compute_stats(session=s, config=StatsConfig(rater_kinds=("simulated",)))
        bias = {row.rater: row.left_rate for row in stats.position_bias}
        assert bias["leftish"] == pytest.approx(left_rate)
        quality = {row.rater: row for row in stats.raters}
        assert quality["leftish"].left_pick_rate == pytest.approx(left_rate)


def test_simulated_votes_stay_out_of_exports_and_stats_unless_asked(sqlite_url):
    engine = engine_for(sqlite_url)
    with session_scope(engine) as s:
        make_pairs(s, 6)
    simulate(engine, make_raters(2), votes_per_rater=6, seed=0)
    with session_scope(engine) as s:
        assert len(export_dpo(session=s)) == 0
        assert len(export_dpo(session=s, selection=Selection(include_simulated=True))) == 6
        stats = compute_stats(session=s)
        assert stats.counts.votes_by_kind["simulated"] == 12
        assert stats.leaderboard.ratings == [] and stats.position_bias == [] and stats.raters == []
        asked = compute_stats(session=s, config=StatsConfig(leaderboard_kinds=("simulated",),
                                                            rater_kinds=("simulated",)))
        assert [r.policy for r in asked.leaderboard.ratings] != [] and len(asked.raters) == 2


def test_a_bad_rule_or_a_human_name_is_refused(sqlite_url):
    engine = engine_for(sqlite_url)
    with pytest.raises(ValueError, match="unknown rubric rule"):
        simulate(engine, [SimulatedRater("x", rule="kindest")], votes_per_rater=1)
    with pytest.raises(ValueError, match="noise"):
        SimulatedRater("x", noise=1.5)
    with session_scope(engine) as s:
        s.add(Rater(name="alice", kind=RaterKind.human))
        s.flush()
        with pytest.raises(ValueError, match="not a simulated"):
            get_or_create_simulated("alice", session=s)


def test_reward_model_rule_prefers_the_higher_score():
    from labeling.simulate import reward_model_rule

    class Scorer:  # RewardScorer's interface: score_batch(prompts, responses)
        def score_batch(self, prompts, responses):
            return [float(len(r)) for r in responses]

    rule = reward_model_rule(Scorer())
    assert rule([{"role": "user", "content": "q"}], "long answer", "short") == "A"
    assert rule([], "ab", "cd") == "C"


def test_migration_0005_upgrades_a_store_with_raters_and_votes(empty_db_url):
    config = alembic_config(empty_db_url)
    command.upgrade(config, "0004")
    engine = engine_for(empty_db_url)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO rater (name, kind, weight, active, created_at) VALUES ('alice', 'human', 1.0, true, "
            "CURRENT_TIMESTAMP), ('import', 'imported', 1.0, true, CURRENT_TIMESTAMP)"
        )
    upgrade(empty_db_url)
    engine.dispose()
    engine = engine_for(empty_db_url)
    with session_scope(engine) as s:
        assert {r.name: r.kind for r in s.exec(select(Rater))} == {"alice": RaterKind.human,
                                                                   "import": RaterKind.imported}
        make_pairs(s, 3)
        get_or_create_simulated("sim:1", session=s)
    simulate(engine, [SimulatedRater("sim:1")], votes_per_rater=3)
    with session_scope(engine) as s:
        assert s.exec(select(Rater).where(Rater.name == "sim:1")).one().kind == RaterKind.simulated
        assert len(s.exec(select(Vote)).all()) == 3
    with pytest.raises(RuntimeError, match="simulated rater"):
        command.downgrade(config, "0004")
