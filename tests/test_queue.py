"""The annotation queue (next_comparison_for and friends) on a real SQLite file and PostgreSQL."""

from __future__ import annotations

import random
from datetime import timedelta

import pytest
from sqlalchemy import update
from sqlmodel import select

from feedback_store.db import session_scope
from feedback_store.models import AppSetting, Assignment, Comparison, Response, utcnow
from feedback_store.queue import (
    OVERLAP_SETTING,
    next_comparison_for,
    next_response_for,
    open_comparisons,
    pair_view,
    release,
)
from feedback_store.raters import get_or_create_judge, get_or_create_local_user
from feedback_store.votes import record_rating, record_vote
from tests.store_factories import make_comparisons


@pytest.fixture
def world(engine):
    """Five comparisons and three annotators; returns (comparison ids, alice, bob, carol ids)."""
    with session_scope(engine) as s:
        comparisons = make_comparisons(s, 5)
        raters = [get_or_create_local_user(name, session=s) for name in ("alice", "bob", "carol")]
    return [c.id for c in comparisons], *(r.id for r in raters)


def next_for(engine, rater_id, **kwargs):
    with session_scope(engine) as s:
        return next_comparison_for(rater_id, session=s, **kwargs)


def vote(engine, comparison_id, rater_id, choice="a"):
    with session_scope(engine) as s:
        record_vote(comparison_id, rater_id, choice, session=s)


def set_overlap(engine, value: int) -> None:
    with session_scope(engine) as s:
        s.merge(AppSetting(key=OVERLAP_SETTING, value=value))


def drain(engine, rater_id, **kwargs) -> list[int]:
    """Vote on whatever the queue hands out until it runs dry; the order it was handed out in."""
    order = []
    while (assignment := next_for(engine, rater_id, **kwargs)) is not None:
        assert assignment.comparison_id not in order, "a comparison came back after the rater voted on it"
        order.append(assignment.comparison_id)
        vote(engine, assignment.comparison_id, rater_id)
    return order


def test_fewest_votes_first_then_id(engine, world):
    ids, alice, bob, carol = world
    for voter, comparison_ids in ((bob, ids[:2]), (carol, ids[:1])):
        for comparison_id in comparison_ids:
            vote(engine, comparison_id, voter)
    # ids[0] has 2 votes, ids[1] has 1, the rest none.
    assert drain(engine, alice, overlap=3) == [ids[2], ids[3], ids[4], ids[1], ids[0]]


def test_priority_comes_before_vote_count(engine, world):
    ids, alice, bob, _ = world
    vote(engine, ids[3], bob)
    with session_scope(engine) as s:
        s.execute(update(Comparison).where(Comparison.id == ids[3]).values(priority=5))
    assert drain(engine, alice, overlap=3)[0] == ids[3]


def test_never_a_comparison_the_rater_voted_on(engine, world):
    ids, alice, _, _ = world
    for comparison_id in ids[:4]:
        vote(engine, comparison_id, alice)
    assert next_for(engine, alice, overlap=5).comparison_id == ids[4]
    vote(engine, ids[4], alice)
    assert next_for(engine, alice, overlap=5) is None


def test_judge_votes_leave_human_slots_open(engine, world):
    ids, alice, _, _ = world
    with session_scope(engine) as s:
        judge = get_or_create_judge("gpt-x", "v1", session=s).id
    for comparison_id in ids:
        vote(engine, comparison_id, judge)
    assert len(drain(engine, alice, overlap=1)) == len(ids)


def test_target_overlap_from_settings_and_argument(engine, world):
    ids, alice, bob, carol = world
    for comparison_id in ids:
        vote(engine, comparison_id, bob)
    assert next_for(engine, alice) is None  # default overlap 1: bob's votes close every pair
    set_overlap(engine, 2)
    assert len(drain(engine, alice)) == len(ids)
    assert next_for(engine, carol) is None  # bob + alice fill the overlap of 2
    assert next_for(engine, carol, overlap=3) is not None  # the argument wins over the setting


def test_the_last_free_slot_goes_to_one_rater_only(engine, world):
    ids, alice, bob, carol = world
    for comparison_id in ids[1:]:
        vote(engine, comparison_id, carol)
    mine = next_for(engine, alice, overlap=1)
    assert mine.comparison_id == ids[0]
    assert next_for(engine, bob, overlap=1) is None
    assert next_for(engine, bob, overlap=2).comparison_id == ids[0]  # overlap 2 leaves room for two


