"""Two :class:`DeviceListModule` instances in memory, sharing a room."""

from __future__ import annotations

from typing import Any

from signedjson.key import generate_signing_key
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from devicelist_plugin.core.backoff import BackoffPolicy
from devicelist_plugin.membership import InMemoryMembership
from devicelist_plugin.module import DeviceListModule, ModuleConfig
from devicelist_plugin.storage import Store, open_sqlite_store
from tests.helpers import FakeNetwork
from tests.local.keys import ClientDevice

NOW = 1_700_000_000
A = "a.test"
B = "b.test"
ALICE = "@alice:a.test"
BOB = "@bob:b.test"
ROOM = "!room:a.test"
#: 60 s, 120 s, ... (no jitter)
POLICY = BackoffPolicy(min_interval=60, multiplier=2, max_interval=3600)
SEND_PREFIX = "/_matrix/federation/v1/send/"


def no_jitter(low: float, high: float) -> float:
    return 1.0


class TwoModulesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(NOW)
        self.network = FakeNetwork(self.clock)
        self.a = self.make(A)
        self.b = self.make(B)
        for module in (self.a, self.b):
            membership = module.membership
            assert isinstance(membership, InMemoryMembership)
            membership.join(ROOM, ALICE)
            membership.join(ROOM, BOB)
        self.flush()

    def make(self, name: str) -> DeviceListModule:
        store: Store = self.successResultOf(
            open_sqlite_store(":memory:", MemoryReactorClock(), synchronous=True)
        )
        self.addCleanup(store.close)
        module = DeviceListModule(
            name,
            [generate_signing_key(f"{name[0]}1")],
            store,
            self.clock,
            self.network.agent_for(name),
            InMemoryMembership(name),
            ModuleConfig(retry_policy=POLICY),
            jitter=no_jitter,
        )
        self.network.add_server(name, module.root)
        self.successResultOf(module.start())
        self.addCleanup(lambda: self.successResultOf(module.stop()))
        return module

    def flush(self) -> None:
        self.network.flush()

    def settle(self, d: Any) -> Any:
        self.flush()
        return self.successResultOf(d)

    def add_device(self, module: DeviceListModule, user_id: str, device_id: str) -> ClientDevice:
        device = ClientDevice(user_id, device_id)
        self.settle(module.local.create_device(user_id, device_id, "phone"))
        self.settle(module.local.upload_device_keys(user_id, device_id, device.device_keys()))
        return device

    def sends(self, origin: str, destination: str) -> int:
        return len(
            self.network.requests(origin=origin, destination=destination, path_prefix=SEND_PREFIX)
        )

    def test_defaults_match_the_updater(self) -> None:
        config = ModuleConfig()
        self.assertEqual(config.hold_grace, 2.0)
        self.assertEqual(config.resync_timeout, 30.0)
        self.assertEqual(config.max_devices_per_user, 50_000)
        self.assertEqual(config.resyncs_per_server, 5)
        self.assertEqual(config.user_backoff, BackoffPolicy(300.0, 2.0, 86_400.0))

    def test_updater_settings_reach_the_updater(self) -> None:
        policy = BackoffPolicy(min_interval=60.0, multiplier=3.0, max_interval=3600.0)
        config = ModuleConfig(hold_grace=0.5, resyncs_per_server=2, user_backoff=policy)
        updater = config.inbound_config().updater
        self.assertEqual(
            (updater.hold_grace, updater.resyncs_per_server, updater.user_backoff),
            (0.5, 2, policy),
        )

    def test_device_change_reaches_the_other_cache_and_query(self) -> None:
        device = self.add_device(self.a, ALICE, "PHONE")
        cached = self.successResultOf(self.b.store.get_remote_devices(ALICE))
        self.assertEqual([d.device_id for d in cached], ["PHONE"])
        answer = self.settle(self.b.query_keys({ALICE: []}))
        self.assertEqual(answer["failures"], {})
        self.assertEqual(
            answer["device_keys"][ALICE]["PHONE"]["keys"], device.device_keys()["keys"]
        )
        # a second device and a deletion arrive too
        self.add_device(self.a, ALICE, "LAPTOP")
        self.settle(self.a.local.delete_device(ALICE, "PHONE"))
        answer = self.settle(self.b.query_keys({ALICE: []}))
        self.assertEqual(sorted(answer["device_keys"][ALICE]), ["LAPTOP"])
        # B's own user, queried on A
        self.add_device(self.b, BOB, "TABLET")
        answer = self.settle(self.a.query_keys({BOB: [], ALICE: []}))
        self.assertEqual(sorted(answer["device_keys"][BOB]), ["TABLET"])
        self.assertEqual(sorted(answer["device_keys"][ALICE]), ["LAPTOP"])

    def test_signed_request_wakes_a_backing_off_queue(self) -> None:
        self.network.faults.take_down(B)
        self.add_device(self.a, ALICE, "PHONE")
        attempts = self.sends(A, B)
        self.assertGreaterEqual(attempts, 1)
        state = self.successResultOf(self.a.store.get_retry_state(B))
        self.assertIsNotNone(state)
        self.network.faults.bring_up(B)
        self.flush()
        # still backing off: nothing is sent until the timer or a contact
        self.assertEqual(self.sends(A, B), attempts)
        self.assertEqual(self.successResultOf(self.b.store.get_remote_devices(ALICE)), [])
        # B sends A a signed transaction (a change of its own user's devices)
        self.add_device(self.b, BOB, "TABLET")
        self.flush()
        self.assertGreater(self.sends(A, B), attempts)
        cached = self.successResultOf(self.b.store.get_remote_devices(ALICE))
        self.assertEqual([d.device_id for d in cached], ["PHONE"])
        self.assertIsNone(self.successResultOf(self.a.store.get_retry_state(B)))

    def test_remote_claim_goes_to_the_users_server(self) -> None:
        self.add_device(self.a, ALICE, "PHONE")
        self.settle(
            self.a.local.upload_one_time_keys(
                ALICE, "PHONE", {"signed_curve25519:AAAA": {"key": "k", "signatures": {}}}
            )
        )
        answer = self.settle(self.b.claim_keys({ALICE: {"PHONE": "signed_curve25519"}}))
        self.assertEqual(answer["failures"], {})
        self.assertIn("PHONE", answer["one_time_keys"][ALICE])
        answer = self.settle(self.b.claim_keys({"@carol:c.test": {"X": "signed_curve25519"}}))
        self.assertIn("c.test", answer["failures"])
