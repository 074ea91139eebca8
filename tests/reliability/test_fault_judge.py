"""Faults: the judge's endpoint killed (-9) and restarted mid-run. A real `prefloop judge`
subprocess judges stored pairs against tests.openai_server in a process of its own (see
judge_endpoint.py); the endpoint dies while requests are in flight and comes back on the same
port. The run rides it out on its retries (a rerun finishes anything that ran out of them):
every pair decided once, no order of a pair answered twice in the store, and the cost ledger
adds up, run by run and against what the endpoint itself says it served."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from sqlmodel import func, select

from feedback_store.db import engine_for, session_scope
from feedback_store.models import JudgeCall, JudgeRun, RunStatus, Vote
from tests.app_support import free_port
from tests.judge_helpers import add_pairs
from tests.reliability.figures import record
from tests.reliability.judge_endpoint import start_endpoint
from tests.reliability.sizes import FULL, JUDGE_PAIRS

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
CONCURRENCY = 8
PRICES = (3.0, 15.0)  # per million prompt / completion tokens
KILLS = 3 if FULL else 1


def judge_command(db_url: str, base_url: str) -> list[str]:
    return [sys.executable, "-m", "labeling.cli", "judge", "--db", db_url, "--base-url", base_url,
            "--model", "scripted", "--concurrency", str(CONCURRENCY), "--max-attempts", "12",
            "--price-prompt", str(PRICES[0]), "--price-completion", str(PRICES[1]), "--no-progress", "--json"]


def judge_votes(engine) -> int:
    with session_scope(engine) as session:
        return session.exec(select(func.count()).select_from(Vote)).one()


def test_judge_endpoint_killed_and_restarted_mid_run(sqlite_url, tmp_path):
    engine = engine_for(sqlite_url)
    pairs = [(f"answer {i} GOOD", f"answer {i}") for i in range(JUDGE_PAIRS)]
    ids = add_pairs(engine, pairs)
    order_of = {}  # (text shown first, text shown second) -> (comparison id, order)
    for comparison_id, (a, b) in zip(ids, pairs):
        order_of[a, b], order_of[b, a] = (comparison_id, "ab"), (comparison_id, "ba")
    port, ledger = free_port(), tmp_path / "served.jsonl"
    env = {**os.environ, "PREFLOOP_JUDGE_API_KEY": "k", "PYTHONPATH": str(REPO)}

    endpoint = start_endpoint(port, ledger, latency=0.2)
    judge = subprocess.Popen(judge_command(sqlite_url, endpoint.url), cwd=REPO, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    killed_pids = []
    try:
        for kill in range(KILLS):
            # Kill at 1/(KILLS+2), 2/(KILLS+2), ... of the way, while requests are in flight.
            goal = len(ids) * (kill + 1) // (KILLS + 2)
            deadline = time.monotonic() + 120
            while judge_votes(engine) < goal:
                assert judge.poll() is None, judge.communicate()
                assert time.monotonic() < deadline, "the judge made no progress"
                time.sleep(0.05)
            endpoint.process.send_signal(signal.SIGKILL)
            endpoint.process.wait()
            killed_pids.append(endpoint.process.pid)
            time.sleep(1.0)  # down for a while: requests fail and back off
            endpoint = start_endpoint(port, ledger, latency=0.2)
        out, err = judge.communicate(timeout=300)
    finally:
        if judge.poll() is None:
            judge.kill()
        endpoint.process.terminate()
        endpoint.process.wait(timeout=30)
    assert judge.returncode == 0, err[-3000:]
    first = json.loads(out)
    assert first["status"] == "done", first
    # Anything that ran out of retries while the endpoint was down is finished by a rerun.
    reruns = 0
    while judge_votes(engine) < len(ids) and reruns < 2:
        endpoint = start_endpoint(port, ledger, latency=0.0)
        try:
            subprocess.run(judge_command(sqlite_url, endpoint.url), cwd=REPO, env=env, check=True,
                           capture_output=True, timeout=300)
        finally:
            endpoint.process.terminate()
            endpoint.process.wait(timeout=30)
        reruns += 1

    with session_scope(engine) as session:
        votes = session.exec(select(Vote.comparison_id)).all()
        runs = session.exec(select(JudgeRun)).all()
        calls = session.exec(select(JudgeCall)).all()
    assert sorted(votes) == sorted(ids), "every pair decided exactly once"
    ok_calls = Counter((c.comparison_id, c.order) for c in calls if c.status == "ok")
    assert set(ok_calls) == {(c, o) for c in ids for o in ("ab", "ba")} and max(ok_calls.values()) == 1

    # The ledger adds up: each run's totals are the sum of its calls, and its cost their price.
    for run in runs:
        mine = [c for c in calls if c.judge_run_id == run.id]
        assert run.status == RunStatus.done
        assert run.prompt_tokens == sum(c.prompt_tokens for c in mine)
        assert run.completion_tokens == sum(c.completion_tokens for c in mine)
        assert run.n_requests == len(mine)
        assert run.cost == pytest.approx((run.prompt_tokens * PRICES[0] + run.completion_tokens * PRICES[1]) / 1e6)
    # ... and matches what the endpoint served: every paid call is an answer in its ledger, and
    # the answers the store lacks were sent by a killed endpoint as it died (at most the
    # requests in flight each time; the judge asked those again).
    served = Counter((*order_of[s["first"], s["second"]], s["prompt_tokens"], s["completion_tokens"])
                     for s in endpoint.served())
    paid = Counter((c.comparison_id, c.order, c.prompt_tokens, c.completion_tokens)
                   for c in calls if c.prompt_tokens or c.completion_tokens)
    assert paid - served == Counter(), "the store paid for answers the endpoint never sent"
    unpaid = served - paid
    assert sum(unpaid.values()) <= CONCURRENCY * KILLS
    lost_lines = [s for s in endpoint.served() if s["pid"] in killed_pids]
    assert sum(unpaid.values()) <= len(lost_lines)
    assert sum(r.prompt_tokens for r in runs) == sum(k[2] * n for k, n in served.items()) - sum(
        k[2] * n for k, n in unpaid.items())
    record(
        "fault-judge-endpoint",
        faults_injected=KILLS,
        faults_survived=KILLS,
        pairs=len(ids),
        judge_runs=len(runs),
        requests_stored=len(calls),
        http_attempts_first_run=first["attempts"],
        answers_served=sum(served.values()),
        answers_lost_in_kill=sum(unpaid.values()),
        prompt_tokens_ledger=sum(r.prompt_tokens for r in runs),
        completion_tokens_ledger=sum(r.completion_tokens for r in runs),
        cost_ledger=round(sum(r.cost or 0 for r in runs), 6),
        duplicate_votes=len(votes) - len(set(votes)),
    )
