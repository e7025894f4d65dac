"""SQLite group commit: transactions queued while one runs share one commit,
and each still succeeds or fails on its own."""

from __future__ import annotations

import os

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from devicelist_plugin.storage import Store, open_sqlite_store
from devicelist_plugin.storage.engines import Txn


class GroupCommitTests(TestCase):
    async def _store(self) -> Store:
        path = os.path.join(os.path.abspath(self.mktemp()) + ".db")
        store = await open_sqlite_store(path, reactor)
        self.addCleanup(store.close)
        await store.database.run(
            "create", lambda t: t.execute("CREATE TABLE scratch (v INTEGER UNIQUE)")
        )
        return store

    async def test_queued_transactions_commit_together_and_fail_alone(self) -> None:
        store = await self._store()
        cursors: list[object] = []  # kept alive: each transaction's cursor

        def insert(v: int) -> "Deferred[object]":
            def txn(t: Txn) -> object:
                cursors.append(t._cursor)
                t.execute("INSERT INTO scratch (v) VALUES (?)", (v,))
                if v == 7:
                    raise ValueError("refused")
                return v

            return store.database.run(f"insert {v}", txn)

        def dup(t: Txn) -> None:
            # a non-retryable database error rolls back this one only
            t.execute("INSERT INTO scratch (v) VALUES (?)", (1000,))
            t.execute("INSERT INTO scratch (v) VALUES (?)", (3,))

        runs: "list[Deferred[object]]" = [insert(v) for v in range(20)]
        runs.append(store.database.run("dup", dup))
        results = await DeferredList(runs, consumeErrors=True)
        values = [value for ok, value in results[:20] if ok]
        self.assertEqual(values, [v for v in range(20) if v != 7])
        self.assertFalse(results[7][0])
        refused = results[7][1]
        assert isinstance(refused, Failure)
        self.assertIsInstance(refused.value, ValueError)
        self.assertFalse(results[20][0])
        rows = await store.database.run(
            "read", lambda t: t.query("SELECT v FROM scratch ORDER BY v"), readonly=True
        )
        self.assertEqual([r[0] for r in rows], [v for v in range(20) if v != 7])
        # the first ran alone; the rest queued meanwhile and shared a transaction
        self.assertLess(len({id(c) for c in cursors}), len(cursors) - 1)

    async def test_transactions_started_by_callbacks_form_the_next_group(self) -> None:
        store = await self._store()
        done: list[int] = []

        def chained(v: int) -> "Deferred[None]":
            d = store.database.run(
                f"insert {v}", lambda t: t.execute("INSERT INTO scratch (v) VALUES (?)", (v,))
            )

            def next_one(_: object) -> "Deferred[None] | None":
                done.append(v)
                return chained(v + 10) if v < 30 else None

            return d.addCallback(next_one)

        await DeferredList([chained(0), chained(1), chained(2)], fireOnOneErrback=True)
        rows = await store.database.run(
            "read", lambda t: t.query("SELECT v FROM scratch ORDER BY v"), readonly=True
        )
        self.assertEqual([r[0] for r in rows], sorted(done))
        self.assertEqual(len(done), 12)
