"""Concurrent writers for the concurrency tests: threads inside the test process and inside
spawned processes, each process building its own engine from the URL.

Kept apart from the test module so a spawned child imports only the store, not pytest's world.
"""

from __future__ import annotations

import multiprocessing
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass

from sqlalchemy.engine import Engine

from feedback_store.db import make_engine, session_scope
from feedback_store.queue import next_comparison_for
from feedback_store.votes import record_vote

START_MARGIN_S = 0.5  # time for every process to connect before the common start
RUN_TIMEOUT_S = 120


@dataclass(frozen=True)
class VoteTask:
    """One attempt to record a vote: several tasks may target the same (comparison, rater)."""

    comparison_id: int
    rater_id: int
    choice: str
    key: str | None


@dataclass(frozen=True)
class QueueTask:
    """One rater asking for work until the queue runs dry, voting on every other pair it gets."""

    rater_id: int
    vote_every: int = 2


def run_vote(engine: Engine, task: VoteTask) -> tuple:
    with session_scope(engine) as session:
        vote = record_vote(task.comparison_id, task.rater_id, task.choice, session=session,
                           idempotency_key=task.key)
        return (task, vote.id, vote.comparison_id, vote.rater_id)


def run_queue(engine: Engine, task: QueueTask) -> tuple:
    """Returns (task, comparison ids handed out to this rater, in order)."""
    handed: list[int] = []
    while True:
        with session_scope(engine) as session:
            assignment = next_comparison_for(task.rater_id, session=session, exclude=handed)
            if assignment is None:
                return (task, handed)
            handed.append(assignment.comparison_id)
            if len(handed) % task.vote_every == 0:
                record_vote(assignment.comparison_id, task.rater_id, "a", session=session,
                            left_response_id=assignment.left_response_id)


RUNNERS: dict[type, Callable[[Engine, object], tuple]] = {VoteTask: run_vote, QueueTask: run_queue}


def run_share(url: str, tasks: Sequence, n_threads: int, start_at: float) -> tuple[list, list[str]]:
    """Run tasks on n_threads threads sharing one engine, from wall-clock time `start_at` on;
    returns (results, formatted errors)."""
    engine = make_engine(url)
    try:
        with engine.connect():  # connect before the start line, so everyone starts together
            pass
        time.sleep(max(0.0, start_at - time.time()))
        with ThreadPoolExecutor(n_threads) as pool:
            futures = [pool.submit(RUNNERS[type(task)], engine, task) for task in tasks]
        results, errors = [], []
        for future in futures:
            try:
                results.append(future.result())
            except Exception:  # every error is a test failure; report them all
                errors.append(traceback.format_exc())
        return results, errors
    finally:
        engine.dispose()


def start_process_pool(processes: int) -> ProcessPoolExecutor:
    """Spawned (not forked) worker processes, started now so that later runs start at once."""
    pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"))
    # Jobs that overlap in time make the pool start every worker (it spawns when none is idle).
    list(pool.map(time.sleep, [1.0] * processes))
    return pool


def run_everywhere(
    url: str, tasks: Sequence, *, pool: ProcessPoolExecutor, processes: int, threads: int
) -> tuple[list, list[str]]:
    """Split tasks over the pool's `processes` processes plus this one, each running `threads`
    threads, all starting at the same moment; returns every result and every error."""
    shares = [list(tasks[i :: processes + 1]) for i in range(processes + 1)]
    start_at = time.time() + START_MARGIN_S
    children = [pool.submit(run_share, url, share, threads, start_at) for share in shares[1:]]
    results, errors = run_share(url, shares[0], threads, start_at)
    for child in children:
        child_results, child_errors = child.result(timeout=RUN_TIMEOUT_S)
        results += child_results
        errors += child_errors
    return results, errors
