"""Admin actions, background jobs, the dashboard's figures, the sanitizer and the CLI commands
(`prefloop users`, `prefloop serve` refusing to start with nobody able to sign in)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from matplotlib.figure import Figure
from sqlmodel import select

from feedback_store.db import engine_for, session_scope
from feedback_store.models import Prompt, Role, RunMetric, TrainingRun, Vote
from feedback_store.queue import target_overlap
from feedback_store.raters import get_or_create_judge, get_rater
from feedback_store.votes import record_vote
from labeling.app import admin, annotate, dashboard
from labeling.app.auth import caller_for
from labeling.app.jobs import Job
from labeling.app.markup import render_markdown, render_messages
from labeling.app.state import AppConfig, AppState
from labeling.cli.job_commands import JOB_COMMAND_LINE
from tests.app_support import PASSWORD, REPO, XSS_TEXT, seed_pairs, seed_users

CLI = [
    sys.executable,
    "-c",
    "import sys; from labeling.cli import main; sys.exit(main(sys.argv[1:]))",
]


@pytest.fixture
def state(db_url, tmp_path):
    engine = engine_for(db_url)
    seed_users(engine, ["bob", "carol"], ["alice"])
    return AppState.create(
        AppConfig(db_url=db_url, job_dir=tmp_path / "jobs"), engine=engine, command_line=JOB_COMMAND_LINE
    )


def test_sanitizer_keeps_markdown_and_makes_html_inert():
    rendered = render_markdown(
        XSS_TEXT + "\n\n**bold** [ok](https://example.org) ![pic](http://tracker/x.png)"
    )
    assert (
        "<script" not in rendered and "<img" not in rendered and 'href="javascript' not in rendered
    )
    assert "&lt;script&gt;window.__xss=1&lt;/script&gt;" in rendered  # shown as the text it is
    assert "<strong>bold</strong>" in rendered and 'href="https://example.org"' in rendered
    assert "![pic](http://tracker/x.png)" in rendered  # an image is shown as text, never fetched
    raw = render_markdown(
        '<a href="javascript:alert(1)" onclick="x()">x</a><iframe src="//e"></iframe>'
    )
    assert "<a" not in raw and "<iframe" not in raw
    turns = render_messages(
        [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "<b>hi</b>"}]
    )
    assert "pf-system" in turns and "&lt;b&gt;hi&lt;/b&gt;" in turns


def test_users_overlap_and_guidelines(state):
    alice = caller_for(state, "alice")
    assert (
        admin.save_user(state, alice, "dave", "a long password", "annotator")
        == "added annotator dave"
    )
    assert (
        admin.save_user(state, alice, "dave", "another password", "admin") == "updated admin dave"
    )
    with pytest.raises(admin.AdminError, match="8 characters"):
        admin.save_user(state, alice, "erin", "short", "annotator")
    with pytest.raises(admin.AdminError, match="role"):
        admin.save_user(state, alice, "erin", "a long password", "superuser")
    assert ["dave", "admin", "yes"] in admin.users_table(state, alice)

    admin.set_user_active(state, alice, "bob", False)
    with session_scope(state.engine) as session:
        assert not get_rater("bob", session=session).active
    with pytest.raises(admin.AdminError, match="your own"):
        admin.set_user_active(state, alice, "alice", False)
    with pytest.raises(admin.AdminError, match="no user"):
        admin.set_user_active(state, alice, "nobody", True)

    admin.save_overlap(state, alice, 3)
    with session_scope(state.engine) as session:
        assert target_overlap(session=session) == 3
    with pytest.raises(admin.AdminError):
        admin.save_overlap(state, alice, 0)
    admin.save_guidelines(state, alice, "# Be kind\n<script>alert(1)</script>")
    html = admin.guidelines_html(state)
    assert "<h1>Be kind</h1>" in html and "<script" not in html


def test_import_and_export(state, tmp_path):
    alice = caller_for(state, "alice")
    upload = tmp_path / "prompts.jsonl"
    upload.write_text(
        "\n".join(json.dumps({"prompt": f"Tell me about {topic}"}) for topic in ("owls", "bees"))
    )
    assert "2 new prompts" in admin.import_prompt_file(state, alice, str(upload))
    with session_scope(state.engine) as session:
        assert len(session.exec(select(Prompt)).all()) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"nothing": 1}\n')
    with pytest.raises(admin.AdminError, match="line 2"):
        admin.import_prompt_file(state, alice, str(bad))
    with session_scope(state.engine) as session:
        assert len(session.exec(select(Prompt)).all()) == 2  # nothing half-written

    seed_pairs(state.engine, 2)
    bob = caller_for(state, "bob")
    desk, _ = annotate.open_desk(state, None, bob)
    annotate.submit(state, desk, bob, "left", desk.slot.key)
    path = admin.export_dataset(state, alice, "dpo", tmp_path / "out")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 1 and {"prompt", "chosen", "rejected"} <= set(rows[0])
    with pytest.raises(admin.AdminError):
        admin.export_dataset(state, alice, "everything")


def test_jobs_run_the_cli_and_show_their_log(state):
    alice = caller_for(state, "alice")
    with pytest.raises(admin.AdminError, match="unknown job"):
        admin.start_job(state, alice, "serve", "")
    # Arguments the CLI would refuse are refused before any process starts.
    with pytest.raises(admin.AdminError, match="unrecognized arguments: --no-such-option"):
        admin.start_job(state, alice, "train", "dpo --no-such-option")
    with pytest.raises(admin.AdminError, match="invalid choice: 'ppo-typo'"):
        admin.start_job(state, alice, "train", "ppo-typo")
    with pytest.raises(admin.AdminError, match="--db: not allowed in web jobs \\(a job runs on this server's database"):
        admin.start_job(state, alice, "judge", "--backend rubric --db /tmp/elsewhere.db")
    assert state.jobs.all() == []
    # A job that parses but fails when it runs: the status and the log say so.
    job = admin.start_job(state, alice, "judge", "--backend rubric --criteria-file missing.txt --no-progress")
    job.process.wait(timeout=60)
    status, fraction, log = admin.job_view(state, job.id)
    assert "failed (exit 2)" in status and "started by alice" in status
    assert "prefloop judge --backend rubric" in log and "missing.txt: No such file" in log
    done = admin.start_job(state, alice, "judge", "--backend rubric --no-progress")
    done.process.wait(timeout=60)
    assert f"#{done.id} judge · done" in admin.job_view(state, done.id)[0]
    assert admin.job_view(state, None)[0] == "No job selected."


def test_job_progress_reads_the_last_progress_bar(tmp_path):
    log = tmp_path / "job.log"
    script = "import sys; sys.stdout.write('generate:  10%|#         | 1/10\\rgenerate:  40%|####      | 4/10\\n'); sys.exit(1)"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-c", script], stdout=out)
    process.wait(timeout=30)
    job = Job(1, "generate", ["generate"], log, process, "alice")
    assert job.tail().splitlines()[-1] == "generate:  40%|####      | 4/10"  # \r rewrote the line
    assert job.progress() == pytest.approx(0.4) and job.status == "failed (exit 1)"
    assert "width:40%" in admin.progress_bar_html(job.progress())


def _add_run(state):
    with session_scope(state.engine) as session:
        run = TrainingRun(kind="dpo", config={})
        session.add(run)
        session.flush()
        for step in range(5):
            session.add(RunMetric(run_id=run.id, step=step, name="loss", value=1.0 / (step + 1)))
            session.add(
                RunMetric(run_id=run.id, step=step, name="rewards/margins", value=0.1 * step)
            )


def test_dashboard_draws_every_statistic(state):
    ids = seed_pairs(state.engine, 6)
    with session_scope(state.engine) as session:
        judge = get_or_create_judge("tiny-judge", "v1", session=session)
        humans = [get_rater(name, session=session) for name in ("bob", "carol")]
        for i, comparison_id in enumerate(ids):
            record_vote(comparison_id, judge.id, "b", session=session)
            for rater in humans:
                record_vote(comparison_id, rater.id, "b" if i % 3 else "a", session=session)
    _add_run(state)
    figures = dashboard.dashboard_figures(state)
    assert set(figures) == set(dashboard.PLOTS) and all(
        isinstance(f, Figure) for f in figures.values()
    )
    board = figures["leaderboard"].axes[0]
    assert [t.get_text().split()[0] for t in board.get_yticklabels()] == [
        "base",
        "tuned",
    ]  # best at the top
    assert len(figures["win_rate"].axes[0].images) == 1
    assert len(figures["annotators"].axes) == 2
    assert figures["judge"].axes[0].patches  # bars drawn
    training = figures["training"].axes
    assert [a.get_title(loc="left") for a in training[:2]] == ["loss", "rewards/margins"]
    assert list(training[0].lines[0].get_ydata()) == pytest.approx([1.0, 0.5, 1 / 3, 0.25, 0.2])


def test_dashboard_on_an_empty_store_explains_itself(state):
    figures = dashboard.dashboard_figures(state)
    texts = [t.get_text() for f in figures.values() for a in f.axes for t in a.texts]
    assert any("Needs votes" in t for t in texts) and any("No training run" in t for t in texts)


def _cli(*args, input_text=None, db=None):
    return subprocess.run(
        [*CLI, *args, *(["--db", db] if db else [])],
        input=input_text,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


def test_users_command(sqlite_url):
    added = _cli(
        "users", "add", "zoe", "--role", "admin", input_text=PASSWORD + "\n", db=sqlite_url
    )
    assert added.returncode == 0 and "added admin zoe" in added.stdout
    short = _cli("users", "add", "yann", input_text="short\n", db=sqlite_url)
    assert short.returncode == 2 and "8 characters" in short.stderr
    empty = _cli("users", "add", "yann", input_text="", db=sqlite_url)
    assert empty.returncode == 2 and "no password on stdin" in empty.stderr
    listed = _cli("users", "list", db=sqlite_url)
    assert "zoe" in listed.stdout and "admin" in listed.stdout and "yann" not in listed.stdout
    with session_scope(engine_for(sqlite_url)) as session:
        zoe = get_rater("zoe", session=session)
        assert (
            zoe.role == Role.admin
            and zoe.password_hash.startswith("scrypt$")
            and PASSWORD not in zoe.password_hash
        )


def test_serve_refuses_to_start_with_nobody_able_to_sign_in(sqlite_url):
    started = time.monotonic()
    result = _cli("serve", "--port", "1", db=sqlite_url)
    assert result.returncode == 2 and "--single-user" in result.stderr
    assert time.monotonic() - started < 60


def test_single_user_mode_needs_no_sign_in(sqlite_url, tmp_path):
    from labeling.app.server import BackgroundServer
    from tests.app_support import AppClient

    seed_pairs(engine_for(sqlite_url), 1)
    state = AppState.create(AppConfig(db_url=sqlite_url, single_user="local", job_dir=tmp_path))
    with BackgroundServer(state) as url:
        client = AppClient(url)
        event, outputs = client.call("whoami")
        assert event == "complete" and "Signed in as <b>local</b> (admin)" in outputs[0]
        event, outputs = client.call("open_pairs")
        event, outputs = client.call("vote_tie", outputs[2], None, "", "")
        assert event == "complete" and "Saved" in outputs[4]
        client.close()
    with session_scope(engine_for(sqlite_url)) as session:
        local = get_rater("local", session=session)
        assert local.role == Role.admin and local.password_hash is None
        assert [v.rater_id for v in session.exec(select(Vote)).all()] == [local.id]


NEW_ADMIN_EVENTS = {"admin_prioritize", "admin_set_gold_rate", "admin_set_quality_threshold", "admin_rater_quality",
                    "admin_set_rater_weight", "admin_auto_weights"}


def test_queue_gold_and_quality_events_are_admin_events(state):
    """The admin tab's queue-order, gold-rate, threshold and weight events are named admin_* (so the
    gateway's admin rule and tests/reliability/test_access.py cover them) and refuse annotators."""
    from labeling.app.server import build_app

    blocks = build_app(state)
    names = {getattr(fn, "api_name", None) for fn in blocks.fns.values()}
    assert NEW_ADMIN_EVENTS <= names
    alice, bob = caller_for(state, "alice"), caller_for(state, "bob")
    admin.save_gold_rate(state, alice, 0.1)
    admin.save_quality_threshold(state, alice, 0.6)
    assert admin.save_rater_weight(state, alice, "carol", 0.5) == "carol: weight 0.5"
    assert "fewest-votes" in admin.run_queue_strategy(state, alice, "fewest-votes")
    for action, args in ((admin.save_gold_rate, (0.9,)), (admin.save_quality_threshold, (0.9,)),
                         (admin.save_rater_weight, ("bob", 9)), (admin.run_queue_strategy, ("arena",)),
                         (admin.rater_quality_table, ()), (admin.auto_rater_weights, ())):
        with pytest.raises(admin.AdminError, match="not an admin"):
            action(state, bob, *args)
    from feedback_store.app_settings import gold_rate, quality_threshold

    with session_scope(state.engine) as session:
        assert gold_rate(session=session) == 0.1 and quality_threshold(session=session) == 0.6
        assert get_rater("bob", session=session).weight == 1.0
