"""An annotator's edit of a response: a new response of its own (an SFT example) and a pair
it wins against the response it was edited from.

`store_edit` writes the edit's policy, response, comparison and winning vote in the caller's
session: one unit of work, so a failure anywhere in it (or in whatever else the caller does
in that session, such as the vote the edit came with) keeps none of it. It is idempotent: a
retry with the same key finds the response, the pair and the vote already there and adds
nothing.
"""

from __future__ import annotations

from sqlmodel import Session

from feedback_store.catalog import add_comparison, add_response, get_or_create_policy
from feedback_store.models import Choice, Response, Vote
from feedback_store.text import text_problem
from feedback_store.votes import record_vote

HUMAN_EDIT_POLICY = "human-edit"
EDIT_SOURCE = "human-edit"  # Comparison.source of an edit's pair


class EditError(ValueError):
    """An edit that cannot be stored as given."""


def edit_key(idempotency_key: str | None) -> str | None:
    """The key of an edit's vote, derived from the key of the judgement it came with."""
    return f"{idempotency_key}:edit" if idempotency_key else None


def store_edit(
    source_response_id: int,
    rater_id: int,
    text: str,
    *,
    session: Session,
    idempotency_key: str | None = None,
) -> Vote | None:
    """Store `text`, an improvement by `rater` of response `source_response_id`, as a response
    of the `human-edit` policy paired with its source, and record the rater's vote that the
    edit wins. Returns that vote, or None when the text is the source's unchanged (nothing to
    learn from). `idempotency_key` is the key of the edit's own vote."""
    source = session.get(Response, source_response_id)
    if source is None:
        raise EditError(f"response {source_response_id} does not exist")
    text = text.strip()
    if not text:
        raise EditError("the edit is empty")
    if (problem := text_problem(text)) is not None:
        raise EditError(f"the edit {problem}")
    if text == source.text.strip():
        return None
    policy = get_or_create_policy(
        HUMAN_EDIT_POLICY,
        session=session,
        base_model="human",
        description="answers edited by annotators",
    )
    edited, _ = add_response(
        source.prompt_id,
        policy.id,
        text,
        session=session,
        edited_from_id=source.id,
        author_rater_id=rater_id,
    )
    pair, _ = add_comparison(edited, source, session=session, source=EDIT_SOURCE)
    choice = Choice.a if pair.response_a_id == edited.id else Choice.b
    return record_vote(
        pair.id,
        rater_id,
        choice,
        session=session,
        rationale="edited answer",
        idempotency_key=idempotency_key,
    )
