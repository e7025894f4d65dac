"""The store methods of the outbound sender and of the store-backed
membership source, run identically against SQLite and PostgreSQL."""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from devicelist_plugin.storage import Store
from devicelist_plugin.storage.types import PendingRow
from tests.helpers.store import SQLiteStoreCase, PostgresStoreCase

if TYPE_CHECKING:
    _Base = TestCase
else:
    _Base = object

OURS = "local.test"
ALICE = "@alice:local.test"
BOB = "@bob:local.test"
REMOTE = "@carol:remote.test"
D = "remote.test"
E = "other.test"


class OutboundStoreMixin(_Base):
    def open_store(self) -> "Deferred[Store]":
        raise AssertionError("subclasses provide open_store")

    async def store(self) -> Store:
        store = await self.open_store()
        self.addCleanup(store.close)
        return store

    async def test_batch_reads_rows_unreferenced_and_resets_at_once(self) -> None:
        store = await self.store()
        await store.create_device(ALICE, "P", None, 1, (D,))
        await store.create_device(BOB, "Q", None, 2, (D, E))
        await store.set_cross_signing_keys(ALICE, {"master": {"k": 1}}, 3, (D,))
        await store.ack_sent(D, [(BOB, "Q", 1)], {BOB: [1]})
        await store.create_device(BOB, "R", None, 4, (D,))
        await store.add_chain_resets([(D, ALICE), (D, ALICE), (E, BOB)])
        batch = await store.get_outbound_batch(D, 10)
        self.assertEqual(
            batch.rows,
            (PendingRow(ALICE, "P", 1), PendingRow(ALICE, None, 2), PendingRow(BOB, "R", 2)),
        )
        self.assertEqual(batch.unreferenced, {ALICE: frozenset(), BOB: frozenset({1})})
        self.assertEqual(batch.resets, {ALICE: None})
        limited = await store.get_outbound_batch(D, 1)
        self.assertEqual(limited.rows, (PendingRow(ALICE, "P", 1),))
        self.assertEqual(await store.destinations_pending_for_user(BOB), [E, D])
        self.assertEqual(await store.destinations_pending_for_user(ALICE), [D])
        await self.assertFailure(store.get_outbound_batch(D, 0), ValueError)

    async def test_destinations_to_send(self) -> None:
        store = await self.store()
        self.assertEqual(await store.destinations_to_send(), [])
        await store.create_device(ALICE, "P", None, 1, (D,))
        await store.set_inflight_txn("c.test", "t", {})
        await store.add_chain_resets([("b.test", ALICE)])
        self.assertEqual(await store.destinations_to_send(), ["b.test", "c.test", D])

    async def test_prepare_queues_the_latest_device_change(self) -> None:
        store = await self.store()
        await store.create_device(ALICE, "P", None, 1, ())
        await store.create_device(ALICE, "Q", None, 2, ())
        await store.delete_device(ALICE, "Q", 3, ())
        await store.set_cross_signing_keys(ALICE, {"master": {"k": 1}}, 4, ())
        await store.set_cross_signing_keys(BOB, {"master": {"k": 1}}, 4, ())
        await store.add_chain_resets([(D, ALICE), (D, BOB)])
        # Bob never changed a device: nothing to restart
        self.assertEqual(await store.prepare_chain_resets(D, 5), frozenset({ALICE}))
        batch = await store.get_outbound_batch(D, 10)
        self.assertEqual(batch.rows, (PendingRow(ALICE, "Q", 3),))
        self.assertEqual(batch.resets, {ALICE: 3})
        # a later change does not move the target; preparing again changes nothing
        await store.rename_device(ALICE, "P", "p", 6, (D,))
        self.assertEqual(await store.prepare_chain_resets(D, 7), frozenset({ALICE}))
        batch = await store.get_outbound_batch(D, 10)
        self.assertEqual(batch.resets, {ALICE: 3})
        self.assertEqual(
            batch.rows, (PendingRow(ALICE, "Q", 3), PendingRow(ALICE, "P", 5))
        )

    async def test_begin_transaction_consumes_resets(self) -> None:
        store = await self.store()
        await store.add_chain_resets([(D, ALICE), (D, BOB)])
        await store.begin_outbound_transaction(D, "t1", {"x": 1}, [ALICE])
        inflight = await store.get_inflight_txn(D)
        assert inflight is not None
        self.assertEqual((inflight.txn_id, inflight.payload), ("t1", {"x": 1}))
        self.assertEqual((await store.get_outbound_batch(D, 1)).resets, {BOB: None})
        counts = await store.count_outbound_rows(D)
        self.assertEqual((counts.pending, counts.unreferenced, counts.chain_resets), (0, 0, 1))

    async def test_compaction_leaves_a_reset_per_user(self) -> None:
        store = await self.store()
        for i in range(5):
            await store.create_device(ALICE, f"P{i}", None, 1, (D, E))
            await store.delete_device(ALICE, f"P{i}", 1, (D, E))
        await store.create_device(BOB, "Q", None, 1, (D,))
        await store.set_cross_signing_keys(ALICE, {"master": {"k": 1}}, 2, (D,))
        await store.ack_sent(D, [], {ALICE: [3]})
        self.assertEqual(await store.compact_destination(D), 6)
        counts = await store.count_outbound_rows(D)
        # the signing-key row stays; Alice's unreferenced ids too (the reset
        # makes her next EDUs say prev_id [] anyway)
        self.assertEqual((counts.pending, counts.unreferenced, counts.chain_resets), (1, 1, 2))
        self.assertEqual((await store.get_outbound_batch(D, 10)).resets, {ALICE: None, BOB: None})
        # another destination is untouched
        self.assertEqual((await store.count_outbound_rows(E)).pending, 5)
        self.assertEqual(await store.compact_destination(D), 0)

    async def test_memberships(self) -> None:
        store = await self.store()
        self.assertEqual(await store.join_room("!a", ALICE, OURS), {})
        self.assertEqual(await store.join_room("!a", REMOTE, OURS), {ALICE: frozenset({D})})
        self.assertEqual(await store.join_room("!a", REMOTE, OURS), {})
        self.assertEqual(await store.join_room("!a", BOB, OURS), {BOB: frozenset({D})})
        self.assertEqual(await store.get_servers_sharing_room(ALICE, OURS), frozenset({D}))
        self.assertTrue(await store.is_user_tracked(REMOTE, OURS))
        self.assertEqual(
            await store.get_tracked_users([REMOTE, "@stranger:d.test", ALICE], OURS),
            frozenset({REMOTE, ALICE}),
        )
        self.assertEqual(await store.get_room_members("!a"), [ALICE, BOB, REMOTE])
        self.assertEqual((await store.get_outbound_batch(D, 1)).resets, {ALICE: None, BOB: None})
        self.assertEqual(await store.leave_room("!a", ALICE, OURS), [])
        self.assertEqual(await store.leave_room("!a", BOB, OURS), [REMOTE])
        self.assertEqual(await store.leave_room("!a", BOB, OURS), [])
        self.assertFalse(await store.is_user_tracked(REMOTE, OURS))
        self.assertEqual(await store.get_tracked_users([REMOTE], OURS), frozenset())
        self.assertEqual(await store.get_servers_sharing_room(ALICE, OURS), frozenset())


class SQLiteOutboundStoreTests(SQLiteStoreCase, OutboundStoreMixin):
    pass


class PostgresOutboundStoreTests(PostgresStoreCase, OutboundStoreMixin):
    pass
