"""The thin database engine under the store: dialects, transactions, retries.

The store's SQL is written once, with ``?`` placeholders and a handful of
dialect hooks (:attr:`Dialect.for_update`, :meth:`Dialect.greatest`, schema
substitutions).  :class:`Database` runs one Python function per database
transaction in a :class:`~twisted.enterprise.adbapi.ConnectionPool` thread
and hands the result back as a Deferred, retrying the whole function when the
database reports a serialization failure or deadlock.

Concurrency model
-----------------
SQLite: one connection (``cp_min = cp_max = 1``) so the process's writes are
serialised; every write transaction starts with ``BEGIN IMMEDIATE`` so that
another process sharing the file waits (``busy_timeout``) instead of failing
half-way; reads use a deferred ``BEGIN`` and see a consistent WAL snapshot.
Transactions that queue up while one runs are run together as one group
commit: each function in its own ``SAVEPOINT`` (a function that raises is
rolled back alone, as if it had run in its own transaction), one ``COMMIT``
(one fsync) for the group.  Serial execution on one connection already
orders them; grouping changes only how many commits they cost.  If the
group itself fails (a busy database, a failed commit), each function runs
again in its own transaction with the usual retries.

PostgreSQL: a small pool.  Write transactions run at READ COMMITTED and take
the row lock of the entity they change as their first statement (a local
user's stream position, a remote user's sync row, a device row), so writers
of one entity are serialised while every later statement sees the latest
committed data; a blocked writer waits instead of failing.  Multi-statement
reads run at REPEATABLE READ, READ ONLY (one snapshot, cannot fail to
serialise).  Callers may ask for REPEATABLE READ or SERIALIZABLE writes; the
retry loop then absorbs serialization failures.
"""

from __future__ import annotations

import abc
import enum
import random
import sqlite3
import time
from functools import lru_cache
from string import Template
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, TypeVar

from twisted.enterprise.adbapi import ConnectionPool
from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure
from twisted.logger import Logger

from devicelist_plugin.storage.errors import UnsupportedDatabaseError

T = TypeVar("T")
Row = tuple[Any, ...]

# SQLite 3.35 brought RETURNING; ON CONFLICT ... DO UPDATE is 3.24.
MIN_SQLITE_VERSION = (3, 35, 0)
# PostgreSQL 9.5 brought ON CONFLICT and SKIP LOCKED; 11 is the oldest we test.
MIN_POSTGRES_VERSION = 110000

# Key of the PostgreSQL advisory lock held while migrating ("dlpmigr").
MIGRATION_LOCK_KEY = 0x646C706D69677272


class Isolation(enum.Enum):
    READ_COMMITTED = "READ COMMITTED"
    REPEATABLE_READ = "REPEATABLE READ"
    SERIALIZABLE = "SERIALIZABLE"


class Txn:
    """A cursor in one database transaction, speaking ``?`` placeholders."""

    def __init__(self, cursor: Any, dialect: "Dialect") -> None:
        self._cursor = cursor
        self.dialect = dialect

    def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        self._cursor.execute(self.dialect.convert(sql), tuple(params))

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        batch = [tuple(r) for r in rows]
        if batch:
            self.dialect.executemany(self._cursor, self.dialect.convert(sql), batch)

    def insert_many(
        self, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]
    ) -> None:
        """Insert many rows at once (one statement per page on PostgreSQL)."""
        batch = [tuple(r) for r in rows]
        if batch:
            self.dialect.insert_many(self._cursor, table, columns, batch)

    def fetchone(self) -> Optional[Row]:
        row = self._cursor.fetchone()
        return None if row is None else tuple(row)

    def fetchall(self) -> list[Row]:
        return [tuple(r) for r in self._cursor.fetchall()]

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        self.execute(sql, params)
        return self.fetchall()

    def query_one(self, sql: str, params: Sequence[Any] = ()) -> Optional[Row]:
        rows = self.query(sql, params)
        return rows[0] if rows else None

    @property
    def rowcount(self) -> int:
        return int(self._cursor.rowcount)


