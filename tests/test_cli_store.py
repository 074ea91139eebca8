"""`prefloop prompts import` and `prefloop export`, end to end, with --db and with PREFLOOP_DB."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import Dataset
from sqlmodel import select

from feedback_store.db import engine_for, session_scope
from feedback_store.models import Choice, Vote
from feedback_store.raters import get_or_create_judge
from feedback_store.votes import record_vote
from labeling.cli import main

ROWS = [
    {"prompt": "Say hi in Arabic", "tags": ["lang"]},
    {"prompt": "2+2?", "chosen": "4", "rejected": "5", "strength": 2},
    {"prompt": [{"role": "user", "content": "Capital of Israel's neighbour Jordan?"}],
     "chosen": [{"role": "assistant", "content": "عمّان"}], "rejected": [{"role": "assistant", "content": "Paris"}]},
]


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def prefloop(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The console script in a child process, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-c", "import sys; from labeling.cli import main; sys.exit(main())", *args],
        capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=cwd, timeout=300,
    )


def test_import_then_export_with_db_flag(db_url, tmp_path, capsys):
    source = write_rows(tmp_path / "prompts.jsonl", ROWS)
    assert main(["prompts", "import", str(source), "--db", db_url, "--source", "cli-test"]) == 0
    out = capsys.readouterr().out
    assert "3 rows; 3 new prompts, 4 new responses, 2 new comparisons, 2 new votes; 0 duplicate" in out

    assert main(["prompts", "import", str(source), "--db", db_url]) == 0
    assert "0 new prompts, 0 new responses, 0 new comparisons, 0 new votes; 3 duplicate rows skipped" in (
        capsys.readouterr().out)

    for kind, suffix, rows in [("dpo", ".jsonl", 2), ("reward", ".parquet", 2), ("kto", ".jsonl", 4),
                               ("sft", ".parquet", 2)]:
        out_path = tmp_path / "exports" / f"{kind}{suffix}"
        assert main(["export", kind, "--out", str(out_path), "--db", db_url]) == 0
        assert f"wrote {rows} {kind} rows to {out_path}" in capsys.readouterr().out
        loaded = Dataset.from_json(str(out_path)) if suffix == ".jsonl" else Dataset.from_parquet(str(out_path))
        assert len(loaded) == rows
    reward = Dataset.from_parquet(str(tmp_path / "exports" / "reward.parquet"))
    assert sorted(reward["margin"]) == [0.0, 2.0]
    dpo = Dataset.from_json(str(tmp_path / "exports" / "dpo.jsonl"))
    assert dpo[1]["chosen"] == [{"role": "assistant", "content": "عمّان"}]


def test_selection_flags_reach_the_export(db_url, tmp_path, capsys):
    write_rows(tmp_path / "p.jsonl", ROWS)
    assert main(["prompts", "import", str(tmp_path / "p.jsonl"), "--db", db_url]) == 0
    # The judge disagrees on one pair: with both kinds it becomes a 1-1 draw (a tie, dropped).
    engine = engine_for(db_url)
    with session_scope(engine) as session:
        judge = get_or_create_judge("j", "v1", session=session)
        first = session.exec(select(Vote).order_by(Vote.comparison_id)).first()
        other = Choice.b if first.choice == Choice.a else Choice.a
        record_vote(first.comparison_id, judge.id, other, session=session)
    capsys.readouterr()
    cases = [
        ([], 1),
        (["--raters", "judge"], 1),
        (["--raters", "human"], 2),
        (["--raters", "human", "--import-as", "exclude"], 0),
        (["--min-votes", "2"], 0),
        (["--tie-policy", "half"], 1),  # DPO drops ties whatever the policy
    ]
    for flags, rows in cases:
        out_path = tmp_path / "dpo.jsonl"
        assert main(["export", "dpo", "--out", str(out_path), "--db", db_url, *flags]) == 0, flags
        assert f"wrote {rows} dpo rows" in capsys.readouterr().out, flags
    assert main(["export", "reward", "--out", str(tmp_path / "r.jsonl"), "--db", db_url, "--tie-policy", "half"]) == 0
    assert "wrote 3 reward rows" in capsys.readouterr().out  # one pair + a tie in both orders


def test_errors_are_one_line_and_exit_2(db_url, tmp_path, capsys):
    bad = write_rows(tmp_path / "bad.jsonl", [{"prompt": "ok"}, {"prompt": ["not", "chat"]}])
    assert main(["prompts", "import", str(bad), "--db", db_url]) == 2
    err = capsys.readouterr().err.strip()
    assert "bad.jsonl line 2: field 'prompt' item 0: expected an object" in err
    assert err.endswith("(nothing imported)") and "\n" not in err

    assert main(["export", "dpo", "--out", str(tmp_path / "out.csv"), "--db", db_url]) == 2
    assert "must end in .jsonl or .parquet" in capsys.readouterr().err
    assert not (tmp_path / "out.csv").exists()
    assert main(["export", "dpo", "--out", str(tmp_path / "o.jsonl"), "--db", db_url, "--min-agreement", "1.5"]) == 2
    assert "min_agreement must be between 0 and 1" in capsys.readouterr().err

    # A database that was never migrated is refused, not silently created.
    blank = f"sqlite:///{tmp_path / 'blank.db'}"
    assert main(["prompts", "import", str(bad), "--db", blank]) == 2
    assert "prefloop db upgrade" in capsys.readouterr().err


def test_console_script_uses_prefloop_db(db_url, tmp_path):
    tmp_path = tmp_path / "work"  # the SQLite fixture's own file is ../prefloop.db
    tmp_path.mkdir()
    source = write_rows(tmp_path / "prompts.jsonl", ROWS)
    env = {"PREFLOOP_DB": db_url}
    done = prefloop("prompts", "import", str(source), env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "2 new votes" in done.stdout
    done = prefloop("export", "dpo", "--out", "dpo.parquet", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "wrote 2 dpo rows to dpo.parquet" in done.stdout
    assert len(Dataset.from_parquet(str(tmp_path / "dpo.parquet"))) == 2
    assert not (tmp_path / "prefloop.db").exists()  # PREFLOOP_DB was used, not the default file

    bad = write_rows(tmp_path / "bad.jsonl", ['{"prompt": "unterminated'])
    done = prefloop("prompts", "import", str(bad), env=env, cwd=tmp_path)
    assert done.returncode == 2
    assert "bad.jsonl line 1: invalid JSON" in done.stderr


def test_default_database_is_the_working_directory_file(tmp_path):
    env = {"PREFLOOP_DB": ""}
    assert prefloop("db", "upgrade", env=env, cwd=tmp_path).returncode == 0
    done = prefloop("prompts", "import", str(write_rows(tmp_path / "p.jsonl", ROWS)), env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "prefloop.db").exists()


@pytest.mark.parametrize("args", [["prompts", "import", "--help"], ["export", "--help"]])
def test_help_mentions_formats(args, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 0
    assert ".jsonl" in capsys.readouterr().out


def test_demo_hands_serve_every_setting_serve_reads(sqlite_url, monkeypatch):
    """`prefloop demo` ends in `run_serve` with its own arguments: each flag `serve` reads must be
    there (a flag added to serve once made the demo crash before serving)."""
    import labeling.cli.serve_command as serve

    seen = {}

    def fake_serve(args):
        seen.update(vars(args))
        return 0

    monkeypatch.setattr(serve, "run_serve", fake_serve)
    monkeypatch.setattr("alignment.generation.run_generation", lambda engine, job, **kw: type(
        "Report", (), {"summary": lambda self: "no generation in this test"})())
    assert main(["demo", "--db", sqlite_url, "--prompts", "1"]) == 0
    assert set(serve.serve_defaults()) - {"command"} <= set(seen)
    assert seen["single_user"] == "demo"
