"""Recording judgements: pairwise votes and single-response ratings.

Both are idempotent. A retry carrying the same idempotency key returns what was stored;
a rater holds at most one vote per comparison (one rating per response), and changing it
updates that row while the superseded state goes to `VoteRevision`. Nothing is lost or
counted twice, whatever the interleaving of retries, tabs and processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

from sqlalchemy import bindparam, delete, func, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import Session, select

from feedback_store import driver_sql
from feedback_store.models import (
    Assignment,
    Choice,
    Comparison,
    Rater,
    RaterKind,
    Rating,
    Response,
    Vote,
    VoteRevision,
    utcnow,
)
from feedback_store.text import text_problem

STRENGTHS = {1: "slightly better", 2: "clearly better"}


class VoteError(ValueError):
    """A vote that cannot be recorded as given (unknown comparison, bad field, reused key)."""


@dataclass(frozen=True)
class VoteInput:
    choice: Choice
    strength: int | None = None
    rationale: str | None = None
    left_response_id: int | None = None
    time_spent_ms: int | None = None
    confidence: float | None = None

    def same_judgement(self, vote: Vote) -> bool:
        return (self.choice, self.strength, self.rationale) == (vote.choice, vote.strength, vote.rationale)


# The hot path of the app: built once (statements are immutable), compiled once per dialect
# and run on the driver cursor of the session's connection (see driver_sql), because ORM
# loads and SQLAlchemy's per-execution work cost far more than this SQL does.
_FACTS = select(
    Comparison.response_a_id,
    Comparison.response_b_id,
    Rater.name,
    (Rater.kind == RaterKind.human).label("is_human"),
    Rater.active,
    # The vote this key already produced, as it stands or since revised.
    func.coalesce(
        select(Vote.id).where(Vote.idempotency_key == bindparam("key")).scalar_subquery(),
        select(VoteRevision.vote_id)
        .where(VoteRevision.idempotency_key == bindparam("key"))
        .limit(1)
        .scalar_subquery(),
    ).label("key_owner"),
).select_from(Comparison).join(Rater, Rater.id == bindparam("rid"))
_FACTS = _FACTS.where(Comparison.id == bindparam("cid"))
_COUNT_HUMAN_VOTE = (
    update(Comparison).where(Comparison.id == bindparam("cid")).values(human_votes=Comparison.human_votes + 1)
)
_RELEASE_ASSIGNMENT = delete(Assignment).where(
    Assignment.comparison_id == bindparam("cid"), Assignment.rater_id == bindparam("rid")
)


@lru_cache(maxsize=None)
def _insert_unless_voted(dialect: str):
    """INSERT that does nothing when the rater already voted on the pair or the key is taken
    (on PostgreSQL it first waits for a concurrent insert of the same row to commit)."""
    dialect_insert = {"sqlite": sqlite_insert, "postgresql": postgresql_insert}[dialect]
    return dialect_insert(Vote.__table__).on_conflict_do_nothing().returning(Vote.__table__.c.id)


class _Facts(NamedTuple):
    """What a vote is checked against, in _FACTS's column order."""

    response_a_id: int
    response_b_id: int
    rater_name: str
    is_human: bool
    active: bool
    key_owner: int | None  # the vote the idempotency key already produced


def _validate(facts: _Facts | None, comparison_id: int, rater_id: int, vote: VoteInput, *, session: Session) -> None:
    if facts is None:
        if session.get(Comparison, comparison_id) is None:
            raise VoteError(f"comparison {comparison_id} does not exist")
        raise VoteError(f"rater {rater_id} does not exist")
    if not facts.active:
        raise VoteError(f"rater {facts.rater_name!r} is deactivated")
    if vote.strength is not None and vote.strength not in STRENGTHS:
        raise VoteError(f"strength must be one of {sorted(STRENGTHS)} (got {vote.strength!r})")
    if vote.strength is not None and vote.choice not in (Choice.a, Choice.b):
        raise VoteError("strength only applies to a choice of 'a' or 'b'")
    pair = (facts.response_a_id, facts.response_b_id)
    if vote.left_response_id is not None and vote.left_response_id not in pair:
        raise VoteError(
            f"left_response_id {vote.left_response_id} is not part of comparison {comparison_id} {pair}"
        )
    if vote.time_spent_ms is not None and vote.time_spent_ms < 0:
        raise VoteError("time_spent_ms must not be negative")
    if vote.rationale is not None and (problem := text_problem(vote.rationale)) is not None:
        raise VoteError(f"the rationale {problem}")


