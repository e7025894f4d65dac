"""Opening a store: build the connection pool, migrate the schema, hand back a Store.

``open_sqlite_store`` is the embedded default; ``open_postgres_store`` is for
several processes over one database.  Both migrate the schema at start-up
(in one transaction; on PostgreSQL under an advisory lock so that processes
starting together do not race) and fail with ``SchemaTooNewError`` if the
database was written by a newer plugin.

Pass ``synchronous=True`` to run every transaction inline in the calling
thread (the returned Deferreds have already fired): for tests driven by a
``MemoryReactorClock``.  Otherwise the database work runs in the pool's
threads and results come back through ``reactor.callFromThread``, so the
reactor must also provide ``IReactorFromThreads`` (every real reactor does).
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any, Optional, Sequence

from twisted.enterprise.adbapi import ConnectionPool
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorCore
from twisted.python.failure import Failure

from devicelist_plugin.storage.engines import Database, PostgresDialect, SqliteDialect
from devicelist_plugin.storage.migrations import Migration, migrate
from devicelist_plugin.storage.store import DEFAULT_KNOWN_IDS_WINDOW, Store

# How long a SQLite writer waits for another process's write lock.
SQLITE_BUSY_TIMEOUT_MS = 10_000


def _setup_sqlite_connection(conn: sqlite3.Connection) -> None:
    # The connection is in autocommit mode (isolation_level=None): the engine
    # issues BEGIN itself, and these pragmas run outside any transaction.
    conn.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
    _use_wal(conn)
    # FULL: a commit (an EDU answered 200, an acknowledged send) survives a
    # power loss too, not only a process crash
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")


def _use_wal(conn: sqlite3.Connection) -> None:
    """Put the database in WAL mode (once; it persists in the file).

    Switching needs an exclusive lock, and SQLite may refuse it at once
    ("database is locked", without waiting the busy timeout) when another
    connection opens the file at the same moment -- several processes, or a
    pool, starting together.  Once in WAL mode there is nothing to switch; a
    refused switch is retried for up to the busy timeout.
    """
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            mode = conn.execute("PRAGMA journal_mode").fetchone()
            if mode is not None and str(mode[0]).lower() == "wal":
                return
            conn.execute("PRAGMA journal_mode = WAL").fetchall()
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _setup_postgres_connection(conn: Any) -> None:
    conn.set_client_encoding("UTF8")
    conn.autocommit = False


def prepare_store(
    database: Database,
    *,
    known_ids_window: int = DEFAULT_KNOWN_IDS_WINDOW,
    migrations: Optional[Sequence[Migration]] = None,
) -> "Deferred[Store]":
    """Migrate ``database`` and wrap it in a :class:`Store`; close it on failure."""

    def run_migrations(txn: Any) -> int:
        return migrate(txn, migrations)

    d = database.run("prepare_database", run_migrations)

    def ready(_version: int) -> Store:
        return Store(database, known_ids_window=known_ids_window)

    def failed(failure: Failure) -> Failure:
        database.close()
        return failure

    return d.addCallback(ready).addErrback(failed)


def open_sqlite_store(
    path: str,
    reactor: IReactorCore,
    *,
    synchronous: bool = False,
    known_ids_window: int = DEFAULT_KNOWN_IDS_WINDOW,
    migrations: Optional[Sequence[Migration]] = None,
) -> "Deferred[Store]":
    """Open (creating and migrating if needed) the SQLite database at ``path``.

    One connection in one pool thread, so the process's writes are
    serialised; WAL journal, foreign keys on, a busy timeout for other
    processes.  ``path`` may be ``":memory:"`` (one connection: still one
    database).  Call :meth:`Store.close` when done.
    """
    try:
        pool = ConnectionPool(
            "sqlite3",
            path,
            check_same_thread=False,
            isolation_level=None,
            timeout=SQLITE_BUSY_TIMEOUT_MS / 1000,
            cp_min=1,
            cp_max=1,
            cp_openfun=_setup_sqlite_connection,
            cp_reactor=reactor,
        )
    except Exception:
        return fail()
    database = Database(pool, SqliteDialect(), synchronous=synchronous)
    return prepare_store(database, known_ids_window=known_ids_window, migrations=migrations)


def open_postgres_store(
    dsn: str,
    reactor: IReactorCore,
    *,
    min_connections: int = 1,
    max_connections: int = 5,
    synchronous: bool = False,
    known_ids_window: int = DEFAULT_KNOWN_IDS_WINDOW,
    migrations: Optional[Sequence[Migration]] = None,
    **connect_kwargs: Any,
) -> "Deferred[Store]":
    """Open the PostgreSQL database named by ``dsn`` (libpq syntax), migrating it.

    ``connect_kwargs`` are passed to ``psycopg2.connect`` (``host``,
    ``user``, ``password``, ...).  Lost connections are re-opened by the pool.
    Call :meth:`Store.close` when done.
    """
    try:
        dialect = PostgresDialect()
        pool = ConnectionPool(
            "psycopg2",
            dsn,
            cp_min=min_connections,
            cp_max=max_connections,
            cp_reconnect=True,
            cp_openfun=_setup_postgres_connection,
            cp_reactor=reactor,
            **connect_kwargs,
        )
    except Exception:
        return fail()
    database = Database(pool, dialect, synchronous=synchronous)
    return prepare_store(database, known_ids_window=known_ids_window, migrations=migrations)
