"""record_vote and record_rating on a real SQLite file and a real PostgreSQL server."""

from __future__ import annotations

import pytest
from sqlmodel import func, select

from feedback_store.db import session_scope
from feedback_store.models import Choice, Comparison, Vote, VoteRevision
from feedback_store.raters import create_user, get_or_create_judge
from feedback_store.votes import VoteError, record_rating, record_vote, vote_history
from tests.store_factories import make_comparisons


@pytest.fixture
def world(engine):
    with session_scope(engine) as s:
        comparisons = make_comparisons(s, 3)
        alice = create_user("alice", "correct horse", session=s)
        bob = create_user("bob", "battery staple", session=s)
        judge = get_or_create_judge("gpt-x", "pairwise-v1", session=s)
    return comparisons, alice, bob, judge


def count(engine, model, *where) -> int:
    with session_scope(engine) as s:
        return s.exec(select(func.count()).select_from(model).where(*where)).one()


def test_a_retry_with_the_same_key_returns_the_original_vote(engine, world):
    comparisons, alice, _, _ = world
    c = comparisons[0]
    with session_scope(engine) as s:
        first = record_vote(c.id, alice.id, "a", session=s, idempotency_key="k1", left_response_id=c.response_b_id)
    with session_scope(engine) as s:
        again = record_vote(c.id, alice.id, "a", session=s, idempotency_key="k1", left_response_id=c.response_b_id)
    assert again.id == first.id
    assert count(engine, Vote) == 1
    with session_scope(engine) as s:
        assert s.get(Comparison, c.id).human_votes == 1


def test_a_changed_vote_updates_in_place_and_keeps_history(engine, world):
    comparisons, alice, _, _ = world
    c = comparisons[0]
    with session_scope(engine) as s:
        record_vote(c.id, alice.id, Choice.a, session=s, idempotency_key="k1", strength=2)
    with session_scope(engine) as s:
        changed = record_vote(c.id, alice.id, Choice.tie, session=s, idempotency_key="k2", rationale="on reflection")
    assert (changed.choice, changed.revision, changed.strength) == (Choice.tie, 2, None)
    assert count(engine, Vote) == 1
    with session_scope(engine) as s:
        history = vote_history(changed.id, session=s)
        assert [(h.choice, h.strength, h.idempotency_key) for h in history] == [(Choice.a, 2, "k1")]
        # The old key still answers, with the vote as it now stands, and changes nothing.
        replay = record_vote(c.id, alice.id, "a", session=s, idempotency_key="k1")
        assert replay.choice == Choice.tie
        assert s.get(Comparison, c.id).human_votes == 1
    assert count(engine, VoteRevision) == 1


def test_judge_votes_do_not_count_toward_human_overlap(engine, world):
    comparisons, alice, bob, judge = world
    c = comparisons[1]
    with session_scope(engine) as s:
        record_vote(c.id, alice.id, "a", session=s)
        record_vote(c.id, bob.id, "b", session=s)
        record_vote(c.id, judge.id, "tie", session=s, confidence=0.7)
    with session_scope(engine) as s:
        assert s.get(Comparison, c.id).human_votes == 2
    assert count(engine, Vote, Vote.comparison_id == c.id) == 3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"choice": "maybe"}, "choice must be one of"),
        ({"choice": "a", "strength": 5}, "strength must be one of"),
        ({"choice": "tie", "strength": 1}, "strength only applies"),
        ({"choice": "a", "left_response_id": 999_999}, "is not part of comparison"),
        ({"choice": "a", "comparison_id": 999_999}, "comparison 999999 does not exist"),
    ],
)
def test_bad_votes_are_refused_with_a_clear_message(engine, world, kwargs, message):
    comparisons, alice, _, _ = world
    kwargs = {"comparison_id": comparisons[0].id, **kwargs}
    with pytest.raises(VoteError, match=message), session_scope(engine) as s:
        record_vote(kwargs.pop("comparison_id"), alice.id, kwargs.pop("choice"), session=s, **kwargs)
    assert count(engine, Vote) == 0


def test_a_key_reused_for_another_comparison_is_refused(engine, world):
    comparisons, alice, _, _ = world
    with session_scope(engine) as s:
        record_vote(comparisons[0].id, alice.id, "a", session=s, idempotency_key="same")
    with pytest.raises(VoteError, match="was used for another vote"), session_scope(engine) as s:
        record_vote(comparisons[1].id, alice.id, "a", session=s, idempotency_key="same")
    assert count(engine, Vote) == 1


def test_ratings_are_one_per_rater_and_response(engine, world):
    comparisons, alice, bob, _ = world
    response_id = comparisons[0].response_a_id
    with session_scope(engine) as s:
        record_rating(response_id, alice.id, True, session=s, idempotency_key="r1")
        record_rating(response_id, alice.id, True, session=s, idempotency_key="r1")
        record_rating(response_id, alice.id, False, session=s, comment="actually wrong")
        record_rating(response_id, bob.id, True, session=s)
    from feedback_store.models import Rating

    assert count(engine, Rating) == 2
    assert count(engine, Rating, Rating.thumbs_up == False) == 1  # noqa: E712
