"""The driver-level hot path writes what the ORM would, and fails the way SQLAlchemy does."""

from __future__ import annotations

import sqlite3

import pytest
import sqlalchemy.exc
from sqlalchemy import bindparam, insert, select

from feedback_store import driver_sql
from feedback_store.db import make_engine, session_scope
from feedback_store.models import Choice, Rater, RaterKind, Vote, utcnow
from feedback_store.raters import create_user
from feedback_store.votes import record_vote
from tests.store_factories import make_comparisons

VOTE_COLUMNS = [c for c in Vote.__table__.c if c.name != "id"]


def stored_rows(session, vote_ids):
    """The rows as the driver returns them, before any SQLAlchemy type processing (on SQLite,
    the very text stored), then as SQLAlchemy reads them."""
    names = ", ".join(c.name for c in VOTE_COLUMNS)
    ids = ", ".join(str(int(i)) for i in vote_ids)
    raw = session.connection().exec_driver_sql(f"SELECT {names} FROM vote WHERE id IN ({ids}) ORDER BY id").all()
    read = session.execute(select(*VOTE_COLUMNS).where(Vote.id.in_(vote_ids)).order_by(Vote.id)).all()
    return [dict(zip((c.name for c in VOTE_COLUMNS), row)) for row in raw], [dict(row._mapping) for row in read]


def test_a_driver_insert_stores_what_the_orm_stores(engine):
    with session_scope(engine) as session:
        first, second = make_comparisons(session, 2)
        rater = create_user("ann", "pw-long-enough", session=session)
        now = utcnow()
        values = dict(rater_id=rater.id, choice=Choice.both_bad, strength=None, rationale="ما الأفضل؟ 🙂\u200b",
                      left_response_id=first.response_b_id, time_spent_ms=0, confidence=0.25,
                      revision=1, created_at=now, updated_at=now)
        orm_vote = Vote(comparison_id=first.id, idempotency_key="orm", **values)
        session.add(orm_vote)
        session.flush()
        driver_values = {**values, "comparison_id": second.id, "idempotency_key": "driver",
                         "left_response_id": second.response_b_id}
        [driver_id] = driver_sql.execute(session.connection(), insert(Vote).returning(Vote.id), driver_values).fetchone()
        raw, read = stored_rows(session, [orm_vote.id, driver_id])
    for via_orm, via_driver in (raw, read):
        for column in ("comparison_id", "idempotency_key", "left_response_id"):
            via_orm.pop(column), via_driver.pop(column)
        assert via_driver == via_orm
    via_driver = read[1]
    assert via_driver["choice"] is Choice.both_bad and via_driver["created_at"].replace(tzinfo=None) == now.replace(tzinfo=None)


def test_fixed_values_and_bound_enums_reach_the_driver(engine):
    """A LIMIT built into the statement and an enum compared in SQL both bind correctly, in
    SQLite's positional style and psycopg's named one."""
    with session_scope(engine) as session:
        create_user("ann", "pw-long-enough", session=session)
        statement = (select(Rater.name, (Rater.kind == RaterKind.human).label("human"))
                     .where(Rater.name == bindparam("name")).limit(1))
        rows = driver_sql.execute(session.connection(), statement, {"name": "ann"}).fetchall()
    assert [(name, bool(human)) for name, human in rows] == [("ann", True)]


def test_driver_errors_are_sqlalchemy_errors(engine):
    with session_scope(engine) as session:
        [comparison] = make_comparisons(session, 1)
        rater = create_user("ann", "pw-long-enough", session=session)
        record_vote(comparison.id, rater.id, "a", session=session, idempotency_key="k1")
    with pytest.raises(sqlalchemy.exc.IntegrityError, match="FOREIGN KEY|foreign key"):
        with session_scope(engine) as session:
            now = utcnow()
            driver_sql.execute(session.connection(), insert(Vote), dict(
                comparison_id=10_000, rater_id=rater.id, choice=Choice.a, revision=1, created_at=now, updated_at=now))


def test_a_locked_sqlite_database_raises_operational_error(sqlite_url):
    engine = make_engine(sqlite_url, busy_timeout_ms=100)
    with session_scope(engine) as session:
        [comparison] = make_comparisons(session, 1)
        rater = create_user("ann", "pw-long-enough", session=session)
    blocker = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(sqlalchemy.exc.OperationalError, match="locked"):
            with session_scope(engine) as session:
                record_vote(comparison.id, rater.id, "a", session=session)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    with session_scope(engine) as session:  # the pool's connection is still good afterwards
        assert record_vote(comparison.id, rater.id, "a", session=session).id is not None
    engine.dispose()
