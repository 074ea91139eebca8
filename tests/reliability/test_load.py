"""Load: many simulated annotators (real HTTP page sessions, tests.page_client) against a real
`prefloop serve`, on SQLite and on PostgreSQL, with double clicks and retries. Exactly one
stored vote per acknowledged submission and per (comparison, rater); no "database is
locked", no 5xx. CI: 50 annotators x 10 votes; PREFLOOP_RELIABILITY_FULL=1: 50 x 200."""

from __future__ import annotations

import time

import pytest

from feedback_store.app_settings import set_target_overlap
from feedback_store.db import engine_for, session_scope
from tests.app_support import seed_pairs, seed_users, start_serve
from tests.reliability.figures import record
from tests.reliability.sizes import FULL, LOAD_ANNOTATORS, LOAD_VOTES_EACH, TIMEOUT_S
from tests.reliability.store_checks import check_votes, distinct_raters_per_comparison
from tests.reliability.voters import Behaviour, run_annotators

pytestmark = [pytest.mark.slow, pytest.mark.timeout(TIMEOUT_S)]


def serve_and_vote(url, root, names, behaviours, *, overlap, pairs, deadline_s):
    engine = engine_for(url)
    seed_users(engine, names)
    seed_pairs(engine, pairs)
    with session_scope(engine) as session:
        set_target_overlap(overlap, session=session)
    server = start_serve(url, root)
    started = time.monotonic()
    try:
        # Accounts beyond the behaviours given exist but never sign in (idle annotators).
        tallies = run_annotators(server.url, names[: len(behaviours)], behaviours, deadline_s=deadline_s)
    finally:
        server.stop()
    return tallies, time.monotonic() - started, server.log()


def assert_clean_traffic(tallies, log):
    errors = [f"{t.name}: {e}" for t in tallies for e in t.errors]
    assert errors == [], errors[:5]
    statuses = sum((t.statuses for t in tallies), start=type(tallies[0].statuses)())
    assert not [s for s in statuses if s >= 500], dict(statuses)
    assert sum(t.disconnects for t in tallies) == 0
    assert "database is locked" not in log and "Traceback" not in log, log[-3000:]
    return statuses


def test_many_annotators_vote_at_once(db_url, tmp_path):
    names = [f"annotator{i:02d}" for i in range(LOAD_ANNOTATORS)]
    overlap = 5  # five raters per pair: annotators contend for the same comparisons
    pairs = LOAD_ANNOTATORS * LOAD_VOTES_EACH // overlap + 2 * LOAD_VOTES_EACH
    behaviours = [Behaviour(votes=LOAD_VOTES_EACH, seed=i) for i in range(len(names))]

    tallies, wall, log = serve_and_vote(db_url, tmp_path, names, behaviours, overlap=overlap, pairs=pairs,
                                        deadline_s=1200 if FULL else 240)

    statuses = assert_clean_traffic(tallies, log)
    acknowledged = [key for t in tallies for key in t.acknowledged]
    assert len(acknowledged) == LOAD_ANNOTATORS * LOAD_VOTES_EACH, "some annotators did not get all their votes in"
    stored = check_votes(db_url, acknowledged)
    assert max(distinct_raters_per_comparison(db_url).values()) <= overlap
    record(
        f"load-{db_url.split(':')[0].split('+')[0]}",
        annotators=len(names),
        votes_attempted=sum(t.attempted for t in tallies),
        votes_acknowledged=len(acknowledged),
        votes_stored=stored["votes_stored"],
        double_submits=sum(t.double_submits for t in tallies),
        retries=sum(t.retries for t in tallies),
        http_5xx=sum(n for s, n in statuses.items() if s >= 500),
        database_locked=log.count("database is locked"),
        votes_per_s=round(len(acknowledged) / wall, 1),
    )


def test_overlap_three_with_idle_annotators(sqlite_url, tmp_path):
    """10 annotators at overlap 3: six vote until their queue is empty, two open a pair and sit
    on it for a while before voting, two never sign in. Every comparison ends with exactly three
    distinct raters: the idle ones' reservations are neither lost nor handed out twice."""
    names = [f"annotator{i}" for i in range(10)]
    active, pausing = names[:6], names[6:8]  # names[8:] are idle: seeded, never signed in
    pairs, overlap = 30, 3
    behaviours = [Behaviour(votes=pairs, seed=i) for i in range(len(active))]
    behaviours += [Behaviour(votes=pairs, idle_s=3.0, seed=100 + i) for i in range(len(pausing))]

    tallies, wall, log = serve_and_vote(sqlite_url, tmp_path, names, behaviours, overlap=overlap, pairs=pairs,
                                        deadline_s=120)

    assert_clean_traffic(tallies, log)
    acknowledged = [key for t in tallies for key in t.acknowledged]
    stored = check_votes(sqlite_url, acknowledged)
    raters = distinct_raters_per_comparison(sqlite_url)
    assert len(raters) == pairs and set(raters.values()) == {overlap}, raters
    assert all(t.acknowledged for t in tallies[len(active):]), "a paused annotator never got to vote"
    record(
        "overlap-3-idle",
        annotators=len(names),
        paused_holding_a_pair=len(pausing),
        never_signed_in=len(names) - len(active) - len(pausing),
        votes_attempted=sum(t.attempted for t in tallies),
        votes_acknowledged=len(acknowledged),
        votes_stored=stored["votes_stored"],
        comparisons_with_3_raters=sum(1 for n in raters.values() if n == overlap),
        comparisons=pairs,
    )
