"""Stores for tests: SQLite with inline transactions, a dump to compare, and
the two engines as test-case bases for suites that must pass on both."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from devicelist_plugin.storage import Store, open_postgres_store, open_sqlite_store
from tests.storage.pgcluster import get_server


def open_inline_store(case: SynchronousTestCase) -> Store:
    """A fresh SQLite store whose transactions run inline (Deferreds fire at once)."""
    directory = case.mktemp()
    os.makedirs(directory)
    d = open_sqlite_store(
        os.path.join(directory, "devicelist.db"), MemoryReactorClock(), synchronous=True
    )
    store = case.successResultOf(d)
    case.addCleanup(store.close)
    return store


def dump_store(case: SynchronousTestCase, store: Store) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, sorted: to assert that nothing changed."""

    def txn(t: Any) -> dict[str, list[tuple[Any, ...]]]:
        tables = [
            r[0]
            for r in t.query(
                "SELECT name FROM sqlite_master WHERE type = 'table'"
                " AND name NOT LIKE 'sqlite_%' ORDER BY name"
            )
        ]
        return {
            table: sorted(t.query(f"SELECT * FROM {table}"), key=repr) for table in tables
        }

    result: dict[str, list[tuple[Any, ...]]] = case.successResultOf(
        store.database.run("dump", txn, readonly=True)
    )
    return result


class SQLiteStoreCase(TestCase):
    """A fresh SQLite file per test; transactions in the pool's thread
    (inline when ``synchronous``).  Mix a store test mixin in front of it."""

    synchronous = False

    def setUp(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        self.path = os.path.join(directory, "devicelist.db")

    def open_store(self) -> "Deferred[Store]":
        return open_sqlite_store(self.path, reactor, synchronous=self.synchronous)


class PostgresStoreCase(TestCase):
    """A fresh PostgreSQL database per test, a pool of five connections."""

    def setUp(self) -> None:
        server = get_server()
        name, self.dsn = server.create_database()
        self.addCleanup(server.drop_database, name)

    def open_store(self) -> "Deferred[Store]":
        return open_postgres_store(self.dsn, reactor, min_connections=1, max_connections=5)
