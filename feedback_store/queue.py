"""What to show a rater next.

A comparison is open to a rater while they have not voted on it and its human votes plus
live reservations by other raters are below the target overlap. Fewest votes come first
(after admin/judge priority), and handing one out reserves it for a short while, so two
annotators are not both given the last free slot. The reservation also fixes which response
is shown on the left, chosen at random, so a reload shows the same screen.
"""

from __future__ import annotations

import random
from collections.abc import Collection
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import and_, delete, exists, func, select as sa_select
from sqlmodel import Session, col, select

from feedback_store.models import (
    AppSetting,
    Assignment,
    Comparison,
    Prompt,
    Rating,
    Response,
    Vote,
    utcnow,
)

DEFAULT_OVERLAP = 1
DEFAULT_RESERVATION = timedelta(minutes=5)
OVERLAP_SETTING = "target_overlap"


@dataclass(frozen=True)
class PairView:
    """One assignment as a rater sees it: prompt, left and right responses."""

    assignment: Assignment
    comparison: Comparison
    prompt: Prompt
    left: Response
    right: Response


def target_overlap(*, session: Session) -> int:
    setting = session.get(AppSetting, OVERLAP_SETTING)
    return int(setting.value) if setting and setting.value else DEFAULT_OVERLAP


def next_comparison_for(
    rater_id: int,
    *,
    session: Session,
    overlap: int | None = None,
    reservation: timedelta = DEFAULT_RESERVATION,
    rng: random.Random | None = None,
    exclude: Collection[int] = (),
) -> Assignment | None:
    """Reserve and return the next comparison for this rater, or None when nothing is open.

    `exclude` holds comparisons the rater skipped in this sitting.
    """
    now = utcnow()
    overlap = overlap or target_overlap(session=session)
    held = session.exec(
        select(Assignment)
        .where(Assignment.rater_id == rater_id, Assignment.reserved_until > now)
        .where(col(Assignment.comparison_id).not_in(exclude))
        .order_by(Assignment.id)
    ).first()
    if held is not None:
        return held
    # Only this rater's own stale rows: others' expired reservations are ignored below, and
    # deleting only ours keeps concurrent callers from contending for the same rows.
    session.execute(delete(Assignment).where(Assignment.rater_id == rater_id, Assignment.reserved_until <= now))

    skipped = set(exclude)
    while (comparison := session.exec(_next_open(rater_id, overlap, now, skipped)).first()) is not None:
        if _still_open(comparison.id, rater_id, overlap, now, session=session):
            break
        skipped.add(comparison.id)
    else:
        return None
    rng = rng or random.SystemRandom()
    left = comparison.response_a_id if rng.random() < 0.5 else comparison.response_b_id
    assignment = Assignment(
        comparison_id=comparison.id, rater_id=rater_id, left_response_id=left, reserved_until=now + reservation
    )
    session.add(assignment)
    session.flush()
    return assignment


def _reserved_by_others(rater_id: int, now):
    return (
        sa_select(func.count())
        .where(
            Assignment.comparison_id == Comparison.id,
            Assignment.rater_id != rater_id,
            Assignment.reserved_until > now,
        )
        .scalar_subquery()
    )


def _next_open(rater_id: int, overlap: int, now, skipped: Collection[int]):
    """The first comparison, in queue order, with a slot free for this rater."""
    voted = exists().where(Vote.comparison_id == Comparison.id, Vote.rater_id == rater_id)
    return (
        select(Comparison)
        .where(
            Comparison.human_votes < overlap,
            ~voted,
            Comparison.human_votes + _reserved_by_others(rater_id, now) < overlap,
        )
        .where(col(Comparison.id).not_in(skipped))
        .order_by(col(Comparison.priority).desc(), Comparison.human_votes, Comparison.id)
        .limit(1)
        # PostgreSQL: two raters asking at once skip each other's candidate row.
        .with_for_update(skip_locked=True, of=Comparison)
    )


def _still_open(comparison_id: int, rater_id: int, overlap: int, now, *, session: Session) -> bool:
    """Check again, in a statement that starts after we got the row lock. On PostgreSQL the
    search above sees a snapshot taken before it waited: a rater whose reservation committed
    in between released the lock but is invisible to it, and would otherwise share the slot."""
    taken = session.execute(
        sa_select(Comparison.human_votes + _reserved_by_others(rater_id, now)).where(Comparison.id == comparison_id)
    ).scalar_one()
    return taken < overlap


def pair_view(assignment: Assignment, *, session: Session) -> PairView:
    comparison = session.get(Comparison, assignment.comparison_id)
    a = session.get(Response, comparison.response_a_id)
    b = session.get(Response, comparison.response_b_id)
    left, right = (a, b) if assignment.left_response_id == a.id else (b, a)
    return PairView(assignment, comparison, session.get(Prompt, comparison.prompt_id), left, right)


def release(rater_id: int, comparison_id: int, *, session: Session) -> None:
    """Give a reserved comparison back (the rater skipped it)."""
    session.execute(
        delete(Assignment).where(Assignment.rater_id == rater_id, Assignment.comparison_id == comparison_id)
    )


def open_comparisons(rater_id: int, *, session: Session, overlap: int | None = None) -> int:
    """How many comparisons this rater could still be given (the app's "remaining")."""
    overlap = overlap or target_overlap(session=session)
    voted = exists().where(Vote.comparison_id == Comparison.id, Vote.rater_id == rater_id)
    return session.exec(
        sa_select(func.count()).select_from(Comparison).where(Comparison.human_votes < overlap, ~voted)
    ).one()[0]


def next_response_for(rater_id: int, *, session: Session, exclude: Collection[int] = ()) -> Response | None:
    """Single-response mode: a response this rater has not rated, least-rated first.

    `exclude` holds responses the rater skipped in this sitting.
    """
    rated_by_me = exists().where(and_(Rating.response_id == Response.id, Rating.rater_id == rater_id))
    n_ratings = sa_select(func.count()).where(Rating.response_id == Response.id).scalar_subquery()
    query = select(Response).where(~rated_by_me, col(Response.id).not_in(exclude))
    return session.exec(query.order_by(n_ratings, Response.id).limit(1)).first()
