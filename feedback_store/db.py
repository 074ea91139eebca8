"""Engines and sessions.

SQLite is configured for many concurrent writers: WAL (readers never block the writer),
a busy timeout (writers queue instead of failing), and BEGIN IMMEDIATE for every
transaction, so two writers never both read and then deadlock on the upgrade to a write
lock. PostgreSQL needs none of this and runs the same code.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlmodel import Session, create_engine

from feedback_store.driver_sql import execute_sql
from feedback_store.settings import Settings

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
READ_ONLY_OPTION = "prefloop_read_only"


def make_engine(db_url: str, *, busy_timeout_ms: int = 30_000, echo: bool = False) -> Engine:
    if not db_url.startswith("sqlite"):
        return create_engine(db_url, echo=echo, pool_pre_ping=True, pool_size=20, max_overflow=40)

    engine = create_engine(
        db_url,
        echo=echo,
        connect_args={"check_same_thread": False, "timeout": busy_timeout_ms / 1000},
        pool_size=20,
        max_overflow=40,
    )

    @event.listens_for(engine, "connect")
    def _configure_sqlite(dbapi_connection, _record) -> None:
        # Let SQLAlchemy, not the sqlite3 module, decide when transactions begin.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cursor.execute("PRAGMA synchronous=NORMAL")  # durable across app crashes in WAL mode
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn) -> None:
        # Reads (stats, dashboards) must not take the write lock for their whole duration.
        read_only = conn.get_execution_options().get(READ_ONLY_OPTION, False)
        # On the driver's cursor: the engine's execution path would cost more than BEGIN does.
        execute_sql(conn, "BEGIN" if read_only else "BEGIN IMMEDIATE")

    return engine


@lru_cache(maxsize=16)
def engine_for(db_url: str) -> Engine:
    """One engine (and pool) per URL per process."""
    return make_engine(db_url)


def get_engine(settings: Settings | None = None) -> Engine:
    return engine_for((settings or Settings.from_env()).db_url)


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A unit of work: commits on success, rolls back on any error."""
    with Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


@contextmanager
def read_scope(engine: Engine) -> Iterator[Session]:
    """A read-only unit of work: on SQLite a plain (deferred) BEGIN, so writers keep going."""
    with Session(engine.execution_options(**{READ_ONLY_OPTION: True}), expire_on_commit=False) as session:
        try:
            yield session
            session.commit()  # ends the read; unlike rollback, keeps loaded objects usable
        except BaseException:
            session.rollback()
            raise


def alembic_config(db_url: str):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", db_url.replace("%", "%%"))
    return config


def upgrade(db_url: str, revision: str = "head") -> None:
    """Create or migrate the schema: the only way tables come to exist."""
    from alembic import command

    command.upgrade(alembic_config(db_url), revision)


def current_revision(db_url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine_for(db_url).connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()
