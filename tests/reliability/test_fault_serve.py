"""Faults: `kill -9` of `prefloop serve` in the middle of voting, again and again, on a real
SQLite file. After every restart the database passes SQLite's integrity check and every vote
the server acknowledged over HTTP is stored exactly once (votes committed just before a kill,
whose answer never left, may be stored unacknowledged: that is allowed and counted).
Each restart is itself the check that the server comes up after a kill.
CI: 3 kills; PREFLOOP_RELIABILITY_FULL=1: 20."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3

import pytest

from feedback_store.app_settings import set_target_overlap
from feedback_store.db import engine_for, session_scope
from tests.app_support import migrated_sqlite, seed_pairs, seed_users, start_serve
from tests.reliability.figures import record
from tests.reliability.sizes import KILL_ANNOTATORS, KILLS, TIMEOUT_S
from tests.reliability.store_checks import check_votes
from tests.reliability.voters import Behaviour, run_annotators

pytestmark = [pytest.mark.slow, pytest.mark.timeout(TIMEOUT_S)]


def sqlite_health(path) -> tuple[list, list]:
    with sqlite3.connect(path) as connection:
        integrity = [row[0] for row in connection.execute("PRAGMA integrity_check")]
        foreign = connection.execute("PRAGMA foreign_key_check").fetchall()
    return integrity, foreign


def test_votes_survive_repeated_kill_9(tmp_path):
    path = tmp_path / "prefloop.db"
    url = migrated_sqlite(path)
    names = [f"annotator{i}" for i in range(KILL_ANNOTATORS)]
    engine = engine_for(url)
    seed_users(engine, names)
    seed_pairs(engine, KILLS * 60)  # more than the voting between kills can use up
    with session_scope(engine) as session:
        set_target_overlap(3, session=session)
    rng = random.Random(9)
    acknowledged: list[str] = []
    attempted = survived = 0
    lost_connections = 0

    for kill in range(KILLS):
        server = start_serve(url, tmp_path)  # a restart after the previous kill must come up

        async def kill_9() -> None:
            await asyncio.sleep(rng.uniform(0.3, 2.5))  # a random moment of the voting
            os.kill(server.process.pid, signal.SIGKILL)

        behaviours = [Behaviour(votes=10_000, seed=kill * 100 + i) for i in range(len(names))]
        try:
            tallies = run_annotators(server.url, names, behaviours, deadline_s=60, fault=kill_9)
        finally:
            server.stop()
        assert server.process.returncode == -signal.SIGKILL, "the server was not killed mid-run"
        errors = [e for t in tallies for e in t.errors]
        assert errors == [], errors[:5]  # no wrong answer before the kill, only lost connections
        assert not [s for t in tallies for s in t.statuses if s >= 500]
        acknowledged += [key for t in tallies for key in t.acknowledged]
        attempted += sum(t.attempted for t in tallies)
        lost_connections += sum(t.disconnects for t in tallies)

        integrity, foreign = sqlite_health(path)
        assert integrity == ["ok"] and foreign == [], (kill, integrity, foreign)
        check_votes(url, acknowledged, all_stored_acknowledged=False)
        survived += 1

    assert lost_connections > 0, "no annotator was voting when the server died"
    final = check_votes(url, acknowledged, all_stored_acknowledged=False)
    record(
        "fault-kill-9-serve",
        faults_injected=KILLS,
        faults_survived=survived,
        votes_attempted=attempted,
        votes_acknowledged=len(acknowledged),
        votes_stored=final["votes_stored"],
        stored_but_unacknowledged=final["stored_unacknowledged"],
        connections_cut=lost_connections,
        integrity_check="ok",
    )
