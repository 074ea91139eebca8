"""The schema comes only from Alembic: `prefloop db upgrade` from empty, again, down and up,
and the migrations' head matches the SQLModel tables (SQLite and PostgreSQL)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect
from sqlmodel import SQLModel

from feedback_store.catalog import add_comparison, add_prompt, add_response, get_or_create_policy, list_prompts
from feedback_store.db import alembic_config, current_revision, engine_for, session_scope, upgrade
from labeling.cli import main as prefloop

MODEL_TABLES = set(SQLModel.metadata.tables)
HEAD = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def schema(url: str) -> dict[str, tuple]:
    """Every table with its columns, indexes and unique constraints, as the database reports them."""
    inspector = inspect(engine_for(url))
    return {
        table: (
            [(c["name"], str(c["type"]), c["nullable"]) for c in inspector.get_columns(table)],
            sorted((i["name"], tuple(i["column_names"]), bool(i["unique"])) for i in inspector.get_indexes(table)),
            sorted((u["name"] or "", tuple(u["column_names"])) for u in inspector.get_unique_constraints(table)),
        )
        for table in inspector.get_table_names()
    }


def test_db_upgrade_from_empty_creates_every_table(empty_db_url):
    assert schema(empty_db_url) == {}
    # The installed console script, reading the database from the environment.
    script = Path(sys.executable).parent / "prefloop"
    done = subprocess.run(
        [str(script), "db", "upgrade"],
        env={**os.environ, "PREFLOOP_DB": empty_db_url},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert f"at revision {HEAD}" in done.stdout
    assert set(schema(empty_db_url)) == MODEL_TABLES | {"alembic_version"}
    assert current_revision(empty_db_url) == HEAD


def test_a_second_upgrade_changes_nothing(empty_db_url, capsys):
    assert prefloop(["db", "upgrade", "--db", empty_db_url]) == 0
    with session_scope(engine_for(empty_db_url)) as s:
        add_prompt("still here after the second upgrade?", session=s)
    before = schema(empty_db_url)
    assert prefloop(["db", "upgrade", "--db", empty_db_url]) == 0
    assert schema(empty_db_url) == before
    assert current_revision(empty_db_url) == HEAD
    with session_scope(engine_for(empty_db_url)) as s:
        contents = [p.messages[0]["content"] for p in list_prompts(session=s)]
        assert contents == ["still here after the second upgrade?"]
    assert capsys.readouterr().out.count(f"at revision {HEAD}") == 2


def test_downgrade_to_base_and_up_again(empty_db_url):
    upgrade(empty_db_url)
    migrated = schema(empty_db_url)
    command.downgrade(alembic_config(empty_db_url), "base")
    assert set(schema(empty_db_url)) == {"alembic_version"}
    assert current_revision(empty_db_url) is None
    upgrade(empty_db_url)
    assert schema(empty_db_url) == migrated
    with session_scope(engine_for(empty_db_url)) as s:  # and the store works on the rebuilt schema
        prompt, _ = add_prompt("hello again", session=s)
        policy = get_or_create_policy("p", session=s)
        r1, _ = add_response(prompt.id, policy.id, "one", session=s)
        r2, _ = add_response(prompt.id, policy.id, "two", session=s)
        add_comparison(r1, r2, session=s)


def _is_queue_index_on_sqlite(diff, dialect: str) -> bool:
    # ix_comparison_queue is declared with the expression `priority DESC`. SQLite reflects it
    # as plain columns (dropping the DESC) and autogenerate cannot match that to a text
    # element, so it always reports a remove + add pair there. The DESC is checked below.
    is_index_change = diff[0] in ("add_index", "remove_index")
    return dialect == "sqlite" and is_index_change and diff[1].name == "ix_comparison_queue"


def test_migrations_head_matches_the_models(db_url):
    engine = engine_for(db_url)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
        diffs = compare_metadata(context, SQLModel.metadata)
        dialect = conn.dialect.name
        if dialect == "sqlite":
            created = conn.exec_driver_sql(
                "SELECT sql FROM sqlite_master WHERE type = 'index' AND name = 'ix_comparison_queue'"
            ).scalar_one()
            assert "priority DESC" in created
    assert [d for d in diffs if not _is_queue_index_on_sqlite(d, dialect)] == []
