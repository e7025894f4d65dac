"""The store's reads of what other servers see of local users (key queries,
``/user/devices`` snapshots), the snapshot-served record and its effect on
``ack_sent``: run identically against SQLite and PostgreSQL, as
:mod:`tests.storage.test_store` is."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from devicelist_plugin.storage import Store
from devicelist_plugin.storage.engines import Txn
from devicelist_plugin.storage.types import CrossSigningSignature, PendingRow
from tests.helpers.store import SQLiteStoreCase, PostgresStoreCase

if TYPE_CHECKING:
    _Base = TestCase
else:
    _Base = object

ALICE = "@alice:local.test"
BOB = "@bob:local.test"
DEST = "a.test"
OTHER_DEST = "b.test"


def keys_of(user_id: str, device_id: str, tag: str = "") -> dict[str, Any]:
    return {
        "user_id": user_id,
        "device_id": device_id,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2"],
        "keys": {f"ed25519:{device_id}": f"ed{device_id}{tag}"},
        "signatures": {user_id: {f"ed25519:{device_id}": f"self{tag}"}},
    }


def cs_json(user_id: str, usage: str, public: str) -> dict[str, Any]:
    return {"user_id": user_id, "usage": [usage], "keys": {f"ed25519:{public}": public}}


class LocalKeysStoreTestsMixin(_Base):
    def open_store(self) -> "Deferred[Store]":
        raise AssertionError("subclasses provide open_store")

    async def store(self) -> Store:
        store = await self.open_store()
        self.addCleanup(store.close)
        return store

    async def device_with_keys(
        self,
        store: Store,
        user_id: str,
        device_id: str,
        name: str | None = None,
        destinations: tuple[str, ...] = (),
    ) -> int:
        await store.create_device(user_id, device_id, name, 1000, destinations)
        return await store.set_device_keys(
            user_id, device_id, keys_of(user_id, device_id), 1000, destinations
        )

    # ------------------------------------------------------------------
    # snapshots

    async def test_snapshot_reads_devices_with_keys_and_records(self) -> None:
        store = await self.store()
        await self.device_with_keys(store, ALICE, "D1", "phone", (DEST,))
        await store.create_device(ALICE, "D2", "no keys", 1000, (DEST,))
        await self.device_with_keys(store, ALICE, "D3", None, (DEST, OTHER_DEST))
        await store.set_cross_signing_keys(
            ALICE,
            {"master": cs_json(ALICE, "master", "M"), "self_signing": cs_json(ALICE, "self_signing", "S")},
            1001,
            (DEST,),
        )
        await store.store_signatures(
            ALICE, [CrossSigningSignature(ALICE, "ed25519:S", ALICE, "D1", "ssk-sig")], 1002, (DEST,)
        )
        # BOB's signature of ALICE's master key is BOB's business only
        await store.store_signatures(
            BOB, [CrossSigningSignature(BOB, "ed25519:U", ALICE, "M", "usk-sig")], 1002, ()
        )
        # BOB's own devices are someone else's snapshot
        await self.device_with_keys(store, BOB, "B1")
        self.assertEqual(await store.get_max_stream_id(ALICE), 7)

        snapshot = await store.get_user_devices_snapshot(ALICE, DEST)
        self.assertEqual(snapshot.user_id, ALICE)
        self.assertEqual(snapshot.stream_id, 7)
        self.assertEqual(
            [(d.device_id, d.display_name, d.keys_json) for d in snapshot.devices],
            [("D1", "phone", keys_of(ALICE, "D1")), ("D3", None, keys_of(ALICE, "D3"))],
        )
        self.assertEqual(set(snapshot.cross_signing_keys), {"master", "self_signing"})
        self.assertEqual(
            snapshot.signatures,
            (CrossSigningSignature(ALICE, "ed25519:S", ALICE, "D1", "ssk-sig"),),
        )
        # recorded for DEST: every device change pending up to 7 is covered;
        # the signing-key change stays (an older m.signing_key_update may
        # still be in flight, and it carries no stream id)
        self.assertEqual(await store.get_pending(DEST, 10), [PendingRow(ALICE, None, 6)])
        self.assertEqual(await store.get_unreferenced(DEST, [ALICE]), {ALICE: frozenset({7})})
        # other destinations are untouched
        self.assertEqual(await store.get_pending(OTHER_DEST, 10), [PendingRow(ALICE, "D3", 5)])
        self.assertEqual(await store.get_unreferenced(OTHER_DEST, [ALICE]), {ALICE: frozenset()})

    async def test_snapshot_without_destination_records_nothing(self) -> None:
        store = await self.store()
        await self.device_with_keys(store, ALICE, "D1", None, (DEST,))
        snapshot = await store.get_user_devices_snapshot(ALICE)
        self.assertEqual(snapshot.stream_id, 2)
        self.assertEqual(await store.get_pending(DEST, 10), [PendingRow(ALICE, "D1", 2)])
        self.assertEqual(await store.get_unreferenced(DEST, [ALICE]), {ALICE: frozenset()})
        # a user that never had a change: stream id 0, nothing recorded
        empty = await store.get_user_devices_snapshot("@nobody:local.test", DEST)
        self.assertEqual((empty.stream_id, empty.devices, dict(empty.cross_signing_keys)), (0, (), {}))
        rows = await store.database.run(
            "count", lambda t: t.query("SELECT COUNT(*) FROM outbound_unreferenced")
        )
        self.assertEqual(rows, [(0,)])

    async def test_record_snapshot_served(self) -> None:
        store = await self.store()
        await self.device_with_keys(store, ALICE, "D1", None, (DEST, OTHER_DEST))  # 1, 2
        await store.set_cross_signing_key(ALICE, "master", cs_json(ALICE, "master", "M"), 1000, (DEST,))  # 3
        await store.rename_device(ALICE, "D1", "later", 1000, (DEST,))  # 4
        await store.create_device(ALICE, "D2", None, 1000, (DEST,))  # 5
        await store.record_snapshot_served(DEST, ALICE, 4)
        # device rows up to 4 are covered; 5 is not, nor the signing key
        self.assertEqual(
            await store.get_pending(DEST, 10),
            [PendingRow(ALICE, None, 3), PendingRow(ALICE, "D2", 5)],
        )
        self.assertEqual(await store.get_unreferenced(DEST, [ALICE]), {ALICE: frozenset({4})})
        self.assertEqual(await store.get_pending(OTHER_DEST, 10), [PendingRow(ALICE, "D1", 2)])
        # an EDU up to 5 acknowledged afterwards: an older snapshot cannot undo it
        await store.ack_sent(DEST, [PendingRow(ALICE, "D2", 5)], {ALICE: {5}})
        await store.record_snapshot_served(DEST, ALICE, 3)
        self.assertEqual(await store.get_unreferenced(DEST, [ALICE]), {ALICE: frozenset({5})})
        for bad in (0, 6):
            with self.assertRaises(ValueError):
                await store.record_snapshot_served(DEST, ALICE, bad)
        with self.assertRaises(ValueError):
            await store.record_snapshot_served(DEST, "@nobody:local.test", 1)

    async def test_ack_sent_never_goes_below_a_served_snapshot(self) -> None:
        store = await self.store()
        for i in range(1, 6):
            await store.create_device(ALICE, f"D{i}", None, 1000, (DEST,))
        # a transaction with 1..3 is in flight when the snapshot at 5 is served
        in_flight = await store.get_pending(DEST, 3)
        await store.get_user_devices_snapshot(ALICE, DEST)
        await store.ack_sent(DEST, in_flight, {ALICE: {3}})
        self.assertEqual(await store.get_unreferenced(DEST, [ALICE]), {ALICE: frozenset({5})})
        # an acknowledgement reaching the snapshot's id replaces it and ends
        # the protection
        await store.create_device(ALICE, "D6", None, 1000, (DEST,))
        await store.ack_sent(DEST, [PendingRow(ALICE, "D6", 6)], {ALICE: {6}})
        self.assertEqual(await store.get_unreferenced(DEST, [ALICE]), {ALICE: frozenset({6})})
        await store.ack_sent(DEST, [], {ALICE: {2}})
        self.assertEqual(await store.get_unreferenced(DEST, [ALICE]), {ALICE: frozenset({2})})
        # several users in one acknowledgement: each judged on its own
        await store.create_device(BOB, "B1", None, 1000, (DEST,))
        await store.get_user_devices_snapshot(ALICE, DEST)
        await store.ack_sent(DEST, [PendingRow(BOB, "B1", 1)], {ALICE: {3}, BOB: {1}})
        self.assertEqual(
            await store.get_unreferenced(DEST, [ALICE, BOB]),
            {ALICE: frozenset({6}), BOB: frozenset({1})},
        )
        # an explicit empty set still deletes
        await store.ack_sent(DEST, [], {ALICE: set()})
        self.assertEqual(await store.get_unreferenced(DEST, [ALICE]), {ALICE: frozenset()})

    async def test_snapshot_is_consistent_under_concurrent_changes(self) -> None:
        store = await self.store()
        count = 12
        for i in range(count):
            await self.device_with_keys(store, ALICE, f"D{i:02d}", "old")
        base = await store.get_max_stream_id(ALICE)
        calls: list[Deferred[Any]] = [
            store.rename_device(ALICE, f"D{i:02d}", "new", 2000, (DEST,)) for i in range(count // 2)
        ]
        calls.append(store.get_user_devices_snapshot(ALICE, DEST))
        calls.extend(
            store.rename_device(ALICE, f"D{i:02d}", "new", 2000, (DEST,))
            for i in range(count // 2, count)
        )
        results = await gatherResults(calls)
        snapshot = results[count // 2]
        rename_ids: list[int] = results[: count // 2] + results[count // 2 + 1 :]
        assert base is not None
        self.assertEqual(sorted(rename_ids), list(range(base + 1, base + count + 1)))
        s = snapshot.stream_id
        names = {d.device_id: d.display_name for d in snapshot.devices}
        for i, stream_id in enumerate(rename_ids):
            self.assertEqual(names[f"D{i:02d}"], "new" if stream_id <= s else "old", (i, stream_id, s))
        # exactly the renames after the snapshot are still pending for DEST
        pending = await store.get_pending(DEST, 100)
        self.assertEqual(sorted(p.stream_id for p in pending), sorted(i for i in rename_ids if i > s))
        self.assertEqual(await store.get_unreferenced(DEST, [ALICE]), {ALICE: frozenset({s})})

    async def test_snapshot_statements_do_not_grow_with_devices(self) -> None:
        store = await self.store()
        counts: list[int] = []
        original = Txn.execute

        def counting(txn: Txn, sql: str, params: Any = ()) -> None:
            counts[-1] += 1
            original(txn, sql, params)

        for user_id, n in ((ALICE, 3), (BOB, 60)):
            for i in range(n):
                await self.device_with_keys(store, user_id, f"D{i:03d}")
            self.patch(Txn, "execute", counting)
            counts.append(0)
            snapshot = await store.get_user_devices_snapshot(user_id, DEST)
            self.patch(Txn, "execute", original)
            self.assertEqual(len(snapshot.devices), n)
        self.assertEqual(counts[0], counts[1])
        self.assertLessEqual(counts[1], 8)

    async def test_snapshot_since_a_known_stream_id(self) -> None:
        store = await self.store()
        await self.device_with_keys(store, ALICE, "D1", None, (DEST,))
        self.assertIsNone(await store.get_user_devices_snapshot_since(ALICE, DEST, 2))
        # still recorded as served: the pending change is covered
        self.assertEqual(await store.get_pending(DEST, 10), [])
        self.assertEqual(await store.get_unreferenced(DEST, [ALICE]), {ALICE: frozenset({2})})
        await store.rename_device(ALICE, "D1", "new", 2000, (DEST,))
        snapshot = await store.get_user_devices_snapshot_since(ALICE, DEST, 2)
        assert snapshot is not None
        self.assertEqual(snapshot, await store.get_user_devices_snapshot(ALICE))
        self.assertEqual((snapshot.stream_id, snapshot.devices[0].display_name), (3, "new"))
        self.assertEqual(await store.get_pending(DEST, 10), [])
        self.assertEqual(await store.get_unreferenced(DEST, [ALICE]), {ALICE: frozenset({3})})
        # without a destination nothing is recorded; a user without changes
        # is read (an empty snapshot at 0)
        self.assertIsNone(await store.get_user_devices_snapshot_since(ALICE, None, 3))
        empty = await store.get_user_devices_snapshot_since(BOB, DEST, 0)
        assert empty is not None
        self.assertEqual((empty.stream_id, empty.devices), (0, ()))
        self.assertEqual(await store.get_unreferenced(DEST, [BOB]), {BOB: frozenset()})

    async def test_serving_the_same_snapshot_again_writes_nothing(self) -> None:
        """The record is a write only when it changes something: a server
        refetching an unchanged list costs no commit to sync."""
        store = await self.store()
        await self.device_with_keys(store, ALICE, "D1", None, (DEST,))
        writes: list[str] = []
        original = Txn.execute

        def counting(txn: Txn, sql: str, params: Any = ()) -> None:
            if sql.lstrip().upper().startswith(("INSERT", "UPDATE")):
                writes.append(sql)
            original(txn, sql, params)

        self.patch(Txn, "execute", counting)
        await store.get_user_devices_snapshot(ALICE, DEST)
        self.assertEqual(len(writes), 1)
        await store.get_user_devices_snapshot(ALICE, DEST)
        await store.record_snapshot_served(DEST, ALICE, 2)
        self.assertEqual(len(writes), 1)
        self.assertEqual(await store.get_unreferenced(DEST, [ALICE]), {ALICE: frozenset({2})})
        self.patch(Txn, "execute", original)
        # a change, pending for DEST: served again, the record is rewritten
        await store.rename_device(ALICE, "D1", "new", 2000, (DEST,))
        self.patch(Txn, "execute", counting)
        snapshot = await store.get_user_devices_snapshot(ALICE, DEST)
        self.assertEqual(snapshot.stream_id, 3)
        self.assertEqual(len(writes), 2)
        self.assertEqual(await store.get_pending(DEST, 10), [])
        self.assertEqual(await store.get_unreferenced(DEST, [ALICE]), {ALICE: frozenset({3})})
        # another destination: its own record
        await store.get_user_devices_snapshot(ALICE, OTHER_DEST)
        self.assertEqual(len(writes), 3)
        self.assertEqual(await store.get_unreferenced(OTHER_DEST, [ALICE]), {ALICE: frozenset({3})})

    # ------------------------------------------------------------------
    # key queries

    async def test_get_local_user_keys_since(self) -> None:
        store = await self.store()
        nobody = "@nobody:local.test"
        await self.device_with_keys(store, ALICE, "D1", "phone")  # 2
        await self.device_with_keys(store, BOB, "B1")  # 2
        wanted = {ALICE: None, BOB: ("B1",), nobody: None}
        fresh = await store.get_local_user_keys(wanted)
        found = await store.get_local_user_keys_since(wanted, {ALICE: 2, BOB: 1, nobody: 0})
        # ALICE unchanged; BOB moved on; nobody (no stream id at all) is read
        self.assertEqual(found, {ALICE: None, BOB: fresh[BOB], nobody: fresh[nobody]})
        self.assertEqual(await store.get_local_user_keys_since(wanted, {}), fresh)
        await store.rename_device(ALICE, "D1", "new", 2000, ())
        found = await store.get_local_user_keys_since({ALICE: None}, {ALICE: 2})
        alice = found[ALICE]
        assert alice is not None
        self.assertEqual((alice.stream_id, alice.devices[0].display_name), (3, "new"))

    async def test_get_local_user_keys(self) -> None:
        store = await self.store()
        await self.device_with_keys(store, ALICE, "D1", "phone")
        await self.device_with_keys(store, ALICE, "D2")
        await store.create_device(ALICE, "D3", None, 1000, ())
        await self.device_with_keys(store, BOB, "B1")
        await store.set_cross_signing_key(BOB, "master", cs_json(BOB, "master", "BM"), 1000, ())
        await store.store_signatures(
            ALICE, [CrossSigningSignature(ALICE, "ed25519:AU", BOB, "BM", "alice-on-bob")], 1000, ()
        )
        await store.store_signatures(
            BOB, [CrossSigningSignature(BOB, "ed25519:B1", BOB, "BM", "bob-device-on-bob")], 1000, ()
        )
        found = await store.get_local_user_keys(
            {ALICE: None, BOB: None, "@nobody:local.test": None}
        )
        self.assertEqual(set(found), {ALICE, BOB, "@nobody:local.test"})
        self.assertEqual([d.device_id for d in found[ALICE].devices], ["D1", "D2"])
        self.assertEqual(found[ALICE].stream_id, 5)
        self.assertEqual(found["@nobody:local.test"].stream_id, 0)
        self.assertEqual(found["@nobody:local.test"].devices, ())
        self.assertEqual(
            [s.signature for s in found[BOB].signatures], ["bob-device-on-bob"]
        )
        self.assertEqual(found[BOB].cross_signing_keys, {"master": cs_json(BOB, "master", "BM")})
        # the signer sees its own signature of another user's key
        seen_by_alice = await store.get_local_user_keys({BOB: None}, from_user_id=ALICE)
        self.assertEqual(
            sorted(s.signature for s in seen_by_alice[BOB].signatures),
            ["alice-on-bob", "bob-device-on-bob"],
        )
        # device filters; devices without keys or unknown are absent
        some = await store.get_local_user_keys({ALICE: ["D2", "D3", "D9"], BOB: ()})
        self.assertEqual([d.device_id for d in some[ALICE].devices], ["D2"])
        self.assertEqual(some[BOB].devices, ())
        self.assertEqual(set(some[BOB].cross_signing_keys), {"master"})
        many = await store.get_local_user_keys({f"@u{i}:local.test": None for i in range(700)})
        self.assertEqual(len(many), 700)

    async def test_set_cross_signing_keys_is_one_change(self) -> None:
        store = await self.store()
        stream_id = await store.set_cross_signing_keys(
            ALICE,
            {
                "master": cs_json(ALICE, "master", "M"),
                "self_signing": cs_json(ALICE, "self_signing", "S"),
                "user_signing": cs_json(ALICE, "user_signing", "U"),
            },
            1000,
            (DEST,),
        )
        self.assertEqual(stream_id, 1)
        self.assertEqual(len(await store.get_stream_since(ALICE, 0)), 1)
        self.assertEqual(await store.get_pending(DEST, 10), [PendingRow(ALICE, None, 1)])
        self.assertEqual(
            set(await store.get_cross_signing_keys(ALICE)), {"master", "self_signing", "user_signing"}
        )
        # a user-signing key alone is logged but never federated
        await store.ack_sent(DEST, [PendingRow(ALICE, None, 1)], {ALICE: {1}})
        self.assertEqual(
            await store.set_cross_signing_keys(
                ALICE, {"user_signing": cs_json(ALICE, "user_signing", "U2")}, 1001, (DEST,)
            ),
            2,
        )
        self.assertEqual(await store.get_pending(DEST, 10), [])
        with self.assertRaises(ValueError):
            await store.set_cross_signing_keys(ALICE, {}, 1002, (DEST,))
        with self.assertRaises(ValueError):
            await store.set_cross_signing_keys(ALICE, {"other": {}}, 1002, (DEST,))
        self.assertEqual(await store.get_max_stream_id(ALICE), 2)


class SQLiteLocalKeysTests(SQLiteStoreCase, LocalKeysStoreTestsMixin):
    """SQLite in a temporary file, transactions in the pool's thread."""