class Dialect(abc.ABC):
    """What differs between the engines."""

    name: str = ""
    # appended to a SELECT that must lock the rows it reads
    for_update: str = ""
    # "FOR SHARE": readers together, writers kept out
    for_share: str = ""
    # appended to a SELECT that takes rows no concurrent transaction holds
    for_update_skip_locked: str = ""
    # ``${NAME}`` substitutions in the schema files
    substitutions: Mapping[str, str] = {}

    def convert(self, sql: str) -> str:
        """Turn ``?`` placeholders into the driver's style."""
        return sql

    @abc.abstractmethod
    def greatest(self, a: str, b: str) -> str:
        """SQL for the larger of two expressions."""

    @abc.abstractmethod
    def least(self, a: str, b: str) -> str:
        """SQL for the smaller of two expressions."""

    def render_schema(self, sql: str) -> str:
        return Template(sql).substitute(self.substitutions)

    @abc.abstractmethod
    def begin(self, cursor: Any, *, readonly: bool, isolation: Optional[Isolation]) -> None:
        """Start a transaction on a connection that is not in one."""

    def is_retryable(self, exc: BaseException) -> bool:
        return False

    def lock_for_migration(self, txn: Txn) -> None:
        """Serialise concurrent migrators (a no-op where BEGIN already does)."""

    def check_server(self, txn: Txn) -> None:
        """Raise :class:`UnsupportedDatabaseError` if the engine is too old."""

    def executemany(self, cursor: Any, sql: str, rows: list[Row]) -> None:
        """Run ``sql`` (already converted) once per row."""
        cursor.executemany(sql, rows)

    def insert_many(self, cursor: Any, table: str, columns: Sequence[str], rows: list[Row]) -> None:
        marks = ", ".join("?" for _ in columns)
        sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})"
        cursor.executemany(self.convert(sql), rows)


class SqliteDialect(Dialect):
    name = "sqlite"
    substitutions = {
        "BIGSERIAL_PRIMARY_KEY": "INTEGER PRIMARY KEY AUTOINCREMENT",
        "BLOB": "BLOB",
        "STRING_AGG": "group_concat",
    }

    def greatest(self, a: str, b: str) -> str:
        return f"MAX({a}, {b})"

    def least(self, a: str, b: str) -> str:
        return f"MIN({a}, {b})"

    def begin(self, cursor: Any, *, readonly: bool, isolation: Optional[Isolation]) -> None:
        # SQLite transactions are serializable; IMMEDIATE takes the write
        # lock up front so a write never fails half-way on a busy file.
        cursor.execute("BEGIN" if readonly else "BEGIN IMMEDIATE")

    def is_retryable(self, exc: BaseException) -> bool:
        if not isinstance(exc, sqlite3.OperationalError):
            return False
        message = str(exc).lower()
        return "locked" in message or "busy" in message

    def check_server(self, txn: Txn) -> None:
        if sqlite3.sqlite_version_info < MIN_SQLITE_VERSION:
            raise UnsupportedDatabaseError(
                f"SQLite {sqlite3.sqlite_version} is too old: devicelist-plugin needs "
                f"{'.'.join(map(str, MIN_SQLITE_VERSION))} or newer"
            )


@lru_cache(maxsize=512)
def _pyformat(sql: str) -> str:
    return sql.replace("%", "%%").replace("?", "%s")


# SQLSTATEs after which the whole transaction can simply be run again.
_PG_RETRYABLE = frozenset({"40001", "40P01"})  # serialization_failure, deadlock_detected


