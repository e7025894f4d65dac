"""The store's behaviour, run identically against SQLite and PostgreSQL.

:class:`StoreTestsMixin` holds every test; the TestCase subclasses at the end
only say how to open a store on a fresh database: SQLite in a temporary file
(with the pool's thread, and inline), PostgreSQL on a throwaway cluster (see
:mod:`tests.storage.pgcluster`) with a pool of several connections so that
the concurrency tests really run concurrently.
"""

from __future__ import annotations

import os
import sqlite3
from typing import TYPE_CHECKING, Any, Optional

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.trial.unittest import TestCase

from devicelist_plugin.core.models import (
    CrossSigningKey,
    DeviceKeys,
    RemoteDevice,
    UserDevicesResponse,
)
from devicelist_plugin.storage import (
    DeviceExistsError,
    KeyConflictError,
    SchemaTooNewError,
    Store,
    UnknownDeviceError,
    open_postgres_store,
    open_sqlite_store,
)
from devicelist_plugin.storage.engines import Isolation, Txn
from devicelist_plugin.storage.migrations import Migration, load_migrations
from devicelist_plugin.storage.types import (
    CrossSigningSignature,
    DestinationStatus,
    InflightTransaction,
    PendingRow,
    RetryState,
    ServerKeyFailure,
    ServerKeyRow,
    StaleRemoteUser,
    StreamChange,
)
from tests.storage.pgcluster import get_server

if TYPE_CHECKING:
    _Base = TestCase
else:
    _Base = object

ALICE = "@alice:local.test"
BOB = "@bob:local.test"
REMOTE = "@carol:remote.test"
DESTS = ("a.test", "b.test")


def device_keys(user_id: str, device_id: str, key: str = "K") -> DeviceKeys:
    raw: dict[str, Any] = {
        "user_id": user_id,
        "device_id": device_id,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2"],
        "keys": {f"ed25519:{device_id}": f"{key}ed", f"curve25519:{device_id}": f"{key}cv"},
        "signatures": {user_id: {f"ed25519:{device_id}": f"sig{key}"}},
        "unknown_field": {"kept": True},
    }
    return DeviceKeys(
        user_id=user_id,
        device_id=device_id,
        algorithms=tuple(raw["algorithms"]),
        keys=dict(raw["keys"]),
        signatures={user_id: {f"ed25519:{device_id}": f"sig{key}"}},
        raw=raw,
    )


def cs_key(user_id: str, usage: str, public: str) -> CrossSigningKey:
    raw: dict[str, Any] = {
        "user_id": user_id,
        "usage": [usage],
        "keys": {f"ed25519:{public}": public},
        "signatures": {},
    }
    return CrossSigningKey(
        user_id=user_id,
        usage=(usage,),
        keys={f"ed25519:{public}": public},
        signatures={},
        raw=raw,
    )


def remote_device(device_id: str, name: Optional[str] = None, key: str = "K") -> RemoteDevice:
    return RemoteDevice(device_id, device_keys(REMOTE, device_id, key), name)


def otk(n: int) -> tuple[str, str, Any]:
    return ("signed_curve25519", f"AAA{n:04d}", {"key": f"otk{n}", "signatures": {}})


