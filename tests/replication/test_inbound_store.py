"""The store methods of the inbound updater, run against SQLite (pool thread
and inline) and PostgreSQL: batches with per-device stream ids and deletion
tombstones, the durable EDU inbox, per-user resync backoff, snapshots."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from devicelist_plugin.core.models import (
    CrossSigningKey,
    DeviceKeys,
    DeviceListUpdate,
    RemoteDevice,
    UserDevicesResponse,
)
from devicelist_plugin.storage import Store
from devicelist_plugin.storage.types import (
    InboxEntry,
    QueuedUpdate,
    RemoteBatch,
    RemoteBatchResult,
    RemoteInbox,
    StaleRemoteUser,
)
from tests.helpers.store import PostgresStoreCase, SQLiteStoreCase

if TYPE_CHECKING:
    _Base = TestCase
else:
    _Base = object

U = "@u:remote.test"
OTHER = "@other:remote.test"


def keys(device_id: str, version: int = 1) -> DeviceKeys:
    raw: dict[str, Any] = {
        "user_id": U,
        "device_id": device_id,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2"],
        "keys": {f"ed25519:{device_id}": f"k{version}"},
        "signatures": {U: {f"ed25519:{device_id}": f"s{version}"}},
    }
    return DeviceKeys(U, device_id, tuple(raw["algorithms"]), dict(raw["keys"]), {}, raw)


def update(
    device_id: str,
    stream_id: int,
    *,
    name: Optional[str] = None,
    deleted: bool = False,
    version: int = 1,
) -> DeviceListUpdate:
    return DeviceListUpdate(
        user_id=U,
        device_id=device_id,
        stream_id=stream_id,
        prev_ids=(stream_id - 1,),
        deleted=deleted,
        display_name=name,
        keys=None if deleted else keys(device_id, version),
    )


def snapshot(stream_id: int, *device_ids: str) -> UserDevicesResponse:
    return UserDevicesResponse(
        user_id=U,
        stream_id=stream_id,
        devices=tuple(RemoteDevice(d, keys(d), f"name {d}") for d in device_ids),
    )


def cs_key(usage: str, public: str) -> CrossSigningKey:
    raw: dict[str, Any] = {"user_id": U, "usage": [usage], "keys": {f"ed25519:{public}": public}}
    return CrossSigningKey(U, (usage,), {f"ed25519:{public}": public}, {}, raw)


class InboundStoreTestsMixin(_Base):
    def open_store(self) -> "Deferred[Store]":
        raise AssertionError("subclasses provide open_store")

    async def store(self) -> Store:
        store = await self.open_store()
        self.addCleanup(store.close)
        return store

    async def devices(self, store: Store) -> dict[str, Optional[str]]:
        return {d.device_id: d.display_name for d in await store.get_remote_devices(U)}

    async def stream_ids(self, store: Store) -> dict[str, tuple[str, int]]:
        def txn(t: Any) -> dict[str, tuple[str, int]]:
            rows = t.query(
                "SELECT device_id, stream_id, 'live' FROM remote_devices WHERE user_id = ?"
                " UNION ALL SELECT device_id, stream_id, 'deleted' FROM remote_deleted_devices"
                " WHERE user_id = ?",
                (U, U),
            )
            return {r[0]: (r[2], int(r[1])) for r in rows}

        result: dict[str, tuple[str, int]] = await store.database.run("ids", txn)
        return result

    async def test_batch_applies_in_order_honouring_device_stream_ids(self) -> None:
        store = await self.store()
        result = await store.apply_remote_batch(
            U, [update("D1", 5, name="five"), update("D2", 6)], frozenset({5, 6}), [], None, 1000
        )
        self.assertEqual(
            result, RemoteBatchResult(("D1", "D2"), None, await store.get_remote_sync_state(U))
        )
        assert result.state is not None
        self.assertEqual(result.state.known_ids, frozenset({5, 6}))
        # a late update of D1 (stream 4 < 5) changes nothing; D2 at 7 does
        result = await store.apply_remote_batch(
            U, [update("D1", 4, name="four"), update("D2", 7, name="seven")], {4, 5, 6, 7}, [], None, 1000
        )
        self.assertEqual(result.changed_device_ids, ("D2",))
        self.assertEqual(await self.devices(store), {"D1": "five", "D2": "seven"})
        self.assertEqual(await self.stream_ids(store), {"D1": ("live", 5), "D2": ("live", 7)})
        state = await store.get_remote_sync_state(U)
        assert state is not None
        self.assertEqual(state.known_ids, frozenset({4, 5, 6, 7}))

    async def test_deletions_leave_tombstones_until_the_next_snapshot(self) -> None:
        store = await self.store()
        await store.replace_remote_snapshot(U, snapshot(10, "D1", "D2"), 0, 1000)
        self.assertEqual(await self.stream_ids(store), {"D1": ("live", 10), "D2": ("live", 10)})
        # at or below the snapshot's id: the device is not replaced
        result = await store.apply_remote_batch(U, [update("D1", 10, name="x")], {10}, [], None, 1)
        self.assertEqual(result.changed_device_ids, ())
        result = await store.apply_remote_batch(U, [update("D1", 12, deleted=True)], {12}, [], None, 1)
        self.assertEqual(result.changed_device_ids, ("D1",))
        self.assertEqual(await self.stream_ids(store), {"D1": ("deleted", 12), "D2": ("live", 10)})
        # an update from before the deletion cannot bring it back; a later one can
        await store.apply_remote_batch(U, [update("D1", 11, name="zombie")], {11, 12}, [], None, 1)
        self.assertEqual(await self.devices(store), {"D2": "name D2"})
        await store.apply_remote_batch(U, [update("D1", 13, name="back")], {11, 12, 13}, [], None, 1)
        self.assertEqual(await self.devices(store), {"D1": "back", "D2": "name D2"})
        self.assertEqual(await self.stream_ids(store), {"D1": ("live", 13), "D2": ("live", 10)})
        await store.apply_remote_batch(U, [update("D2", 14, deleted=True)], {14}, [], None, 1)
        # the next snapshot forgets the tombstones
        await store.replace_remote_snapshot(U, snapshot(20, "D1"), 0, 2000)
        self.assertEqual(await self.stream_ids(store), {"D1": ("live", 20)})

    async def test_stale_mark_with_the_batch(self) -> None:
        store = await self.store()
        await store.replace_remote_snapshot(U, snapshot(10, "D1"), 0, 1000)
        result = await store.apply_remote_batch(
            U, [update("D1", 11, name="applied")], {11}, [], "unknown_prev_id", 2000
        )
        state = await store.get_remote_sync_state(U)
        assert state is not None
        self.assertEqual(result, RemoteBatchResult(("D1",), 1, state))
        self.assertTrue(state.stale)
        self.assertEqual((state.stale_reason, state.stale_since_ts), ("unknown_prev_id", 2000))
        self.assertEqual(await self.devices(store), {"D1": "applied"})
        self.assertEqual(
            await store.list_stale_remote_users(), [StaleRemoteUser(U, 1, "unknown_prev_id", 2000)]
        )

    async def test_inbox_queue_read_and_delete(self) -> None:
        store = await self.store()
        self.assertTrue(await store.queue_remote_update(U, 3, {"n": 3}, 100))
        self.assertTrue(await store.queue_remote_update(U, 2, {"n": 2}, 200))
        self.assertFalse(await store.queue_remote_update(U, 3, {"n": "other"}, 300))
        self.assertTrue(await store.queue_remote_update(OTHER, 1, {"n": 1}, 300))
        self.assertEqual(
            await store.get_remote_inbox(U),
            [InboxEntry(U, 2, {"n": 2}, 200), InboxEntry(U, 3, {"n": 3}, 100)],
        )
        self.assertEqual(
            await store.get_remote_inbox_state(U),
            RemoteInbox(
                None, (QueuedUpdate(U, 2, '{"n":2}', 200), QueuedUpdate(U, 3, '{"n":3}', 100))
            ),
        )
        self.assertEqual(await store.list_remote_inbox_users(), [OTHER, U])
        # deleting processed rows alone creates no sync row
        result = await store.apply_remote_batch(U, [], None, [2], None, 1)
        self.assertIsNone(result.state)
        self.assertIsNone(await store.get_remote_sync_state(U))
        self.assertEqual([e.stream_id for e in await store.get_remote_inbox(U)], [3])
        # a snapshot keeps the inbox (the updater re-runs it); a drop does not
        await store.replace_remote_snapshot(U, snapshot(1), 0, 1)
        self.assertEqual([e.stream_id for e in await store.get_remote_inbox(U)], [3])
        inbox = await store.get_remote_inbox_state(U)
        self.assertEqual(inbox.state, await store.get_remote_sync_state(U))
        self.assertEqual([e.stream_id for e in inbox.entries], [3])
        await store.drop_remote_user(U)
        self.assertEqual(await store.get_remote_inbox(U), [])
        self.assertEqual(await store.list_remote_inbox_users(), [OTHER])

    async def test_several_users_queued_read_and_applied_in_one_call_each(self) -> None:
        store = await self.store()
        flags = await store.queue_remote_updates(
            [
                InboxEntry(U, 1, {"n": 1}, 100),
                InboxEntry(OTHER, 7, {"n": 7}, 100),
                InboxEntry(U, 1, {"n": "copy"}, 200),
                InboxEntry(U, 2, {"n": 2}, 200),
            ]
        )
        self.assertEqual(flags, [True, True, False, True])
        states = await store.get_remote_inbox_states([U, OTHER, "@none:remote.test"])
        self.assertEqual([e.stream_id for e in states[U].entries], [1, 2])
        self.assertEqual(states[OTHER].entries, (QueuedUpdate(OTHER, 7, '{"n":7}', 100),))
        self.assertEqual(states["@none:remote.test"], RemoteInbox(None, ()))
        other_update = DeviceListUpdate(OTHER, "O1", 7, display_name="o")
        results = await store.apply_remote_batches(
            [
                RemoteBatch(
                    U, (update("D1", 1), update("D2", 2)), frozenset({1, 2}), frozenset({1, 2}), None
                ),
                RemoteBatch(OTHER, (other_update,), None, frozenset({7}), "unknown_prev_id"),
            ],
            5000,
        )
        self.assertEqual([r.changed_device_ids for r in results], [("D1", "D2"), ("O1",)])
        assert results[0].state is not None and results[1].state is not None
        self.assertEqual(results[0].state.known_ids, frozenset({1, 2}))
        self.assertFalse(results[0].state.stale)
        self.assertEqual(results[1].stale_generation, 1)
        self.assertTrue(results[1].state.stale)
        self.assertEqual(await store.list_remote_inbox_users(), [])
        # one batch per user: a second for the same user is refused, nothing written
        with self.assertRaises(ValueError):
            await store.apply_remote_batches(
                [
                    RemoteBatch(U, (update("D3", 3),), None, frozenset(), None),
                    RemoteBatch(U, (), None, frozenset(), "x"),
                ],
                5000,
            )
        self.assertNotIn("D3", await self.device_ids(store, U))

    async def test_one_commit_orders_changes_of_one_device(self) -> None:
        """Several changes of a device in one commit end as the last one that
        supersedes; a tombstone is revived, a newer cached entry kept."""
        store = await self.store()
        await store.replace_remote_snapshot(U, snapshot(10, "KEEP", "GONE", "BACK"), 0, 1)
        await store.apply_remote_batch(U, [update("BACK", 11, deleted=True)], {11}, [], None, 1)
        other_update = DeviceListUpdate(OTHER, "O1", 3, display_name="o")
        results = await store.apply_remote_batches(
            [
                RemoteBatch(
                    U,
                    (
                        update("GONE", 12, deleted=True),
                        update("NEW", 13, name="first"),
                        update("NEW", 14, deleted=True),
                        update("NEW", 15, name="again"),
                        update("BACK", 16, name="revived"),
                        update("KEEP", 9, name="stale"),  # below the snapshot's 10
                    ),
                    frozenset({11, 12, 13, 14, 15, 16}),
                    frozenset(),
                    None,
                ),
                RemoteBatch(OTHER, (other_update,), frozenset({3}), frozenset(), None),
            ],
            2,
        )
        self.assertEqual(results[0].changed_device_ids, ("BACK", "GONE", "NEW"))
        self.assertEqual(results[1].changed_device_ids, ("O1",))
        devices = {d.device_id: d.display_name for d in await store.get_remote_devices(U)}
        self.assertEqual(devices, {"KEEP": "name KEEP", "NEW": "again", "BACK": "revived"})
        # the tombstones left: GONE's only (BACK's was revived)
        self.assertEqual(await self.tombstones(store, U), [("GONE", 12)])
        # a late change from before GONE's deletion does not bring it back
        zombie = update("GONE", 11, name="zombie")
        result = await store.apply_remote_batch(U, [zombie], None, [], None, 3)
        self.assertEqual(result.changed_device_ids, ())

    async def tombstones(self, store: Store, user_id: str) -> list[tuple[str, int]]:
        rows = await store.database.run(
            "tombstones",
            lambda t: t.query(
                "SELECT device_id, stream_id FROM remote_deleted_devices WHERE user_id = ?"
                " ORDER BY device_id",
                (user_id,),
            ),
        )
        return [(r[0], int(r[1])) for r in rows]

    async def device_ids(self, store: Store, user_id: str) -> list[str]:
        return [d.device_id for d in await store.get_remote_devices(user_id)]

    async def test_resync_backoff_is_kept_and_reset_by_a_snapshot(self) -> None:
        store = await self.store()
        generation = await store.mark_remote_stale(U, "first_contact", 1000)
        await store.set_remote_resync_backoff(U, 2, 5000)
        state = await store.get_remote_sync_state(U)
        assert state is not None
        self.assertEqual((state.resync_attempts, state.resync_retry_ts), (2, 5000))
        self.assertFalse(state.cached)
        self.assertEqual(
            await store.list_stale_remote_users(),
            [StaleRemoteUser(U, generation, "first_contact", 1000, 5000)],
        )
        self.assertTrue(await store.replace_remote_snapshot(U, snapshot(3, "D1"), generation, 6000))
        state = await store.get_remote_sync_state(U)
        assert state is not None
        self.assertEqual((state.resync_attempts, state.resync_retry_ts), (0, None))
        self.assertTrue(state.cached)
        # a user without a row: nothing to record
        await store.set_remote_resync_backoff(OTHER, 1, 1)
        self.assertIsNone(await store.get_remote_sync_state(OTHER))

    async def test_cache_read_in_one_go(self) -> None:
        store = await self.store()
        empty = await store.get_remote_cache(U)
        self.assertEqual((empty.state, empty.devices, dict(empty.cross_signing_keys)), (None, (), {}))
        await store.replace_remote_snapshot(U, snapshot(3, "B", "A"), 0, 1)
        await store.set_remote_cross_signing_keys(
            U, {"master": cs_key("master", "M"), "self_signing": cs_key("self_signing", "S")}
        )
        cache = await store.get_remote_cache(U)
        assert cache.state is not None
        self.assertEqual(cache.state.snapshot_stream_id, 3)
        self.assertEqual([d.device_id for d in cache.devices], ["A", "B"])
        self.assertEqual(
            {usage: key.public_key for usage, key in cache.cross_signing_keys.items()},
            {"master": "M", "self_signing": "S"},
        )
        with self.assertRaises(ValueError):
            await store.set_remote_cross_signing_keys(U, {"nonsense": cs_key("master", "M")})
        await store.drop_remote_user(U)
        self.assertEqual(await self.stream_ids(store), {})

    async def test_batch_of_another_user_is_refused(self) -> None:
        store = await self.store()
        wrong = DeviceListUpdate(OTHER, "D", 1)
        with self.assertRaises(ValueError):
            await store.apply_remote_batch(U, [wrong], None, [], None, 1)


class SQLiteInboundStoreTests(SQLiteStoreCase, InboundStoreTestsMixin):
    pass


class SQLiteInlineInboundStoreTests(SQLiteInboundStoreTests):
    synchronous = True


class PostgresInboundStoreTests(PostgresStoreCase, InboundStoreTestsMixin):
    pass