class SQLiteInlineLocalKeysTests(SQLiteLocalKeysTests):
    """SQLite with every transaction run inline."""

    synchronous = True


class PostgresLocalKeysTests(PostgresStoreCase, LocalKeysStoreTestsMixin):
    """PostgreSQL, a fresh database per test, a pool of five connections."""

    async def test_concurrent_snapshots_do_not_queue_on_the_users_row(self) -> None:
        """Many servers (or one, many times) fetching one user's list hold
        its position row shared: a snapshot waits for changes, not for
        other snapshots."""
        store = await self.store()
        await self.device_with_keys(store, ALICE, "D1", "one", (DEST,))
        await store.get_user_devices_snapshot(ALICE, DEST)
        holding, release, ended = threading.Event(), threading.Event(), threading.Event()

        def held(t: Txn) -> None:
            store._user_devices_snapshot(t, ALICE, DEST, None)
            holding.set()
            release.wait(10)
            ended.set()

        first = store.database.run("held snapshot", held)
        try:
            await deferToThread(holding.wait, 30)
            snapshot = await store.get_user_devices_snapshot(ALICE, DEST)
            # it finished while the first still held the row
            self.assertFalse(ended.is_set())
            self.assertEqual([d.device_id for d in snapshot.devices], ["D1"])
        finally:
            release.set()
            await first
