"""LocalDeviceHandler under real concurrency: stores whose transactions run
in pool threads (SQLite with its one connection, PostgreSQL with five), many
changes and claims in flight at once."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, cast

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IReactorFromThreads, IReactorThreads
from twisted.trial.unittest import TestCase

from devicelist_plugin.local.handler import (
    CpuRunner,
    LocalDeviceHandler,
    run_inline,
    thread_pool_runner,
)
from devicelist_plugin.membership import InMemoryMembership
from devicelist_plugin.storage import Store
from tests.local.keys import ClientDevice, CrossSigning
from tests.helpers.membership import share_room
from tests.helpers.store import SQLiteStoreCase, PostgresStoreCase

if TYPE_CHECKING:
    _Base = TestCase
else:
    _Base = object

ALICE = "@alice:b.example"
DEST = "a.example"


class ConcurrencyTestsMixin(_Base):
    def open_store(self) -> "Deferred[Store]":
        raise AssertionError("subclasses provide open_store")

    async def handler(
        self, cpu_runner: CpuRunner = run_inline
    ) -> tuple[LocalDeviceHandler, Store, list[tuple[str, int, tuple[str, ...]]]]:
        store = await self.open_store()
        self.addCleanup(store.close)
        membership = InMemoryMembership("b.example")
        share_room(membership, ALICE, DEST)
        handler = LocalDeviceHandler(
            "b.example", store, membership, reactor, cpu_runner=cpu_runner
        )
        notified: list[tuple[str, int, tuple[str, ...]]] = []
        handler.add_change_listener(lambda u, s, d: notified.append((u, s, d)))
        return handler, store, notified

    async def test_stream_ids_strictly_increasing_under_concurrent_changes(self) -> None:
        handler, store, notified = await self.handler()
        n = 15
        created = await gatherResults(
            [handler.create_device(ALICE, f"D{i:02d}", "x") for i in range(n)]
            + [handler.create_device(ALICE, "GONE")]
        )
        self.assertEqual(sorted(created), list(range(1, n + 2)))
        devices = [ClientDevice(ALICE, f"D{i:02d}") for i in range(n)]
        cross_signing = CrossSigning(ALICE)
        mixed: list[Deferred[Any]] = []
        for i, device in enumerate(devices):
            mixed.append(handler.rename_device(ALICE, device.device_id, f"name {i}"))
            mixed.append(handler.upload_device_keys(ALICE, device.device_id, device.device_keys()))
        mixed.append(handler.upload_cross_signing_keys(ALICE, cross_signing.upload_body()))
        mixed.append(handler.delete_device(ALICE, "GONE"))
        ids = await gatherResults(mixed)
        total = 3 * n + 3
        self.assertEqual(sorted(ids), list(range(n + 2, total + 1)))
        # every change logged once, in the order of its id, and notified once
        changes = await store.get_stream_since(ALICE, 0)
        self.assertEqual([c.stream_id for c in changes], list(range(1, total + 1)))
        self.assertEqual(sorted(s for _, s, _ in notified), list(range(1, total + 1)))
        self.assertEqual(await store.get_max_stream_id(ALICE), total)
        # the pending rows name each device's last change
        pending = await store.get_pending(DEST, 100)
        last: dict[Any, int] = {}
        for c in changes:
            last[c.device_id] = c.stream_id
        self.assertEqual({(p.device_id, p.stream_id) for p in pending}, set(last.items()))

    async def test_claim_race_never_hands_out_a_key_twice(self) -> None:
        handler, store, _ = await self.handler()
        await handler.create_device(ALICE, "D1")
        keys = {f"signed_curve25519:K{i:03d}": {"key": f"k{i}"} for i in range(30)}
        await handler.upload_one_time_keys(ALICE, "D1", keys)
        await handler.upload_fallback_keys(ALICE, "D1", {"signed_curve25519:FB": {"key": "fb"}})
        results = await gatherResults(
            [handler.claim_keys({ALICE: {"D1": "signed_curve25519"}}) for _ in range(50)]
        )
        claimed = [next(iter(r["one_time_keys"][ALICE]["D1"])) for r in results]
        one_time = [k for k in claimed if k != "signed_curve25519:FB"]
        self.assertEqual(sorted(one_time), sorted(keys))
        self.assertEqual(claimed.count("signed_curve25519:FB"), 20)
        self.assertEqual(await store.count_one_time_keys(ALICE, "D1"), {})


    async def test_snapshot_encoded_in_the_reactor_thread_pool(self) -> None:
        threads = cast(IReactorThreads, reactor)
        runner = thread_pool_runner(cast(IReactorFromThreads, reactor), threads.getThreadPool())
        handler, store, _ = await self.handler(runner)
        cross_signing = CrossSigning(ALICE)
        await handler.upload_cross_signing_keys(ALICE, cross_signing.upload_body())
        for i in range(20):
            device = ClientDevice(ALICE, f"D{i:02d}")
            await handler.create_device(ALICE, device.device_id, f"name {i}")
            await handler.upload_device_keys(ALICE, device.device_id, device.device_keys())
        served = (await handler.query_keys({ALICE: ["D03"]}))["device_keys"][ALICE]["D03"]
        signed = cross_signing.sign_with("self_signing", served)
        await handler.upload_signatures(ALICE, {ALICE: {"D03": signed}})
        encoded = await handler.encoded_user_devices_snapshot(ALICE, DEST)
        self.assertEqual(json.loads(encoded), await handler.user_devices_snapshot(ALICE))
        self.assertEqual(len(json.loads(encoded)["devices"]), 20)


class SQLiteConcurrencyTests(SQLiteStoreCase, ConcurrencyTestsMixin):
    pass


class PostgresConcurrencyTests(PostgresStoreCase, ConcurrencyTestsMixin):
    pass