def test_an_expired_reservation_frees_the_slot(engine, world):
    ids, alice, bob, carol = world
    for comparison_id in ids[1:]:
        vote(engine, comparison_id, carol)
    next_for(engine, alice, overlap=1)
    assert next_for(engine, bob, overlap=1) is None
    with session_scope(engine) as s:  # alice walked away: her reservation runs out
        s.execute(update(Assignment).values(reserved_until=utcnow() - timedelta(seconds=1)))
    assert next_for(engine, bob, overlap=1).comparison_id == ids[0]
    with session_scope(engine) as s:
        live = select(Assignment.rater_id).where(Assignment.reserved_until > utcnow())
        assert s.exec(live).all() == [bob]


def test_released_slot_goes_to_the_next_rater(engine, world):
    ids, alice, bob, carol = world
    for comparison_id in ids[1:]:
        vote(engine, comparison_id, carol)
    next_for(engine, alice, overlap=1)
    with session_scope(engine) as s:
        release(alice, ids[0], session=s)
    assert next_for(engine, bob, overlap=1).comparison_id == ids[0]


def test_a_reload_returns_the_held_reservation_with_the_same_left_side(engine, world):
    _, alice, _, _ = world
    first = next_for(engine, alice, overlap=3, rng=random.Random(1))
    for seed in range(10):  # whatever a new coin says, the screen stays the same
        again = next_for(engine, alice, overlap=3, rng=random.Random(seed))
        assert (again.id, again.comparison_id, again.left_response_id) == (
            first.id,
            first.comparison_id,
            first.left_response_id,
        )


def test_exclude_skips_to_another_comparison(engine, world):
    ids, alice, _, _ = world
    held = next_for(engine, alice, overlap=3)
    skipped = {held.comparison_id}
    while (other := next_for(engine, alice, overlap=3, exclude=skipped)) is not None:
        assert other.comparison_id not in skipped
        skipped.add(other.comparison_id)
    assert skipped == set(ids)
    assert next_for(engine, alice, overlap=3).comparison_id == held.comparison_id  # still held


def test_the_left_side_is_random_and_recorded(engine):
    with session_scope(engine) as s:
        comparisons = {c.id: c for c in make_comparisons(s, 120)}
        rater = get_or_create_local_user("lefty", session=s).id
    rng, seen, left_is_a = random.Random(1234), set(), 0
    for _ in comparisons:
        assignment = next_for(engine, rater, overlap=1, rng=rng, exclude=seen)
        comparison = comparisons[assignment.comparison_id]
        assert assignment.left_response_id in (comparison.response_a_id, comparison.response_b_id)
        left_is_a += assignment.left_response_id == comparison.response_a_id
        seen.add(assignment.comparison_id)
    assert len(seen) == 120
    assert 40 <= left_is_a <= 80  # Binomial(120, 0.5): outside this is p < 5e-4


def test_pair_view_shows_the_recorded_left_side(engine, world):
    _, alice, _, _ = world
    for seed in range(6):
        assignment = next_for(engine, alice, overlap=3, rng=random.Random(seed), exclude=())
        with session_scope(engine) as s:
            view = pair_view(assignment, session=s)
            assert view.left.id == assignment.left_response_id
            assert {view.left.id, view.right.id} == {view.comparison.response_a_id, view.comparison.response_b_id}
            assert view.left.prompt_id == view.right.prompt_id == view.prompt.id == view.comparison.prompt_id
            release(alice, assignment.comparison_id, session=s)


def test_open_comparisons_counts_what_is_left(engine, world):
    ids, alice, bob, _ = world
    with session_scope(engine) as s:
        assert open_comparisons(alice, session=s) == 5
    vote(engine, ids[0], alice)
    vote(engine, ids[1], bob)
    with session_scope(engine) as s:
        assert open_comparisons(alice, session=s) == 3  # one voted by her, one closed by bob
        assert open_comparisons(alice, session=s, overlap=2) == 4
        s.merge(AppSetting(key=OVERLAP_SETTING, value=2))
    with session_scope(engine) as s:
        assert open_comparisons(alice, session=s) == 4


def test_next_response_for_least_rated_first_never_rated_by_me(engine, world):
    _, alice, bob, carol = world
    with session_scope(engine) as s:
        response_ids = sorted(s.exec(select(Response.id)).all())
        for response_id in response_ids[4:]:
            record_rating(response_id, bob, True, session=s)
        record_rating(response_ids[0], carol, False, session=s)
    seen = []
    while True:
        with session_scope(engine) as s:
            response = next_response_for(alice, session=s)
            if response is None:
                break
            assert response.id not in seen, "a response came back after the rater rated it"
            seen.append(response.id)
            record_rating(response.id, alice, True, session=s)
    # Unrated first, then the once-rated ones, each group in id order.
    assert seen == response_ids[1:4] + [response_ids[0]] + response_ids[4:]
