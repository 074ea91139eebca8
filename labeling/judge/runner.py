"""Judge every stored comparison a judge rater has not voted on yet, in both orders.

    summary = run_judge(engine, backend, JudgeRunConfig(concurrency=64))

Each comparison is asked twice, once with response_a shown first ("ab") and once with
response_b first ("ba"). Agreement gives the verdict; disagreement is recorded as a tie
marked inconsistent (the judge was swayed by position). A call whose verdict cannot be
read is a parse failure, stored with the raw text, and the comparison stays undecided.

`concurrency` workers pull requests from a bounded queue, so at most that many are in
flight and memory does not grow with the number of comparisons. A comparison goes to the
store within `write_interval_s` (50 ms) of its second answer, in one short transaction with
the others finished meanwhile, while the requests go on. On
Ctrl-C or SIGTERM the workers stop, every answered call is still written, and the run is
marked aborted: only requests in flight are lost. A rerun skips voted comparisons and
reuses answered orders of undecided ones, so nothing is asked twice.

Judge-first (`judge_first`): a comparison the judge decided with confidence counts as
labelled and leaves the human queue (`comparison.settled_by`, written with its vote), so only
doubtful pairs reach people. Confident: both orders name the same winner, A or B (a tie,
agreed or from orders that disagree, is left to people), and, where the backend gives
logprobs, the verdict's confidence (the mean of the two orders', as stored on the vote) is at
least `judge_first_threshold`. A rerun with judge-first also settles what this judge decided
confidently in earlier runs. A human vote on a settled pair (one reserved before it was
settled) is stored and counted as usual. `route_doubts` works as before, with or without it.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from sqlalchemy.engine import Engine

from feedback_store.db import session_scope
from feedback_store.judge_runs import (
    CallRecord,
    Decision,
    Judgement,
    PairTexts,
    comparisons_to_judge,
    finish_judge_run,
    load_pairs,
    record_judgements,
    reusable_calls,
    start_judge_run,
)
from feedback_store.models import Choice, JudgeRun, RunStatus
from feedback_store.queue import settle_comparisons, settle_judge_votes
from feedback_store.raters import get_or_create_judge
from labeling.judge.backends import JudgeBackend, JudgeCallError, JudgeRequest
from labeling.judge.parsing import ORDERS, VerdictParseError, parse_verdict, to_choice, verdict_confidence
from labeling.judge.ratelimit import RateLimiter
from labeling.judge.templates import DEFAULT_TEMPLATE, get_template

RULE_TEMPLATE_VERSION = "rule"  # rubric judges use no prompt template


@dataclass(frozen=True)
class JudgeRunConfig:
    template: str = field(default=DEFAULT_TEMPLATE, metadata={"help": "prompt template id (see `prefloop judge --list-templates`)"})
    criteria: str | None = field(default=None, metadata={"help": "judging criteria / short constitution replacing the template's default"})
    concurrency: int | None = field(default=None, metadata={"help": "requests in flight; unset: what the backend prefers"})
    rpm: float | None = field(default=None, metadata={"help": "at most this many requests per minute"})
    tpm: float | None = field(default=None, metadata={"help": "at most this many tokens per minute (estimated before, settled after)"})
    limit: int | None = field(default=None, metadata={"help": "judge at most this many comparisons"})
    comparison_ids: tuple[int, ...] | None = field(
        default=None, metadata={"help": "judge only these comparisons (an evaluation's pairs); None = every one"}
    )
    price_prompt: float | None = field(default=None, metadata={"help": "price per 1M prompt tokens"})
    price_completion: float | None = field(default=None, metadata={"help": "price per 1M completion tokens"})
    route_doubts: bool = field(default=False, metadata={"help": "raise the human-queue priority of inconsistent or low-confidence comparisons"})
    doubt_confidence: float = field(default=0.75, metadata={"help": "a verdict below this confidence counts as a doubt"})
    doubt_priority: int = field(default=10, metadata={"help": "queue priority given to doubtful comparisons"})
    judge_first: bool = field(default=False, metadata={"help": (
        "a pair the judge decided with confidence (both orders name the same winner and, where logprobs give "
        "one, confidence >= --judge-first-threshold) counts as labelled and leaves the human queue: only "
        "doubtful pairs reach people")})
    judge_first_threshold: float = field(default=0.8, metadata={"help": (
        "judge-first: the least confidence (0-1, from logprobs) of a verdict that settles a pair; "
        "verdicts without logprobs settle on agreement alone")})
    page_size: int = field(default=256, metadata={"help": "comparisons loaded from the store at a time"})
    write_interval_s: float = field(default=0.05, metadata={"help": "finished comparisons are written at most this long after their answer"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self) -> None:
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1 (got {self.concurrency})")
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"limit must not be negative (got {self.limit})")
        if not 0.0 <= self.judge_first_threshold <= 1.0:
            raise ValueError(f"judge_first_threshold must be between 0 and 1 (got {self.judge_first_threshold})")
        for name in ("rpm", "tpm", "price_prompt", "price_completion", "write_interval_s"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must not be negative (got {value})")


@dataclass(frozen=True)
class JudgeRunSummary:
    run_id: int
    rater: str
    status: str
    comparisons: int  # undecided comparisons this run set out to judge
    requests: int  # judge calls made (one per comparison and order)
    attempts: int  # HTTP attempts, retries included
    decided: int
    inconsistent: int
    failed: int  # comparisons left undecided by a failed call
    doubts: int  # comparisons routed to humans
    settled: int  # judge-first: comparisons taken out of the human queue (earlier runs' included)
    failures: dict  # call status -> count
    prompt_tokens: int
    completion_tokens: int
    cost: float | None
    elapsed_s: float

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class _Plan:
    run_id: int
    rater_id: int
    rater: str
    pending: list[int]
    reused: dict[tuple[int, str], CallRecord]
    settled_before: int = 0  # judge-first: earlier confident votes of this judge, settled now


def decide(calls: Mapping[str, CallRecord]) -> Decision | None:
    """Both orders agree: that verdict. They disagree: an inconsistent tie. A failure: undecided."""
    ab, ba = calls["ab"], calls["ba"]
    if ab.status != "ok" or ba.status != "ok":
        return None
    if ab.verdict == ba.verdict:
        known = [c.confidence for c in (ab, ba) if c.confidence is not None]
        return Decision(ab.verdict, sum(known) / len(known) if known else None, inconsistent=False)
    return Decision(
        Choice.tie,
        None,
        inconsistent=True,
        rationale=f"inconsistent across orders: {ab.verdict.value} with a shown first, {ba.verdict.value} with b shown first",
    )


def is_confident(decision: Decision | None, threshold: float) -> bool:
    """Judge-first: does this decision settle its pair? Both orders named the same winner (A or
    B; ties go to people) and its confidence, where known, is at least `threshold`."""
    if decision is None or decision.inconsistent or decision.choice not in (Choice.a, Choice.b):
        return False
    return decision.confidence is None or decision.confidence >= threshold


def is_doubt(decision: Decision | None, threshold: float) -> bool:
    if decision is None:
        return False
    return decision.inconsistent or (decision.confidence is not None and decision.confidence < threshold)


def run_judge(engine: Engine, backend: JudgeBackend, config: JudgeRunConfig = JudgeRunConfig()) -> JudgeRunSummary:
    """Run to the end, or until Ctrl-C/SIGTERM: the summary's status says which ("done"/"aborted")."""
    plan, stats = _prepare(engine, backend, config), _Stats()
    started = time.monotonic()
    try:
        asyncio.run(_execute(engine, backend, config, plan, stats, handle_sigterm=True))
    except (KeyboardInterrupt, asyncio.CancelledError):  # Ctrl-C, or SIGTERM (cancels the main task)
        pass  # the run is stored as aborted; the summary says so
    return _summarize(engine, plan, stats, time.monotonic() - started)


