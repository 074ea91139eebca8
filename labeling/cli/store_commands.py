"""`prefloop db upgrade` and `prefloop prompts import`."""

from __future__ import annotations

import argparse

from feedback_store.db import current_revision, upgrade
from feedback_store.settings import Settings


def register(subparsers, common: argparse.ArgumentParser) -> None:
    db = subparsers.add_parser("db", help="database schema management")
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    up = db_sub.add_parser("upgrade", parents=[common], help="create or migrate the schema (Alembic)")
    up.add_argument("--revision", default="head", help="target revision (default: head)")
    up.set_defaults(handler=run_db_upgrade)


def run_db_upgrade(args: argparse.Namespace) -> int:
    url = Settings.from_env(args.db).db_url
    upgrade(url, args.revision)
    print(f"database {url} at revision {current_revision(url)}")
    return 0
