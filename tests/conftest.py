"""Shared fixtures: a fresh migrated SQLite file per test, and the CI's PostgreSQL server."""

from __future__ import annotations

import os
import uuid

import pytest
from sqlalchemy import text

from feedback_store.db import engine_for, make_engine, session_scope, upgrade
from feedback_store.settings import normalize_db_url

PG_URL = os.environ.get("PREFLOOP_TEST_PG_URL")


@pytest.fixture
def empty_sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'prefloop.db'}"


@pytest.fixture
def empty_postgres_url() -> str:
    """A fresh, empty database on the test PostgreSQL server, dropped afterwards."""
    if not PG_URL:
        pytest.skip("PREFLOOP_TEST_PG_URL is not set (.ci/run starts a PostgreSQL server)")
    admin_url = normalize_db_url(PG_URL)
    name = f"prefloop_{uuid.uuid4().hex[:12]}"
    admin = make_engine(admin_url).execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = admin_url.rsplit("/", 1)[0] + f"/{name}"
    yield url
    engine_for(url).dispose()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def sqlite_url(empty_sqlite_url) -> str:
    upgrade(empty_sqlite_url)
    return empty_sqlite_url


@pytest.fixture
def postgres_url(empty_postgres_url) -> str:
    upgrade(empty_postgres_url)
    return empty_postgres_url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request) -> str:
    """Each store test runs on a real SQLite file and on the real PostgreSQL server."""
    return request.getfixturevalue(f"{request.param}_url")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_db_url(request) -> str:
    """Like db_url, but with no schema: for the migration tests."""
    return request.getfixturevalue(f"empty_{request.param}_url")


@pytest.fixture
def engine(db_url):
    return engine_for(db_url)


@pytest.fixture
def session(engine):
    with session_scope(engine) as session:
        yield session