async def judge_comparisons(
    engine: Engine, backend: JudgeBackend, config: JudgeRunConfig = JudgeRunConfig()
) -> JudgeRunSummary:
    """`run_judge` for callers already inside an event loop: cancelling it aborts the run (the
    caller's own signal handling is left alone)."""
    plan, stats = await asyncio.to_thread(_prepare, engine, backend, config), _Stats()
    started = time.monotonic()
    await _execute(engine, backend, config, plan, stats, handle_sigterm=False)
    return _summarize(engine, plan, stats, time.monotonic() - started)


def _prepare(engine: Engine, backend: JudgeBackend, config: JudgeRunConfig) -> _Plan:
    template = get_template(config.template)
    version = template.version_id(config.criteria) if backend.uses_template else RULE_TEMPLATE_VERSION
    skipped = ("progress", "page_size", "write_interval_s", "comparison_ids")  # the calls name their comparisons
    settings = {k: v for k, v in asdict(config).items() if k not in skipped}
    settings["concurrency"] = config.concurrency or backend.preferred_concurrency
    with session_scope(engine) as session:
        rater = get_or_create_judge(backend.model_id, version, session=session)
        pending = comparisons_to_judge(rater.id, session=session, limit=config.limit, among=config.comparison_ids)
        wanted = set(pending)
        reused = {key: call for key, call in reusable_calls(rater.id, session=session).items() if key[0] in wanted}
        run = start_judge_run(rater.id, backend.kind, backend.model_id, version, settings, session=session)
        settled_before = 0
        if config.judge_first:
            settled_before = settle_judge_votes(
                rater.id, session=session, threshold=config.judge_first_threshold, among=config.comparison_ids
            )
        return _Plan(run.id, rater.id, rater.name, pending, reused, settled_before)


