"""The SQL side of the ledger: the ``usage_events`` table, its schema check, inserts and reads.

One table, one row per usage event, keyed by ``event_id`` (the event's Redis Stream
entry id, unique within the stream): inserting a row whose id is already there changes
nothing (``ON CONFLICT DO NOTHING``), which turns the stream's at-least-once delivery
into an exactly-once effect. SQLite (``sqlite:///path.db``, the embedded default) and
PostgreSQL (``postgresql://...``, through psycopg 3) are supported, through SQLAlchemy
Core. The table is created when missing, with indexes on time, user, model and the tag
dimensions ``tenant``, ``feature`` and ``api_key`` (expression indexes on the JSON
``tags``: budgets are grouped by tags, so a new dimension needs an index, not a column).
An existing table is checked column by column; one that lacks a column or has the wrong
kind of column is refused with a :class:`LedgerError` naming it, before anything is
read from the stream. Errors never carry the database password.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

from ..errors import BudgetGuardError
from ..redact import redact_url
from .flags import DEFAULT_TABLE

try:
    import sqlalchemy as sa
    from sqlalchemy.dialects import postgresql, sqlite
    from sqlalchemy.engine import Engine
except ImportError:  # the [ledger] extra is not installed
    sa = None  # type: ignore[assignment]

__all__ = ["DEFAULT_TABLE", "TAG_INDEXES", "Ledger", "LedgerError", "open_ledger"]

TAG_INDEXES = ("tenant", "feature", "api_key")
_TABLE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,47}")
_MAX_URL = 4096


class LedgerError(BudgetGuardError):
    """The ledger database cannot be used: unreachable, a bad URL, a table of the wrong shape."""


def _require_sqlalchemy() -> None:
    if sa is None:
        raise LedgerError("the ledger needs SQLAlchemy and psycopg: pip install 'budgetguard-redis[ledger]'")


def _table(name: str) -> sa.Table:
    json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
    metadata = sa.MetaData()
    text = sa.String
    table = sa.Table(
        name, metadata,
        sa.Column("event_id", text(64), primary_key=True),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", text(16), nullable=False),
        sa.Column("outcome", text(64), nullable=False),
        sa.Column("user_id", text(256)),
        sa.Column("tier", text(256)),
        sa.Column("request_id", text(256)),
        sa.Column("provider", text(64)),
        sa.Column("model", text(256)),
        sa.Column("requested_model", text(256)),
        sa.Column("routed", sa.Boolean),
        sa.Column("limit_name", text(256)),
        sa.Column("reason", text(1024)),
        sa.Column("error", text(1024)),
        sa.Column("endpoint", text(64)),
        sa.Column("finish_reason", text(64)),
        sa.Column("streamed", sa.Boolean),
        sa.Column("input_tokens", sa.BigInteger, nullable=False),
        sa.Column("cached_input_tokens", sa.BigInteger, nullable=False),
        sa.Column("cache_write_tokens", sa.BigInteger, nullable=False),
        sa.Column("output_tokens", sa.BigInteger, nullable=False),
        sa.Column("reasoning_tokens", sa.BigInteger, nullable=False),
        sa.Column("cost_nano", sa.BigInteger, nullable=False),
        sa.Column("input_cost_nano", sa.BigInteger, nullable=False),
        sa.Column("estimated_nano", sa.BigInteger, nullable=False),
        sa.Column("estimated_input_tokens", sa.BigInteger),
        sa.Column("max_output_tokens", sa.BigInteger),
        sa.Column("latency_ms", sa.BigInteger),
        sa.Column("tags", json, nullable=False),
        sa.Column("prices", json),
        sa.Column("raw_usage", json),
    )
    sa.Index(f"ix_{name}_ts", table.c.ts)
    sa.Index(f"ix_{name}_user_ts", table.c.user_id, table.c.ts)
    sa.Index(f"ix_{name}_model_ts", table.c.model, table.c.ts)
    return table


def _tag_index_ddl(dialect: str, table: str) -> list[str]:
    # Written out rather than built: the expression must be the one queries spell
    # (``tags->>'tenant'``, ``json_extract(tags, '$.tenant')``) for the planner to use it.
    # Table names are checked against _TABLE_NAME and tags are constants: nothing to escape.
    def expression(tag: str) -> str:
        return f"(tags->>'{tag}')" if dialect == "postgresql" else f"json_extract(tags, '$.{tag}')"

    return [f"CREATE INDEX IF NOT EXISTS ix_{table}_{tag} ON {table} ({expression(tag)}, ts)" for tag in TAG_INDEXES]


# The kind of SQL type each column must have, by Python type of its values.
_KINDS: dict[str, type] = {"ts": datetime, "routed": bool, "streamed": bool, "tags": dict, "prices": dict,
                           "raw_usage": dict}
_INTEGERS = frozenset({"input_tokens", "cached_input_tokens", "cache_write_tokens", "output_tokens",
                       "reasoning_tokens", "cost_nano", "input_cost_nano", "estimated_nano",
                       "estimated_input_tokens", "max_output_tokens", "latency_ms"})


def _type_ok(column: str, sql_type: Any) -> bool:
    if column in _INTEGERS:
        # A 32-bit INTEGER would overflow on a month's nano-USD; SQLite's INTEGER is 64-bit.
        return isinstance(sql_type, sa.BigInteger) or (isinstance(sql_type, sa.Integer) and _sqlite_int(sql_type))
    if column in ("tags", "prices", "raw_usage"):
        return isinstance(sql_type, sa.JSON | postgresql.JSONB | postgresql.JSON) or (
            isinstance(sql_type, sa.types.NullType | sa.Text | sa.String) and _sqlite_json(sql_type))
    if column == "ts":
        return isinstance(sql_type, sa.DateTime)
    if column in ("routed", "streamed"):
        return isinstance(sql_type, sa.Boolean)
    return isinstance(sql_type, sa.String)


def _sqlite_int(sql_type: Any) -> bool:
    return type(sql_type).__module__.startswith("sqlalchemy.dialects.sqlite") or type(sql_type) is sa.INTEGER


def _sqlite_json(sql_type: Any) -> bool:
    return type(sql_type).__module__.startswith("sqlalchemy.dialects.sqlite")


def _engine_url(url: str) -> str:
    if len(url) > _MAX_URL:
        raise LedgerError(f"the database URL is longer than {_MAX_URL} characters")
    scheme = url.split(":", 1)[0].lower()
    if scheme in ("postgresql", "postgres", "postgresql+psycopg"):
        return "postgresql+psycopg:" + url.split(":", 1)[1]
    if scheme == "sqlite":
        if not url.startswith("sqlite:///"):
            raise LedgerError(f"bad SQLite URL {redact_url(url)!r}: use sqlite:///relative.db or sqlite:////abs.db")
        return url
    raise LedgerError(f"unsupported database URL {redact_url(url)!r}: use sqlite:///path.db or postgresql://...")


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers (reports) run beside a shipper; NORMAL still survives a process crash.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


class Ledger:
    """A ledger table in one database. Use :func:`open_ledger`."""

    def __init__(self, engine: Engine, table: sa.Table, url: str) -> None:
        self.engine = engine
        self.table = table
        self.url = redact_url(url)
        self._insert = (postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert)(table)

    # -- schema ------------------------------------------------------------------------

    def ensure_schema(self, create: bool = True) -> None:
        """Create the table and its indexes when missing (``create``, else refuse a missing
        table); refuse a table of another shape."""
        try:
            with self.engine.begin() as conn:
                if not sa.inspect(conn).has_table(self.table.name):
                    if not create:
                        raise LedgerError(f"there is no table {self.table.name} in {self.url} "
                                          "(budgetguard ship creates it)")
                    self.table.create(conn, checkfirst=True)  # with its column indexes
                    for ddl in _tag_index_ddl(conn.dialect.name, self.table.name):
                        conn.execute(sa.text(ddl))
                    return
                with warnings.catch_warnings():
                    # SQLAlchemy cannot reflect the tag expression indexes and says so; they are not checked.
                    warnings.simplefilter("ignore", sa.exc.SAWarning)
                    self._check(conn)
        except sa.exc.SQLAlchemyError as exc:
            raise LedgerError(f"cannot use the database {self.url}: {_why(exc)}") from None

    def _check(self, conn: sa.Connection) -> None:
        inspector = sa.inspect(conn)
        found = {c["name"]: c for c in inspector.get_columns(self.table.name)}
        for column in self.table.columns:
            have = found.get(column.name)
            if have is None:
                raise LedgerError(f"table {self.table.name} in {self.url} has no column {column.name!r} "
                                  "(drop it, or ship to another table with --table)")
            if not _type_ok(column.name, have["type"]):
                raise LedgerError(f"table {self.table.name} in {self.url}: column {column.name!r} is "
                                  f"{have['type']!s}, expected {column.type.compile(conn.dialect)}")
        primary = inspector.get_pk_constraint(self.table.name).get("constrained_columns") or []
        uniques = [[str(c) for c in u["column_names"]] for u in inspector.get_unique_constraints(self.table.name)]
        uniques += [[str(c) for c in i["column_names"]] for i in inspector.get_indexes(self.table.name)
                    if i.get("unique")]
        if primary != ["event_id"] and ["event_id"] not in uniques:
            raise LedgerError(f"table {self.table.name} in {self.url}: column 'event_id' is not unique, "
                              "so a redelivered event would be counted twice")

    # -- writing -----------------------------------------------------------------------

    def insert(self, rows: Sequence[dict[str, Any]]) -> int:
        """Insert ``rows`` in one transaction, skipping ids already present; how many were new.

        Raises ``sqlalchemy.exc.SQLAlchemyError`` (the transaction rolled back) on failure.
        """
        if not rows:
            return 0
        with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                return self._copy_insert(conn, rows)
            statement = self._insert.on_conflict_do_nothing(index_elements=["event_id"]).returning(
                self.table.c.event_id)
            return len(conn.execute(statement, list(rows)).all())

    def _copy_insert(self, conn: sa.Connection, rows: Sequence[dict[str, Any]]) -> int:
        # COPY into a per-session staging table, then one INSERT ... SELECT: several times
        # faster than a multi-row INSERT of the same rows, with the same ON CONFLICT rule.
        # Both run inside the caller's transaction, so a failure leaves nothing behind.
        import psycopg
        from psycopg.types.json import Jsonb

        stage = f"bg_stage_{self.table.name}"
        names = [c.name for c in self.table.columns]
        jsons = {"tags", "prices", "raw_usage"}
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.execute(f"CREATE TEMP TABLE IF NOT EXISTS {stage} "
                           f"(LIKE {self.table.name} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS")
            with cursor.copy(f"COPY {stage} ({', '.join(names)}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row([Jsonb(row[n]) if n in jsons and row[n] is not None else row[n] for n in names])
            cursor.execute(f"INSERT INTO {self.table.name} SELECT * FROM {stage} ON CONFLICT (event_id) DO NOTHING")
            return max(cursor.rowcount, 0)
        except psycopg.Error as exc:
            # The driver's own error, wrapped as SQLAlchemy wraps every other statement's.
            raise sa.exc.DBAPIError.instance("COPY", None, exc, psycopg.Error) from exc
        finally:
            cursor.close()

    # -- reading -----------------------------------------------------------------------

    def rows(self, since: datetime | None, until: datetime | None, batch: int = 5000,
             columns: Sequence[str] | None = None) -> Iterator[dict[str, Any]]:
        """Rows (``columns`` of them, default all) whose ``ts`` lies in [since, until), oldest
        first, streamed in batches."""
        chosen = self.table.columns if columns is None else [self.table.c[name] for name in columns]
        query = sa.select(*chosen).order_by(self.table.c.ts, self.table.c.event_id)
        if since is not None:
            query = query.where(self.table.c.ts >= since)
        if until is not None:
            query = query.where(self.table.c.ts < until)
        try:
            with self.engine.connect() as conn:
                result = conn.execution_options(yield_per=batch).execute(query)
                for row in result.mappings():
                    yield dict(row)
        except sa.exc.SQLAlchemyError as exc:
            raise LedgerError(f"cannot read {self.table.name} from {self.url}: {_why(exc)}") from None

    def count(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(self.table)).scalar_one())

    def close(self) -> None:
        self.engine.dispose()


def _why(exc: BaseException) -> str:
    """The driver's own first line, without SQLAlchemy's statement dump."""
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def open_ledger(url: str, table: str = DEFAULT_TABLE, *, create: bool = True) -> Ledger:
    """A :class:`Ledger` on ``url`` (``sqlite:///path.db`` or ``postgresql://...``).

    The table is created when missing (with ``create``; else that is an error) and an
    existing one checked; a database that does not answer raises :class:`LedgerError`.
    """
    _require_sqlalchemy()
    if not _TABLE_NAME.fullmatch(table):
        raise LedgerError(f"bad table name {table[:60]!r}: use lower-case letters, digits and _ (at most 48)")
    target = _engine_url(url)
    try:
        if target.startswith("sqlite"):
            # A second shipper or a report waits for the writer's lock instead of failing.
            engine = sa.create_engine(target, connect_args={"timeout": 60})
            sa.event.listen(engine, "connect", _sqlite_pragmas)
        else:
            engine = sa.create_engine(target, pool_pre_ping=True, connect_args={"connect_timeout": 10})
    except (sa.exc.ArgumentError, ValueError) as exc:
        raise LedgerError(f"bad database URL {redact_url(url)!r}: {exc}") from None
    ledger = Ledger(engine, _table(table), url)
    try:
        ledger.ensure_schema(create)
    except LedgerError:
        engine.dispose()
        raise
    return ledger
