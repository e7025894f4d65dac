"""A ``/user/devices`` snapshot served while a transaction carrying an older
``m.signing_key_update`` is in flight must not cancel the newer cross-signing
change: ``m.signing_key_update`` has no stream id, so the receiver applies
whatever arrives last, and the older transaction arrives after the snapshot.
(Found by the convergence simulation, seed 149: a restarted server resynced
a user while the user's server still held a transaction built before the
user's last cross-signing upload.)"""

from __future__ import annotations

import random

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from devicelist_plugin.membership import InMemoryMembership
from devicelist_plugin.module import DeviceListModule
from tests.helpers import FakeNetwork, FaultKind
from tests.simulation.modules import start_module
from tests.simulation.harness import SEND_PREFIX, cross_signing_upload

A, B = "a.test", "b.test"
ALICE, BOB = "@alice:a.test", "@bob:b.test"
ROOM = "!room:a.test"


class SnapshotDuringSigningKeyUpdate(SynchronousTestCase):
    def make(self, name: str) -> DeviceListModule:
        membership = InMemoryMembership(name)
        module = start_module(self, name, self.clock, self.network, membership)
        membership.join(ROOM, ALICE)
        membership.join(ROOM, BOB)
        return module

    def master_key(self, module: DeviceListModule) -> object:
        cache = self.successResultOf(module.store.get_remote_cache(BOB))
        return dict(cache.cross_signing_keys["master"].keys)

    def test_older_update_in_flight_does_not_win(self) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(1_700_000_000)
        self.network = FakeNetwork(self.clock)
        a, b = self.make(A), self.make(B)
        rng = random.Random(1)
        self.successResultOf(b.local.create_device(BOB, "D1", None))
        self.network.advance(5)
        # Bob's first cross-signing keys travel slowly to A ...
        self.network.faults.inject(
            FaultKind.DELAY, origin=B, destination=A, path_prefix=SEND_PREFIX, delay=10
        )
        first = cross_signing_upload(rng, BOB)
        self.successResultOf(b.local.upload_cross_signing_keys(BOB, first))
        self.network.flush()
        # ... he replaces them, and A resyncs him before the first arrive
        second = cross_signing_upload(rng, BOB)
        self.successResultOf(b.local.upload_cross_signing_keys(BOB, second))
        self.successResultOf(a.store.mark_remote_stale(BOB, "test", 1_700_000_005_000))
        resync = a.request_resync(BOB)
        self.network.flush()
        self.assertIsNone(self.successResultOf(resync))
        self.assertEqual(self.master_key(a), second["master_key"]["keys"])
        self.network.advance(60)
        self.assertEqual(self.master_key(a), second["master_key"]["keys"])
