"""feedback_store.edits.store_edit, and a judgement with the next item as one unit of work
(record_vote_and_next, record_rating_and_next), on a real SQLite file and PostgreSQL."""

from __future__ import annotations

import pytest
from sqlalchemy.exc import OperationalError
from sqlmodel import func, select

from feedback_store import sittings as sittings_module
from feedback_store.db import session_scope
from feedback_store.edits import HUMAN_EDIT_POLICY, EditError, store_edit
from feedback_store.models import (
    Assignment,
    Choice,
    Comparison,
    PolicyVersion,
    Rating,
    Response,
    Vote,
)
from feedback_store.raters import get_or_create_local_user
from feedback_store.sittings import record_rating_and_next, record_vote_and_next
from feedback_store.votes import VoteError, record_vote
from tests.store_factories import make_comparisons


@pytest.fixture
def world(engine):
    with session_scope(engine) as s:
        comparisons = make_comparisons(s, 3)
        bob = get_or_create_local_user("bob", session=s)
    return comparisons, bob.id


def count(engine, model, *where) -> int:
    with session_scope(engine) as s:
        return s.exec(select(func.count()).select_from(model).where(*where)).one()


def edits(engine) -> int:
    return count(engine, Response, Response.edited_from_id.is_not(None))


def test_an_edit_is_a_response_a_pair_it_wins_and_a_vote_stored_once(engine, world):
    comparisons, bob = world
    source_id = comparisons[0].response_a_id
    for _ in range(2):  # the second time is a retry with the same key: it adds nothing
        with session_scope(engine) as s:
            vote = store_edit(
                source_id, bob, "  A better answer.  ", session=s, idempotency_key="k:edit"
            )
    with session_scope(engine) as s:
        edited = s.exec(select(Response).where(Response.edited_from_id == source_id)).one()
        assert (edited.text, edited.author_rater_id) == ("A better answer.", bob)
        assert s.get(PolicyVersion, edited.policy_id).name == HUMAN_EDIT_POLICY
        pair = s.get(Comparison, vote.comparison_id)
        assert {pair.response_a_id, pair.response_b_id} == {edited.id, source_id}
        assert pair.source == "human-edit" and pair.human_votes == 1
        winner = pair.response_a_id if vote.choice == Choice.a else pair.response_b_id
        assert winner == edited.id and vote.idempotency_key == "k:edit"
    assert count(engine, Vote) == 1 and edits(engine) == 1


def test_an_untouched_or_unstorable_edit_stores_nothing(engine, world):
    comparisons, bob = world
    with session_scope(engine) as s:
        source = s.get(Response, comparisons[0].response_a_id)
        assert (
            store_edit(source.id, bob, f"  {source.text}\n", session=s, idempotency_key="k") is None
        )
        for text in ("   ", "a\x00b", "lone \ud800"):
            with pytest.raises(EditError):
                store_edit(source.id, bob, text, session=s)
        with pytest.raises(EditError, match="does not exist"):
            store_edit(10**9, bob, "text", session=s)
    assert edits(engine) == 0 and count(engine, Vote) == 0


def test_a_failing_edit_keeps_none_of_it(engine, world):
    """The edit's vote fails (its key belongs to another vote) after its policy, response and
    pair were written: the unit of work keeps none of them."""
    comparisons, bob = world
    with session_scope(engine) as s:
        record_vote(comparisons[1].id, bob, "a", session=s, idempotency_key="taken")
    with pytest.raises(VoteError, match="another vote"), session_scope(engine) as s:
        store_edit(comparisons[0].response_a_id, bob, "Better.", session=s, idempotency_key="taken")
    assert edits(engine) == 0 and count(engine, Vote) == 1
    assert count(engine, Comparison, Comparison.source == "human-edit") == 0
    assert count(engine, PolicyVersion, PolicyVersion.name == HUMAN_EDIT_POLICY) == 0


def fail_next(monkeypatch, name: str) -> None:
    def broken(*args, **kwargs):
        raise OperationalError("next item", {}, Exception("the database went away"))

    monkeypatch.setattr(sittings_module, name, broken)


def test_a_vote_its_edit_and_the_next_reservation_are_one_unit_of_work(engine, world, monkeypatch):
    comparisons, bob = world
    first = comparisons[0]
    with session_scope(engine) as s:
        vote, nxt = record_vote_and_next(
            first.id,
            bob,
            "b",
            session=s,
            idempotency_key="k1",
            edit_text="Better.",
            edit_source_id=first.response_b_id,
            exclude=[comparisons[1].id],
        )
    assert vote.comparison_id == first.id and nxt.comparison_id == comparisons[2].id
    assert count(engine, Vote) == 2 and edits(engine) == 1
    assert count(engine, Assignment, Assignment.rater_id == bob) == 1

    fail_next(monkeypatch, "next_pair_for")  # the failure comes after the vote and the edit
    with pytest.raises(OperationalError), session_scope(engine) as s:
        record_vote_and_next(
            comparisons[2].id,
            bob,
            "a",
            session=s,
            idempotency_key="k2",
            edit_text="Also better.",
            edit_source_id=comparisons[2].response_a_id,
        )
    assert count(engine, Vote) == 2 and edits(engine) == 1  # neither the vote nor its edit
    with pytest.raises(EditError), session_scope(engine) as s:
        record_vote_and_next(comparisons[2].id, bob, "tie", session=s, edit_text="No source.")
    assert count(engine, Vote) == 2


def test_a_rating_and_the_next_card_are_one_unit_of_work(engine, world, monkeypatch):
    _comparisons, bob = world
    with session_scope(engine) as s:
        ids = [r.id for r in s.exec(select(Response).order_by(Response.id))]
    with session_scope(engine) as s:
        rating, nxt = record_rating_and_next(
            ids[0], bob, True, session=s, comment="fine", idempotency_key="r1", exclude=[ids[1]]
        )
    assert (
        rating.response_id == ids[0] and nxt.id == ids[2]
    )  # never the one just rated, nor a skipped one
    with session_scope(engine) as s:  # a retry of the same key changes nothing and deals the same
        again, nxt = record_rating_and_next(
            ids[0], bob, False, session=s, idempotency_key="r1", exclude=[ids[1]]
        )
    assert again.id == rating.id and again.thumbs_up and nxt.id == ids[2]

    fail_next(monkeypatch, "next_response_for")  # the failure comes after the rating is written
    with pytest.raises(OperationalError), session_scope(engine) as s:
        record_rating_and_next(ids[2], bob, False, session=s, idempotency_key="r2")
    assert count(engine, Rating) == 1
