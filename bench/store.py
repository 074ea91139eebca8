"""Store throughput and queue latency, on SQLite and on PostgreSQL.

Goals: >= 2,000 votes/s from one writer on SQLite, zero errors with 16 concurrent writers,
`next_comparison_for` p95 below 10 ms with 100,000 comparisons in the database.

The database is filled with bulk inserts: 100,000 comparisons (10 pairs per prompt), every
one already holding 1-3 human votes by 50 background raters (about 2% closed at overlap 3).
Then, on the same database:

- votes/s: each vote is its own transaction (session_scope + record_vote) by a rater with a
  fresh comparison and its own idempotency key; every 10th call is a retry of the writer's
  previous vote (same key), which must return the original. 1 writer, then 16 threads.
  Errors = exceptions + votes missing or doubled afterwards.
- queue latency: 8 annotators in turn ask for their next pair (overlap 3), one transaction
  per call, then vote on it. Each already cast the only vote of 2,000 comparisons near the
  head of the queue; the first one's block is the head itself, so its requests must walk
  past 2,000 pairs it already judged (1 call in 8: that is what the p95 shows).

    .venv/bin/python bench/store.py [--votes 4000] [--writers 16] [--comparisons 100000]

PostgreSQL: a scratch database on the server at $PREFLOOP_BENCH_PG_URL or
$PREFLOOP_TEST_PG_URL (skipped with a note when neither is set).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import combinations

from rich.console import Console
from rich.progress import track
from rich.table import Table
from sqlalchemy import func, insert, select, text, update

from feedback_store.db import make_engine, session_scope, upgrade
from feedback_store.models import Comparison, PolicyVersion, Prompt, Rater, RaterKind, Response, Vote
from feedback_store.queue import next_comparison_for
from feedback_store.settings import normalize_db_url
from feedback_store.votes import record_vote

GOAL_VOTES_PER_S = 2000
GOAL_P95_MS = 10.0
RESPONSES_PER_PROMPT = 5  # 10 comparisons per prompt
BACKGROUND_RATERS = 50
OVERLAP = 3
RETRY_EVERY = 10
console = Console()


@dataclass(frozen=True)
class BenchConfig:
    votes: int = field(default=4000, metadata={"help": "record_vote calls per throughput run"})
    writers: int = field(default=16, metadata={"help": "concurrent writer threads"})
    comparisons: int = field(default=100_000, metadata={"help": "comparisons in the database"})
    samples: int = field(default=400, metadata={"help": "timed next_comparison_for calls"})
    queue_raters: int = field(default=8, metadata={"help": "annotators asking for work in turn"})
    head_votes: int = field(default=2000, metadata={"help": "queue-head votes each of them already cast"})


@dataclass
class BackendResult:
    single_writer: float = 0.0
    cpu_ms_per_vote: float = 0.0  # this process's CPU time per call, single writer
    multi_writer: float = 0.0
    errors: int = 0
    p50_ms: float = 0.0
    p95_ms: float = 0.0


# ---------------------------------------------------------------- fixtures (bulk, core inserts)


def fill(engine, config: BenchConfig) -> dict[str, list[int]]:
    """Bulk-insert prompts, responses, comparisons, raters and background votes; returns the
    rater ids of the writers and of the queue annotators."""
    now = datetime.now(timezone.utc)
    pairs = list(combinations(range(RESPONSES_PER_PROMPT), 2))
    n_prompts = -(-config.comparisons // len(pairs))
    writers = [f"writer{i}" for i in range(config.writers)]
    annotators = [f"annotator{i}" for i in range(config.queue_raters)]
    names = [f"background{i}" for i in range(BACKGROUND_RATERS)] + writers + annotators
    with session_scope(engine) as s:
        policies = [{"id": i + 1, "name": f"policy{i}", "base_model": "tiny", "created_at": now}
                    for i in range(RESPONSES_PER_PROMPT)]
        s.execute(insert(PolicyVersion), policies)
        s.execute(insert(Rater), [{"id": i + 1, "name": name, "kind": RaterKind.human, "weight": 1.0,
                                   "active": True, "created_at": now} for i, name in enumerate(names)])
    batch = 2000  # prompts per transaction
    comparison_id = 0
    for start in track(range(0, n_prompts, batch), description="bulk insert", console=console):
        prompts, responses, comparisons, votes = [], [], [], []
        for p in range(start, min(start + batch, n_prompts)):
            prompts.append({"id": p + 1, "messages": [{"role": "user", "content": f"prompt {p}"}],
                            "content_hash": f"bench-{p}", "source": "bench", "tags": [], "created_at": now})
            first = p * RESPONSES_PER_PROMPT + 1
            responses += [{"id": first + k, "prompt_id": p + 1, "policy_id": k + 1, "text": f"answer {p}/{k}",
                           "text_hash": f"{p}-{k}", "generation_params": {}, "created_at": now}
                          for k in range(RESPONSES_PER_PROMPT)]
            for a, b in pairs:
                if comparison_id == config.comparisons:
                    break
                comparison_id += 1
                # 1, 2 or 3 background votes: 58% / 40% / 2% (3 = closed at overlap 3).
                n_votes = 3 if comparison_id % 50 == 0 else 2 if comparison_id % 5 < 2 else 1
                comparisons.append({"id": comparison_id, "prompt_id": p + 1, "response_a_id": first + a,
                                    "response_b_id": first + b, "priority": 0, "human_votes": n_votes,
                                    "source": "bench", "created_at": now})
                votes += [{"comparison_id": comparison_id,
                           "rater_id": (comparison_id + k) % BACKGROUND_RATERS + 1,
                           "choice": "a", "revision": 1, "created_at": now, "updated_at": now}
                          for k in range(n_votes)]
        with session_scope(engine) as s:
            tables = ((Prompt, prompts), (Response, responses), (Comparison, comparisons), (Vote, votes))
            for model, rows in tables:
                s.execute(insert(model), rows)
    with session_scope(engine) as s:
        ids = dict(s.execute(select(Rater.name, Rater.id)).all())
        # Each annotator cast the single vote of its own block of comparisons at the head of
        # the queue: annotator0's block comes first, so its every request walks past it.
        head = s.execute(
            select(Comparison.id).where(Comparison.human_votes == 1).order_by(Comparison.id)
            .limit(config.head_votes * len(annotators))
        ).scalars().all()
        for i, name in enumerate(annotators):
            block = head[i * config.head_votes : (i + 1) * config.head_votes]
            s.execute(update(Vote).where(Vote.comparison_id.in_(block)).values(rater_id=ids[name]))
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("ANALYZE"))
    return {"writers": [ids[n] for n in writers], "annotators": [ids[n] for n in annotators]}


# ---------------------------------------------------------------- measurements


def free_comparisons(engine, n: int, offset: int) -> list[int]:
    """Comparison ids, from the back of the id range, that no writer has touched yet."""
    with session_scope(engine) as s:
        top = s.execute(select(func.max(Comparison.id))).scalar_one()
    return list(range(top - offset - n + 1, top - offset + 1))


def write_votes(engine, rater_id: int, comparison_ids: list[int], tag: str) -> tuple[int, int]:
    """One writer: a vote per comparison, each its own transaction, plus retries. Returns
    (calls, errors)."""
    calls = errors = 0
    previous = None
    for i, comparison_id in enumerate(comparison_ids):
        attempt = (previous if previous and i % RETRY_EVERY == RETRY_EVERY - 1 else
                   (comparison_id, f"{tag}-{rater_id}-{comparison_id}"))
        try:
            with session_scope(engine) as s:
                vote = record_vote(attempt[0], rater_id, "a", session=s, idempotency_key=attempt[1],
                                   strength=1, time_spent_ms=1500)
            errors += (vote.comparison_id, vote.rater_id) != (attempt[0], rater_id)
        except Exception as error:  # counted, reported once, the run goes on
            errors += 1
            console.print(f"[red]error[/red] {type(error).__name__}: {str(error).splitlines()[0]}")
        calls += 1
        previous = attempt
    return calls, errors


def throughput(engine, rater_ids: list[int], n_votes: int, offset: int, tag: str) -> tuple[float, float, int, int]:
    """votes/s with one thread per rater; returns (calls per second, CPU ms per call, errors,
    comparisons used)."""
    per_writer = n_votes // len(rater_ids)
    comparison_ids = free_comparisons(engine, per_writer * len(rater_ids), offset)
    shares = [comparison_ids[i :: len(rater_ids)] for i in range(len(rater_ids))]
    with session_scope(engine) as s:
        before = s.execute(select(func.count()).select_from(Vote)).scalar_one()
    start, cpu_start = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(len(rater_ids)) as pool:
        done = list(pool.map(write_votes, [engine] * len(rater_ids), rater_ids, shares, [tag] * len(rater_ids)))
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    calls, errors = map(sum, zip(*done))
    expected_new = sum(len(share) - len(range(RETRY_EVERY - 1, len(share), RETRY_EVERY)) for share in shares)
    with session_scope(engine) as s:
        after = s.execute(select(func.count()).select_from(Vote)).scalar_one()
    if after - before != expected_new:
        console.print(f"[red]{after - before} votes stored, {expected_new} expected[/red]")
        errors += abs(after - before - expected_new)
    return calls / elapsed, cpu / calls * 1000, errors, len(comparison_ids)


def queue_latency(engine, annotators: list[int], samples: int) -> tuple[float, float, int]:
    """Latency of next_comparison_for (its whole transaction) in ms: (p50, p95, errors)."""
    timings, errors = [], 0
    for i in range(samples):
        rater_id = annotators[i % len(annotators)]
        start = time.perf_counter()
        with session_scope(engine) as s:
            assignment = next_comparison_for(rater_id, session=s, overlap=OVERLAP)
        timings.append((time.perf_counter() - start) * 1000)
        if assignment is None:
            errors += 1
            continue
        with session_scope(engine) as s:
            record_vote(assignment.comparison_id, rater_id, "tie", session=s,
                        left_response_id=assignment.left_response_id)
    timings.sort()
    return statistics.median(timings), timings[int(0.95 * (len(timings) - 1))], errors


def run_backend(url: str, config: BenchConfig) -> BackendResult:
    upgrade(url)
    engine = make_engine(url)
    try:
        started = time.perf_counter()
        raters = fill(engine, config)
        console.print(f"  filled in {time.perf_counter() - started:.1f} s")
        result = BackendResult()
        # Warm up the pool, caches and statement cache before timing.
        throughput(engine, raters["writers"][:1], 200, offset=0, tag="warmup")
        result.single_writer, result.cpu_ms_per_vote, errors_1, used = throughput(
            engine, raters["writers"][:1], config.votes, 200, "one"
        )
        console.print(f"  1 writer:  {result.single_writer:,.0f} votes/s "
                      f"({result.cpu_ms_per_vote:.2f} ms CPU each), {errors_1} errors")
        result.multi_writer, _, errors_n, _ = throughput(
            engine, raters["writers"], config.votes, 200 + used, "many"
        )
        console.print(f"  {config.writers} writers: {result.multi_writer:,.0f} votes/s, {errors_n} errors")
        result.p50_ms, result.p95_ms, errors_q = queue_latency(engine, raters["annotators"], config.samples)
        console.print(f"  next_comparison_for: p50 {result.p50_ms:.2f} ms, p95 {result.p95_ms:.2f} ms")
        result.errors = errors_1 + errors_n + errors_q
        return result
    finally:
        engine.dispose()


@contextmanager
def scratch_postgres(server_url: str):
    admin = make_engine(normalize_db_url(server_url)).execution_options(isolation_level="AUTOCOMMIT")
    name = f"prefloop_bench_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield normalize_db_url(server_url).rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, f in BenchConfig.__dataclass_fields__.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=f.default, help=f.metadata["help"])
    config = BenchConfig(**vars(parser.parse_args()))
    pg_server = os.environ.get("PREFLOOP_BENCH_PG_URL") or os.environ.get("PREFLOOP_TEST_PG_URL")

    results: dict[str, BackendResult] = {}
    with tempfile.TemporaryDirectory() as tmp:
        console.print("[bold]SQLite[/bold] (WAL, BEGIN IMMEDIATE)")
        results["sqlite"] = run_backend(f"sqlite:///{tmp}/bench.db", config)
    if pg_server:
        console.print("[bold]PostgreSQL[/bold]")
        with scratch_postgres(pg_server) as url:
            results["pg"] = run_backend(url, config)
    else:
        console.print("PostgreSQL skipped: set PREFLOOP_BENCH_PG_URL or PREFLOOP_TEST_PG_URL")

    sqlite, pg = results["sqlite"], results.get("pg")
    table = Table(title=f"store: {config.comparisons:,} comparisons, {config.writers} writers")
    for column in ("measure", "SQLite", "PostgreSQL", "goal", "SQLite / goal"):
        table.add_column(column, justify="right")
    na = "skipped"
    table.add_row("votes/s, 1 writer", f"{sqlite.single_writer:,.0f}", f"{pg.single_writer:,.0f}" if pg else na,
                  f">= {GOAL_VOTES_PER_S:,}", f"{sqlite.single_writer / GOAL_VOTES_PER_S:.2f}")
    table.add_row(f"votes/s, {config.writers} writers", f"{sqlite.multi_writer:,.0f}",
                  f"{pg.multi_writer:,.0f}" if pg else na, "", "")
    table.add_row("CPU ms per vote, 1 writer", f"{sqlite.cpu_ms_per_vote:.2f}",
                  f"{pg.cpu_ms_per_vote:.2f}" if pg else na, "", "")
    table.add_row("errors", str(sqlite.errors), str(pg.errors) if pg else na, "0", "")
    table.add_row("next_comparison_for p50 ms", f"{sqlite.p50_ms:.2f}", f"{pg.p50_ms:.2f}" if pg else na, "", "")
    table.add_row("next_comparison_for p95 ms", f"{sqlite.p95_ms:.2f}", f"{pg.p95_ms:.2f}" if pg else na,
                  f"< {GOAL_P95_MS:g}", f"{sqlite.p95_ms / GOAL_P95_MS:.2f}")
    console.print(table)
    # Wall-clock rates depend on what else the machine runs; the load says how shared it was.
    load = os.getloadavg()[0]
    console.print(f"load average {load:.1f} on {os.cpu_count()} CPUs: "
                  "wall-clock rates scale with the CPU share this process got")
    errors = sum(r.errors for r in results.values())
    pg_writes = (f"pg_1w={pg.single_writer:.0f} pg_16w={pg.multi_writer:.0f}" if pg
                 else "pg_1w=skipped pg_16w=skipped")
    pg_queue = f" pg_next_p50_ms={pg.p50_ms:.2f} pg_next_p95_ms={pg.p95_ms:.2f}" if pg else ""
    print(f"RESULT store ratio={sqlite.single_writer / GOAL_VOTES_PER_S:.2f} sqlite_1w={sqlite.single_writer:.0f} "
          f"sqlite_16w={sqlite.multi_writer:.0f} {pg_writes} errors={errors} "
          f"next_p50_ms={sqlite.p50_ms:.2f} next_p95_ms={sqlite.p95_ms:.2f}{pg_queue} "
          f"sqlite_cpu_ms_per_vote={sqlite.cpu_ms_per_vote:.2f} load={load:.1f}")


if __name__ == "__main__":
    main()