class PostgresDialect(Dialect):
    name = "postgres"
    for_update = " FOR UPDATE"
    for_share = " FOR SHARE"
    for_update_skip_locked = " FOR UPDATE SKIP LOCKED"
    substitutions = {
        "BIGSERIAL_PRIMARY_KEY": "BIGSERIAL PRIMARY KEY",
        "BLOB": "BYTEA",
        "STRING_AGG": "string_agg",
    }

    def __init__(self) -> None:
        import psycopg2.errors
        import psycopg2.extras

        self._extras = psycopg2.extras
        self._retryable_types: tuple[type[BaseException], ...] = (
            psycopg2.errors.SerializationFailure,
            psycopg2.errors.DeadlockDetected,
        )

    def convert(self, sql: str) -> str:
        return _pyformat(sql)

    def greatest(self, a: str, b: str) -> str:
        return f"GREATEST({a}, {b})"

    def least(self, a: str, b: str) -> str:
        return f"LEAST({a}, {b})"

    def begin(self, cursor: Any, *, readonly: bool, isolation: Optional[Isolation]) -> None:
        # psycopg2 opens the transaction (BEGIN) before this first statement.
        if isolation is None:
            isolation = Isolation.REPEATABLE_READ if readonly else Isolation.READ_COMMITTED
        mode = ", READ ONLY" if readonly else ""
        cursor.execute(f"SET TRANSACTION ISOLATION LEVEL {isolation.value}{mode}")

    def is_retryable(self, exc: BaseException) -> bool:
        return (
            isinstance(exc, self._retryable_types) or getattr(exc, "pgcode", None) in _PG_RETRYABLE
        )

    def lock_for_migration(self, txn: Txn) -> None:
        # Held until the migrating transaction ends: several processes
        # starting at once migrate one after the other.
        txn.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK_KEY,))
        txn.fetchall()

    def check_server(self, txn: Txn) -> None:
        row = txn.query_one("SHOW server_version_num")
        version = int(row[0]) if row else 0
        if version < MIN_POSTGRES_VERSION:
            raise UnsupportedDatabaseError(
                f"PostgreSQL server version {version} is too old: devicelist-plugin "
                f"needs {MIN_POSTGRES_VERSION // 10000} or newer"
            )

    def executemany(self, cursor: Any, sql: str, rows: list[Row]) -> None:
        # pages of statements in one round trip each, not a round trip per row
        self._extras.execute_batch(cursor, sql, rows, page_size=100)

    def insert_many(self, cursor: Any, table: str, columns: Sequence[str], rows: list[Row]) -> None:
        sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES %s"
        self._extras.execute_values(cursor, sql, rows, page_size=500)


class _Job:
    """A transaction waiting for its group commit."""

    __slots__ = ("desc", "func", "readonly", "isolation", "deferred")

    def __init__(
        self,
        desc: str,
        func: Callable[[Txn], Any],
        readonly: bool,
        isolation: Optional[Isolation],
        deferred: "Deferred[Any]",
    ) -> None:
        self.desc = desc
        self.func = func
        self.readonly = readonly
        self.isolation = isolation
        self.deferred = deferred


