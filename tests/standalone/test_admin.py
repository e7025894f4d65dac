"""The admin API and the metrics, on a module with store-backed memberships
(as the standalone server wires it) and a remote module on a FakeNetwork."""

from __future__ import annotations

from typing import Any, Optional

import treq
from signedjson.key import generate_signing_key
from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent
from twisted.internet.testing import MemoryReactorClock

from devicelist_plugin.client.api import ClientApi
from devicelist_plugin.client.passwords import PasswordHasher
from devicelist_plugin.core.backoff import BackoffPolicy
from devicelist_plugin.federation.client import BytesProducer
from devicelist_plugin.membership import InMemoryMembership
from devicelist_plugin.membership_store import StoreMembership
from devicelist_plugin.module import DeviceListModule, ModuleConfig
from devicelist_plugin.standalone.admin import ADMIN_PREFIX, AdminApi
from devicelist_plugin.standalone.site import PrefixRoot
from devicelist_plugin.storage import open_sqlite_store
from devicelist_plugin.storage.accounts import AccountStore
from tests.client.harness import NOW_S, SECRET, SERVER, V3, ClientApiCase
from tests.helpers import FakeNetwork
from tests.helpers.store import open_inline_store
from tests.local.keys import ClientDevice

B = "b.test"
BOB = "@bob:b.test"
ROOM = "!room:hs.test"
#: 60 s, 120 s, ... (no jitter)
POLICY = BackoffPolicy(min_interval=60, multiplier=2, max_interval=3600)


def no_jitter(low: float, high: float) -> float:
    return 1.0


