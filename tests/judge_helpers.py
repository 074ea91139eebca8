"""Building blocks of the judge tests: comparisons with chosen texts, and reading results back."""

from __future__ import annotations

from sqlmodel import select

from feedback_store.catalog import add_comparison, add_prompt, add_response, get_or_create_policy
from feedback_store.db import session_scope
from feedback_store.models import Comparison, JudgeCall, JudgeRun, Vote


def add_pairs(engine, pairs: list[tuple[str, str]], prefix: str = "question") -> list[int]:
    """One comparison per (text_a, text_b); text_a is the canonical response_a."""
    ids = []
    with session_scope(engine) as session:
        first = get_or_create_policy("policy-1", session=session, base_model="tiny")
        second = get_or_create_policy("policy-2", session=session, base_model="tiny")
        for i, (text_a, text_b) in enumerate(pairs):
            prompt, _ = add_prompt(f"{prefix} {i}?", session=session, source="test")
            a, _ = add_response(prompt.id, first.id, text_a, session=session)
            b, _ = add_response(prompt.id, second.id, text_b, session=session)
            comparison, _ = add_comparison(a, b, session=session)
            assert comparison.response_a_id == a.id
            ids.append(comparison.id)
    return ids


def votes_by_comparison(engine, rater_name_part: str = "judge:") -> dict[int, Vote]:
    from feedback_store.models import Rater

    with session_scope(engine) as session:
        rows = session.exec(select(Vote, Rater).join(Rater, Rater.id == Vote.rater_id)).all()
        return {vote.comparison_id: vote for vote, rater in rows if rater_name_part in rater.name}


def calls(engine, run_id: int | None = None) -> list[JudgeCall]:
    with session_scope(engine) as session:
        query = select(JudgeCall).order_by(JudgeCall.id)
        if run_id is not None:
            query = query.where(JudgeCall.judge_run_id == run_id)
        return list(session.exec(query))


def run_row(engine, run_id: int) -> JudgeRun:
    with session_scope(engine) as session:
        return session.get(JudgeRun, run_id)


def priorities(engine) -> dict[int, int]:
    with session_scope(engine) as session:
        return {c.id: c.priority for c in session.exec(select(Comparison))}
