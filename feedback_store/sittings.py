"""A judgement and the rater's next item, one unit of work.

The annotation pages save a judgement and take the rater's next item in one transaction: if
any part fails nothing is kept (no judgement without its next reservation, no reservation
without its judgement), and a retry with the same key does it all again, once. The pieces are
the store's own: `votes` records, `edits` stores an edited answer, `gold` and `queue` deal.
"""

from __future__ import annotations

import random
from collections.abc import Collection
from datetime import timedelta

from sqlmodel import Session

from feedback_store.edits import EditError, edit_key, store_edit
from feedback_store.gold import next_pair_for
from feedback_store.models import Assignment, Choice, Rating, Response, Vote
from feedback_store.queue import DEFAULT_RESERVATION, next_response_for
from feedback_store.votes import record_rating, record_vote


def record_vote_and_next(
    comparison_id: int,
    rater_id: int,
    choice: Choice | str,
    *,
    session: Session,
    idempotency_key: str | None = None,
    strength: int | None = None,
    rationale: str | None = None,
    left_response_id: int | None = None,
    time_spent_ms: int | None = None,
    edit_text: str | None = None,
    edit_source_id: int | None = None,
    exclude: Collection[int] = (),
    reservation: timedelta = DEFAULT_RESERVATION,
    rng: random.Random | None = None,
) -> tuple[Vote, Assignment | None]:
    """Record the vote (and the edit that came with it, see feedback_store.edits.store_edit),
    then reserve the rater's next comparison, all in `session`: call it inside one
    session_scope. Returns the vote and the next assignment (None when nothing is open). The
    next pair is dealt as the page deals (feedback_store.gold.next_pair_for): a gold pair at
    the gold rate, else the ordinary queue's; `rng` draws the gold pairs and the left side."""
    vote = record_vote(
        comparison_id,
        rater_id,
        choice,
        session=session,
        strength=strength,
        rationale=rationale,
        left_response_id=left_response_id,
        time_spent_ms=time_spent_ms,
        idempotency_key=idempotency_key,
    )
    if edit_text and edit_text.strip():
        if edit_source_id is None:
            raise EditError("an edit needs the response it improves")
        store_edit(edit_source_id, rater_id, edit_text, session=session, idempotency_key=edit_key(idempotency_key))
    return vote, next_pair_for(rater_id, session=session, exclude=exclude, reservation=reservation, rng=rng)


def record_rating_and_next(
    response_id: int,
    rater_id: int,
    thumbs_up: bool,
    *,
    session: Session,
    comment: str | None = None,
    idempotency_key: str | None = None,
    exclude: Collection[int] = (),
) -> tuple[Rating, Response | None]:
    """Record the rating, then pick the rater's next response to rate, both in `session`:
    call it inside one session_scope. The next response is never the one just rated."""
    rating = record_rating(
        response_id, rater_id, thumbs_up, session=session, comment=comment, idempotency_key=idempotency_key
    )
    return rating, next_response_for(rater_id, session=session, exclude=exclude)
