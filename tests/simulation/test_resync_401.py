"""A resync answered 401 because the remote server could not fetch *our*
signing key is a failure of that server, not of the user: the server backs off
on the shared schedule and is retried as soon as it may be, instead of the user
sitting out the 5-minute user backoff (found by the convergence simulation)."""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from devicelist_plugin.membership import InMemoryMembership
from devicelist_plugin.module import DeviceListModule
from tests.helpers import FakeNetwork, FaultKind
from tests.simulation.modules import start_module

A, B = "a.test", "b.test"
ALICE, BOB = "@alice:a.test", "@bob:b.test"
ROOM = "!room:a.test"
RESYNC = "/_matrix/federation/v1/user/devices/"


class ResyncAnswered401(SynchronousTestCase):
    def make(self, name: str) -> DeviceListModule:
        return start_module(self, name, self.clock, self.network, InMemoryMembership(name))

    def test_401_backs_off_the_server_not_the_user(self) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(1_700_000_000)
        self.network = FakeNetwork(self.clock)
        # B fails to fetch A's signing key, once; nothing else goes wrong
        self.network.faults.inject(
            FaultKind.REFUSE, origin=B, destination=A, path_prefix="/_matrix/key/"
        )
        a, b = self.make(A), self.make(B)
        for module in (a, b):
            membership = module.membership
            assert isinstance(membership, InMemoryMembership)
            membership.join(ROOM, ALICE)
            membership.join(ROOM, BOB)
        self.network.flush()
        a.request_resync(BOB)
        self.network.flush()
        [first] = self.network.requests(origin=A, path_prefix=RESYNC)
        self.assertEqual(first.status, 401)
        state = self.successResultOf(a.store.get_remote_sync_state(BOB))
        assert state is not None
        # no per-user backoff: the destination backs off instead (1 s policy)
        self.assertEqual(state.resync_attempts, 0)
        self.assertIsNotNone(self.successResultOf(a.store.get_retry_state(B)))
        # B holds off re-fetching our key for 60 s after its failed fetch, so
        # the server's retries (1, 2, 4, ... s) are refused until then; the
        # first one after that succeeds, far sooner than a 5-minute user backoff
        self.network.advance(70)
        statuses = [r.status for r in self.network.requests(origin=A, path_prefix=RESYNC)]
        self.assertEqual(statuses[-1], 200)
        self.assertLessEqual(len(statuses), 8)
        state = self.successResultOf(a.store.get_remote_sync_state(BOB))
        assert state is not None
        self.assertFalse(state.stale)
