"""The rounds of `prefloop loop`, as the store keeps them, and the store questions a round asks.

    round_ = open_round("loop", 1, method="dpo", start_policy_id=3, session=session)
    finish_step(round_.id, "label", session=session, comparison_ids=[...])
    rounds("loop", session=session)

A round row is written at the end of each step (sample, label, train, evaluate), in the same
transaction as nothing else: the step's own work (responses, votes, a training run, an
evaluation) is already committed by then, and redoing a step whose row was not updated is
safe because every step is idempotent on its own.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import and_, func, update
from sqlalchemy.orm import aliased
from sqlmodel import Session, select

from feedback_store.models import (
    Comparison,
    LoopRound,
    Rater,
    RaterKind,
    Response,
    Vote,
    utcnow,
)

STEPS = ("sample", "label", "train", "evaluate", "done")


def rounds(loop: str, *, session: Session) -> list[LoopRound]:
    return list(session.exec(select(LoopRound).where(LoopRound.loop == loop).order_by(LoopRound.round)))


def open_round(loop: str, number: int, *, method: str, start_policy_id: int, session: Session) -> LoopRound:
    """Round `number` of `loop`: the stored one, or a new one starting at step `sample`."""
    existing = session.exec(
        select(LoopRound).where(LoopRound.loop == loop, LoopRound.round == number)
    ).first()
    if existing is not None:
        return existing
    round_ = LoopRound(loop=loop, round=number, method=method, start_policy_id=start_policy_id)
    session.add(round_)
    session.flush()
    return round_


def finish_step(round_id: int, next_step: str, *, session: Session, **outcome) -> LoopRound:
    """Record a step's outcome and move the round to `next_step`."""
    if next_step not in STEPS:
        raise ValueError(f"unknown loop step {next_step!r} (expected one of {', '.join(STEPS)})")
    round_ = session.get(LoopRound, round_id)
    for name, value in outcome.items():
        setattr(round_, name, value)
    round_.step = next_step
    if next_step == "done":
        round_.finished_at = utcnow()
    session.add(round_)
    return round_


def pairs_of_policy(policy_id: int, prompt_ids: Sequence[int], *, session: Session) -> list[int]:
    """Comparisons between two responses of one policy on these prompts (what a round labels)."""
    a, b = aliased(Response), aliased(Response)
    query = (
        select(Comparison.id)
        .join(a, a.id == Comparison.response_a_id)
        .join(b, b.id == Comparison.response_b_id)
        .where(a.policy_id == policy_id, b.policy_id == policy_id, Comparison.prompt_id.in_(list(prompt_ids)))
        .order_by(Comparison.id)
    )
    return list(session.exec(query))


def missing_human_labels(comparison_ids: Sequence[int], overlap: int, *, session: Session) -> int:
    """How many human votes these comparisons still need to reach `overlap` distinct raters each."""
    if not comparison_ids:
        return 0
    counts = dict(
        session.exec(
            select(Vote.comparison_id, func.count(func.distinct(Vote.rater_id)))
            .join(Rater, and_(Rater.id == Vote.rater_id, Rater.kind == RaterKind.human))
            .where(Vote.comparison_id.in_(list(comparison_ids)))
            .group_by(Vote.comparison_id)
        ).all()
    )
    return sum(max(0, overlap - counts.get(cid, 0)) for cid in comparison_ids)


LOOP_PRIORITY = 5  # above fewest-votes order, below the judge's doubts (10)


def prioritize_for_humans(comparison_ids: Sequence[int], *, session: Session, priority: int = LOOP_PRIORITY) -> None:
    """Put a waiting round's pairs at the front of the human queue (never lowering a priority)."""
    if comparison_ids:
        session.exec(
            update(Comparison)
            .where(Comparison.id.in_(list(comparison_ids)), Comparison.priority < priority)
            .values(priority=priority)
        )


def waiting_rounds(*, session: Session) -> list[tuple[LoopRound, int, int]]:
    """Rounds waiting for human labels: (round, human votes still needed, target overlap)."""
    from feedback_store.queue import target_overlap

    overlap = target_overlap(session=session)
    waiting = session.exec(select(LoopRound).where(LoopRound.step == "label").order_by(LoopRound.id)).all()
    return [(r, missing_human_labels(r.comparison_ids, overlap, session=session), overlap) for r in waiting]
