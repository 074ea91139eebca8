"""A rater's own progress, as the annotation page shows it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import func, select
from sqlmodel import Session

from feedback_store.models import Rating, Vote
from feedback_store.loops import waiting_rounds
from feedback_store.queue import open_comparisons, target_overlap


@dataclass(frozen=True)
class RaterProgress:
    votes_today: int
    ratings_today: int
    remaining: int  # comparisons this rater could still be given
    target_overlap: int
    # `prefloop loop --labels human` rounds waiting on annotators: (loop, round, votes still needed)
    loops_waiting: tuple[tuple[str, int, int], ...] = ()


def start_of_day(now: datetime | None = None) -> datetime:
    now = now or datetime.now(timezone.utc)
    return now.replace(hour=0, minute=0, second=0, microsecond=0)


def rater_progress(
    rater_id: int, *, session: Session, since: datetime | None = None
) -> RaterProgress:
    bound = since or start_of_day()

    def count(model) -> int:
        query = (
            select(func.count())
            .select_from(model)
            .where(model.rater_id == rater_id, model.created_at >= bound)
        )
        return int(session.execute(query).scalar_one())

    overlap = target_overlap(session=session)
    return RaterProgress(
        votes_today=count(Vote),
        ratings_today=count(Rating),
        remaining=open_comparisons(rater_id, session=session, overlap=overlap),
        target_overlap=overlap,
        loops_waiting=tuple(
            (round_.loop, round_.round, missing)
            for round_, missing, _ in waiting_rounds(session=session)
            if missing
        ),
    )
