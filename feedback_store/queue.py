"""What to show a rater next.

A comparison is open to a rater while they have not voted on it and its human votes plus
live reservations by other raters are below the target overlap. Fewest votes come first
(after admin/judge priority), and handing one out reserves it for a short while, so two
annotators are not both given the last free slot. The reservation also fixes which response
is shown on the left, chosen at random, so a reload shows the same screen.

The ordinary queue never serves a gold pair (`gold_winner` set: feedback_store.gold deals
those, at the gold rate, through `gold.next_pair_for`) nor a pair the judge settled
(`settled_by` set: `prefloop judge --judge-first`). Both predicates are those of the partial
index ix_comparison_queue, so its walk does not pass such pairs.
"""

from __future__ import annotations

import random
from collections.abc import Collection
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import and_, bindparam, delete, exists, func, insert, select as sa_select
from sqlmodel import Session, col, select

from feedback_store.models import (
    GOLD_POLICY,
    AppSetting,
    Assignment,
    Choice,
    Comparison,
    PolicyVersion,
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
    value = session.connection().execute(_OVERLAP).scalar()
    return int(value) if value else DEFAULT_OVERLAP


# The queue's statements, built once (they are immutable) and run on the session's connection:
# the annotation app asks for the next pair on every vote, and ORM loads plus statement
# construction cost more than the SQL itself.
_OVERLAP = sa_select(AppSetting.value).where(AppSetting.key == OVERLAP_SETTING)
_SKIPPED = bindparam("skip", expanding=True)
_HELD = (
    sa_select(Assignment.__table__)
    .where(
        Assignment.rater_id == bindparam("rid"),
        Assignment.reserved_until > bindparam("now"),
        Assignment.comparison_id.not_in(_SKIPPED),
    )
    .order_by(Assignment.id)
    .limit(1)
)
# Only this rater's own stale rows: others' expired reservations are ignored by the search,
# and deleting only ours keeps concurrent callers from contending for the same rows.
_DROP_MY_EXPIRED = delete(Assignment).where(
    Assignment.rater_id == bindparam("rid"), Assignment.reserved_until <= bindparam("now")
)
_RESERVED_BY_OTHERS = (
    sa_select(func.count())
    .where(
        Assignment.comparison_id == Comparison.id,
        Assignment.rater_id != bindparam("rid"),
        Assignment.reserved_until > bindparam("now"),
    )
    .scalar_subquery()
)
# What the ordinary queue may serve: the predicate of the partial index ix_comparison_queue,
# term for term (SQLite uses a partial index only for a query that names its terms).
_ORDINARY = (Comparison.gold_winner.is_(None), Comparison.settled_by.is_(None))
# The first comparison, in queue order (the order of ix_comparison_queue), with a free slot.
_NEXT_OPEN = (
    sa_select(Comparison.id, Comparison.response_a_id, Comparison.response_b_id)
    .where(
        *_ORDINARY,
        Comparison.human_votes < bindparam("overlap"),
        ~exists().where(Vote.comparison_id == Comparison.id, Vote.rater_id == bindparam("rid")),
        Comparison.human_votes + _RESERVED_BY_OTHERS < bindparam("overlap"),
        Comparison.id.not_in(_SKIPPED),
    )
    .order_by(Comparison.priority.desc(), Comparison.human_votes, Comparison.id)
    .limit(1)
    # PostgreSQL: two raters asking at once skip each other's candidate row.
    .with_for_update(skip_locked=True, of=Comparison)
)
_SLOTS_TAKEN = sa_select(Comparison.human_votes + _RESERVED_BY_OTHERS).where(Comparison.id == bindparam("cid"))
_RESERVE = insert(Assignment.__table__).returning(Assignment.__table__.c.id)


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

    A live reservation of the rater's (any pair, gold included) is returned again: a reload
    shows the same screen. `exclude` holds comparisons the rater skipped in this sitting.
    """
    held = held_assignment(rater_id, session=session, exclude=exclude)
    if held is not None:
        return held
    return reserve_next_open(rater_id, session=session, overlap=overlap, reservation=reservation, rng=rng,
                             exclude=exclude)


def held_assignment(rater_id: int, *, session: Session, exclude: Collection[int] = ()) -> Assignment | None:
    """The rater's live reservation (the pair on their screen), if any, skipped ones aside."""
    held = session.connection().execute(_HELD, {"rid": rater_id, "now": utcnow(), "skip": list(exclude)}).first()
    return Assignment(**held._mapping) if held is not None else None


def reserve_next_open(
    rater_id: int,
    *,
    session: Session,
    overlap: int | None = None,
    reservation: timedelta = DEFAULT_RESERVATION,
    rng: random.Random | None = None,
    exclude: Collection[int] = (),
) -> Assignment | None:
    """`next_comparison_for` without looking for a held reservation first (the caller did):
    reserve the first open ordinary comparison, or return None."""
    connection = session.connection()
    now = utcnow()
    overlap = overlap or target_overlap(session=session)
    params = {"rid": rater_id, "now": now, "skip": list(exclude), "overlap": overlap}
    connection.execute(_DROP_MY_EXPIRED, params)

    while (candidate := connection.execute(_NEXT_OPEN, params).first()) is not None:
        if connection.dialect.name == "sqlite" or _still_open(candidate.id, params, connection):
            break
        params["skip"].append(candidate.id)
    else:
        return None
    rng = rng or random.SystemRandom()
    values = {
        "comparison_id": candidate.id,
        "rater_id": rater_id,
        "left_response_id": candidate.response_a_id if rng.random() < 0.5 else candidate.response_b_id,
        "reserved_until": now + reservation,
        "created_at": now,
    }
    return Assignment(id=connection.execute(_RESERVE, values).scalar_one(), **values)


def ordinary_open(rater_id: int, *, session: Session, exclude: Collection[int] = ()) -> bool:
    """Whether the ordinary queue has a pair for this rater (reservations by others aside):
    what feedback_store.gold.next_pair_for asks before mixing a gold pair in."""
    voted = exists().where(Vote.comparison_id == Comparison.id, Vote.rater_id == rater_id)
    query = sa_select(Comparison.id).where(
        *_ORDINARY, Comparison.human_votes < target_overlap(session=session), ~voted
    )
    if exclude:
        query = query.where(Comparison.id.not_in(list(exclude)))
    return session.connection().execute(sa_select(query.exists())).scalar()


def _still_open(comparison_id: int, params: dict, connection) -> bool:
    """Check again, in a statement that starts after we got the row lock. On PostgreSQL the
    search reads a snapshot taken when it started: a rater whose reservation committed while
    it ran has released the row lock, yet is invisible to it, and would share the slot.
    (SQLite needs no second look: BEGIN IMMEDIATE runs one writer at a time.)"""
    taken = connection.execute(_SLOTS_TAKEN, {**params, "cid": comparison_id}).scalar_one()
    return taken < params["overlap"]


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
    """How many ordinary comparisons this rater could still be given (the app's "remaining"):
    gold pairs and pairs the judge settled are not counted."""
    overlap = overlap or target_overlap(session=session)
    voted = exists().where(Vote.comparison_id == Comparison.id, Vote.rater_id == rater_id)
    return session.exec(
        sa_select(func.count()).select_from(Comparison).where(*_ORDINARY, Comparison.human_votes < overlap, ~voted)
    ).one()[0]


def next_response_for(rater_id: int, *, session: Session, exclude: Collection[int] = ()) -> Response | None:
    """Single-response mode: a response this rater has not rated, least-rated first. Degraded
    copies made for gold pairs (policy `gold:degraded`) are never dealt.

    `exclude` holds responses the rater skipped in this sitting.
    """
    rated_by_me = exists().where(and_(Rating.response_id == Response.id, Rating.rater_id == rater_id))
    n_ratings = sa_select(func.count()).where(Rating.response_id == Response.id).scalar_subquery()
    gold_copy = exists().where(PolicyVersion.id == Response.policy_id, PolicyVersion.name == GOLD_POLICY)
    query = select(Response).where(~rated_by_me, ~gold_copy, col(Response.id).not_in(exclude))
    return session.exec(query.order_by(n_ratings, Response.id).limit(1)).first()


# ---- judge-first: pairs the judge settled leave the human queue ----------------------------


def settle_comparisons(comparison_ids: Collection[int], judge_rater_id: int, *, session: Session) -> int:
    """Mark these comparisons settled by the judge (`prefloop judge --judge-first`): the ordinary
    queue no longer serves them. Gold pairs and pairs already settled are left as they are.
    Returns how many were settled now."""
    ids, settled = sorted(set(comparison_ids)), 0
    table = Comparison.__table__
    for start in range(0, len(ids), 900):  # bound parameters per IN (...), under every limit
        settled += session.connection().execute(
            table.update()
            .where(table.c.id.in_(ids[start : start + 900]), table.c.gold_winner.is_(None), table.c.settled_by.is_(None))
            .values(settled_by=judge_rater_id)
        ).rowcount
    return settled


def settle_judge_votes(
    judge_rater_id: int, *, session: Session, threshold: float, among: Collection[int] | None = None
) -> int:
    """Settle every pair this judge already decided with confidence: its vote names a winner
    (A or B: a judge vote does only when both orders agreed) with a confidence of at least
    `threshold`, or none known. Only those `among`, if given. Returns how many were settled."""
    confident = sa_select(Vote.comparison_id).where(
        Vote.rater_id == judge_rater_id,
        Vote.choice.in_([Choice.a, Choice.b]),
        (Vote.confidence.is_(None)) | (Vote.confidence >= threshold),
    )
    ids = list(session.connection().execute(confident).scalars())
    if among is not None:
        wanted = set(among)
        ids = [i for i in ids if i in wanted]
    return settle_comparisons(ids, judge_rater_id, session=session)
