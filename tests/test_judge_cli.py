"""`prefloop judge` end to end: the real CLI against a real store and a real HTTP server,
including an interruption (SIGINT / SIGTERM) of a running judge in a separate process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlmodel import func, select

from feedback_store.db import engine_for, session_scope
from feedback_store.models import JudgeCall, JudgeRun, RunStatus, Vote
from labeling.cli import main
from labeling.judge import JudgeRunConfig, OpenAIJudge, OpenAIJudgeConfig, run_judge
from tests.judge_helpers import add_pairs, priorities, votes_by_comparison
from tests.openai_server import OpenAIServer, ServerScript

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def server():
    with OpenAIServer(ServerScript(retry_after=0.05)) as server:
        yield server


def test_rubric_judge_from_the_command_line(sqlite_url, capsys):
    engine = engine_for(sqlite_url)
    ids = add_pairs(engine, [("short", "much longer"), ("I cannot help with that.", "Sure: do this and that.")])
    assert main(["judge", "--db", sqlite_url, "--backend", "rubric", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "judge:rubric:no-refusal,shorter@rule" in out and "decided 2" in out
    votes = votes_by_comparison(engine)
    assert [votes[i].choice.value for i in ids] == ["a", "b"]
    assert main(["judge", "--db", sqlite_url, "--backend", "rubric", "--no-progress", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["comparisons"] == 0 and summary["requests"] == 0 and summary["status"] == "done"


def test_openai_judge_from_the_command_line(sqlite_url, server, capsys, monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", "secret-from-the-environment")
    engine = engine_for(sqlite_url)
    ids = add_pairs(engine, [("GOOD answer", "answer"), ("x #judge:positional", "y"), ("GOOD #judge:unsure", "z")])
    argv = ["judge", "--db", sqlite_url, "--base-url", server.url, "--model", "scripted", "--api-key-env", "MY_JUDGE_KEY",
            "--concurrency", "4", "--logprobs", "--route-doubts", "--price-prompt", "3", "--price-completion", "15",
            "--no-progress", "--json"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["decided"], summary["inconsistent"], summary["doubts"]) == (3, 1, 2)
    assert summary["prompt_tokens"] == server.log.prompt_tokens
    assert summary["cost"] == pytest.approx((server.log.prompt_tokens * 3 + server.log.completion_tokens * 15) / 1e6)
    assert priorities(engine) == {ids[0]: 0, ids[1]: 10, ids[2]: 10}
    assert votes_by_comparison(engine)[ids[0]].confidence == pytest.approx(0.9)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--backend", "openai"], "--model is required"),
        (["--model", "m"], "no API key: set PREFLOOP_JUDGE_API_KEY or OPENAI_API_KEY"),
        (["--backend", "rubric", "--template", "nope"], "unknown judge template 'nope'"),
        (["--backend", "rubric", "--rubric", "kindest"], "unknown rubric rule 'kindest'"),
        (["--backend", "rubric", "--criteria-file", "/nonexistent/criteria.txt"], "--criteria-file /nonexistent/criteria.txt"),
        (["--backend", "rubric", "--concurrency", "0"], "concurrency must be at least 1"),
    ],
)
def test_bad_invocations_fail_with_one_line(sqlite_url, capsys, monkeypatch, extra, message):
    monkeypatch.delenv("PREFLOOP_JUDGE_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert main(["judge", "--db", sqlite_url, "--no-progress", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_list_templates(capsys):
    assert main(["judge", "--list-templates"]) == 0
    assert "pairwise-v1" in capsys.readouterr().out


def _count(engine, model) -> int:
    with session_scope(engine) as session:
        return session.exec(select(func.count()).select_from(model)).one()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupting_a_run_loses_only_requests_in_flight(sqlite_url, sig):
    concurrency = 8
    engine = engine_for(sqlite_url)
    pairs = [(f"answer {i} GOOD", f"answer {i}") for i in range(80)]
    ids = add_pairs(engine, pairs)
    with OpenAIServer(ServerScript(latency=0.1)) as server:
        env = {**os.environ, "PREFLOOP_JUDGE_API_KEY": "k", "PYTHONPATH": str(ROOT)}
        process = subprocess.Popen(
            [sys.executable, "-m", "labeling.cli", "judge", "--db", sqlite_url, "--base-url", server.url,
             "--model", "scripted", "--concurrency", str(concurrency), "--no-progress"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        deadline = time.monotonic() + 120
        while _count(engine, Vote) < 10:
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the judge made no progress"
            time.sleep(0.05)
        process.send_signal(sig)
        out, err = process.communicate(timeout=60)
        assert process.returncode == 130, (out, err)
        assert "aborted" in out
        answered = {(ids[pairs.index((f, s))] if (f, s) in pairs else ids[pairs.index((s, f))], "ab" if (f, s) in pairs else "ba")
                    for (f, s), n in server.log.judged.items()}
        with session_scope(engine) as session:
            [run] = session.exec(select(JudgeRun)).all()
            stored = {(c.comparison_id, c.order) for c in session.exec(select(JudgeCall))}
        assert run.status == RunStatus.aborted
        assert stored <= answered
        assert len(answered - stored) <= concurrency  # at most the requests in flight
        assert run.n_decided == _count(engine, Vote) < len(ids)

        # Resuming finishes the job; only requests lost in flight are asked a second time.
        backend = OpenAIJudge(OpenAIJudgeConfig(model="scripted", base_url=server.url, max_connections=concurrency))
        summary = run_judge(engine, backend, JudgeRunConfig(progress=False))
        assert summary.status == "done" and summary.failed == 0
        assert set(votes_by_comparison(engine)) == set(ids)
        asked_twice = [key for key, n in server.log.judged.items() if n > 1]
        assert len(asked_twice) <= concurrency and max(server.log.judged.values()) <= 2
