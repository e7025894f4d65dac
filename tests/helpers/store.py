"""Stores for tests: SQLite with inline transactions, and a dump to compare."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from devicelist_plugin.storage import Store, open_sqlite_store


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
