"""Prebuilt statements executed straight on the database driver, for the store's hot path.

Recording a vote runs four tiny statements. SQLite executes each in ~10 µs, while
SQLAlchemy's per-execution work (compiled-cache lookup, parameter processing, events, result
set-up) adds ~100 µs to each: most of a vote's cost. The statements stay SQLAlchemy
constructs, compiled once per dialect; only their execution skips the engine layer, on the
session's own connection and so inside its transaction. Bound values pass through the column
types' bind processors, so a row lands exactly as the ORM would have written it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql import ClauseElement


@dataclass(frozen=True)
class DriverStatement:
    sql: str
    positions: tuple[str, ...] | None  # bind names in order, for positional paramstyles (SQLite's "?")
    fixed: Mapping[str, Any]  # values built into the statement (e.g. LIMIT 1)
    processors: Mapping[str, Callable[[Any], Any]]

    def parameters(self, values: Mapping[str, Any]) -> Sequence[Any] | dict[str, Any]:
        params = {**self.fixed, **values}
        for name, process in self.processors.items():
            if params[name] is not None:
                params[name] = process(params[name])
        return params if self.positions is None else [params[name] for name in self.positions]


@lru_cache(maxsize=64)
def prepare(statement: ClauseElement, dialect: Dialect, column_keys: tuple[str, ...] | None = None) -> DriverStatement:
    """Compile once per (statement, dialect); `column_keys` names the columns of an INSERT
    whose values come at execution."""
    compiled = statement.compile(dialect=dialect, column_keys=list(column_keys) if column_keys else None)
    binds = {name: bind for bind, name in compiled.bind_names.items()}
    processors = {}
    for name, bind in binds.items():
        process = bind.type.dialect_impl(dialect).bind_processor(dialect)
        if process is not None:
            processors[name] = process
    fixed = {name: bind.effective_value for name, bind in binds.items() if not bind.required and bind.value is not None}
    positions = tuple(compiled.positiontup) if compiled.positional else None
    return DriverStatement(str(compiled), positions, fixed, processors)


def execute(connection: Connection, statement: ClauseElement, values: Mapping[str, Any]):
    """Run `statement` with `values` on the connection's driver cursor; returns the cursor
    (fetchone/fetchall give plain tuples, without result-type processing). An INSERT needs a
    value for every column it names, defaults included: none are filled in here."""
    keys = tuple(values) if getattr(statement, "is_insert", False) else None
    prepared = prepare(statement, connection.dialect, keys)
    return execute_sql(connection, prepared.sql, prepared.parameters(values))


def execute_sql(connection: Connection, sql: str, parameters: Sequence[Any] | Mapping[str, Any] = ()):
    """Driver-level execution whose errors are SQLAlchemy's, as from `Connection.execute`
    (callers catch `sqlalchemy.exc.OperationalError` for "database is locked", say), and a
    connection the server dropped is invalidated rather than handed out again."""
    dbapi_error = connection.dialect.loaded_dbapi.Error
    cursor = connection.connection.cursor()
    try:
        cursor.execute(sql, parameters)
    except dbapi_error as error:
        if connection.dialect.is_disconnect(error, connection.connection, cursor):
            connection.invalidate(error)
        raise DBAPIError.instance(sql, parameters, error, dbapi_error, dialect=connection.dialect) from error
    return cursor
