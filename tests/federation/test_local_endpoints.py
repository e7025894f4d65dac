"""/user/devices, /user/keys/query and /user/keys/claim served by instance B
to instance A over the in-memory network, with signed requests; A reads the
answers with its own parsing code and cache."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import treq
from signedjson.key import generate_signing_key, get_verify_key
from signedjson.types import SigningKey
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from devicelist_plugin.core.models import JsonDict
from devicelist_plugin.core.parse import parse_user_devices_response
from devicelist_plugin.federation.auth import FederationAuthenticator
from devicelist_plugin.federation.client import HttpResponseError
from devicelist_plugin.federation.errors import (
    M_BAD_JSON,
    M_INVALID_PARAM,
    M_NOT_JSON,
    M_UNAUTHORIZED,
)
from devicelist_plugin.federation.local_endpoints import (
    KEYS_CLAIM_PATH,
    KEYS_QUERY_PATH,
    LocalDeviceEndpoints,
)
from devicelist_plugin.federation.resource import JsonResource
from devicelist_plugin.federation.transport import build_federation_transport
from devicelist_plugin.federation.xmatrix import build_authorization_header
from devicelist_plugin.local.handler import LocalDeviceHandler
from devicelist_plugin.membership import InMemoryMembership
from devicelist_plugin.storage.types import PendingRow
from tests.federation.test_auth import DictKeyLookup
from tests.helpers import FakeNetwork
from tests.helpers.store import open_inline_store
from tests.local.harness import NOW_S
from tests.local.keys import ClientDevice, CrossSigning
from tests.helpers.membership import share_room

A = "a.example"
B = "b.example"
ALICE = "@alice:b.example"
BOB = "@bob:b.example"
CAROL = "@carol:a.example"


def devices_path(user_id: str) -> str:
    return "/_matrix/federation/v1/user/devices/" + quote(user_id, safe="")


class LocalEndpointsTests(SynchronousTestCase):
    allow_names = False

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW_S)  # an arbitrary "now"
        self.network = FakeNetwork(self.clock)
        # instance A: a signing key and a store for its remote cache
        self.a_key = generate_signing_key("a_1")
        self.a_store = open_inline_store(self)
        # instance B: serves its users' devices and knows A's key
        self.b_store = open_inline_store(self)
        self.membership = InMemoryMembership(B)
        share_room(self.membership, ALICE, A)
        self.handler = LocalDeviceHandler(
            B,
            self.b_store,
            self.membership,
            self.clock,
            allow_device_name_lookup_over_federation=self.allow_names,
        )
        lookup = DictKeyLookup()
        lookup.keys[(A, "ed25519:a_1")] = get_verify_key(self.a_key)
        resource = JsonResource(authenticator=FederationAuthenticator(B, lookup, self.clock))
        LocalDeviceEndpoints(self.handler).register(resource)
        self.network.add_server(B, resource)
        self.http = self.network.client_for(A)

        self.cs = CrossSigning(ALICE)
        self.phone = ClientDevice(ALICE, "PHONE")
        self.laptop = ClientDevice(ALICE, "LAPTOP")
        self.successResultOf(self.handler.create_device(ALICE, "PHONE", "Alice's phone"))
        self.successResultOf(self.handler.create_device(ALICE, "LAPTOP"))
        self.successResultOf(self.handler.create_device(ALICE, "NOKEYS", "login only"))
        self.successResultOf(self.handler.upload_device_keys(ALICE, "PHONE", self.phone.device_keys()))
        self.successResultOf(self.handler.upload_device_keys(ALICE, "LAPTOP", self.laptop.device_keys()))
        self.successResultOf(self.handler.upload_cross_signing_keys(ALICE, self.cs.upload_body()))
        served = self.successResultOf(self.handler.query_keys({ALICE: ["PHONE"]}))
        signed = self.cs.sign_with("self_signing", served["device_keys"][ALICE]["PHONE"])
        self.assertEqual(
            self.successResultOf(self.handler.upload_signatures(ALICE, {ALICE: {"PHONE": signed}})),
            {"failures": {}},
        )
        self.ssk_signature = signed["signatures"][ALICE][f"ed25519:{self.cs.self_signing_public}"]

    # -- A's side ------------------------------------------------------------

    def start(
        self,
        method: str,
        path: str,
        content: JsonDict | None = None,
        *,
        key: SigningKey | None = None,
        signed: bool = True,
        raw_body: bytes | None = None,
    ) -> "Deferred[Any]":
        headers = Headers()
        if signed:
            headers.addRawHeader(
                b"Authorization",
                build_authorization_header(key or self.a_key, A, B, method, path, content),
            )
        body = raw_body if raw_body is not None else (
            None if content is None else json.dumps(content).encode("utf-8")
        )
        if body is not None:
            headers.addRawHeader(b"Content-Type", b"application/json")
        d: Deferred[Any] = self.http.request(method, f"https://{B}{path}", data=body, headers=headers)
        return d

    def finish(self, d: "Deferred[Any]") -> tuple[int, Any]:
        self.network.flush()
        response = self.successResultOf(d)
        content = self.successResultOf(treq.content(response))
        self.assertEqual(response.headers.getRawHeaders(b"Content-Type"), [b"application/json"])
        return response.code, json.loads(content)

    def call(self, method: str, path: str, content: JsonDict | None = None, **kwargs: Any) -> tuple[int, Any]:
        return self.finish(self.start(method, path, content, **kwargs))

    # -- /user/devices ---------------------------------------------------------

    def test_user_devices_fields(self) -> None:
        code, body = self.call("GET", devices_path(ALICE))
        self.assertEqual(code, 200)
        self.assertEqual(set(body), {"user_id", "stream_id", "devices", "master_key", "self_signing_key"})
        self.assertEqual(body["user_id"], ALICE)
        self.assertEqual(body["stream_id"], self.successResultOf(self.b_store.get_max_stream_id(ALICE)))
        self.assertEqual(body["stream_id"], 7)
        # every device with keys; no names by default; the self-signing
        # signature merged into the phone's keys
        self.assertEqual([d["device_id"] for d in body["devices"]], ["LAPTOP", "PHONE"])
        laptop, phone = body["devices"]
        self.assertEqual(laptop, {"device_id": "LAPTOP", "keys": self.laptop.device_keys()})
        expected_phone = self.phone.device_keys()
        expected_phone["signatures"][ALICE][f"ed25519:{self.cs.self_signing_public}"] = self.ssk_signature
        expected_entry: JsonDict = {"device_id": "PHONE", "keys": expected_phone}
        if self.allow_names:
            expected_entry["device_display_name"] = "Alice's phone"
        self.assertEqual(phone, expected_entry)
        self.assertEqual(body["master_key"], self.cs.master_json)
        self.assertEqual(body["self_signing_key"], self.cs.self_signing_json)

    def test_a_parses_and_caches_the_answer(self) -> None:
        _, body = self.call("GET", devices_path(ALICE))
        parsed = parse_user_devices_response(body, expected_user_id=ALICE)
        self.assertEqual(parsed.skipped, ())
        self.assertEqual(parsed.stream_id, 7)
        self.assertEqual([d.device_id for d in parsed.devices], ["LAPTOP", "PHONE"])
        assert parsed.master_key is not None and parsed.self_signing_key is not None
        self.assertEqual(parsed.master_key.public_key, self.cs.master_public)
        self.assertEqual(parsed.self_signing_key.public_key, self.cs.self_signing_public)
        phone = parsed.devices[1]
        assert phone.keys is not None
        self.assertEqual(phone.keys.keys["ed25519:PHONE"], self.phone.ed25519)
        self.assertEqual(phone.display_name, "Alice's phone" if self.allow_names else None)
        # A's cache holds exactly what B serves
        self.assertTrue(self.successResultOf(self.a_store.replace_remote_snapshot(ALICE, parsed, 0, NOW_S * 1000)))
        cached = self.successResultOf(self.a_store.get_remote_devices(ALICE))
        self.assertEqual([d.device_id for d in cached], ["LAPTOP", "PHONE"])
        assert cached[1].keys is not None
        self.assertEqual(cached[1].keys.raw, phone.keys.raw)
        state = self.successResultOf(self.a_store.get_remote_sync_state(ALICE))
        assert state is not None
        self.assertEqual(state.snapshot_stream_id, 7)

    def test_stream_id_names_the_next_edu(self) -> None:
        # B has updates pending for A; serving the snapshot covers the device
        # changes (not the signing-key one, which carries no stream id) and
        # makes its stream_id what the next EDU to A names as prev_id
        self.assertNotEqual(self.successResultOf(self.b_store.get_pending(A, 100)), [])
        _, body = self.call("GET", devices_path(ALICE))
        s = body["stream_id"]
        signing_key_row = PendingRow(ALICE, None, 6)
        self.assertEqual(self.successResultOf(self.b_store.get_pending(A, 100)), [signing_key_row])
        self.assertEqual(
            self.successResultOf(self.b_store.get_unreferenced(A, [ALICE])), {ALICE: frozenset({s})}
        )
        # a later change goes out chained from the snapshot
        self.successResultOf(self.handler.rename_device(ALICE, "PHONE", "new name"))
        self.assertEqual(
            self.successResultOf(self.b_store.get_pending(A, 100)),
            [signing_key_row, PendingRow(ALICE, "PHONE", s + 1)],
        )
        # a transaction that was in flight during the snapshot (ids <= s) is
        # acknowledged late: the correlation survives
        self.successResultOf(self.b_store.ack_sent(A, [(ALICE, "LAPTOP", 2)], {ALICE: {4}}))
        self.assertEqual(
            self.successResultOf(self.b_store.get_unreferenced(A, [ALICE])), {ALICE: frozenset({s})}
        )

    def test_display_names_only_when_allowed(self) -> None:
        _, body = self.call("GET", devices_path(ALICE))
        _, query = self.call("POST", KEYS_QUERY_PATH, {"device_keys": {ALICE: []}})
        parsed = parse_user_devices_response(body, expected_user_id=ALICE)
        # LAPTOP has no name: never a name field, whatever the setting
        self.assertNotIn("device_display_name", body["devices"][0])
        self.assertEqual(query["device_keys"][ALICE]["LAPTOP"]["unsigned"], {})
        if self.allow_names:
            self.assertEqual(body["devices"][1]["device_display_name"], "Alice's phone")
            self.assertEqual(parsed.devices[1].display_name, "Alice's phone")
            self.assertEqual(
                query["device_keys"][ALICE]["PHONE"]["unsigned"],
                {"device_display_name": "Alice's phone"},
            )
        else:
            self.assertTrue(all("device_display_name" not in d for d in body["devices"]))
            self.assertIsNone(parsed.devices[1].display_name)
            self.assertEqual(query["device_keys"][ALICE]["PHONE"]["unsigned"], {})

    def test_non_local_and_malformed_users(self) -> None:
        for user_id, needle in (
            (CAROL, "not local"),
            ("@alice:b.example:8448", "not local"),
            ("alice", "alice"),
            ("@:b.example", "empty localpart"),
            ("@alice:bad..name", "invalid hostname"),
        ):
            with self.subTest(user_id):
                code, body = self.call("GET", devices_path(user_id))
                self.assertEqual((code, body["errcode"]), (400, M_INVALID_PARAM))
                self.assertIn(needle, body["error"])
        self.assertEqual(self.successResultOf(self.b_store.get_unreferenced(A, [CAROL])), {CAROL: frozenset()})

    def test_unsigned_and_badly_signed_requests(self) -> None:
        other_key = generate_signing_key("a_1")
        query: JsonDict = {"device_keys": {ALICE: []}}
        claim: JsonDict = {"one_time_keys": {ALICE: {"PHONE": "signed_curve25519"}}}
        requests: list[tuple[str, str, JsonDict | None]] = [
            ("GET", devices_path(ALICE), None),
            ("POST", KEYS_QUERY_PATH, query),
            ("POST", KEYS_CLAIM_PATH, claim),
        ]
        for method, path, content in requests:
            with self.subTest(path=path, signed=False):
                code, body = self.call(method, path, content, signed=False)
                self.assertEqual((code, body["errcode"]), (401, M_UNAUTHORIZED))
            with self.subTest(path=path, key="another key"):
                code, body = self.call(method, path, content, key=other_key)
                self.assertEqual((code, body["errcode"]), (401, M_UNAUTHORIZED))
        # nothing was recorded for the unauthenticated /user/devices
        self.assertEqual(self.successResultOf(self.b_store.get_unreferenced(A, [ALICE])), {ALICE: frozenset()})
        self.assertNotEqual(self.successResultOf(self.b_store.get_pending(A, 100)), [])

    # -- /user/keys/query --------------------------------------------------------

    def test_keys_query(self) -> None:
        code, body = self.call("POST", KEYS_QUERY_PATH, {"device_keys": {ALICE: [], BOB: []}})
        self.assertEqual(code, 200)
        self.assertEqual(set(body), {"device_keys", "master_keys", "self_signing_keys"})
        self.assertEqual(body["device_keys"][BOB], {})
        self.assertEqual(set(body["device_keys"][ALICE]), {"LAPTOP", "PHONE"})
        phone = body["device_keys"][ALICE]["PHONE"]
        names = {"device_display_name": "Alice's phone"} if self.allow_names else {}
        self.assertEqual(phone["unsigned"], names)
        self.assertIn(f"ed25519:{self.cs.self_signing_public}", phone["signatures"][ALICE])
        self.assertEqual(body["master_keys"], {ALICE: self.cs.master_json})
        self.assertEqual(body["self_signing_keys"], {ALICE: self.cs.self_signing_json})
        code, body = self.call("POST", KEYS_QUERY_PATH, {"device_keys": {ALICE: ["PHONE", "NOKEYS"]}})
        self.assertEqual(set(body["device_keys"][ALICE]), {"PHONE"})

    def test_keys_query_refuses_non_local_users(self) -> None:
        code, body = self.call("POST", KEYS_QUERY_PATH, {"device_keys": {ALICE: [], CAROL: []}})
        self.assertEqual((code, body["errcode"]), (400, M_INVALID_PARAM))
        self.assertIn(CAROL, body["error"])

    def test_keys_query_bad_bodies(self) -> None:
        for content, errcode, starts in (
            ({}, M_BAD_JSON, "device_keys: required"),
            ({"device_keys": []}, M_BAD_JSON, "device_keys: required"),
            ({"device_keys": {ALICE: "PHONE"}}, M_BAD_JSON, f'device_keys["{ALICE}"]: expected a list'),
            ({"device_keys": {ALICE: [1]}}, M_BAD_JSON, f'device_keys["{ALICE}"][0]'),
            ({"device_keys": {"nobody": []}}, M_INVALID_PARAM, 'device_keys["nobody"]'),
        ):
            with self.subTest(content=content):
                code, body = self.call("POST", KEYS_QUERY_PATH, content)
                self.assertEqual((code, body["errcode"]), (400, errcode))
                self.assertTrue(body["error"].startswith(starts), body["error"])
        code, body = self.call("POST", KEYS_QUERY_PATH)
        self.assertEqual((code, body["errcode"]), (400, M_NOT_JSON))

    # -- /user/keys/claim ----------------------------------------------------------

    def upload_one_time_keys(self, n: int) -> list[str]:
        names = [f"signed_curve25519:K{i:03d}" for i in range(n)]
        self.successResultOf(
            self.handler.upload_one_time_keys(
                ALICE, "PHONE", {name: {"key": f"key-{name}", "signatures": {}} for name in names}
            )
        )
        return names

    def test_claim_oldest_first_then_fallback(self) -> None:
        names = self.upload_one_time_keys(3)
        self.successResultOf(
            self.handler.upload_fallback_keys(ALICE, "PHONE", {"signed_curve25519:FB": {"key": "fb"}})
        )
        claimed = []
        for _ in range(5):
            code, body = self.call(
                "POST",
                KEYS_CLAIM_PATH,
                {"one_time_keys": {ALICE: {"PHONE": "signed_curve25519", "LAPTOP": "signed_curve25519"}}},
            )
            self.assertEqual(code, 200)
            self.assertEqual(set(body), {"one_time_keys"})
            self.assertEqual(set(body["one_time_keys"][ALICE]), {"PHONE"})
            claimed.extend(body["one_time_keys"][ALICE]["PHONE"])
        self.assertEqual(claimed, names + ["signed_curve25519:FB", "signed_curve25519:FB"])

    def test_claim_race(self) -> None:
        names = self.upload_one_time_keys(20)
        claim = {"one_time_keys": {ALICE: {"PHONE": "signed_curve25519"}}}
        pending = [self.start("POST", KEYS_CLAIM_PATH, claim) for _ in range(30)]
        results = [self.finish(d) for d in pending]
        keys = [k for code, body in results for k in body["one_time_keys"].get(ALICE, {}).get("PHONE", {})]
        self.assertEqual(sorted(keys), names)
        self.assertEqual(sum(1 for _, body in results if body["one_time_keys"] == {}), 10)

    def test_claim_errors(self) -> None:
        code, body = self.call("POST", KEYS_CLAIM_PATH, {"one_time_keys": {CAROL: {"X": "a"}}})
        self.assertEqual((code, body["errcode"]), (400, M_INVALID_PARAM))
        self.assertIn(CAROL, body["error"])
        for content, starts in (
            ({}, "one_time_keys: required"),
            ({"one_time_keys": {ALICE: ["PHONE"]}}, f'one_time_keys["{ALICE}"]: expected an object'),
            ({"one_time_keys": {ALICE: {"PHONE": 1}}}, f'one_time_keys["{ALICE}"]["PHONE"]'),
        ):
            code, body = self.call("POST", KEYS_CLAIM_PATH, content)
            self.assertEqual((code, body["errcode"]), (400, M_BAD_JSON))
            self.assertTrue(body["error"].startswith(starts), body["error"])


class DisplayNamesAllowedTests(LocalEndpointsTests):
    """The same instance with ``allow_device_name_lookup_over_federation`` on."""

    allow_names = True


class FullTransportTests(SynchronousTestCase):
    """Two complete federation transports: A's FederationClient (signing,
    key fetching, JSON parsing) against B's endpoints mounted on B's
    transport resource."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(NOW_S)  # an arbitrary "now"
        self.network = FakeNetwork(self.clock)
        transports = {}
        for name in (A, B):
            store = open_inline_store(self)
            transports[name] = build_federation_transport(
                name, [generate_signing_key("k_1")], store, self.clock, self.network.agent_for(name)
            )
            self.network.add_server(name, transports[name].root)
        self.a, self.b = transports[A], transports[B]
        self.b_store = open_inline_store(self)
        membership = InMemoryMembership(B)
        share_room(membership, ALICE, A)
        self.handler = LocalDeviceHandler(B, self.b_store, membership, self.clock)
        LocalDeviceEndpoints(self.handler).register(self.b.resource)
        self.phone = ClientDevice(ALICE, "PHONE")
        self.successResultOf(self.handler.create_device(ALICE, "PHONE", "phone"))
        self.successResultOf(self.handler.upload_device_keys(ALICE, "PHONE", self.phone.device_keys()))
        self.successResultOf(
            self.handler.upload_one_time_keys(ALICE, "PHONE", {"signed_curve25519:K1": {"key": "k1"}})
        )

    def run_client(self, coroutine: Any) -> "Deferred[JsonDict]":
        d: Deferred[JsonDict] = Deferred.fromCoroutine(coroutine)
        self.network.flush()
        return d

    def test_a_fetches_parses_queries_and_claims(self) -> None:
        body = self.successResultOf(
            self.run_client(self.a.client.get_json(B, devices_path(ALICE)))
        )
        parsed = parse_user_devices_response(body, expected_user_id=ALICE)
        self.assertEqual(parsed.stream_id, 2)
        (device,) = parsed.devices
        assert device.keys is not None
        self.assertEqual(device.keys.raw, self.phone.device_keys())
        self.assertEqual(
            self.successResultOf(self.b_store.get_unreferenced(A, [ALICE])), {ALICE: frozenset({2})}
        )
        query = self.successResultOf(
            self.run_client(self.a.client.post_json(B, KEYS_QUERY_PATH, {"device_keys": {ALICE: []}}))
        )
        self.assertEqual(set(query["device_keys"][ALICE]), {"PHONE"})
        claim = {"one_time_keys": {ALICE: {"PHONE": "signed_curve25519"}}}
        claimed = self.successResultOf(self.run_client(self.a.client.post_json(B, KEYS_CLAIM_PATH, claim)))
        self.assertEqual(
            claimed, {"one_time_keys": {ALICE: {"PHONE": {"signed_curve25519:K1": {"key": "k1"}}}}}
        )

    def test_non_local_user_is_a_400_for_the_client(self) -> None:
        d = self.run_client(self.a.client.get_json(B, devices_path(CAROL)))
        error = self.failureResultOf(d, HttpResponseError).value
        self.assertEqual((error.code, error.errcode), (400, M_INVALID_PARAM))