@dataclass
class _Stats:
    attempts: int = 0
    doubts: int = 0
    settled: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    failures: Counter = field(default_factory=Counter)  # call status -> count
    outcomes: Counter = field(default_factory=Counter)  # decided / inconsistent / failed comparisons


def _summarize(engine: Engine, plan: _Plan, stats: _Stats, elapsed: float) -> JudgeRunSummary:
    with session_scope(engine) as session:
        run = session.get(JudgeRun, plan.run_id)
        return JudgeRunSummary(
            run_id=run.id,
            rater=plan.rater,
            status=run.status.value,
            comparisons=len(plan.pending),
            requests=run.n_requests,
            attempts=stats.attempts,
            decided=run.n_decided,
            inconsistent=run.n_inconsistent,
            failed=run.n_failed,
            doubts=stats.doubts,
            settled=plan.settled_before + stats.settled,
            failures=dict(stats.failures),
            prompt_tokens=run.prompt_tokens,
            completion_tokens=run.completion_tokens,
            cost=run.cost,
            elapsed_s=elapsed,
        )


class _StoreWriter:
    """Stores finished comparisons from the event loop, at most `write_interval_s` after
    they are handed over.

    The first comparison handed over schedules a write that interval later; everything that
    finished meanwhile goes into that one transaction. Per comparison a transaction costs
    more CPU than the whole request does, and CPU on the loop delays every other request in
    flight: grouping 50 ms worth cut the client's CPU per request by a third. A comparison's
    calls, vote and ledger entry land together or not at all; Ctrl-C and SIGTERM write what
    is pending, only a hard kill can lose the last interval's answers (asked again on rerun).

    Why on the loop and not in a thread: SQLite writes cost ~1 ms of CPU and do no waiting
    worth overlapping, while a writer thread makes the event loop wait for the GIL at every
    system call it makes (measured: the loop stalled for ~1.5 ms per request at 64 in flight)."""

    def __init__(self, engine: Engine, plan: _Plan, config: JudgeRunConfig):
        self._engine, self._plan, self._config = engine, plan, config
        self._pending: list[Judgement] = []
        self._settle: list[int] = []  # judge-first: pending comparisons that leave the human queue
        self._scheduled = False
        self.error: BaseException | None = None
        self.transactions = 0

    def submit(self, comparison_id: int, calls: Mapping[str, CallRecord], decision: Decision | None,
               *, failed: bool, doubt: bool = False, settle: bool = False) -> None:
        new = [c for order, c in sorted(calls.items()) if (comparison_id, order) not in self._plan.reused]
        self._pending.append(Judgement(comparison_id, new, decision, failed=failed, doubt=doubt))
        if settle:
            self._settle.append(comparison_id)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_later(self._config.write_interval_s, self.flush)

    def flush(self) -> None:
        self._scheduled = False
        group, self._pending = self._pending, []
        settle, self._settle = self._settle, []
        if not group or self.error is not None:  # after a failure, stop writing: the run reports it
            return
        try:
            with session_scope(self._engine) as session:
                record_judgements(
                    self._plan.run_id,
                    self._plan.rater_id,
                    group,
                    session=session,
                    doubt_priority=self._config.doubt_priority,
                    price_prompt=self._config.price_prompt,
                    price_completion=self._config.price_completion,
                )
                if settle:  # with its vote, in the same transaction
                    settle_comparisons(settle, self._plan.rater_id, session=session)
            self.transactions += 1
        except Exception as error:  # noqa: BLE001 - raised by the workers and at the end
            self.error = error