class StoreTestsMixin(_Base):
    """Every store test; subclasses provide :meth:`open_store` on a fresh database."""

    def open_store(self, **kwargs: Any) -> "Deferred[Store]":
        """Open a store on this test's database (the same database on every call)."""
        raise AssertionError("subclasses provide open_store")

    def retryable_error(self) -> BaseException:
        """An exception the engine retries the transaction after."""
        raise AssertionError("subclasses provide retryable_error")

    async def store(self, **kwargs: Any) -> Store:
        store = await self.open_store(**kwargs)
        self.addCleanup(store.close)
        return store

    async def query(
        self, store: Store, sql: str, params: tuple[Any, ...] = ()
    ) -> list[tuple[Any, ...]]:
        return await store.database.run("test query", lambda t: t.query(sql, params))

    # ------------------------------------------------------------------
    # Schema and migrations
    # ------------------------------------------------------------------

    async def test_fresh_database_is_at_latest_version(self) -> None:
        store = await self.store()
        latest = load_migrations()[-1].version
        self.assertEqual(await store.get_schema_version(), latest)
        rows = await self.query(store, "SELECT version FROM schema_version ORDER BY version")
        self.assertEqual([r[0] for r in rows], list(range(1, latest + 1)))

    async def test_migrating_twice_is_a_no_op(self) -> None:
        first = await self.open_store()
        await first.create_device(ALICE, "D1", "phone", 1000, DESTS)
        await first.close()
        store = await self.store()
        rows = await self.query(store, "SELECT COUNT(*) FROM schema_version")
        self.assertEqual(rows[0][0], len(load_migrations()))
        device = await store.get_device(ALICE, "D1")
        assert device is not None
        self.assertEqual(device.display_name, "phone")

    async def test_newer_schema_is_refused(self) -> None:
        first = await self.open_store()
        await first.database.run(
            "bump",
            lambda t: t.execute(
                "INSERT INTO schema_version (version, name) VALUES (?, ?)", (999, "future")
            ),
        )
        await first.close()
        with self.assertRaises(SchemaTooNewError) as caught:
            await self.open_store()
        latest = load_migrations()[-1].version
        self.assertEqual(
            str(caught.exception),
            f"database schema version 999 is newer than this devicelist-plugin understands "
            f"({latest}); upgrade the plugin",
        )

    async def test_new_migration_applies_once_and_old_code_refuses(self) -> None:
        await (await self.open_store()).close()
        shipped = load_migrations()
        extra = Migration(
            shipped[-1].version + 1,
            "extra",
            "-- a test table\nCREATE TABLE extra_test (\n  x INTEGER\n);\n",
        )
        upgraded = await self.open_store(migrations=(*shipped, extra))
        self.assertEqual(await upgraded.get_schema_version(), extra.version)
        await upgraded.database.run(
            "use", lambda t: t.execute("INSERT INTO extra_test (x) VALUES (?)", (7,))
        )
        await upgraded.close()
        again = await self.store(migrations=(*shipped, extra))
        self.assertEqual(await self.query(again, "SELECT x FROM extra_test"), [(7,)])
        with self.assertRaises(SchemaTooNewError):
            await self.open_store()

    async def test_failed_migration_leaves_nothing(self) -> None:
        await (await self.open_store()).close()
        shipped = load_migrations()
        broken = Migration(
            shipped[-1].version + 1,
            "broken",
            "CREATE TABLE broken_a (x INTEGER);\nINSERT INTO no_such_table VALUES (1);\n",
        )
        with self.assertRaises(Exception):
            await self.open_store(migrations=(*shipped, broken))
        store = await self.store()
        self.assertEqual(await store.get_schema_version(), shipped[-1].version)
        with self.assertRaises(Exception):
            await self.query(store, "SELECT COUNT(*) FROM broken_a")

    async def test_known_ids_move_into_the_sync_row(self) -> None:
        """Migration 7 keeps every known stream id of every remote user."""
        shipped = load_migrations()
        before = [m for m in shipped if m.version < 7]
        old = await self.open_store(migrations=before)

        def fill(t: Txn) -> None:
            t.executemany(
                "INSERT INTO remote_sync_state (user_id, snapshot_stream_id) VALUES (?, ?)",
                [(REMOTE, 10), ("@dave:remote.test", 3), ("@erin:remote.test", None)],
            )
            t.executemany(
                "INSERT INTO remote_known_stream_ids (user_id, stream_id) VALUES (?, ?)",
                [(REMOTE, 11), (REMOTE, 12), (REMOTE, 40), ("@dave:remote.test", 4)],
            )

        await old.database.run("fill", fill)
        await old.close()
        store = await self.store()
        expected = {REMOTE: {11, 12, 40}, "@dave:remote.test": {4}, "@erin:remote.test": set()}
        for user_id, known in expected.items():
            state = await store.get_remote_sync_state(user_id)
            assert state is not None
            self.assertEqual(state.known_ids, frozenset(known))
        with self.assertRaises(Exception):
            await self.query(store, "SELECT COUNT(*) FROM remote_known_stream_ids")

    async def test_concurrent_start_up_migrates_once(self) -> None:
        stores = await gatherResults([self.open_store() for _ in range(4)])
        for store in stores:
            self.addCleanup(store.close)
        rows = await self.query(stores[0], "SELECT COUNT(*) FROM schema_version")
        self.assertEqual(rows[0][0], len(load_migrations()))

    # ------------------------------------------------------------------
    # The engine
    # ------------------------------------------------------------------

    async def test_retryable_failure_reruns_the_transaction(self) -> None:
        store = await self.store()
        await store.database.run("t", lambda t: t.execute("CREATE TABLE retry_test (x INTEGER)"))
        attempts: list[int] = []

        def flaky(t: Txn) -> int:
            t.execute("INSERT INTO retry_test (x) VALUES (?)", (len(attempts),))
            attempts.append(1)
            if len(attempts) == 1:
                raise self.retryable_error()
            return len(attempts)

        self.assertEqual(await store.database.run("flaky", flaky), 2)
        # the first attempt's insert was rolled back
        self.assertEqual(await self.query(store, "SELECT x FROM retry_test"), [(1,)])

    async def test_other_failures_are_not_retried(self) -> None:
        store = await self.store()
        attempts: list[int] = []

        def broken(t: Txn) -> None:
            attempts.append(1)
            raise ZeroDivisionError()

        with self.assertRaises(ZeroDivisionError):
            await store.database.run("broken", broken)
        self.assertEqual(len(attempts), 1)

    async def test_repeatable_read_increments_survive_contention(self) -> None:
        # Under REPEATABLE READ, PostgreSQL fails concurrent updates of one row
        # with serialization failures: the retry loop must absorb them.
        store = await self.store()
        await store.database.run(
            "t",
            lambda t: t.execute(
                "CREATE TABLE counter_test (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)"
            ),
        )
        await store.database.run("t", lambda t: t.execute("INSERT INTO counter_test VALUES (1, 0)"))

        def increment(t: Txn) -> None:
            row = t.query_one("SELECT n FROM counter_test WHERE id = 1")
            assert row is not None
            t.execute("UPDATE counter_test SET n = ? WHERE id = 1", (row[0] + 1,))

        await gatherResults(
            [
                store.database.run("inc", increment, isolation=Isolation.REPEATABLE_READ)
                for _ in range(8)
            ]
        )
        self.assertEqual(await self.query(store, "SELECT n FROM counter_test"), [(8,)])

    # ------------------------------------------------------------------
    # Local devices and the stream
    # ------------------------------------------------------------------

    async def test_device_lifecycle_and_stream(self) -> None:
        store = await self.store()
        self.assertIsNone(await store.get_max_stream_id(ALICE))
        self.assertEqual(await store.create_device(ALICE, "D1", "phone", 1000, DESTS), 1)
        self.assertEqual(await store.create_device(ALICE, "D2", None, 1001, DESTS), 2)
        self.assertEqual(await store.create_device(BOB, "D1", None, 1002, DESTS), 1)
        keys = {"user_id": ALICE, "device_id": "D1", "keys": {"ed25519:D1": "x"}}
        self.assertEqual(await store.set_device_keys(ALICE, "D1", keys, 1003, DESTS), 3)
        self.assertEqual(await store.rename_device(ALICE, "D2", "laptop", 1004, DESTS), 4)
        await store.update_device_last_seen(ALICE, "D2", 1500)

        devices = await store.get_devices(ALICE)
        self.assertEqual(
            [(d.device_id, d.display_name, d.keys_json) for d in devices],
            [("D1", "phone", keys), ("D2", "laptop", None)],
        )
        self.assertEqual((devices[0].created_ts, devices[1].last_seen_ts), (1000, 1500))
        self.assertEqual(await store.get_device(ALICE, "D3"), None)
        both = await store.get_devices_for_users([ALICE, BOB, "@nobody:local.test"])
        self.assertEqual(
            {u: [d.device_id for d in ds] for u, ds in both.items()},
            {ALICE: ["D1", "D2"], BOB: ["D1"], "@nobody:local.test": []},
        )

        self.assertEqual(await store.delete_device(ALICE, "D1", 1005, DESTS), 5)
        self.assertEqual([d.device_id for d in await store.get_devices(ALICE)], ["D2"])
        self.assertEqual(await store.get_max_stream_id(ALICE), 5)
        self.assertEqual(
            await store.get_stream_since(ALICE, 2),
            [
                StreamChange(ALICE, 3, "D1", "device", 1003),
                StreamChange(ALICE, 4, "D2", "device", 1004),
                StreamChange(ALICE, 5, "D1", "device", 1005),
            ],
        )
        self.assertEqual(len(await store.get_stream_since(ALICE, 0, limit=2)), 2)

    async def test_errors_consume_no_stream_id(self) -> None:
        store = await self.store()
        await store.create_device(ALICE, "D1", None, 1000, DESTS)
        with self.assertRaises(DeviceExistsError):
            await store.create_device(ALICE, "D1", None, 1001, DESTS)
        with self.assertRaises(UnknownDeviceError):
            await store.rename_device(ALICE, "NOPE", "x", 1001, DESTS)
        with self.assertRaises(UnknownDeviceError):
            await store.delete_device(ALICE, "NOPE", 1001, DESTS)
        with self.assertRaises(UnknownDeviceError):
            await store.set_device_keys(ALICE, "NOPE", {}, 1001, DESTS)
        with self.assertRaises(ValueError):
            await store.create_device(ALICE, "", None, 1001, DESTS)
        self.assertEqual(await store.get_max_stream_id(ALICE), 1)
        self.assertEqual(await store.create_device(ALICE, "D2", None, 1002, DESTS), 2)

    async def test_set_device_keys_if_changed(self) -> None:
        store = await self.store()
        await store.create_device(ALICE, "D1", None, 1000, ())
        keys = {"user_id": ALICE, "device_id": "D1", "keys": {"ed25519:D1": "x"}}
        with self.assertRaises(UnknownDeviceError):
            await store.set_device_keys_if_changed(ALICE, "NOPE", keys, 1001, DESTS)
        self.assertEqual(await store.set_device_keys_if_changed(ALICE, "D1", keys, 1001, DESTS), 2)
        # the same object again (in another key order): nothing written, no id taken
        same = dict(reversed(list(keys.items())))
        self.assertIsNone(await store.set_device_keys_if_changed(ALICE, "D1", same, 1002, DESTS))
        self.assertEqual(await store.get_max_stream_id(ALICE), 2)
        other = {**keys, "keys": {"ed25519:D1": "y"}}
        self.assertEqual(await store.set_device_keys_if_changed(ALICE, "D1", other, 1003, DESTS), 3)
        self.assertEqual((await store.get_device(ALICE, "D1")).keys_json, other)  # type: ignore[union-attr]
        self.assertEqual(
            [(r.user_id, r.device_id, r.stream_id) for r in await store.get_pending(DESTS[0], 10)],
            [(ALICE, "D1", 3)],
        )

    async def test_delete_device_removes_its_keys(self) -> None:
        store = await self.store()
        await store.create_device(ALICE, "D1", None, 1000, ())
        await store.set_device_keys(ALICE, "D1", {"k": 1}, 1000, ())
        await store.add_one_time_keys(ALICE, "D1", [otk(1), otk(2)])
        await store.set_fallback_key(ALICE, "D1", "signed_curve25519", "FB", {"key": "fb"})
        await store.store_signatures(
            ALICE, [CrossSigningSignature(ALICE, "ed25519:SSK", ALICE, "D1", "sig")], 1000, ()
        )
        await store.delete_device(ALICE, "D1", 1001, ())
        self.assertEqual(await store.count_one_time_keys(ALICE, "D1"), {})
        self.assertEqual(await store.claim_keys([(ALICE, "D1", "signed_curve25519")]), {})
        self.assertEqual(await store.get_signatures(ALICE), [])
        for table in ("local_device_keys", "local_one_time_keys", "local_fallback_keys"):
            self.assertEqual(await self.query(store, f"SELECT COUNT(*) FROM {table}"), [(0,)])
        # the device can be created again, with a fresh stream id
        self.assertEqual(await store.create_device(ALICE, "D1", None, 1002, ()), 5)

    async def test_concurrent_changes_get_strictly_increasing_ids(self) -> None:
        store = await self.store()
        ids = await gatherResults(
            [store.create_device(ALICE, f"D{i:02d}", None, 1000 + i, DESTS) for i in range(20)]
            + [store.create_device(BOB, f"D{i:02d}", None, 1000 + i, DESTS) for i in range(5)]
        )
        self.assertEqual(sorted(ids[:20]), list(range(1, 21)))
        self.assertEqual(sorted(ids[20:]), list(range(1, 6)))
        changes = await store.get_stream_since(ALICE, 0)
        self.assertEqual([c.stream_id for c in changes], list(range(1, 21)))
        # each device got the id its own transaction returned
        by_device = {c.device_id: c.stream_id for c in changes}
        self.assertEqual([by_device[f"D{i:02d}"] for i in range(20)], ids[:20])
        self.assertEqual(await store.get_max_stream_id(ALICE), 20)
        pending = await store.get_pending("a.test", 100)
        self.assertEqual(len(pending), 25)
        # more concurrent changes of the same devices keep the ids increasing
        more = await gatherResults(
            [store.rename_device(ALICE, f"D{i:02d}", "n", 2000, DESTS) for i in range(20)]
        )
        self.assertEqual(sorted(more), list(range(21, 41)))

    async def test_change_failing_mid_transaction_writes_nothing(self) -> None:
        store = await self.store()
        original = store._enqueue_pending

        def boom(*args: Any) -> None:
            raise RuntimeError("injected failure")

        self.patch(store, "_enqueue_pending", boom)
        with self.assertRaises(RuntimeError):
            await store.create_device(ALICE, "D1", "phone", 1000, DESTS)
        self.assertIsNone(await store.get_device(ALICE, "D1"))
        self.assertIsNone(await store.get_max_stream_id(ALICE))
        self.assertEqual(await store.get_stream_since(ALICE, 0), [])
        self.assertEqual(await store.destinations_with_pending(), [])
        self.patch(store, "_enqueue_pending", original)
        self.assertEqual(await store.create_device(ALICE, "D1", "phone", 1000, DESTS), 1)

    # ------------------------------------------------------------------
    # Outbound
    # ------------------------------------------------------------------

    async def test_pending_rows_collapse_per_device(self) -> None:
        store = await self.store()
        await store.create_device(ALICE, "D1", None, 1000, DESTS)
        await store.create_device(ALICE, "D2", None, 1000, ["a.test"])
        await store.set_device_keys(ALICE, "D1", {"k": 1}, 1001, DESTS)
        await store.rename_device(ALICE, "D1", "x", 1002, ["a.test", "a.test"])
        await store.create_device(BOB, "D1", None, 1003, ["c.test"])
        self.assertEqual(
            await store.get_pending("a.test", 10),
            [PendingRow(ALICE, "D2", 2), PendingRow(ALICE, "D1", 4)],
        )
        self.assertEqual(await store.get_pending("b.test", 10), [PendingRow(ALICE, "D1", 3)])
        self.assertEqual(await store.get_pending("c.test", 10), [PendingRow(BOB, "D1", 1)])
        self.assertEqual(await store.destinations_with_pending(), ["a.test", "b.test", "c.test"])
        rows = await self.query(store, "SELECT COUNT(*) FROM outbound_pending")
        self.assertEqual(rows, [(4,)])

    async def test_pending_limit_is_a_prefix_per_user(self) -> None:
        store = await self.store()
        for i in range(5):
            await store.create_device(ALICE, f"D{i}", None, 1000, ["a.test"])
        first = await store.get_pending("a.test", 3)
        self.assertEqual([p.stream_id for p in first], [1, 2, 3])
        await store.ack_sent("a.test", first, {ALICE: {3}})
        self.assertEqual([p.stream_id for p in await store.get_pending("a.test", 3)], [4, 5])

    async def test_ack_sent_keeps_newer_changes(self) -> None:
        store = await self.store()
        await store.create_device(ALICE, "D1", None, 1000, DESTS)
        await store.create_device(ALICE, "D2", None, 1000, DESTS)
        sent = await store.get_pending("a.test", 10)
        self.assertEqual(sent, [PendingRow(ALICE, "D1", 1), PendingRow(ALICE, "D2", 2)])
        # D1 changes again while the transaction is in flight
        await store.rename_device(ALICE, "D1", "new", 1001, DESTS)
        await store.set_inflight_txn("a.test", "txn1", {"edus": []})
        await store.ack_sent("a.test", sent, {ALICE: frozenset({2})}, completed_txn_id="txn1")
        self.assertEqual(await store.get_pending("a.test", 10), [PendingRow(ALICE, "D1", 3)])
        self.assertEqual(
            await store.get_unreferenced("a.test", [ALICE, BOB]),
            {ALICE: frozenset({2}), BOB: frozenset()},
        )
        self.assertIsNone(await store.get_inflight_txn("a.test"))
        # another destination is untouched
        self.assertEqual(len(await store.get_pending("b.test", 10)), 2)
        self.assertEqual(await store.get_unreferenced("b.test", [ALICE]), {ALICE: frozenset()})
        # tuples work too; an empty unreferenced set deletes the row
        await store.ack_sent("a.test", [(ALICE, "D1", 3)], {ALICE: frozenset()})
        self.assertEqual(await store.get_pending("a.test", 10), [])
        self.assertEqual(await store.get_unreferenced("a.test", [ALICE]), {ALICE: frozenset()})
        self.assertEqual(await store.destinations_with_pending(), ["b.test"])

    async def test_inflight_transaction(self) -> None:
        store = await self.store()
        self.assertIsNone(await store.get_inflight_txn("a.test"))
        await store.set_inflight_txn("a.test", "t1", {"edus": [{"edu_type": "x"}]})
        self.assertEqual(
            await store.get_inflight_txn("a.test"),
            InflightTransaction("t1", {"edus": [{"edu_type": "x"}]}),
        )
        self.assertFalse(await store.clear_inflight_txn("a.test", "other"))
        self.assertIsNotNone(await store.get_inflight_txn("a.test"))
        self.assertTrue(await store.clear_inflight_txn("a.test", "t1"))
        self.assertFalse(await store.clear_inflight_txn("a.test"))
        self.assertIsNone(await store.get_inflight_txn("a.test"))

    async def test_retry_state(self) -> None:
        store = await self.store()
        self.assertIsNone(await store.get_retry_state("a.test"))
        state = RetryState(failure_ts=1000, retry_last_ts=2000, retry_interval_ms=60000, attempts=3)
        await store.set_inflight_txn("a.test", "t1", {})
        await store.set_retry_state("a.test", state)
        self.assertEqual(await store.get_retry_state("a.test"), state)
        # the in-flight transaction survives retry bookkeeping
        self.assertIsNotNone(await store.get_inflight_txn("a.test"))
        await store.set_retry_state("a.test", None)
        self.assertIsNone(await store.get_retry_state("a.test"))

    async def test_destination_statuses(self) -> None:
        # the admin API's query (a marked section of the store)
        store = await self.store()
        self.assertEqual(await store.get_destination_statuses(), [])
        await store.create_device(ALICE, "D1", None, 1000, ("b.test", "c.test"))
        await store.create_device(ALICE, "D2", None, 1500, ("b.test",))
        state = RetryState(failure_ts=1000, retry_last_ts=2000, retry_interval_ms=60000, attempts=2)
        await store.set_retry_state("c.test", state)
        await store.set_inflight_txn("d.test", "t1", {})
        self.assertEqual(
            await store.get_destination_statuses(),
            [
                DestinationStatus("b.test", 2, 1000, None, None),
                DestinationStatus("c.test", 1, 1000, state, None),
                DestinationStatus("d.test", 0, None, None, "t1"),
            ],
        )
        self.assertEqual(
            await store.get_destination_statuses("c.test"),
            [DestinationStatus("c.test", 1, 1000, state, None)],
        )
        self.assertEqual(await store.get_destination_statuses("e.test"), [])

    async def test_enqueue_current_devices_for_a_new_destination(self) -> None:
        store = await self.store()
        self.assertEqual(await store.enqueue_current_devices("new.test", ALICE, 999), [])
        await store.create_device(ALICE, "D1", None, 1000, ())
        await store.create_device(ALICE, "D2", None, 1000, ())
        await store.create_device(ALICE, "D3", None, 1000, ())
        await store.rename_device(ALICE, "D1", "x", 1001, ())
        await store.delete_device(ALICE, "D3", 1002, ())
        await store.set_cross_signing_key(ALICE, "master", {"k": "m"}, 1003, ())
        await store.set_cross_signing_key(ALICE, "user_signing", {"k": "u"}, 1004, ())
        rows = await store.enqueue_current_devices("new.test", ALICE, 2000)
        expected = [
            PendingRow(ALICE, "D2", 2),
            PendingRow(ALICE, "D1", 4),
            PendingRow(ALICE, None, 7),
        ]
        self.assertEqual(rows, expected)
        self.assertEqual(await store.get_pending("new.test", 10), expected)
        self.assertEqual(expected[2].kind, "signing_key")
        # a newer change already pending is not moved back
        await store.rename_device(ALICE, "D2", "y", 3000, ["new.test"])
        await store.enqueue_current_devices("new.test", ALICE, 3001)
        self.assertIn(PendingRow(ALICE, "D2", 8), await store.get_pending("new.test", 10))

    # ------------------------------------------------------------------
    # Keys
    # ------------------------------------------------------------------

    async def test_one_time_keys_upload_and_conflicts(self) -> None:
        store = await self.store()
        with self.assertRaises(UnknownDeviceError):
            await store.add_one_time_keys(ALICE, "D1", [otk(1)])
        await store.create_device(ALICE, "D1", None, 1000, ())
        await store.add_one_time_keys(ALICE, "D1", [otk(1), otk(2), ("curve25519", "C1", "bare")])
        # identical re-upload: no-op
        await store.add_one_time_keys(ALICE, "D1", [otk(2), otk(3)])
        self.assertEqual(
            await store.count_one_time_keys(ALICE, "D1"), {"signed_curve25519": 3, "curve25519": 1}
        )
        # different content under a known id: the whole upload is refused
        changed = ("signed_curve25519", "AAA0001", {"key": "other", "signatures": {}})
        with self.assertRaises(KeyConflictError):
            await store.add_one_time_keys(ALICE, "D1", [otk(4), changed])
        with self.assertRaises(KeyConflictError):
            await store.add_one_time_keys(
                ALICE, "D1", [otk(5), ("signed_curve25519", "AAA0005", {"x": 1})]
            )
        self.assertEqual(
            await store.count_one_time_keys(ALICE, "D1"), {"signed_curve25519": 3, "curve25519": 1}
        )

    async def test_claims_oldest_first_then_fallback(self) -> None:
        store = await self.store()
        await store.create_device(ALICE, "D1", None, 1000, ())
        await store.create_device(BOB, "D1", None, 1000, ())
        await store.add_one_time_keys(ALICE, "D1", [otk(2), otk(1)])
        await store.add_one_time_keys(ALICE, "D1", [otk(3)])
        await store.set_fallback_key(ALICE, "D1", "signed_curve25519", "FB1", {"key": "fb1"})
        self.assertEqual(
            await store.get_unused_fallback_key_algorithms(ALICE, "D1"), ["signed_curve25519"]
        )
        claim = [
            (ALICE, "D1", "signed_curve25519"),
            (BOB, "D1", "signed_curve25519"),
            (BOB, "NOPE", "x"),
        ]
        got = [await store.claim_keys(claim) for _ in range(5)]
        alice_keys = [g[ALICE]["D1"] for g in got]
        self.assertEqual(
            alice_keys,
            [
                {"signed_curve25519:AAA0002": otk(2)[2]},
                {"signed_curve25519:AAA0001": otk(1)[2]},
                {"signed_curve25519:AAA0003": otk(3)[2]},
                {"signed_curve25519:FB1": {"key": "fb1"}},
                {"signed_curve25519:FB1": {"key": "fb1"}},
            ],
        )
        self.assertTrue(all(BOB not in g for g in got))
        self.assertEqual(await store.get_unused_fallback_key_algorithms(ALICE, "D1"), [])
        # the same fallback key uploaded again stays used; a new one is unused
        await store.set_fallback_key(ALICE, "D1", "signed_curve25519", "FB1", {"key": "fb1"})
        self.assertEqual(await store.get_unused_fallback_key_algorithms(ALICE, "D1"), [])
        await store.set_fallback_key(ALICE, "D1", "signed_curve25519", "FB2", {"key": "fb2"})
        self.assertEqual(
            await store.get_unused_fallback_key_algorithms(ALICE, "D1"), ["signed_curve25519"]
        )
        self.assertEqual(
            await store.claim_keys([(ALICE, "D1", "signed_curve25519")]),
            {ALICE: {"D1": {"signed_curve25519:FB2": {"key": "fb2"}}}},
        )

    async def test_concurrent_claims_never_share_a_key(self) -> None:
        store = await self.store()
        await store.create_device(ALICE, "D1", None, 1000, ())
        await store.add_one_time_keys(ALICE, "D1", [otk(i) for i in range(25)])
        await store.set_fallback_key(ALICE, "D1", "signed_curve25519", "FB", {"key": "fb"})
        results = await gatherResults(
            [store.claim_keys([(ALICE, "D1", "signed_curve25519")]) for _ in range(40)]
        )
        key_ids = [next(iter(r[ALICE]["D1"])) for r in results]
        one_time = [k for k in key_ids if not k.endswith(":FB")]
        self.assertEqual(len(one_time), 25)
        self.assertEqual(
            sorted(one_time), sorted(f"signed_curve25519:AAA{i:04d}" for i in range(25))
        )
        self.assertEqual(key_ids.count("signed_curve25519:FB"), 15)
        self.assertEqual(await store.count_one_time_keys(ALICE, "D1"), {})

    async def test_cross_signing_keys(self) -> None:
        store = await self.store()
        self.assertEqual(
            await store.set_cross_signing_key(ALICE, "master", {"k": "m1"}, 1000, DESTS), 1
        )
        self.assertEqual(
            await store.set_cross_signing_key(ALICE, "self_signing", {"k": "s"}, 1001, DESTS), 2
        )
        self.assertEqual(
            await store.set_cross_signing_key(ALICE, "user_signing", {"k": "u"}, 1002, DESTS), 3
        )
        self.assertEqual(
            await store.set_cross_signing_key(ALICE, "master", {"k": "m2"}, 1003, DESTS), 4
        )
        self.assertEqual(
            await store.get_cross_signing_keys(ALICE),
            {"master": {"k": "m2"}, "self_signing": {"k": "s"}, "user_signing": {"k": "u"}},
        )
        self.assertEqual(
            [c.kind for c in await store.get_stream_since(ALICE, 0)], ["signing_key"] * 4
        )
        # one collapsed signing-key update; the user-signing change was not queued
        self.assertEqual(await store.get_pending("a.test", 10), [PendingRow(ALICE, None, 4)])
        with self.assertRaises(ValueError):
            await store.set_cross_signing_key(ALICE, "bogus", {}, 1004, DESTS)

    async def test_signatures_make_device_and_key_changes(self) -> None:
        store = await self.store()
        await store.create_device(ALICE, "D1", None, 1000, ())
        await store.create_device(ALICE, "D2", None, 1000, ())
        signatures = [
            CrossSigningSignature(ALICE, "ed25519:SSK", ALICE, "D1", "s1"),
            CrossSigningSignature(ALICE, "ed25519:SSK", ALICE, "D2", "s2"),
            CrossSigningSignature(ALICE, "ed25519:D1", ALICE, "MASTERPUB", "s3"),
            CrossSigningSignature(ALICE, "ed25519:USK", BOB, "BOBMASTER", "s4"),
        ]
        changes = await store.store_signatures(ALICE, signatures, 2000, DESTS)
        self.assertEqual(
            changes,
            [
                StreamChange(ALICE, 3, "D1", "device", 2000),
                StreamChange(ALICE, 4, "D2", "device", 2000),
                StreamChange(ALICE, 5, None, "signing_key", 2000),
            ],
        )
        self.assertEqual(
            await store.get_pending("a.test", 10),
            [PendingRow(ALICE, "D1", 3), PendingRow(ALICE, "D2", 4), PendingRow(ALICE, None, 5)],
        )
        self.assertEqual(await store.get_signatures(ALICE, ["D1"]), [signatures[0]])
        self.assertEqual(await store.get_signatures(BOB), [signatures[3]])
        # a replaced signature
        newer = CrossSigningSignature(ALICE, "ed25519:SSK", ALICE, "D1", "s1b")
        await store.store_signatures(ALICE, [newer], 2001, ())
        self.assertEqual(await store.get_signatures(ALICE, ["D1"]), [newer])
        with self.assertRaises(ValueError):
            await store.store_signatures(BOB, [newer], 2002, ())

    # ------------------------------------------------------------------
    # Remote cache
    # ------------------------------------------------------------------

    async def test_remote_updates_round_trip(self) -> None:
        store = await self.store(known_ids_window=5)
        self.assertIsNone(await store.get_remote_sync_state(REMOTE))
        await store.apply_remote_updates(
            REMOTE, [remote_device("R1", "phone"), remote_device("R2")], [], frozenset({1, 2})
        )
        devices = await store.get_remote_devices(REMOTE)
        self.assertEqual(devices, [remote_device("R1", "phone"), remote_device("R2")])
        assert devices[0].keys is not None
        self.assertEqual(devices[0].keys.raw, device_keys(REMOTE, "R1").raw)
        await store.apply_remote_updates(
            REMOTE, [remote_device("R1", None, key="N")], ["R2", "R9"], frozenset(range(1, 12))
        )
        self.assertEqual(
            await store.get_remote_devices(REMOTE), [remote_device("R1", None, key="N")]
        )
        state = await store.get_remote_sync_state(REMOTE)
        assert state is not None
        self.assertEqual(state.known_ids, frozenset({7, 8, 9, 10, 11}))
        self.assertIsNone(state.snapshot_stream_id)
        self.assertFalse(state.stale)

    async def test_remote_updates_are_atomic(self) -> None:
        store = await self.store()
        await store.apply_remote_updates(REMOTE, [remote_device("R1")], [], frozenset({1}))

        def boom(*args: Any) -> None:
            raise RuntimeError("injected failure")

        self.patch(store, "_replace_known_ids", boom)
        with self.assertRaises(RuntimeError):
            await store.apply_remote_updates(
                REMOTE, [remote_device("R2")], ["R1"], frozenset({1, 2})
            )
        self.assertEqual(await store.get_remote_devices(REMOTE), [remote_device("R1")])
        state = await store.get_remote_sync_state(REMOTE)
        assert state is not None
        self.assertEqual(state.known_ids, frozenset({1}))
        with self.assertRaises(ValueError):
            await store.apply_remote_updates(REMOTE, [remote_device("R1")], ["R1"], frozenset())

    async def test_stale_marks_and_snapshots(self) -> None:
        store = await self.store()
        await store.apply_remote_updates(REMOTE, [remote_device("OLD")], [], frozenset({5}))
        await store.set_remote_cross_signing_key(
            REMOTE, "user_signing", cs_key(REMOTE, "user_signing", "U")
        )
        self.assertEqual(await store.mark_remote_stale(REMOTE, "unknown prev_id 4", 1000), 1)
        self.assertEqual(await store.mark_remote_stale(REMOTE, "unknown prev_id 6", 1100), 2)
        self.assertEqual(await store.mark_remote_stale("@dan:remote.test", "new", 900), 1)
        self.assertEqual(
            await store.list_stale_remote_users(),
            [
                StaleRemoteUser("@dan:remote.test", 1, "new", 900),
                StaleRemoteUser(REMOTE, 2, "unknown prev_id 6", 1000),
            ],
        )
        # a resync starts from generation 2; meanwhile a new gap is seen
        self.assertEqual(await store.mark_remote_stale(REMOTE, "gap during resync", 1200), 3)
        snapshot = UserDevicesResponse(
            user_id=REMOTE,
            stream_id=42,
            devices=(remote_device("N1", "new"),),
            master_key=cs_key(REMOTE, "master", "M"),
            self_signing_key=cs_key(REMOTE, "self_signing", "S"),
        )
        self.assertFalse(await store.replace_remote_snapshot(REMOTE, snapshot, 2, 1300))
        state = await store.get_remote_sync_state(REMOTE)
        assert state is not None
        self.assertTrue(state.stale)
        self.assertEqual(
            (
                state.snapshot_stream_id,
                state.known_ids,
                state.stale_generation,
                state.cleared_generation,
            ),
            (42, frozenset(), 3, 2),
        )
        self.assertEqual(
            (state.stale_reason, state.stale_since_ts, state.last_resync_ts),
            ("gap during resync", 1000, 1300),
        )
        self.assertEqual(await store.get_remote_devices(REMOTE), [remote_device("N1", "new")])
        keys = await store.get_remote_cross_signing_keys(REMOTE)
        self.assertEqual(sorted(keys), ["master", "self_signing"])
        self.assertEqual(keys["master"], cs_key(REMOTE, "master", "M"))
        self.assertEqual(keys["master"].raw, cs_key(REMOTE, "master", "M").raw)
        # the second resync covers the newest mark
        self.assertTrue(await store.replace_remote_snapshot(REMOTE, snapshot, 3, 1400))
        state = await store.get_remote_sync_state(REMOTE)
        assert state is not None
        self.assertFalse(state.stale)
        self.assertEqual((state.stale_reason, state.stale_since_ts), (None, None))
        self.assertEqual(
            [u.user_id for u in await store.list_stale_remote_users()], ["@dan:remote.test"]
        )
        # a stale mark after being cleared starts a new stale period
        self.assertEqual(await store.mark_remote_stale(REMOTE, "again", 5000), 4)
        state = await store.get_remote_sync_state(REMOTE)
        assert state is not None
        self.assertEqual(state.stale_since_ts, 5000)
        # an out-of-range generation cannot clear marks that were never made
        self.assertFalse(await store.replace_remote_snapshot(REMOTE, snapshot, 3, 5100))
        self.assertTrue(await store.replace_remote_snapshot(REMOTE, snapshot, 99, 5200))
        state = await store.get_remote_sync_state(REMOTE)
        assert state is not None
        self.assertEqual(state.cleared_generation, 4)
        # a resync overtaken by a later one does not overwrite its answer
        old_snapshot = UserDevicesResponse(user_id=REMOTE, stream_id=1, devices=())
        self.assertTrue(await store.replace_remote_snapshot(REMOTE, old_snapshot, 2, 5300))
        self.assertEqual(await store.get_remote_devices(REMOTE), [remote_device("N1", "new")])
        state = await store.get_remote_sync_state(REMOTE)
        assert state is not None
        self.assertEqual((state.snapshot_stream_id, state.last_resync_ts), (42, 5200))
        self.assertEqual(await store.mark_remote_stale(REMOTE, "next", 6000), 5)
        self.assertFalse(await store.replace_remote_snapshot(REMOTE, old_snapshot, 3, 6100))
        with self.assertRaises(ValueError):
            await store.replace_remote_snapshot("@other:remote.test", snapshot, 1, 6000)

    async def test_first_snapshot_of_an_untracked_user(self) -> None:
        store = await self.store()
        snapshot = UserDevicesResponse(user_id=REMOTE, stream_id=7, devices=())
        self.assertTrue(await store.replace_remote_snapshot(REMOTE, snapshot, 0, 100))
        state = await store.get_remote_sync_state(REMOTE)
        assert state is not None
        self.assertEqual(
            (state.snapshot_stream_id, state.stale, state.last_resync_ts), (7, False, 100)
        )
        self.assertEqual(await store.get_remote_devices(REMOTE), [])

    async def test_drop_remote_user(self) -> None:
        store = await self.store()
        await store.apply_remote_updates(REMOTE, [remote_device("R1")], [], frozenset({1}))
        await store.set_remote_cross_signing_key(REMOTE, "master", cs_key(REMOTE, "master", "M"))
        await store.mark_remote_stale(REMOTE, "x", 1)
        await store.apply_remote_updates(
            "@other:remote.test", [remote_device("R1")], [], frozenset({1})
        )
        await store.drop_remote_user(REMOTE)
        self.assertIsNone(await store.get_remote_sync_state(REMOTE))
        self.assertEqual(await store.get_remote_devices(REMOTE), [])
        self.assertEqual(await store.get_remote_cross_signing_keys(REMOTE), {})
        self.assertEqual(await store.list_stale_remote_users(), [])
        self.assertEqual(len(await store.get_remote_devices("@other:remote.test")), 1)

    async def test_large_snapshot(self) -> None:
        store = await self.store()
        devices = tuple(remote_device(f"D{i:05d}") for i in range(1500))
        snapshot = UserDevicesResponse(user_id=REMOTE, stream_id=1, devices=devices)
        self.assertTrue(await store.replace_remote_snapshot(REMOTE, snapshot, 0, 1))
        self.assertEqual(len(await store.get_remote_devices(REMOTE)), 1500)

    # ------------------------------------------------------------------
    # Server keys and received transactions
    # ------------------------------------------------------------------

    async def test_server_keys_and_negative_cache(self) -> None:
        store = await self.store()
        old = ServerKeyRow(
            "remote.test", "ed25519:a", "AAAA", 5000, None, 1000, {"server_name": "remote.test"}
        )
        other = ServerKeyRow("remote.test", "ed25519:b", "BBBB", 5000, 4000, 1000, {"v": 1})
        await store.set_server_key_failure("remote.test", "timeout", 900)
        self.assertEqual(
            await store.get_server_key_failure("remote.test"),
            ServerKeyFailure("remote.test", 900, "timeout"),
        )
        await store.store_server_keys("remote.test", [old, other])
        self.assertIsNone(await store.get_server_key_failure("remote.test"))
        self.assertEqual(
            await store.get_server_keys("remote.test"), {"ed25519:a": old, "ed25519:b": other}
        )
        self.assertEqual(
            await store.get_server_keys("remote.test", ["ed25519:b", "ed25519:z"]),
            {"ed25519:b": other},
        )
        newer = ServerKeyRow("remote.test", "ed25519:a", "AAAA", 9000, None, 2000, {"new": True})
        await store.store_server_keys("remote.test", [newer])
        # an answer fetched earlier than the stored one does not replace it
        await store.store_server_keys("remote.test", [old])
        self.assertEqual(
            (await store.get_server_keys("remote.test", ["ed25519:a"]))["ed25519:a"], newer
        )
        self.assertEqual(await store.get_server_keys("nowhere.test"), {})
        await store.set_server_key_failure("nowhere.test", "dns", 1)
        await store.set_server_key_failure("nowhere.test", "refused", 2)
        self.assertEqual(
            await store.get_server_key_failure("nowhere.test"),
            ServerKeyFailure("nowhere.test", 2, "refused"),
        )
        await store.clear_server_key_failure("nowhere.test")
        self.assertIsNone(await store.get_server_key_failure("nowhere.test"))
        with self.assertRaises(ValueError):
            await store.store_server_keys("other.test", [old])

    async def test_received_transactions(self) -> None:
        store = await self.store()
        self.assertIsNone(await store.get_received_txn("remote.test", "t1"))
        self.assertTrue(await store.store_received_txn("remote.test", "t1", {"pdus": {}}, 1000))
        self.assertFalse(
            await store.store_received_txn("remote.test", "t1", {"pdus": {"x": {}}}, 1001)
        )
        self.assertEqual(await store.get_received_txn("remote.test", "t1"), {"pdus": {}})
        self.assertIsNone(await store.get_received_txn("other.test", "t1"))
        await store.store_received_txn("remote.test", "t2", {"pdus": {}}, 2000)
        await store.store_received_txn("other.test", "t1", {"pdus": {}}, 3000)
        self.assertEqual(await store.prune_received_txns(2001), 2)
        self.assertIsNone(await store.get_received_txn("remote.test", "t1"))
        self.assertEqual(await store.get_received_txn("other.test", "t1"), {"pdus": {}})
        self.assertEqual(await store.prune_received_txns(2001), 0)


class SQLiteStoreTests(StoreTestsMixin, TestCase):
    """SQLite in a temporary file, transactions in the pool's thread."""

    synchronous = False

    def setUp(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        self.path = os.path.join(directory, "devicelist.db")

    def open_store(self, **kwargs: Any) -> "Deferred[Store]":
        return open_sqlite_store(self.path, reactor, synchronous=self.synchronous, **kwargs)

    def retryable_error(self) -> BaseException:
        return sqlite3.OperationalError("database is locked")


class SQLiteInlineStoreTests(SQLiteStoreTests):
    """SQLite with every transaction run inline (``synchronous=True``)."""

    synchronous = True


class PostgresStoreTests(StoreTestsMixin, TestCase):
    """PostgreSQL, a fresh database per test, a pool of five connections."""

    def setUp(self) -> None:
        server = get_server()
        name, self.dsn = server.create_database()
        self.addCleanup(server.drop_database, name)

    def open_store(self, **kwargs: Any) -> "Deferred[Store]":
        return open_postgres_store(
            self.dsn, reactor, min_connections=1, max_connections=5, **kwargs
        )

    def retryable_error(self) -> BaseException:
        import psycopg2.errors

        return psycopg2.errors.SerializationFailure("could not serialize access")
