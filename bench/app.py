"""Many annotators at once against a real `prefloop serve`: no vote lost or doubled, and the
vote round trip next to the bare `record_vote` call.

A temporary SQLite store gets N users and enough pairs for N x V votes; `prefloop serve`
runs in a subprocess; N simulated annotators (one asyncio task and HTTP client each, signed
in as their own user) open the page's pair and, once all are in, vote V times through the
app's HTTP API exactly as the page's buttons do, pausing a random "think time" (mean 1 s,
some ten times faster than people read two answers) before each vote. A share of the
submissions is sent twice at once (a double click). Afterwards every acknowledged
idempotency key must be in the store exactly once and nothing else. The bare call is
`record_vote` in its own transaction on an identically seeded store, in this process, with
no server.

    .venv/bin/python bench/app.py                 # 50 annotators x 40 votes
    .venv/bin/python bench/app.py --think-ms 0    # closed loop: a stress figure, not a human pace
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from rich.progress import Progress

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlmodel import select  # noqa: E402

from feedback_store.app_settings import set_target_overlap  # noqa: E402
from feedback_store.db import engine_for, session_scope  # noqa: E402
from feedback_store.models import Vote  # noqa: E402
from feedback_store.queue import next_comparison_for  # noqa: E402
from feedback_store.raters import get_rater  # noqa: E402
from feedback_store.votes import record_vote  # noqa: E402
from tests.app_support import migrated_sqlite, seed_pairs, seed_users, start_serve  # noqa: E402
from tests.page_client import KEY, SIDES, STATUS, PageSession  # noqa: E402

GOAL_P95_MS = 150.0


@dataclass
class Annotator:
    name: str
    saved_keys: list[str] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


async def annotate(
    url: str,
    who: Annotator,
    votes: int,
    think_s: float,
    double_rate: float,
    rng: random.Random,
    progress,
    everyone_in: asyncio.Barrier,
) -> None:
    """Sign in and open the page; once all annotators have (the barrier), vote `votes` times."""
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(
        base_url=url, timeout=timeout, cookie_jar=aiohttp.CookieJar(unsafe=True)
    ) as client:
        page = PageSession(client, f"bench-{who.name}")
        key = None
        if await page.start(who.name):
            [(event, outputs)] = await page.events("open_pairs")
            key = outputs[KEY] if event == "complete" else None
        else:
            who.errors.append("could not sign in")
        await everyone_in.wait()
        attempts = 0
        while len(who.saved_keys) < votes and isinstance(key, str) and key and attempts < 3 * votes:
            attempts += 1
            await asyncio.sleep(rng.uniform(0, 2 * think_s))
            copies = 2 if rng.random() < double_rate else 1
            started = time.perf_counter()
            results = await page.events(
                f"vote_{rng.choice(SIDES)}", key, None, "", "", copies=copies
            )
            elapsed_ms = (time.perf_counter() - started) * 1000
            saved = [r for r in results if r[0] == "complete" and "Saved" in r[1][STATUS]]
            if len(saved) != 1:
                who.errors.append(f"{len(saved)} saves for one submission: {str(results)[:300]}")
            if saved:
                who.latencies_ms.append(elapsed_ms)
                who.saved_keys.append(key)
                progress()
            last = next((r for r in reversed(results) if r[0] == "complete"), None)
            if last is None:
                break
            key = last[1][KEY] if isinstance(last[1][KEY], str) else key


def bare_record_vote(url: str, users: list[str], votes: int) -> list[float]:
    """The store call alone: reserve a pair and record the vote, each in its own transaction."""
    engine = engine_for(url)
    with session_scope(engine) as session:
        ids = [get_rater(name, session=session).id for name in users]
    timings = []
    rng = random.Random(1)
    for _ in range(votes):
        for rater_id in ids:
            with session_scope(engine) as session:
                assignment = next_comparison_for(rater_id, session=session)
                comparison_id, left = assignment.comparison_id, assignment.left_response_id
            started = time.perf_counter()
            with session_scope(engine) as session:
                record_vote(
                    comparison_id,
                    rater_id,
                    rng.choice(("a", "b", "tie", "both_bad")),
                    session=session,
                    left_response_id=left,
                    idempotency_key=f"bare-{rater_id}-{comparison_id}",
                )
            timings.append((time.perf_counter() - started) * 1000)
    return timings


def seed(url: str, users: list[str], pairs: int, overlap: int) -> None:
    engine = engine_for(url)
    seed_users(engine, users)
    seed_pairs(engine, pairs)
    with session_scope(engine) as session:
        set_target_overlap(overlap, session=session)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--annotators", type=int, default=50)
    parser.add_argument("--votes", type=int, default=40, help="votes per annotator")
    parser.add_argument(
        "--think-ms",
        type=float,
        default=1000.0,
        help="mean pause between an annotator's votes (uniform 0..2x); 0 = closed loop",
    )
    parser.add_argument(
        "--double-rate", type=float, default=0.05, help="share of submissions sent twice at once"
    )
    parser.add_argument("--overlap", type=int, default=5, help="target human votes per pair")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    users = [f"annotator{i:02d}" for i in range(args.annotators)]
    total = args.annotators * args.votes
    pairs = total // args.overlap + args.votes * 2  # room to spare: reservations hold some pairs
    root = Path(tempfile.mkdtemp(prefix="prefloop-bench-app-"))
    print(
        f"store: {root}; {args.annotators} annotators x {args.votes} votes, {pairs} pairs, overlap {args.overlap}, "
        f"think {args.think_ms:.0f} ms mean, {args.double_rate:.0%} double submissions"
    )

    bare_url = migrated_sqlite(root / "bare.db")
    seed(bare_url, users, pairs, args.overlap)
    bare = bare_record_vote(bare_url, users, args.votes)

    url = migrated_sqlite(root / "app.db")
    seed(url, users, pairs, args.overlap)
    server = start_serve(url, root)
    annotators = [Annotator(name) for name in users]
    try:
        with Progress() as bar:
            task = bar.add_task("votes", total=total)

            async def run_all() -> float:
                # Sign-in (scrypt) and page loads first; the timed part is the voting.
                everyone_in = asyncio.Barrier(len(annotators) + 1)
                sessions = asyncio.gather(
                    *(
                        annotate(
                            server.url,
                            who,
                            args.votes,
                            args.think_ms / 1000,
                            args.double_rate,
                            random.Random(args.seed * 1000 + i),
                            lambda: bar.advance(task),
                            everyone_in,
                        )
                        for i, who in enumerate(annotators)
                    )
                )
                await everyone_in.wait()
                started = time.perf_counter()
                cpu_before[:] = [cpu_seconds(server.process.pid), time.process_time()]
                await sessions
                cpu_after[:] = [cpu_seconds(server.process.pid), time.process_time()]
                return time.perf_counter() - started

            cpu_before, cpu_after = [], []
            wall = asyncio.run(run_all())
    finally:
        server.stop()

    acknowledged = [key for who in annotators for key in who.saved_keys]
    with session_scope(engine_for(url)) as session:
        stored = list(session.exec(select(Vote.idempotency_key)).all())
    lost = len(set(acknowledged) - set(stored))
    doubled = (len(stored) - len(set(stored))) + len(set(stored) - set(acknowledged))
    missing = total - len(acknowledged)
    errors = [error for who in annotators for error in who.errors]
    latencies = [ms for who in annotators for ms in who.latencies_ms]

    p50, p95 = statistics.median(latencies), percentile(latencies, 95)
    bare_p50, bare_p95 = statistics.median(bare), percentile(bare, 95)
    print(
        f"\n{len(acknowledged)} votes acknowledged in {wall:.1f} s ({len(acknowledged) / wall:.1f}/s), "
        f"{len(stored)} stored; {len(errors)} refused or failed submissions"
    )
    server_cpu, client_cpu = (after - before for after, before in zip(cpu_after, cpu_before))
    print(
        f"CPU per acknowledged vote: server {server_cpu / max(1, len(acknowledged)) * 1000:.1f} ms, "
        f"simulated clients {client_cpu / max(1, len(acknowledged)) * 1000:.1f} ms "
        f"(load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)"
    )
    for error in errors[:5]:
        print("  ", error)
    print(f"{'':24}{'p50 ms':>10}{'p95 ms':>10}")
    print(f"{'app round trip (HTTP)':24}{p50:>10.1f}{p95:>10.1f}")
    print(f"{'bare record_vote':24}{bare_p50:>10.2f}{bare_p95:>10.2f}")
    print(
        f"round trip / bare at p95: {p95 / bare_p95:.0f}x; p95 vs goal {GOAL_P95_MS:.0f} ms: {p95 / GOAL_P95_MS:.2f}"
    )
    if missing:
        print(f"warning: {missing} votes were never acknowledged")
    print(
        f"RESULT app ratio={p95 / GOAL_P95_MS:.3f} p50_ms={p50:.1f} p95_ms={p95:.1f} bare_p50_ms={bare_p50:.2f} "
        f"bare_p95_ms={bare_p95:.2f} lost={lost} doubled={doubled}"
    )
    return 0 if lost == doubled == missing == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
