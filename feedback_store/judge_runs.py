"""The judge's side of the store: what is left to judge, and recording each decided comparison.

A judge rater (model + template version) votes at most once per comparison, so "what is
left" is every comparison without a vote by that rater: a rerun never judges one twice. A
comparison is written in one short transaction as soon as both orders are in (its calls,
its vote if decided, the run's counters), so an interrupted run loses only what was in
flight, and the run's ledger always equals the sum of its calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Boolean, Float, bindparam, case, exists, insert
from sqlalchemy.orm import aliased
from sqlmodel import Session, col, select

from feedback_store.models import (
    Choice,
    Comparison,
    JudgeCall,
    JudgeRun,
    Prompt,
    Response,
    RunStatus,
    Vote,
    utcnow,
)


@dataclass(frozen=True)
class PairTexts:
    comparison_id: int
    conversation: list  # the prompt's chat messages
    text_a: str  # response_a (canonical order)
    text_b: str


@dataclass(frozen=True)
class CallRecord:
    """One request's outcome, as stored in JudgeCall."""

    comparison_id: int
    order: str  # "ab" or "ba"
    status: str
    verdict: Choice | None = None
    confidence: float | None = None
    raw_text: str | None = None
    error: str | None = None
    attempts: int = 1
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class Decision:
    """What a comparison's two calls add up to."""

    choice: Choice
    confidence: float | None
    inconsistent: bool
    rationale: str | None = None


def start_judge_run(
    rater_id: int, backend: str, model: str, template_version: str, config: dict, *, session: Session
) -> JudgeRun:
    run = JudgeRun(rater_id=rater_id, backend=backend, model=model, template_version=template_version, config=config)
    session.add(run)
    session.flush()
    return run


def comparisons_to_judge(
    rater_id: int, *, session: Session, limit: int | None = None, among: Sequence[int] | None = None
) -> list[int]:
    """Ids of comparisons this rater has not voted on, oldest first; only those `among`, if given
    (an evaluation judges its own pairs and nothing else)."""
    voted = exists().where(Vote.comparison_id == Comparison.id, Vote.rater_id == rater_id)
    if among is None:
        query = select(Comparison.id).where(~voted).order_by(Comparison.id)
        if limit is not None:
            query = query.limit(limit)
        return list(session.exec(query))
    wanted = sorted(set(among))
    found: list[int] = []
    for start in range(0, len(wanted), 900):  # bound parameters per IN (...), under every limit
        chunk = wanted[start : start + 900]
        found += session.exec(select(Comparison.id).where(~voted, col(Comparison.id).in_(chunk)))
    return sorted(found)[:limit] if limit is not None else sorted(found)


def load_pairs(comparison_ids: Sequence[int], *, session: Session) -> list[PairTexts]:
    """Prompt and response texts of these comparisons, in the order given."""
    response_a, response_b = aliased(Response), aliased(Response)
    rows = session.exec(
        select(Comparison.id, Prompt.messages, response_a.text, response_b.text)
        .join(Prompt, Prompt.id == Comparison.prompt_id)
        .join(response_a, response_a.id == Comparison.response_a_id)
        .join(response_b, response_b.id == Comparison.response_b_id)
        .where(col(Comparison.id).in_(list(comparison_ids)))
    ).all()
    by_id = {row[0]: PairTexts(row[0], list(row[1]), row[2], row[3]) for row in rows}
    return [by_id[i] for i in comparison_ids if i in by_id]


def reusable_calls(rater_id: int, *, session: Session) -> dict[tuple[int, str], CallRecord]:
    """Successful calls of this rater's earlier runs on comparisons it has not voted on yet
    (one order answered before an interruption or a failure of the other): not asked again."""
    voted = exists().where(Vote.comparison_id == JudgeCall.comparison_id, Vote.rater_id == rater_id)
    calls = session.exec(
        select(JudgeCall)
        .join(JudgeRun, JudgeRun.id == JudgeCall.judge_run_id)
        .where(JudgeRun.rater_id == rater_id, JudgeCall.status == "ok", ~voted)
        .order_by(JudgeCall.id)
    )
    return {
        (call.comparison_id, call.order): CallRecord(
            call.comparison_id, call.order, call.status, Choice(call.verdict), call.confidence,
            call.raw_text, None, call.attempts, 0, 0,  # already billed to the run that made it
        )
        for call in calls
    }


@dataclass(frozen=True)
class Judgement:
    """One comparison's outcome in a run: its new calls, its decision, whether to route it."""

    comparison_id: int
    new_calls: Sequence[CallRecord]
    decision: Decision | None
    failed: bool = False  # undecided because a call failed (not: interrupted half-way)
    doubt: bool = False  # raise its human-queue priority