class AdminCase(ClientApiCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(NOW_S)  # an arbitrary "now"
        self.network = FakeNetwork(self.clock)
        self.store = open_inline_store(self)
        self.module = DeviceListModule(
            SERVER,
            [generate_signing_key("a1")],
            self.store,
            self.clock,
            self.network.agent_for(SERVER),
            StoreMembership(SERVER, self.store),
            ModuleConfig(retry_policy=POLICY),
            jitter=no_jitter,
        )
        self.network.add_server(SERVER, self.module.root)
        self.api = ClientApi(
            SERVER,
            self.module.local,
            AccountStore(self.store.database),
            self.clock,
            password_hasher=PasswordHasher(rounds=4),
            registration_shared_secret=SECRET,
            remote_query=self.module.remote_keys_query,
            remote_client=self.module.remote_key_claimer,
        )
        self.admin_api = AdminApi(self.module, self.api.auth)
        root = PrefixRoot(
            [
                ("/_matrix/client", self.api.resource),
                ("/_synapse/admin/v1/register", self.api.resource),
                ("/_devicelist/admin", self.admin_api.resource),
                ("/_devicelist/metrics", self.module.metrics.resource),
            ]
        )
        self.agent = RequestTraversalAgent(root)
        self.http = HTTPClient(self.agent, data_to_body_producer=BytesProducer)
        self.successResultOf(self.module.start())
        self.addCleanup(lambda: self.successResultOf(self.module.stop()))

        b_store = self.successResultOf(
            open_sqlite_store(":memory:", MemoryReactorClock(), synchronous=True)
        )
        self.addCleanup(b_store.close)
        self.b_membership = InMemoryMembership(B)
        self.b = DeviceListModule(
            B,
            [generate_signing_key("b1")],
            b_store,
            self.clock,
            self.network.agent_for(B),
            self.b_membership,
            ModuleConfig(retry_policy=POLICY),
            jitter=no_jitter,
        )
        self.network.add_server(B, self.b.root)
        self.successResultOf(self.b.start())
        self.addCleanup(lambda: self.successResultOf(self.b.stop()))

        self.register("root", admin=True)
        self.admin = self.login("root")["access_token"]
        self.register("alice")
        self.alice = self.login("alice", device_id="ALICEPHONE")["access_token"]

    def start(self, method: str, path: str, body: Any = None, token: Optional[str] = None,
              raw: Optional[bytes] = None,
              headers: Optional[dict[bytes, list[bytes]]] = None) -> Any:
        d = super().start(method, path, body, token, raw, headers)
        for _ in range(5):
            self.network.flush()
            self.agent.flush()
        return d

    def admin_ok(self, method: str, path: str, body: Any = None) -> Any:
        return self.ok(method, ADMIN_PREFIX + path, body, self.admin)

    def share_room_with_bob(self) -> None:
        self.b_membership.join(ROOM, f"@alice:{SERVER}")
        self.b_membership.join(ROOM, BOB)
        self.network.flush()
        self.admin_ok("PUT", f"/rooms/{ROOM}/members/@alice:{SERVER}", {"membership": "join"})
        self.admin_ok("PUT", f"/rooms/{ROOM}/members/{BOB}", {"membership": "join"})

    def bob_device(self, device_id: str) -> None:
        self.successResultOf(self.b.local.create_device(BOB, device_id))
        self.network.flush()
        keys = ClientDevice(BOB, device_id).device_keys()
        self.successResultOf(self.b.local.upload_device_keys(BOB, device_id, keys))
        self.network.flush()


class AdminApiTests(AdminCase):
    def test_admins_only(self) -> None:
        self.error("GET", ADMIN_PREFIX + "/destinations", token=self.alice,
                   code=403, errcode="M_FORBIDDEN")
        self.error("GET", ADMIN_PREFIX + "/destinations", code=401, errcode="M_MISSING_TOKEN")
        self.error("PUT", f"{ADMIN_PREFIX}/rooms/{ROOM}/members/{BOB}", {"membership": "join"},
                   token=self.alice, code=403, errcode="M_FORBIDDEN")

    def test_room_members(self) -> None:
        self.share_room_with_bob()
        members = self.admin_ok("GET", f"/rooms/{ROOM}/members")["members"]
        self.assertEqual(members, sorted([f"@alice:{SERVER}", BOB]))
        self.admin_ok("PUT", f"/rooms/{ROOM}/members/{BOB}", {"membership": "leave"})
        self.assertEqual(
            self.admin_ok("GET", f"/rooms/{ROOM}/members")["members"], [f"@alice:{SERVER}"]
        )
        self.error("PUT", f"{ADMIN_PREFIX}/rooms/{ROOM}/members/{BOB}", {"membership": "ban"},
                   token=self.admin, code=400, errcode="M_BAD_JSON")
        self.error("PUT", f"{ADMIN_PREFIX}/rooms/{ROOM}/members/notauser",
                   {"membership": "join"}, token=self.admin, code=400, errcode="M_INVALID_PARAM")

    def test_join_through_the_admin_api_sends_devices(self) -> None:
        self.share_room_with_bob()
        alice = f"@alice:{SERVER}"
        state = self.successResultOf(self.b.store.get_remote_sync_state(alice))
        assert state is not None
        self.assertTrue(state.cached)
        # devices without keys are not listed: upload some
        keys = ClientDevice(alice, "ALICEPHONE").device_keys()
        self.ok("POST", f"{V3}/keys/upload", {"device_keys": keys}, self.alice)
        cached = self.successResultOf(self.b.store.get_remote_devices(alice))
        self.assertEqual([d.device_id for d in cached], ["ALICEPHONE"])

    def test_remote_user_devices_and_resync(self) -> None:
        self.share_room_with_bob()
        self.bob_device("TABLET")
        answer = self.admin_ok("GET", f"/users/{BOB}/devices")
        self.assertFalse(answer["local"])
        self.assertTrue(answer["tracked"])
        self.assertFalse(answer["stale"])
        self.assertEqual([d["device_id"] for d in answer["devices"]], ["TABLET"])
        self.assertTrue(answer["known_stream_ids"] or answer["snapshot_stream_id"] is not None)
        self.assertEqual(self.admin_ok("POST", f"/users/{BOB}/resync", {}), {"resynced": True})
        answer = self.admin_ok("GET", f"/users/{BOB}/devices")
        self.assertEqual(answer["last_resync_ts"], NOW_S * 1000)
        # and /keys/query for a remote user goes through the module
        keys = self.ok("POST", f"{V3}/keys/query", {"device_keys": {BOB: []}}, self.alice)
        self.assertEqual(list(keys["device_keys"][BOB]), ["TABLET"])

    def test_local_user_devices(self) -> None:
        answer = self.admin_ok("GET", f"/users/@alice:{SERVER}/devices")
        self.assertTrue(answer["local"])
        # the device of the registration and the one of the login
        self.assertIn("ALICEPHONE", [d["device_id"] for d in answer["devices"]])
        self.assertEqual(len(answer["devices"]), 2)
        self.assertIsInstance(answer["stream_id"], int)

    def test_destinations(self) -> None:
        self.assertEqual(self.admin_ok("GET", "/destinations"), {"destinations": []})
        self.error("GET", ADMIN_PREFIX + "/destinations/c.test", token=self.admin,
                   code=404, errcode="M_NOT_FOUND")
        self.network.faults.take_down(B)
        self.share_room_with_bob()
        self.clock.advance(5)  # 5 s later: the pending update has aged
        status = self.admin_ok("GET", f"/destinations/{B}")
        self.assertEqual(status["pending"], 2)  # alice's two devices
        self.assertEqual(status["oldest_pending_age_ms"], 5000)
        self.assertEqual(status["retry_interval_ms"], 60_000)
        self.assertEqual(status["next_retry_ts"], (NOW_S + 60) * 1000)
        self.assertIsNotNone(status["last_error"])
        self.assertIsNone(status["last_success_ts"])
        self.assertEqual(self.admin_ok("GET", "/destinations")["destinations"], [status])
        self.network.faults.bring_up(B)
        self.clock.advance(55)  # the sender's 60 s backoff timer
        self.network.flush()
        status = self.admin_ok("GET", f"/destinations/{B}")
        self.assertEqual(status["pending"], 0)
        self.assertEqual(status["retry_interval_ms"], 0)
        self.assertEqual(status["last_success_ts"], (NOW_S + 60) * 1000)


class MetricsTests(AdminCase):
    def metrics(self) -> str:
        d = self.http.get("https://hs.test/_devicelist/metrics")
        self.agent.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 200)
        body: bytes = self.successResultOf(treq.content(response))
        return body.decode("utf-8")

    def test_exposition(self) -> None:
        self.network.faults.take_down(B)
        self.share_room_with_bob()
        text = self.metrics()
        self.assertIn('devicelist_pending_updates{destination="b.test"} 2.0', text)
        self.assertIn("devicelist_transactions_failed_total 1.0", text)
        self.network.faults.bring_up(B)
        self.clock.advance(60)  # the sender's backoff timer
        self.network.flush()
        self.bob_device("TABLET")
        text = self.metrics()
        self.assertIn("devicelist_transactions_sent_total 1.0", text)
        self.assertIn('devicelist_pending_updates{destination="b.test"} 0.0', text)
        self.assertIn(
            'devicelist_edus_received_total{edu_type="m.device_list_update",outcome="accepted"} 2.0',
            text,
        )
        self.assertIn('devicelist_edus_decided_total{action="resync",reason="first_contact"}', text)
        self.assertIn('devicelist_resyncs_total{reason="first_contact"}', text)
        self.assertIn('devicelist_transactions_received_total{outcome="received"} 2.0', text)

    def test_request_latency_histogram(self) -> None:
        class FakeRequest:
            path = b"/_matrix/client/v3/login"
            method = b"POST"
            code = 200

        self.module.metrics.observe_request(FakeRequest(), 0.02)  # type: ignore[arg-type]
        text = self.metrics()
        self.assertIn(
            'devicelist_request_duration_seconds_count{code="200",method="POST",'
            'prefix="/_matrix/client"} 1.0',
            text,
        )

    def test_registries_are_per_module(self) -> None:
        self.assertIsNot(self.module.metrics.registry, self.b.metrics.registry)
