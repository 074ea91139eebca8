"""The one typed settings object read from the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DB_FILE = "prefloop.db"


@dataclass(frozen=True)
class Settings:
    db_url: str
    sqlite_busy_timeout_ms: int = 30_000

    @classmethod
    def from_env(cls, db: str | None = None) -> "Settings":
        """`db` (the CLI's `--db`) wins over `PREFLOOP_DB`, which wins over ./prefloop.db."""
        return cls(db_url=normalize_db_url(db or os.environ.get("PREFLOOP_DB") or DEFAULT_DB_FILE))


def normalize_db_url(value: str) -> str:
    """Accept a SQLAlchemy URL, a `postgres://` URL, or a plain path to an SQLite file."""
    if value.startswith("postgres://"):
        value = "postgresql://" + value[len("postgres://") :]
    if value.startswith("postgresql://"):
        # psycopg 3 is the driver we ship as the `postgres` extra.
        return "postgresql+psycopg://" + value[len("postgresql://") :]
    if "://" in value:
        return value
    return f"sqlite:///{Path(value).expanduser().resolve()}"