def record_judgements(
    run_id: int,
    rater_id: int,
    judgements: Sequence[Judgement],
    *,
    session: Session,
    doubt_priority: int = 10,
    price_prompt: float | None = None,
    price_completion: float | None = None,
) -> int:
    """Store comparisons' calls and votes, route doubts, and add them to the run's ledger.

    A handful of set-based statements whatever the number of comparisons: the runner calls it
    with one comparison, or with all that finished while the previous write was committing
    (a group commit). A comparison the rater has already voted on (a concurrent run of the
    same judge) keeps its vote. Judge votes bypass `record_vote`'s human bookkeeping (queue
    counters, reservations, revision history): a judge votes once per comparison and never
    holds a reservation. Returns the number of votes inserted. Prices are per million tokens."""
    now = utcnow()
    connection = session.connection()  # Core statements: none of the ORM's per-row bookkeeping
    calls = [
        dict(
            judge_run_id=run_id, comparison_id=c.comparison_id, order=c.order, status=c.status,
            verdict=c.verdict.value if c.verdict is not None else None, confidence=c.confidence,
            raw_text=c.raw_text, error=c.error, attempts=c.attempts,
            prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens, created_at=now,
        )
        for j in judgements
        for c in j.new_calls
    ]
    if calls:
        connection.execute(_INSERT_CALLS, calls)
    decided = [j for j in judgements if j.decision is not None]
    votes = [
        dict(
            comparison_id=j.comparison_id, rater_id=rater_id, choice=j.decision.choice,
            confidence=j.decision.confidence, rationale=j.decision.rationale,
            revision=1, created_at=now, updated_at=now,
        )
        for j in decided
    ]
    inserted = 0
    if votes:
        inserted = connection.execute(_insert_ignoring_conflicts(connection, Vote.__table__).values(votes)).rowcount
    doubts = [j.comparison_id for j in judgements if j.doubt]
    if doubts:
        table = Comparison.__table__
        connection.execute(
            table.update().where(table.c.id.in_(doubts), table.c.priority < doubt_priority).values(priority=doubt_priority)
        )
    prompt_tokens = sum(c["prompt_tokens"] for c in calls)
    completion_tokens = sum(c["completion_tokens"] for c in calls)
    connection.execute(
        _UPDATE_LEDGER,
        dict(
            run_id=run_id,
            requests=len(calls),
            decided=len(decided),
            inconsistent=sum(j.decision.inconsistent for j in decided),
            failed=sum(j.failed for j in judgements),
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            priced=price_prompt is not None or price_completion is not None,
            price_prompt=(price_prompt or 0.0) / 1e6,
            price_completion=(price_completion or 0.0) / 1e6,
        ),
    )
    return inserted


def add_usage(
    run_id: int,
    *,
    requests: int,
    failed: int = 0,
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
    session: Session,
    price_prompt: float | None = None,
    price_completion: float | None = None,
) -> None:
    """Add judge calls that vote on no stored comparison (a training reward's) to a run's ledger:
    requests, failures, tokens and cost, as `record_judgements` counts them. Prices per 1M tokens."""
    session.connection().execute(
        _UPDATE_LEDGER,
        dict(
            run_id=run_id, requests=requests, decided=0, inconsistent=0, failed=failed,
            prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
            priced=price_prompt is not None or price_completion is not None,
            price_prompt=(price_prompt or 0.0) / 1e6,
            price_completion=(price_completion or 0.0) / 1e6,
        ),
    )


def _ledger_update():
    """One prepared statement adding a write's counts and tokens to its run (cost when priced)."""
    run = JudgeRun.__table__
    prompt_total = run.c.prompt_tokens + bindparam("prompt_tokens")
    completion_total = run.c.completion_tokens + bindparam("completion_tokens")
    new_cost = prompt_total * bindparam("price_prompt", type_=Float) + completion_total * bindparam(
        "price_completion", type_=Float
    )
    return (
        run.update()
        .where(run.c.id == bindparam("run_id"))
        .values(
            n_requests=run.c.n_requests + bindparam("requests"),
            n_decided=run.c.n_decided + bindparam("decided"),
            n_inconsistent=run.c.n_inconsistent + bindparam("inconsistent"),
            n_failed=run.c.n_failed + bindparam("failed"),
            prompt_tokens=prompt_total,
            completion_tokens=completion_total,
            cost=case((bindparam("priced", type_=Boolean), new_cost), else_=run.c.cost),
        )
    )


_INSERT_CALLS = insert(JudgeCall.__table__)
_UPDATE_LEDGER = _ledger_update()


def _insert_ignoring_conflicts(connection, table):
    dialect = connection.dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table).on_conflict_do_nothing()
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(table).on_conflict_do_nothing()
    return insert(table)


def finish_judge_run(run_id: int, status: RunStatus, *, session: Session) -> JudgeRun:
    run = session.get(JudgeRun, run_id)
    run.status = status
    run.finished_at = utcnow()
    session.add(run)
    session.flush()
    return run
