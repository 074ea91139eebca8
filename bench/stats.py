"""How long `prefloop stats` takes on 100,000 votes (goal: under 2 s on this 2-core CPU).

Builds a synthetic store with bulk inserts (4 policies of known strength, 50 human raters
with a left-side bias, 2 judges, ~3 votes per comparison), then times `compute_stats`
(one SQL read of the vote columns, numpy for the rest, 200 bootstrap resamples).

    .venv/bin/python bench/stats.py [--votes 100000] [--db sqlite:///...|postgresql://...]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import datetime, timedelta, timezone

import numpy as np
from sqlalchemy import func, insert, select

from feedback_store.db import engine_for, session_scope, upgrade
from feedback_store.models import Comparison, PolicyVersion, Prompt, Rater, RaterKind, Response, Vote
from feedback_store.stats import CHOICES, compute_stats

STRENGTHS = {"base": 0.0, "sft": 0.4, "dpo": 0.9, "kto": 0.7}


def build(url: str, n_votes: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    votes_per_comparison = 3
    n_comparisons = n_votes // votes_per_comparison
    now = datetime(2025, 1, 1, tzinfo=timezone.utc)
    names = list(STRENGTHS)
    strengths = np.array(list(STRENGTHS.values()))
    with session_scope(engine_for(url)) as s:
        s.execute(insert(PolicyVersion), [{"id": i + 1, "name": n, "base_model": "tiny", "created_at": now}
                                          for i, n in enumerate(names)])
        raters = [{"id": i + 1, "name": f"annotator{i}", "kind": RaterKind.human, "created_at": now} for i in range(50)]
        raters += [{"id": 51 + i, "name": f"judge:m{i}@v1", "kind": RaterKind.judge, "created_at": now} for i in range(2)]
        s.execute(insert(Rater), raters)
        s.execute(insert(Prompt), [{"id": i + 1, "messages": [{"role": "user", "content": f"p{i}"}],
                                    "content_hash": f"h{i}", "tags": [], "created_at": now}
                                   for i in range(n_comparisons)])
        pairs = np.array([rng.choice(len(names), 2, replace=False) for _ in range(n_comparisons)])
        responses = []
        for i, (p, q) in enumerate(pairs):
            for k, policy in enumerate((p, q)):
                responses.append({"id": 2 * i + k + 1, "prompt_id": i + 1, "policy_id": int(policy) + 1,
                                  "text": "x", "text_hash": f"{i}-{k}", "generation_params": {}, "created_at": now})
        s.execute(insert(Response), responses)
        s.execute(insert(Comparison), [{"id": i + 1, "prompt_id": i + 1, "response_a_id": 2 * i + 1,
                                        "response_b_id": 2 * i + 2, "created_at": now} for i in range(n_comparisons)])
        votes = []
        clock = now
        for i, (p, q) in enumerate(pairs):
            win = 1 / (1 + np.exp(-(strengths[p] - strengths[q])))
            for rater in rng.choice(52, votes_per_comparison, replace=False):
                u = rng.random()
                choice = 0 if u < 0.85 * win else 1 if u < 0.85 else 2 + int(u > 0.95)
                clock += timedelta(seconds=float(rng.exponential(20)))
                votes.append({"comparison_id": i + 1, "rater_id": int(rater) + 1, "choice": CHOICES[choice],
                              "left_response_id": 2 * i + 1 + int(rng.random() < 0.5),
                              "time_spent_ms": int(rng.integers(2000, 60000)), "created_at": clock,
                              "updated_at": clock, "revision": 1})
        s.execute(insert(Vote), votes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--votes", type=int, default=100_000)
    parser.add_argument("--db", default=None, help="a throwaway, empty database URL (default: a temp SQLite file)")
    parser.add_argument("--goal-s", type=float, default=2.0)
    args = parser.parse_args()
    url = args.db or f"sqlite:///{tempfile.mkdtemp()}/bench-stats.db"
    upgrade(url)
    with session_scope(engine_for(url)) as s:
        if s.execute(select(func.count()).select_from(PolicyVersion)).scalar_one():
            raise SystemExit(f"bench/stats.py: --db {url} must be an empty database (it has policies already)")
    started = time.perf_counter()
    build(url, args.votes)
    print(f"built {args.votes} votes in {time.perf_counter() - started:.1f} s ({url.split(':')[0]})")
    timings, cpu = [], []
    for _ in range(3):
        started, started_cpu = time.perf_counter(), time.process_time()
        with session_scope(engine_for(url)) as s:
            stats = compute_stats(session=s)
        timings.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)  # this process only: not the database server
    measured = min(timings)
    board = ", ".join(f"{r.policy} {r.rating:.0f} [{r.ci_low:.0f}, {r.ci_high:.0f}]" for r in stats.leaderboard.ratings)
    print(f"leaderboard: {board}")
    print(f"{'':24}{'goal':>10}{'measured':>10}")
    print(f"{'compute_stats (s)':24}{args.goal_s:>10.2f}{measured:>10.2f}")
    print(f"{'  of which CPU here (s)':24}{'':>10}{min(cpu):>10.2f}")
    print(f"RESULT stats ratio={args.goal_s / measured:.2f} votes={stats.counts.votes} seconds={measured:.3f} "
          f"cpu_seconds={min(cpu):.3f} goal_s={args.goal_s}")


if __name__ == "__main__":
    main()
