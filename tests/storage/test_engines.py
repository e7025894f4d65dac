"""The engine's pure parts, and the store run inline under a simulated reactor."""

from __future__ import annotations

import os
import sqlite3
from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from devicelist_plugin.storage import SchemaError, open_sqlite_store
from devicelist_plugin.storage.engines import PostgresDialect, SqliteDialect
from devicelist_plugin.storage.factory import _use_wal
from devicelist_plugin.storage.migrations import (
    Migration,
    check_migrations,
    load_migrations,
    split_statements,
)


class MigrationFileTests(SynchronousTestCase):
    def test_shipped_migrations_are_numbered_from_one(self) -> None:
        migrations = load_migrations()
        self.assertEqual([m.version for m in migrations], list(range(1, len(migrations) + 1)))
        self.assertEqual(migrations[0].name, "initial")

    def test_gaps_and_duplicates_are_refused(self) -> None:
        with self.assertRaises(SchemaError):
            check_migrations([Migration(1, "a", ""), Migration(3, "c", "")])
        with self.assertRaises(SchemaError):
            check_migrations([Migration(1, "a", ""), Migration(1, "b", "")])
        self.assertEqual(
            [m.version for m in check_migrations([Migration(2, "b", ""), Migration(1, "a", "")])],
            [1, 2],
        )

    def test_split_statements(self) -> None:
        sql = (
            "-- comment; not a statement\n"
            "CREATE TABLE a (\n  x INTEGER -- no\n);\n\n"
            "CREATE INDEX i ON a (x);\n"
            "SELECT 1"
        )
        self.assertEqual(
            split_statements(sql),
            ["CREATE TABLE a (\n  x INTEGER -- no\n)", "CREATE INDEX i ON a (x)", "SELECT 1"],
        )

    def test_every_statement_renders_for_both_dialects(self) -> None:
        for dialect in (SqliteDialect(), PostgresDialect()):
            for migration in load_migrations():
                for statement in split_statements(migration.sql):
                    rendered = dialect.render_schema(statement)
                    self.assertNotIn("$", rendered)


class DialectTests(SynchronousTestCase):
    def test_placeholders(self) -> None:
        sql = "SELECT a FROM t WHERE b = ? AND c LIKE 'x%' AND d = ?"
        self.assertEqual(SqliteDialect().convert(sql), sql)
        self.assertEqual(
            PostgresDialect().convert(sql),
            "SELECT a FROM t WHERE b = %s AND c LIKE 'x%%' AND d = %s",
        )

    def test_greatest(self) -> None:
        self.assertEqual(SqliteDialect().greatest("a", "b"), "MAX(a, b)")
        self.assertEqual(PostgresDialect().greatest("a", "b"), "GREATEST(a, b)")


class SynchronousStoreTests(SynchronousTestCase):
    """``synchronous=True``: no threads, results available at once."""

    def test_store_under_memory_reactor(self) -> None:
        reactor = MemoryReactorClock()
        store = self.successResultOf(open_sqlite_store(":memory:", reactor, synchronous=True))
        self.addCleanup(store.close)
        self.assertEqual(self.successResultOf(store.create_device("@a:x", "D", None, 5, ["y"])), 1)
        self.assertEqual(self.successResultOf(store.create_device("@a:x", "E", None, 6, ["y"])), 2)
        self.assertEqual(
            [d.device_id for d in self.successResultOf(store.get_devices("@a:x"))], ["D", "E"]
        )
        self.assertEqual(len(self.successResultOf(store.get_pending("y", 10))), 2)
        self.assertEqual(reactor.getDelayedCalls(), [])


class _LockedOnce:
    """A connection whose first journal-mode switch is refused as locked."""

    def __init__(self, error: str = "database is locked") -> None:
        self.conn = sqlite3.connect(":memory:")
        self.error = error
        self.switches = 0

    def execute(self, sql: str) -> Any:
        if sql == "PRAGMA journal_mode = WAL":
            self.switches += 1
            if self.switches == 1:
                raise sqlite3.OperationalError(self.error)
            return self.conn.execute("SELECT 'wal'")
        if sql == "PRAGMA journal_mode":
            return self.conn.execute("SELECT 'delete'" if self.switches < 2 else "SELECT 'wal'")
        return self.conn.execute(sql)


class WalModeTests(SynchronousTestCase):
    def test_a_switch_refused_as_locked_is_retried(self) -> None:
        conn = _LockedOnce()
        _use_wal(conn)  # type: ignore[arg-type]
        self.assertEqual(conn.switches, 2)

    def test_other_errors_are_not_retried(self) -> None:
        conn = _LockedOnce("disk I/O error")
        with self.assertRaises(sqlite3.OperationalError):
            _use_wal(conn)  # type: ignore[arg-type]
        self.assertEqual(conn.switches, 1)

    def test_a_database_in_wal_mode_is_left_alone(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "x.db")
        sqlite3.connect(path).execute("PRAGMA journal_mode = WAL").fetchall()
        conn = sqlite3.connect(path)
        _use_wal(conn)
        self.assertEqual(conn.execute("PRAGMA journal_mode").fetchone()[0], "wal")