def _progress(config: JudgeRunConfig, total: int):
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task) -> Text:
            return Text(f"{task.speed:.1f} req/s" if task.speed else "- req/s", style="progress.data.speed")

    progress = Progress(
        TextColumn("judging"),
        BarColumn(bar_width=24),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=Console(stderr=True),
        disable=not config.progress,
    )
    task = progress.add_task("judge", total=total, status="")
    return progress, task


async def _execute(
    engine: Engine, backend: JudgeBackend, config: JudgeRunConfig, plan: _Plan, stats: _Stats, *, handle_sigterm: bool
) -> None:
    template = get_template(config.template)
    concurrency = config.concurrency or backend.preferred_concurrency
    limiter = RateLimiter(config.rpm, config.tpm)
    answered: dict[int, dict[str, CallRecord]] = {}  # comparisons with an order still to come
    work: asyncio.Queue = asyncio.Queue(maxsize=2 * concurrency)
    writer = _StoreWriter(engine, plan, config)
    total = 2 * len(plan.pending) - len(plan.reused)
    progress, task = _progress(config, total)

    def finish(comparison_id: int, calls: dict[str, CallRecord]) -> None:
        decision = decide(calls)
        doubt = config.route_doubts and is_doubt(decision, config.doubt_confidence)
        settle = config.judge_first and is_confident(decision, config.judge_first_threshold)
        stats.doubts += int(doubt)
        stats.settled += int(settle)
        stats.outcomes["decided" if decision else "failed"] += 1
        stats.outcomes["inconsistent"] += int(bool(decision and decision.inconsistent))
        writer.submit(comparison_id, calls, decision, failed=decision is None, doubt=doubt, settle=settle)

    async def call(pair: PairTexts, order: str) -> CallRecord:
        first, second = (pair.text_a, pair.text_b) if order == "ab" else (pair.text_b, pair.text_a)
        messages = template.render(pair.conversation, first, second, config.criteria) if backend.uses_template else []
        request = JudgeRequest(pair.conversation, first, second, messages)
        estimate = sum(len(m["content"]) for m in messages) // 4 + backend.max_output_tokens
        await limiter.acquire(estimate)
        base = {"comparison_id": pair.comparison_id, "order": order}
        try:
            reply = await backend.judge(request)
        except JudgeCallError as error:
            limiter.settle(estimate, error.prompt_tokens + error.completion_tokens)
            stats.attempts += error.attempts
            stats.prompt_tokens += error.prompt_tokens
            stats.completion_tokens += error.completion_tokens
            return CallRecord(**base, status=error.status, raw_text=error.raw_text, error=error.reason,
                              attempts=error.attempts, prompt_tokens=error.prompt_tokens,
                              completion_tokens=error.completion_tokens)
        limiter.settle(estimate, reply.prompt_tokens + reply.completion_tokens)
        stats.attempts += reply.attempts
        stats.prompt_tokens += reply.prompt_tokens
        stats.completion_tokens += reply.completion_tokens
        usage = {"attempts": reply.attempts, "prompt_tokens": reply.prompt_tokens,
                 "completion_tokens": reply.completion_tokens, "raw_text": reply.text}
        try:
            verdict = parse_verdict(reply.text, truncated=reply.truncated)
        except VerdictParseError as error:
            return CallRecord(**base, status="parse_error", error=error.reason, **usage)
        confidence = verdict_confidence(reply.text, verdict, reply.logprobs)
        return CallRecord(**base, status="ok", verdict=to_choice(verdict.letter, order), confidence=confidence, **usage)

    async def produce() -> None:
        for start in range(0, len(plan.pending), config.page_size):
            page = plan.pending[start : start + config.page_size]
            for pair in _load_pairs(engine, page):  # a few ms: not worth a thread (see _StoreWriter)
                known = {o: plan.reused[(pair.comparison_id, o)] for o in ORDERS if (pair.comparison_id, o) in plan.reused}
                if len(known) == len(ORDERS):
                    finish(pair.comparison_id, known)
                    continue
                answered[pair.comparison_id] = known
                for order in ORDERS:
                    if order not in known:
                        await work.put((pair, order))
        for _ in range(concurrency):
            await work.put(None)

    async def consume() -> None:
        while (item := await work.get()) is not None:
            pair, order = item
            record = await call(pair, order)
            if record.status != "ok":
                stats.failures[record.status] += 1
            calls = answered[pair.comparison_id]
            calls[order] = record
            if len(calls) == len(ORDERS):
                del answered[pair.comparison_id]
                finish(pair.comparison_id, calls)
            if writer.error is not None:
                raise writer.error
            progress.update(task, advance=1, status=_status_line(stats, config))

    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    sigterm = handle_sigterm and _on_sigterm(loop, main.cancel if main else None)
    status = RunStatus.failed
    progress.start()
    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(produce())
            for _ in range(concurrency):
                group.create_task(consume())
        status = RunStatus.done
    except (asyncio.CancelledError, KeyboardInterrupt):
        status = RunStatus.aborted
        raise
    finally:
        progress.stop()
        if sigterm:
            loop.remove_signal_handler(signal.SIGTERM)
        # Answered orders of comparisons still waiting for their other order: keep them.
        for comparison_id, calls in answered.items():
            if calls:
                writer.submit(comparison_id, calls, None, failed=False)
        writer.flush()
        _finish(engine, plan.run_id, RunStatus.failed if writer.error is not None else status)
        await backend.aclose()
    if writer.error is not None:
        raise writer.error


