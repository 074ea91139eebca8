"""Every vote as numeric columns, read in one query below the ORM.

Statistics, rater quality and the admin tab all start from these arrays: one entry per vote,
with the rater, the choice, the side shown on the left, both responses and policies, the time
spent and, for gold pairs, the known winner.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC

import numpy as np
from sqlalchemy import Float, case, func, select
from sqlalchemy.orm import aliased
from sqlmodel import Session

from feedback_store.models import Comparison, Rater, RaterKind, Response, Vote

CHOICES = ("a", "b", "tie", "both_bad")


@dataclass(frozen=True)
class RaterTable:
    ids: np.ndarray  # rater ids, ascending
    names: list[str]
    kinds: list[str]

    def index(self, rater_ids: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.ids, rater_ids)

    def of_kinds(self, kinds) -> np.ndarray:
        return np.array([kind in kinds for kind in self.kinds], dtype=bool)


@dataclass(frozen=True)
class VoteColumns:
    """One entry per vote. `rater` indexes RaterTable, `choice` indexes CHOICES, missing = -1 / NaN."""

    comparison: np.ndarray
    rater: np.ndarray
    choice: np.ndarray
    left: np.ndarray
    response_a: np.ndarray
    response_b: np.ndarray
    policy_a: np.ndarray
    policy_b: np.ndarray
    time_spent_ms: np.ndarray
    created_s: np.ndarray  # seconds since the epoch
    gold: np.ndarray | None = None  # the comparison's gold winner: 0 = a, 1 = b, -1 = not a gold pair

    def __post_init__(self) -> None:
        if self.gold is None:
            object.__setattr__(self, "gold", np.full(len(self.comparison), -1, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.comparison)

    def without_gold(self) -> VoteColumns:
        return self.subset(self.gold < 0) if len(self) else self

    def subset(self, mask: np.ndarray) -> VoteColumns:
        return VoteColumns(**{name: value[mask] for name, value in self.__dict__.items()})


def _epoch_seconds(column, dialect: str):
    """Seconds since the epoch, computed by the database: parsing 100,000 datetimes in Python
    would take longer than every statistic together. SQLite stores naive UTC text."""
    if dialect == "sqlite":
        return (func.julianday(column) - 2440587.5) * 86400.0
    if dialect == "postgresql":
        return func.date_part("epoch", column, type_=Float)  # double precision; extract() is a slower numeric
    return None


def _python_epoch_seconds(values) -> np.ndarray:
    return np.array(
        [(v if v.tzinfo else v.replace(tzinfo=UTC)).timestamp() for v in values], dtype=float
    )


def load_raters(*, session: Session) -> RaterTable:
    rows = session.execute(select(Rater.id, Rater.name, Rater.kind).order_by(Rater.id)).all()
    return RaterTable(
        ids=np.array([r[0] for r in rows], dtype=np.int64),
        names=[r[1] for r in rows],
        kinds=[RaterKind(r[2]).value for r in rows],
    )


def load_votes(raters: RaterTable, *, session: Session) -> VoteColumns:
    """Every vote as numeric columns, from one query run below the ORM (no per-row objects)."""
    response_a, response_b = aliased(Response), aliased(Response)
    choice_code = case(*((Vote.choice == choice, i) for i, choice in enumerate(CHOICES)), else_=-1)
    epoch = _epoch_seconds(Vote.created_at, session.get_bind().dialect.name)
    gold_code = case((Comparison.gold_winner == "a", 0), (Comparison.gold_winner == "b", 1), else_=-1)
    query = (
        select(
            Vote.comparison_id,
            Vote.rater_id,
            choice_code,
            Vote.left_response_id,
            Comparison.response_a_id,
            Comparison.response_b_id,
            response_a.policy_id,
            response_b.policy_id,
            Vote.time_spent_ms,
            Vote.created_at if epoch is None else epoch,
            gold_code,
        )
        .join(Comparison, Comparison.id == Vote.comparison_id)
        .join(response_a, response_a.id == Comparison.response_a_id)
        .join(response_b, response_b.id == Comparison.response_b_id)
    )
    result = session.connection().execute(query)
    if epoch is None:
        rows = [tuple(row) for row in result.all()]
        created = _python_epoch_seconds([row[9] for row in rows])
        rows = [row[:9] + (0.0, row[10]) for row in rows]
    else:
        # Every column is a plain number the driver already converted: read the DBAPI cursor's
        # tuples directly, which numpy takes at once (SQLAlchemy's Row objects would triple the time).
        rows = result.cursor.fetchall()
        result.close()
    table = np.array(rows, dtype=float).reshape(len(rows), 11)  # None -> NaN
    if epoch is not None:
        created = table[:, 9]
    ints = np.nan_to_num(table[:, :8], nan=-1).astype(np.int64)
    return VoteColumns(
        comparison=ints[:, 0],
        rater=raters.index(ints[:, 1]),
        choice=ints[:, 2],
        left=ints[:, 3],
        response_a=ints[:, 4],
        response_b=ints[:, 5],
        policy_a=ints[:, 6],
        policy_b=ints[:, 7],
        time_spent_ms=table[:, 8].copy(),
        created_s=np.asarray(created, dtype=float),
        gold=table[:, 10].astype(np.int64),
    )
