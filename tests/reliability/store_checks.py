"""What the reliability tests hold the store to after the traffic: every acknowledged vote
stored exactly once, one vote per (comparison, rater), and the queue's vote counters in step
with the votes themselves."""

from __future__ import annotations

from collections import Counter

from sqlalchemy import func
from sqlmodel import select

from feedback_store.db import engine_for, session_scope
from feedback_store.models import Comparison, Rater, RaterKind, Vote


def human_votes(url: str) -> list[tuple[int, int, str | None]]:
    """(comparison id, rater id, idempotency key) of every human vote."""
    with session_scope(engine_for(url)) as session:
        query = (select(Vote.comparison_id, Vote.rater_id, Vote.idempotency_key)
                 .join(Rater, Rater.id == Vote.rater_id).where(Rater.kind == RaterKind.human))
        return [tuple(row) for row in session.exec(query)]


def check_votes(url: str, acknowledged: list[str], *, all_stored_acknowledged: bool = True) -> dict:
    """Assert the store against the acknowledged keys; return the counts for the figures.

    `all_stored_acknowledged=False` allows stored votes nobody saw acknowledged: a server
    killed after its commit and before its answer."""
    votes = human_votes(url)
    keys = Counter(key for _, _, key in votes)
    assert Counter(acknowledged).most_common(1)[0][1] == 1, "the server acknowledged one key twice"
    missing = [key for key in acknowledged if keys[key] == 0]
    assert missing == [], f"{len(missing)} acknowledged votes are not stored, e.g. {missing[:3]}"
    assert max(keys.values()) == 1, "a key is stored twice"
    per_pair = Counter((comparison, rater) for comparison, rater, _ in votes)
    assert max(per_pair.values()) == 1, "two votes of one rater on one comparison"
    unacknowledged = len(votes) - len(acknowledged)
    if all_stored_acknowledged:
        assert unacknowledged == 0, f"{unacknowledged} stored votes were never acknowledged"
    with session_scope(engine_for(url)) as session:
        counted = dict(session.exec(select(Comparison.id, Comparison.human_votes)).all())
    per_comparison = Counter(comparison for comparison, _, _ in votes)
    drift = {c: (n, per_comparison.get(c, 0)) for c, n in counted.items() if n != per_comparison.get(c, 0)}
    assert drift == {}, f"human_votes counters out of step with the votes: {dict(list(drift.items())[:5])}"
    return {"votes_stored": len(votes), "stored_unacknowledged": unacknowledged}


def distinct_raters_per_comparison(url: str) -> Counter:
    with session_scope(engine_for(url)) as session:
        rows = session.exec(
            select(Comparison.id, func.count(func.distinct(Vote.rater_id)))
            .join(Vote, Vote.comparison_id == Comparison.id, isouter=True)
            .group_by(Comparison.id)
        ).all()
    return Counter(dict(rows))
