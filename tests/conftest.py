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
def sqlite_url(tmp_path) -> str:
    url = f"sqlite:///{tmp_path / 'prefloop.db'}"
    upgrade(url)
    return url


@pytest.fixture
def postgres_url() -> str:
    """A fresh database on the test PostgreSQL server, dropped afterwards."""
    if not PG_URL:
        pytest.skip("PREFLOOP_TEST_PG_URL is not set (.ci/run starts a PostgreSQL server)")
    admin_url = normalize_db_url(PG_URL)
    name = f"prefloop_{uuid.uuid4().hex[:12]}"
    admin = make_engine(admin_url).execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = admin_url.rsplit("/", 1)[0] + f"/{name}"
    upgrade(url)
    yield url
    engine_for(url).dispose()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request) -> str:
    """Each store test runs on a real SQLite file and on the real PostgreSQL server."""
    return request.getfixturevalue(f"{request.param}_url")


@pytest.fixture
def engine(db_url):
    return engine_for(db_url)


@pytest.fixture
def session(engine):
    with session_scope(engine) as session:
        yield session
