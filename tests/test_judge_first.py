"""Judge-first (`prefloop judge --judge-first`): a pair the judge decided with confidence (both
orders name the same winner, confidence at or above the threshold where logprobs give one)
leaves the human queue; doubtful pairs stay for people; a human vote still counts; migration
0006 goes up and down on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import math

from sqlalchemy import inspect, text
from sqlmodel import select

from feedback_store.db import engine_for, session_scope, upgrade
from feedback_store.models import Comparison, Rater, RaterKind, Vote
from feedback_store.queue import next_comparison_for, open_comparisons
from feedback_store.votes import record_vote
from labeling.cli import main as cli_main
from labeling.judge.backends import JudgeReply, JudgeRequest
from labeling.judge.parsing import TokenLogprob
from labeling.judge.runner import JudgeRunConfig, run_judge
from tests.judge_helpers import add_pairs


class ScriptedJudge:
    """Answers by a script keyed on the better text: how sure it is, or how it fails."""

    kind = "scripted"
    model_id = "scripted-judge"
    uses_template = False
    max_output_tokens = 8
    preferred_concurrency = 4

    def __init__(self, script: dict[str, str | float | None]):
        self.script = script  # good text -> confidence (float), None (no logprobs), "biased", "tie"

    async def judge(self, request: JudgeRequest) -> JudgeReply:
        if request.first in self.script:
            good, letter = request.first, "A"
        else:
            good, letter = request.second, "B"
        how = self.script[good]
        if how == "biased":  # always the first shown: the orders disagree
            letter = "A"
        if how == "tie":
            letter = "C"
        reply = f"[[{letter}]]"
        if how is None or isinstance(how, str):
            return JudgeReply(reply)
        tokens = [TokenLogprob("[[", 0.0, {}), TokenLogprob(letter, math.log(how), {}), TokenLogprob("]]", 0.0, {})]
        return JudgeReply(reply, logprobs=tokens)

    async def aclose(self) -> None:
        pass


SCRIPT = {  # the better (response_a) text -> how the judge answers
    "sure": 0.95,
    "unsure": 0.6,
    "no logprobs": None,
    "swayed by position": "biased",
    "a tie": "tie",
}


def setup_pairs(engine) -> dict[str, int]:
    ids = add_pairs(engine, [(good, f"worse than {good}") for good in SCRIPT])
    return dict(zip(SCRIPT, ids))


def settled(engine) -> dict[int, int | None]:
    with session_scope(engine) as s:
        return {c.id: c.settled_by for c in s.exec(select(Comparison))}


def human(engine, name: str) -> int:
    with session_scope(engine) as s:
        rater = Rater(name=name, kind=RaterKind.human)
        s.add(rater)
        s.flush()
        return rater.id


def test_judge_first_settles_confident_pairs_only(db_url):
    engine = engine_for(db_url)
    ids = setup_pairs(engine)
    bob = human(engine, "bob")
    summary = run_judge(engine, ScriptedJudge(SCRIPT), JudgeRunConfig(judge_first=True, judge_first_threshold=0.8,
                                                                    progress=False))
    state = settled(engine)
    # Both orders agree on A: settled when sure or without logprobs (agreement alone).
    assert {name for name, cid in ids.items() if state[cid] is not None} == {"sure", "no logprobs"}
    assert summary.settled == 2 and summary.decided == 5 and summary.inconsistent == 1
    with session_scope(engine) as s:
        judge_id = s.exec(select(Rater.id).where(Rater.kind == RaterKind.judge)).one()
        assert state[ids["sure"]] == judge_id
        # Only doubtful pairs reach people: unsure, inconsistent, an agreed tie.
        assert open_comparisons(bob, session=s) == 3
        served = []
        while (assignment := next_comparison_for(bob, session=s)) is not None:
            served.append(assignment.comparison_id)
            record_vote(assignment.comparison_id, bob, "a", session=s)
        assert sorted(served) == sorted(ids[n] for n in ("unsure", "swayed by position", "a tie"))
        # A human vote on a settled pair still counts.
        record_vote(ids["sure"], bob, "b", session=s)
        assert s.get(Comparison, ids["sure"]).human_votes == 1


def test_without_judge_first_nothing_leaves_the_queue_and_route_doubts_still_works(sqlite_url):
    engine = engine_for(sqlite_url)
    ids = setup_pairs(engine)
    summary = run_judge(engine, ScriptedJudge(SCRIPT), JudgeRunConfig(route_doubts=True, doubt_confidence=0.75,
                                                                    progress=False))
    assert summary.settled == 0 and set(settled(engine).values()) == {None}
    with session_scope(engine) as s:
        priority = {c.id: c.priority for c in s.exec(select(Comparison))}
    assert {n for n, cid in ids.items() if priority[cid] > 0} == {"unsure", "swayed by position"}
    # Both together: doubts raised, confident pairs settled by a rerun (it settles earlier votes).
    summary = run_judge(engine, ScriptedJudge(SCRIPT), JudgeRunConfig(judge_first=True, route_doubts=True,
                                                                    progress=False))
    assert summary.comparisons == 0 and summary.settled == 2
    assert {n for n, cid in ids.items() if settled(engine)[cid]} == {"sure", "no logprobs"}


def test_threshold_and_the_command_line(sqlite_url, capsys, monkeypatch):
    engine = engine_for(sqlite_url)
    ids = setup_pairs(engine)
    from labeling.cli import judge_command

    monkeypatch.setattr(judge_command, "build_backend", lambda args: ScriptedJudge(SCRIPT))
    code = cli_main(["judge", "--db", sqlite_url, "--backend", "rubric", "--judge-first",
                     "--judge-first-threshold", "0.5", "--no-progress", "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["settled"] == 3  # 0.6 now passes
    assert {n for n, cid in ids.items() if settled(engine)[cid]} == {"sure", "unsure", "no logprobs"}
    with session_scope(engine) as s:
        run_config = s.exec(text("SELECT config FROM judgerun")).scalar_one()
    run_config = json.loads(run_config) if isinstance(run_config, str) else run_config
    assert run_config["judge_first"] is True and run_config["judge_first_threshold"] == 0.5
    assert cli_main(["judge", "--db", sqlite_url, "--judge-first-threshold", "1.5", "--backend", "rubric"]) == 2
    err = capsys.readouterr().err.strip()
    assert "judge_first_threshold must be between 0 and 1" in err and len(err.splitlines()) == 1


def test_gold_pairs_are_never_settled(sqlite_url):
    engine = engine_for(sqlite_url)
    ids = setup_pairs(engine)
    with session_scope(engine) as s:
        gold = s.get(Comparison, ids["sure"])
        gold.gold_winner = "a"
        s.add(gold)
    run_judge(engine, ScriptedJudge(SCRIPT), JudgeRunConfig(judge_first=True, progress=False))
    assert settled(engine)[ids["sure"]] is None and settled(engine)[ids["no logprobs"]] is not None
    with session_scope(engine) as s:  # the judge still votes on it (judge accuracy on gold)
        assert s.exec(select(Vote).where(Vote.comparison_id == ids["sure"])).first() is not None


def test_migration_0006_up_and_down(empty_db_url):
    from alembic import command

    from feedback_store.db import alembic_config

    upgrade(empty_db_url)
    engine = engine_for(empty_db_url)
    ids = setup_pairs(engine)
    with session_scope(engine) as s:
        s.execute(text("UPDATE comparison SET settled_by = 1 WHERE id = :id"), {"id": ids["sure"]})

    def queue_index() -> dict:
        with engine.connect() as conn:
            found = {i["name"]: i for i in inspect(conn).get_indexes("comparison")}
            columns = {c["name"] for c in inspect(conn).get_columns("comparison")}
            if conn.dialect.name == "sqlite":
                sql = conn.exec_driver_sql(
                    "SELECT sql FROM sqlite_master WHERE name = 'ix_comparison_queue'").scalar_one()
            else:
                sql = conn.exec_driver_sql("SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_comparison_queue'"
                                           ).scalar_one()
        return {"settled_by": "settled_by" in columns, "partial": "settled_by IS NULL" in sql,
                "gold": "ix_comparison_gold_winner" in found}

    assert queue_index() == {"settled_by": True, "partial": True, "gold": True}
    config = alembic_config(empty_db_url)
    command.downgrade(config, "0005")
    engine.dispose()
    assert queue_index() == {"settled_by": False, "partial": False, "gold": True}
    with engine.connect() as conn:  # the rows are all there, the settled pair back in the queue
        assert conn.execute(text("SELECT count(*) FROM comparison")).scalar_one() == len(ids)
    command.upgrade(config, "head")
    engine.dispose()
    assert queue_index() == {"settled_by": True, "partial": True, "gold": True}
    assert set(settled(engine).values()) == {None}