def record_vote(
    comparison_id: int,
    rater_id: int,
    choice: Choice | str,
    *,
    session: Session,
    strength: int | None = None,
    rationale: str | None = None,
    left_response_id: int | None = None,
    time_spent_ms: int | None = None,
    confidence: float | None = None,
    idempotency_key: str | None = None,
) -> Vote:
    """Store `rater`'s judgement of a comparison and return the vote as now stored (a first
    vote comes back as a detached object built from what was inserted)."""
    try:
        choice = Choice(choice)
    except ValueError:
        raise VoteError(f"choice must be one of {[c.value for c in Choice]} (got {choice!r})") from None
    given = VoteInput(choice, strength, rationale or None, left_response_id, time_spent_ms, confidence)
    ids = {"cid": comparison_id, "rid": rater_id}

    connection = session.connection()
    row = driver_sql.execute(connection, _FACTS, {**ids, "key": idempotency_key}).fetchone()
    facts = _Facts(*row) if row is not None else None
    if facts is not None and facts.key_owner is not None:
        return _replay(idempotency_key, comparison_id, rater_id, session=session)
    _validate(facts, comparison_id, rater_id, given, session=session)

    now = utcnow()
    values = dict(comparison_id=comparison_id, rater_id=rater_id, idempotency_key=idempotency_key,
                  revision=1, created_at=now, updated_at=now, **given.__dict__)
    inserted = driver_sql.execute(connection, _insert_unless_voted(connection.dialect.name), values).fetchone()
    if inserted is not None:  # the usual case: a first vote
        if facts.is_human:
            driver_sql.execute(connection, _COUNT_HUMAN_VOTE, ids)
        driver_sql.execute(connection, _RELEASE_ASSIGNMENT, ids)
        return Vote(id=inserted[0], **values)

    # The rater voted on this pair before (or a concurrent twin just did): lock that vote.
    existing = _existing_vote(comparison_id, rater_id, session=session)
    if existing is None:
        raise VoteError(f"idempotency key {idempotency_key!r} was used for another vote")
    # With the lock held, a twin of this retry that got in first is visible: its key must not
    # be applied a second time on top of someone else's change.
    if idempotency_key is not None:
        if (replay := _replay(idempotency_key, comparison_id, rater_id, session=session)) is not None:
            return replay
    if given.same_judgement(existing):
        return existing  # a retry without a key, or the same answer twice
    return _revise(existing, given, idempotency_key, session=session)


def _replay(key: str, comparison_id: int, rater_id: int, *, session: Session) -> Vote | None:
    """The vote a key already produced, if any; a key belongs to one (comparison, rater)."""
    replay = _vote_for_key(key, session=session)
    if replay is not None and (replay.comparison_id, replay.rater_id) != (comparison_id, rater_id):
        raise VoteError(f"idempotency key {key!r} was used for another vote")
    return replay


def _vote_for_key(key: str, *, session: Session) -> Vote | None:
    vote = session.exec(select(Vote).where(Vote.idempotency_key == key)).first()
    if vote is not None:
        return vote
    # A key that produced a since-revised state still answers with the vote as it is now.
    vote_id = session.exec(select(VoteRevision.vote_id).where(VoteRevision.idempotency_key == key)).first()
    return session.get(Vote, vote_id) if vote_id is not None else None


def _existing_vote(comparison_id: int, rater_id: int, *, session: Session) -> Vote | None:
    """The rater's vote on the comparison, row-locked until commit (PostgreSQL; SQLite's
    BEGIN IMMEDIATE already serialises writers), so two changes of mind never interleave."""
    query = (
        select(Vote)
        .where(Vote.comparison_id == comparison_id, Vote.rater_id == rater_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    return session.exec(query).first()


def _revise(vote: Vote, given: VoteInput, idempotency_key: str | None, *, session: Session) -> Vote:
    session.add(
        VoteRevision(
            vote_id=vote.id,
            revision=vote.revision,
            choice=vote.choice,
            strength=vote.strength,
            rationale=vote.rationale,
            left_response_id=vote.left_response_id,
            time_spent_ms=vote.time_spent_ms,
            idempotency_key=vote.idempotency_key,
            recorded_at=vote.updated_at,
        )
    )
    for field, value in given.__dict__.items():
        setattr(vote, field, value)
    vote.idempotency_key = idempotency_key
    vote.revision += 1
    vote.updated_at = utcnow()
    session.add(vote)
    session.flush()
    return vote


def vote_history(vote_id: int, *, session: Session) -> list[VoteRevision]:
    return list(
        session.exec(select(VoteRevision).where(VoteRevision.vote_id == vote_id).order_by(VoteRevision.revision))
    )


def votes_by(rater_id: int, *, session: Session) -> list[Vote]:
    return list(session.exec(select(Vote).where(Vote.rater_id == rater_id).order_by(Vote.id)))


def record_rating(
    response_id: int,
    rater_id: int,
    thumbs_up: bool,
    *,
    session: Session,
    comment: str | None = None,
    idempotency_key: str | None = None,
) -> Rating:
    """Thumbs up/down on one response; one rating per (response, rater), updated in place."""
    if idempotency_key is not None:
        replay = session.exec(select(Rating).where(Rating.idempotency_key == idempotency_key)).first()
        if replay is not None:
            if (replay.response_id, replay.rater_id) != (response_id, rater_id):
                raise VoteError(f"idempotency key {idempotency_key!r} was used for another rating")
            return replay
    if session.get(Response, response_id) is None:
        raise VoteError(f"response {response_id} does not exist")
    if session.get(Rater, rater_id) is None:
        raise VoteError(f"rater {rater_id} does not exist")
    if comment and (problem := text_problem(comment)) is not None:
        raise VoteError(f"the comment {problem}")
    rating = session.exec(
        select(Rating).where(Rating.response_id == response_id, Rating.rater_id == rater_id)
    ).first()
    if rating is None:
        rating = Rating(response_id=response_id, rater_id=rater_id, thumbs_up=bool(thumbs_up))
    rating.thumbs_up = bool(thumbs_up)
    rating.comment = comment or None
    rating.idempotency_key = idempotency_key or rating.idempotency_key
    session.add(rating)
    session.flush()
    return rating


# ---- a judgement and the next item, as one unit of work --------------------------------------
