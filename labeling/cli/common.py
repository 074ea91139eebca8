"""What every subcommand shares: the database option and how errors reach the user."""

from __future__ import annotations

import argparse

from sqlalchemy.engine import Engine

from feedback_store.db import current_revision, engine_for, upgrade
from feedback_store.settings import Settings


class CliError(Exception):
    """A one-line, user-facing error; the CLI prints it and exits non-zero."""


def common_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument(
        "--db",
        default=None,
        help="database URL or SQLite path (default: $PREFLOOP_DB, else ./prefloop.db)",
    )
    return parser


def open_store(args: argparse.Namespace, *, migrate: bool = False) -> Engine:
    """The engine for `--db`/`PREFLOOP_DB`, refusing a schema that is not up to date."""
    url = Settings.from_env(args.db).db_url
    if migrate:
        upgrade(url)
    else:
        from alembic.script import ScriptDirectory

        from feedback_store.db import alembic_config

        head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
        if current_revision(url) != head:
            raise CliError(f"the database at {url} is not at the latest schema: run `prefloop db upgrade`")
    return engine_for(url)