def _load_pairs(engine: Engine, ids: list[int]) -> list[PairTexts]:
    with session_scope(engine) as session:
        return load_pairs(ids, session=session)


def _finish(engine: Engine, run_id: int, status: RunStatus) -> None:
    with session_scope(engine) as session:
        finish_judge_run(run_id, status, session=session)


def _on_sigterm(loop: asyncio.AbstractEventLoop, cancel) -> bool:
    """Treat SIGTERM (`kill`) like Ctrl-C while the run lasts, where this thread may set handlers."""
    if cancel is None or threading.current_thread() is not threading.main_thread():
        return False
    try:
        loop.add_signal_handler(signal.SIGTERM, cancel)
    except (NotImplementedError, RuntimeError, ValueError):
        return False
    return True


def _status_line(stats: _Stats, config: JudgeRunConfig) -> str:
    o = stats.outcomes
    line = f"decided {o['decided']} (inconsistent {o['inconsistent']})  failed {o['failed']}"
    line += f"  tokens {stats.prompt_tokens + stats.completion_tokens}"
    if config.price_prompt is not None or config.price_completion is not None:
        cost = stats.prompt_tokens * (config.price_prompt or 0) + stats.completion_tokens * (config.price_completion or 0)
        line += f"  cost {cost / 1e6:.4f}"
    return line