class Database:
    """Runs functions of a :class:`Txn` as database transactions.

    ``synchronous=True`` runs each transaction inline, in the calling thread,
    and returns an already-fired Deferred: for tests driven by a
    ``MemoryReactorClock`` (which has no threads) and for deterministic
    single-threaded use.  Otherwise the work runs in the pool's threads and
    the reactor thread never blocks on the database.
    """

    log = Logger()

    def __init__(
        self,
        pool: ConnectionPool,
        dialect: Dialect,
        *,
        synchronous: bool = False,
        max_attempts: int = 10,
    ) -> None:
        self.pool = pool
        self.dialect = dialect
        self.synchronous = synchronous
        self.max_attempts = max_attempts
        self._closed = False
        # group commit: SQLite's single connection runs transactions one at
        # a time, so those that queue meanwhile can share one commit
        self._group_commit = dialect.name == "sqlite" and not synchronous
        self._queued: list[_Job] = []
        self._group_running = False

    def run(
        self,
        desc: str,
        func: Callable[[Txn], T],
        *,
        readonly: bool = False,
        isolation: Optional[Isolation] = None,
    ) -> "Deferred[T]":
        """Run ``func`` in one transaction; commit if it returns, roll back if it raises.

        ``func`` may be called more than once (after a serialization failure
        or deadlock), each time in a fresh transaction: it must not have side
        effects outside the database.
        """
        if self._closed:
            return fail(RuntimeError(f"{desc}: the database has been closed"))
        if self.synchronous:
            try:
                conn = self.pool.connectionFactory(self.pool)
                result = self._run_with_retries(conn, desc, func, readonly, isolation)
            except BaseException:
                return fail()
            return succeed(result)
        if self._group_commit:
            job = _Job(desc, func, readonly, isolation, Deferred())
            self._queued.append(job)
            if not self._group_running:
                self._start_group()
            return job.deferred
        d: Deferred[T] = self.pool.runWithConnection(
            self._run_with_retries, desc, func, readonly, isolation
        )
        return d

    def _start_group(self) -> None:
        jobs, self._queued = self._queued, []
        self._group_running = True
        d: Deferred[list[tuple[bool, Any]]] = self.pool.runWithConnection(self._run_group, jobs)
        d.addBoth(self._group_done, jobs)

    def _group_done(self, outcome: object, jobs: "list[_Job]") -> None:
        # fired on the reactor thread; new transactions that callbacks start
        # queue up and form the next group
        if isinstance(outcome, Failure):
            for job in jobs:
                job.deferred.errback(outcome)
        else:
            assert isinstance(outcome, list)
            for job, (ok, value) in zip(jobs, outcome):
                if ok:
                    job.deferred.callback(value)
                else:
                    job.deferred.errback(value)
        self._group_running = False
        if self._queued:
            if self._closed:
                queued, self._queued = self._queued, []
                for job in queued:
                    job.deferred.errback(RuntimeError(f"{job.desc}: the database has been closed"))
            else:
                self._start_group()

    def _run_group(self, conn: Any, jobs: "list[_Job]") -> list[tuple[bool, Any]]:
        """Run ``jobs`` (in the pool's thread) as one group commit:
        ``(True, result)`` or ``(False, Failure)`` each."""
        if len(jobs) > 1:
            try:
                return self._try_group(conn, jobs)
            except Exception as e:
                try:
                    conn.rollback()
                except Exception:
                    pass
                self.log.debug(
                    "Group of {count} transactions failed ({error}); running them one by one",
                    count=len(jobs),
                    error=e,
                )
        results: list[tuple[bool, Any]] = []
        for job in jobs:
            try:
                results.append((True, self._run_with_retries(
                    conn, job.desc, job.func, job.readonly, job.isolation)))
            except Exception:
                results.append((False, Failure()))
        return results

    def _try_group(self, conn: Any, jobs: "list[_Job]") -> list[tuple[bool, Any]]:
        cursor = conn.cursor()
        results: list[tuple[bool, Any]] = []
        try:
            self.dialect.begin(
                cursor, readonly=all(job.readonly for job in jobs), isolation=None
            )
            for i, job in enumerate(jobs):
                cursor.execute(f"SAVEPOINT group_{i}")
                try:
                    value = job.func(Txn(cursor, self.dialect))
                except Exception as e:
                    if self.dialect.is_retryable(e):
                        raise
                    cursor.execute(f"ROLLBACK TO group_{i}")
                    cursor.execute(f"RELEASE group_{i}")
                    results.append((False, Failure()))
                    continue
                cursor.execute(f"RELEASE group_{i}")
                results.append((True, value))
        finally:
            cursor.close()
        conn.commit()
        return results

    def _run_with_retries(
        self,
        conn: Any,
        desc: str,
        func: Callable[[Txn], T],
        readonly: bool,
        isolation: Optional[Isolation],
    ) -> T:
        attempt = 0
        while True:
            attempt += 1
            cursor = conn.cursor()
            try:
                self.dialect.begin(cursor, readonly=readonly, isolation=isolation)
                result = func(Txn(cursor, self.dialect))
                cursor.close()
                conn.commit()
                return result
            except BaseException as e:
                try:
                    cursor.close()
                except Exception:
                    pass
                conn.rollback()
                if attempt >= self.max_attempts or not self.dialect.is_retryable(e):
                    raise
                self.log.debug(
                    "Retrying transaction {desc} (attempt {attempt}) after {error}",
                    desc=desc,
                    attempt=attempt,
                    error=e,
                )
                if not self.synchronous:
                    # Jittered backoff so that retrying writers spread out.
                    time.sleep(random.random() * min(0.2, 0.002 * 2**attempt))

    def close(self) -> None:
        """Stop the pool's threads and close its connections (idempotent)."""
        if not self._closed:
            self._closed = True
            self.pool.close()
