"""A local device handler on an inline SQLite store and a simulated clock."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from devicelist_plugin.federation.errors import MatrixError
from devicelist_plugin.local.handler import LocalDeviceHandler
from devicelist_plugin.membership import InMemoryMembership
from devicelist_plugin.storage import Store, open_sqlite_store

NOW_S = 1_700_000_000


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


class HandlerCase(SynchronousTestCase):
    """A handler for server ``b.example`` that records its change notifications."""

    server_name = "b.example"
    allow_names = False

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(NOW_S)  # an arbitrary "now"
        self.store = open_inline_store(self)
        self.membership = InMemoryMembership(self.server_name)
        self.handler = LocalDeviceHandler(
            self.server_name,
            self.store,
            self.membership,
            self.clock,
            allow_device_name_lookup_over_federation=self.allow_names,
        )
        self.notified: list[tuple[str, int, tuple[str, ...]]] = []
        self.handler.add_change_listener(
            lambda user_id, stream_id, device_ids: self.notified.append(
                (user_id, stream_id, device_ids)
            )
        )

    def matrix_error(self, d: Any) -> MatrixError:
        failure = self.failureResultOf(d, MatrixError)
        error = failure.value
        assert isinstance(error, MatrixError)
        return error

    def assertMatrixError(self, d: Any, code: int, errcode: str, starts: str = "") -> MatrixError:
        error = self.matrix_error(d)
        self.assertEqual((error.code, error.errcode), (code, errcode), error.msg)
        if starts:
            self.assertTrue(error.msg.startswith(starts), error.msg)
        return error
