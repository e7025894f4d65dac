"""KeyRing: remote servers' keys fetched over a FakeNetwork from real key
servers, checked, cached in memory and in an SQLite store, shared between
concurrent look-ups, negatively cached, and fetched through notaries."""

from __future__ import annotations

from typing import Any, Optional

from signedjson.key import encode_verify_key_base64, generate_signing_key, get_verify_key
from signedjson.sign import sign_json
from signedjson.types import SigningKey, VerifyKey
from twisted.internet.defer import CancelledError
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from devicelist_plugin.core.models import JsonDict
from devicelist_plugin.federation.client import FederationClient
from devicelist_plugin.federation.key_server import KEY_SERVER_PATH, KeyServer
from devicelist_plugin.federation.keyring import (
    DEFAULT_KEY_FETCH_RETRY_MS,
    KEY_QUERY_PATH,
    MAX_KEY_CACHE_LIFETIME_MS,
    KeyResponseError,
    KeyRing,
    TrustedKeyServer,
    TrustedKeyServersError,
    key_usable_until,
    parse_key_response,
    parse_trusted_key_servers,
)
from devicelist_plugin.federation.resource import JsonRequest, JsonResource
from devicelist_plugin.federation.signing_keys import OldVerifyKey
from devicelist_plugin.federation.xmatrix import build_authorization_header
from devicelist_plugin.storage import open_sqlite_store
from devicelist_plugin.storage.store import Store
from devicelist_plugin.storage.types import ServerKeyRow
from tests.helpers import FakeNetwork, FaultKind, FaultPlan

A = "a.test"
B = "b.test"
NOTARY = "notary.test"
NOW_S = 1_700_000_000
NOW_MS = NOW_S * 1000
HOUR_MS = 60 * 60 * 1000
DAY_MS = 24 * HOUR_MS
A_KEY_ID = "ed25519:a_1"


def b64(key: SigningKey) -> str:
    return encode_verify_key_base64(get_verify_key(key))


def b64_of(key: Optional[VerifyKey]) -> Optional[str]:
    return None if key is None else encode_verify_key_base64(key)


class KeyRingTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(NOW_S)  # an arbitrary "now"
        self.faults = FaultPlan()
        self.network = FakeNetwork(self.clock, self.faults)
        self.a_key = generate_signing_key("a_1")
        self.b_key = generate_signing_key("b_1")
        self.store = self.open_store()
        self.client = FederationClient(B, self.network.agent_for(B), self.clock, self.sign_as_b)
        self.ring = self.make_ring()

    def open_store(self) -> Store:
        store = self.successResultOf(open_sqlite_store(":memory:", self.clock, synchronous=True))
        self.addCleanup(store.close)
        return store

    def sign_as_b(
        self, method: str, destination: str, uri: bytes, content: Optional[JsonDict]
    ) -> bytes:
        return build_authorization_header(self.b_key, B, destination, method, uri, content)

    def make_ring(self, store: Optional[Store] = None, **kwargs: Any) -> KeyRing:
        return KeyRing(
            B, store or self.store, self.client, self.clock, signing_keys=[self.b_key], **kwargs
        )

    def serve_key_server(self, name: str, key_server: KeyServer) -> JsonResource:
        resource = JsonResource()
        key_server.register(resource)
        self.network.add_server(name, resource)
        return resource

    def serve_a(self, **kwargs: Any) -> KeyServer:
        key_server = KeyServer(A, [self.a_key], self.clock, **kwargs)
        self.serve_key_server(A, key_server)
        return key_server

    def serve_json(self, name: str, method: str, path: str, answer: Any) -> list[JsonDict | None]:
        """Serve ``answer()`` (a JSON object) at ``path``; returns the bodies received."""
        received: list[JsonDict | None] = []

        async def handler(request: JsonRequest) -> tuple[int, JsonDict]:
            received.append(request.content)
            return 200, answer()

        resource = JsonResource()
        resource.register(method, path, handler)
        self.network.add_server(name, resource)
        return received

    def lookup(
        self,
        server: str = A,
        key_id: str = A_KEY_ID,
        at_ms: Optional[int] = None,
        ring: Optional[KeyRing] = None,
    ) -> Optional[VerifyKey]:
        d = (ring or self.ring).get_verify_key(server, key_id, NOW_MS if at_ms is None else at_ms)
        self.network.flush()
        return self.successResultOf(d)

    def key_requests(self, destination: str = A) -> int:
        return len(self.network.requests(destination=destination, path_prefix=KEY_SERVER_PATH))

    def now_ms(self) -> int:
        return int(self.clock.seconds() * 1000)


class DirectFetchTests(KeyRingTestCase):
    def test_fetches_from_the_key_server_and_stores_the_rows(self) -> None:
        key_server = self.serve_a()
        key = self.lookup()
        self.assertEqual(b64_of(key), b64(self.a_key))
        self.assertEqual(self.key_requests(), 1)
        (record,) = self.network.requests(destination=A)
        self.assertEqual((record.origin, record.method, record.path), (B, "GET", KEY_SERVER_PATH))
        rows = self.successResultOf(self.store.get_server_keys(A))
        row = rows[A_KEY_ID]
        self.assertEqual(row.verify_key, b64(self.a_key))
        self.assertEqual(row.fetched_ts, NOW_MS)
        self.assertEqual(row.valid_until_ts, NOW_MS + DAY_MS)
        self.assertIsNone(row.expired_ts)
        self.assertEqual(row.key_json, key_server.response())

    def test_memory_then_store_answer_without_requests(self) -> None:
        self.serve_a()
        self.lookup()
        self.assertEqual(b64_of(self.lookup()), b64(self.a_key))
        self.assertEqual(self.key_requests(), 1)
        # a fresh key ring on the same store (another process, a restart)
        fresh = self.make_ring()
        self.assertEqual(b64_of(self.lookup(ring=fresh)), b64(self.a_key))
        self.assertEqual(self.key_requests(), 1)

    def test_own_keys_answered_locally(self) -> None:
        old_key = get_verify_key(generate_signing_key("b_old"))
        ring = self.make_ring(old_verify_keys=[OldVerifyKey("ed25519:b_old", old_key, NOW_MS + 5)])
        self.assertEqual(b64_of(self.lookup(B, "ed25519:b_1", ring=ring)), b64(self.b_key))
        far_future = NOW_MS + 100 * DAY_MS
        self.assertEqual(b64_of(self.lookup(B, "ed25519:b_1", far_future, ring=ring)), b64(self.b_key))
        self.assertEqual(b64_of(self.lookup(B, "ed25519:b_old", NOW_MS + 4, ring=ring)), b64_of(old_key))
        self.assertIsNone(self.lookup(B, "ed25519:b_old", NOW_MS + 5, ring=ring))
        self.assertIsNone(self.lookup(B, "ed25519:other", ring=ring))
        self.assertEqual(self.network.log, [])

    def test_unknown_key_id_is_none(self) -> None:
        self.serve_a()
        self.assertIsNone(self.lookup(A, "ed25519:nope"))
        self.assertEqual(self.key_requests(), 1)

    def test_invalid_names_never_fetched(self) -> None:
        for server, key_id in (
            ("a.test/evil?x=", A_KEY_ID),
            ("a.test@c.test", A_KEY_ID),
            ("", A_KEY_ID),
            (A, "rsa:a_1"),
            (A, "ed25519:"),
            (A, "ed25519"),
        ):
            with self.subTest(server=server, key_id=key_id):
                self.assertIsNone(self.lookup(server, key_id))
        self.assertEqual(self.network.log, [])

    def test_server_name_mismatch_rejected(self) -> None:
        # c.test's genuine, self-signed answer served as a.test's
        impostor = KeyServer("c.test", [self.a_key], self.clock)
        self.serve_key_server(A, impostor)
        self.assertIsNone(self.lookup())
        self.assertEqual(self.key_requests(), 1)
        self.assertEqual(self.successResultOf(self.store.get_server_keys(A)), {})
        failure = self.successResultOf(self.store.get_server_key_failure(A))
        assert failure is not None
        self.assertEqual(failure.failed_ts, NOW_MS)
        self.assertIn("server_name 'c.test' is not 'a.test'", failure.error)

    def test_bad_self_signature_rejected(self) -> None:
        key_server = KeyServer(A, [self.a_key], self.clock)

        def tampered() -> JsonDict:
            body = key_server.response()
            body["valid_until_ts"] += 1
            return body

        self.serve_json(A, "GET", KEY_SERVER_PATH, tampered)
        self.assertIsNone(self.lookup())
        failure = self.successResultOf(self.store.get_server_key_failure(A))
        assert failure is not None
        self.assertIn("self signature of a.test with ed25519:a_1 does not verify", failure.error)
        self.assertEqual(self.successResultOf(self.store.get_server_keys(A)), {})

    def test_signed_only_by_an_unpublished_key_rejected(self) -> None:
        other = generate_signing_key("a_1")  # same key id, another key
        published = KeyServer(A, [self.a_key], self.clock)

        def signed_by_other() -> JsonDict:
            body = published.response()
            del body["signatures"]
            return sign_json(body, A, other)

        self.serve_json(A, "GET", KEY_SERVER_PATH, signed_by_other)
        self.assertIsNone(self.lookup())
        self.assertEqual(self.successResultOf(self.store.get_server_keys(A)), {})

    def test_http_error_is_a_failure(self) -> None:
        resource = JsonResource()  # 404 M_UNRECOGNIZED for everything
        self.network.add_server(A, resource)
        self.assertIsNone(self.lookup())
        failure = self.successResultOf(self.store.get_server_key_failure(A))
        assert failure is not None
        self.assertIn("404", failure.error)


class ValidityTests(KeyRingTestCase):
    def test_expired_key_is_refetched(self) -> None:
        self.serve_a(refresh_interval_ms=HOUR_MS)
        valid_until = NOW_MS + HOUR_MS
        self.assertEqual(b64_of(self.lookup(at_ms=valid_until)), b64(self.a_key))
        self.assertEqual(self.key_requests(), 1)
        # past valid_until_ts, but a fetch ended less than the negative-cache
        # period ago: no new request yet
        self.assertIsNone(self.lookup(at_ms=valid_until + 1))
        self.assertEqual(self.key_requests(), 1)
        self.clock.advance(HOUR_MS // 1000 + 1)  # past valid_until_ts (and the negative cache)
        self.assertEqual(b64_of(self.lookup(at_ms=self.now_ms())), b64(self.a_key))
        self.assertEqual(self.key_requests(), 2)
        row = self.successResultOf(self.store.get_server_keys(A))[A_KEY_ID]
        self.assertEqual(row.valid_until_ts, self.now_ms() + HOUR_MS)
        self.assertEqual(row.fetched_ts, self.now_ms())

    def test_seven_day_cap(self) -> None:
        self.serve_a(refresh_interval_ms=30 * DAY_MS)
        self.lookup()
        row = self.successResultOf(self.store.get_server_keys(A))[A_KEY_ID]
        self.assertEqual(row.valid_until_ts, NOW_MS + 30 * DAY_MS)
        self.assertEqual(key_usable_until(row), NOW_MS + MAX_KEY_CACHE_LIFETIME_MS)
        self.clock.advance(7 * 24 * 3600)  # exactly seven days after the fetch: still usable
        self.assertEqual(b64_of(self.lookup(at_ms=self.now_ms())), b64(self.a_key))
        self.assertEqual(self.key_requests(), 1)
        self.clock.advance(1)  # one second past the cap: refetched
        self.assertEqual(b64_of(self.lookup(at_ms=self.now_ms())), b64(self.a_key))
        self.assertEqual(self.key_requests(), 2)

    def test_old_verify_keys_only_before_expired_ts(self) -> None:
        old_key = get_verify_key(generate_signing_key("a_old"))
        expired_ts = NOW_MS + 5000
        self.serve_a(old_verify_keys=[OldVerifyKey("ed25519:a_old", old_key, expired_ts)])
        self.assertEqual(b64_of(self.lookup(A, "ed25519:a_old", expired_ts - 1)), b64_of(old_key))
        self.assertIsNone(self.lookup(A, "ed25519:a_old", expired_ts))
        row = self.successResultOf(self.store.get_server_keys(A))["ed25519:a_old"]
        self.assertEqual(row.expired_ts, expired_ts)
        # the 7-day cap does not apply to an old key's expiry
        self.assertEqual(key_usable_until(row), expired_ts - 1)

    def test_old_key_already_expired(self) -> None:
        old_key = get_verify_key(generate_signing_key("a_old"))
        self.serve_a(old_verify_keys=[OldVerifyKey("ed25519:a_old", old_key, NOW_MS - 1)])
        self.assertIsNone(self.lookup(A, "ed25519:a_old"))
        self.assertEqual(b64_of(self.lookup()), b64(self.a_key))
        self.assertEqual(self.key_requests(), 1)


class SharingAndFailureTests(KeyRingTestCase):
    def test_concurrent_lookups_share_one_request(self) -> None:
        self.serve_a()
        d1 = self.ring.get_verify_key(A, A_KEY_ID, NOW_MS)
        d2 = self.ring.get_verify_key(A, A_KEY_ID, NOW_MS)
        d3 = self.ring.get_verify_key(A, "ed25519:other", NOW_MS)
        self.assertNoResult(d1)
        self.assertNoResult(d2)
        self.assertNoResult(d3)
        self.network.flush()
        self.assertEqual(b64_of(self.successResultOf(d1)), b64(self.a_key))
        self.assertEqual(b64_of(self.successResultOf(d2)), b64(self.a_key))
        self.assertIsNone(self.successResultOf(d3))
        self.assertEqual(self.key_requests(), 1)

    def test_a_cancelled_lookup_leaves_the_others_alone(self) -> None:
        self.serve_a()
        d1 = self.ring.get_verify_key(A, A_KEY_ID, NOW_MS)
        d2 = self.ring.get_verify_key(A, A_KEY_ID, NOW_MS)
        d1.cancel()
        self.failureResultOf(d1, CancelledError)
        self.network.flush()
        self.assertEqual(b64_of(self.successResultOf(d2)), b64(self.a_key))
        self.assertEqual(self.key_requests(), 1)

    def test_failure_held_off_then_retried(self) -> None:
        # a.test is not on the network yet: connection refused
        self.assertIsNone(self.lookup())
        self.assertEqual(self.key_requests(), 1)
        failure = self.successResultOf(self.store.get_server_key_failure(A))
        assert failure is not None
        self.assertEqual(failure.failed_ts, NOW_MS)
        self.assertIn("ConnectionRefusedError", failure.error)

        self.serve_a()
        self.clock.advance(1.5)  # within the 2 s hold-off after a first failure
        self.assertIsNone(self.lookup(at_ms=self.now_ms()))
        # another process on the same store holds off too
        self.assertIsNone(self.lookup(at_ms=self.now_ms(), ring=self.make_ring()))
        self.assertEqual(self.key_requests(), 1)
        self.clock.advance(0.5)  # NOW + 2 s = failed_ts + 2 s: retried
        self.assertEqual(self.now_ms(), NOW_MS + DEFAULT_KEY_FETCH_RETRY_MS)
        self.assertEqual(b64_of(self.lookup(at_ms=self.now_ms())), b64(self.a_key))
        self.assertEqual(self.key_requests(), 2)
        self.assertIsNone(self.successResultOf(self.store.get_server_key_failure(A)))

    def test_consecutive_failures_double_the_hold_off_up_to_a_minute(self) -> None:
        retries = []
        self.assertIsNone(self.lookup(at_ms=self.now_ms()))
        self.assertEqual(self.key_requests(), 1)
        for _ in range(8):
            before, waited = self.key_requests(), 0
            while self.key_requests() == before:
                self.clock.advance(1)
                waited += 1
                self.assertIsNone(self.lookup(at_ms=self.now_ms()))
            self.assertEqual(self.key_requests(), before + 1)
            retries.append(waited)
        self.assertEqual(retries, [2, 4, 8, 16, 32, 60, 60, 60])
        # a success resets the escalation, and holds cache misses off a minute
        self.serve_a()
        self.clock.advance(60)
        self.assertEqual(b64_of(self.lookup(at_ms=self.now_ms())), b64(self.a_key))
        self.network.remove_server(A)
        self.clock.advance(60)
        before = self.key_requests()
        self.assertIsNone(self.lookup(A, "ed25519:other", self.now_ms()))
        self.clock.advance(2)
        self.assertIsNone(self.lookup(A, "ed25519:other", self.now_ms()))
        self.assertEqual(self.key_requests(), before + 2)

    def test_timeout_counts_from_the_end_of_the_fetch(self) -> None:
        self.serve_a()
        self.faults.inject(FaultKind.BLACKHOLE, destination=A)
        ring = self.make_ring(fetch_timeout=10.0, failure_retry_ms=30_000)
        d = ring.get_verify_key(A, A_KEY_ID, NOW_MS)
        self.network.flush()
        self.assertNoResult(d)
        self.network.advance(10)  # the key request's 10 s timeout
        self.assertIsNone(self.successResultOf(d))
        failure = self.successResultOf(self.store.get_server_key_failure(A))
        assert failure is not None
        self.assertEqual(failure.failed_ts, NOW_MS + 10_000)
        self.assertIn("timed out", failure.error)
        self.clock.advance(29)  # NOW + 39 s: within 30 s of the failure
        self.assertIsNone(self.lookup(at_ms=self.now_ms(), ring=ring))
        self.assertEqual(self.key_requests(), 1)
        self.clock.advance(1)  # NOW + 40 s = failed_ts + 30 s: retried
        self.assertEqual(b64_of(self.lookup(at_ms=self.now_ms(), ring=ring)), b64(self.a_key))
        self.assertEqual(self.key_requests(), 2)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_unknown_key_ids_do_not_hammer_a_live_server(self) -> None:
        self.serve_a()
        for n in range(5):
            self.assertIsNone(self.lookup(A, f"ed25519:random{n}"))
        self.assertEqual(self.key_requests(), 1)
        self.clock.advance(60)  # the negative-cache period after the fetch
        self.assertIsNone(self.lookup(A, "ed25519:random9", self.now_ms()))
        self.assertEqual(self.key_requests(), 2)


class NotaryTests(KeyRingTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.notary_key = generate_signing_key("n_1")
        self.notary = TrustedKeyServer(NOTARY, (get_verify_key(self.notary_key),))
        self.a_server = KeyServer(A, [self.a_key], self.clock)
        self.ring = self.make_ring(trusted_key_servers=[self.notary])

    def serve_notary(
        self, sign_with: Optional[SigningKey] = None, tamper: bool = False
    ) -> list[JsonDict | None]:
        def answer() -> JsonDict:
            response = self.a_server.response()
            if tamper:
                response["valid_until_ts"] += 1
            return {"server_keys": [sign_json(response, NOTARY, sign_with or self.notary_key)]}

        return self.serve_json(NOTARY, "POST", KEY_QUERY_PATH, answer)

    def test_notary_used_when_the_server_is_unreachable(self) -> None:
        received = self.serve_notary()
        self.assertEqual(b64_of(self.lookup()), b64(self.a_key))
        self.assertEqual(
            [(r.destination, r.method, r.path) for r in self.network.log],
            [(A, "GET", KEY_SERVER_PATH), (NOTARY, "POST", KEY_QUERY_PATH)],
        )
        self.assertEqual(
            received,
            [{"server_keys": {A: {A_KEY_ID: {"minimum_valid_until_ts": NOW_MS}}}}],
        )
        row = self.successResultOf(self.store.get_server_keys(A))[A_KEY_ID]
        self.assertIn(NOTARY, row.key_json["signatures"])
        self.assertIsNone(self.successResultOf(self.store.get_server_key_failure(A)))

    def test_notary_not_asked_when_the_server_answers(self) -> None:
        received = self.serve_notary()
        self.serve_key_server(A, self.a_server)
        self.assertEqual(b64_of(self.lookup()), b64(self.a_key))
        self.assertEqual(received, [])

    def test_notary_asked_for_keys_the_server_lacked(self) -> None:
        received = self.serve_notary()
        self.serve_key_server(A, KeyServer(A, [generate_signing_key("a_2")], self.clock))
        self.assertEqual(b64_of(self.lookup()), b64(self.a_key))
        self.assertEqual(len(received), 1)

    def test_forged_notary_signature_rejected(self) -> None:
        self.serve_notary(sign_with=generate_signing_key("n_1"))
        self.assertIsNone(self.lookup())
        self.assertEqual(self.successResultOf(self.store.get_server_keys(A)), {})
        failure = self.successResultOf(self.store.get_server_key_failure(A))
        assert failure is not None
        self.assertIn(
            "notary signature of notary.test with ed25519:n_1 does not verify", failure.error
        )

    def test_notary_signature_with_an_unconfigured_key_rejected(self) -> None:
        self.serve_notary(sign_with=generate_signing_key("n_other"))
        self.assertIsNone(self.lookup())
        self.assertEqual(self.successResultOf(self.store.get_server_keys(A)), {})

    def test_origin_self_signature_checked_on_notary_answers(self) -> None:
        # the notary signs an object whose origin signature no longer verifies
        self.serve_notary(tamper=True)
        self.assertIsNone(self.lookup())
        failure = self.successResultOf(self.store.get_server_key_failure(A))
        assert failure is not None
        self.assertIn("self signature of a.test", failure.error)

    def test_answers_about_other_servers_ignored(self) -> None:
        other = KeyServer("c.test", [self.a_key], self.clock)
        self.serve_json(
            NOTARY,
            "POST",
            KEY_QUERY_PATH,
            lambda: {"server_keys": [sign_json(other.response(), NOTARY, self.notary_key)]},
        )
        self.assertIsNone(self.lookup())
        self.assertEqual(self.successResultOf(self.store.get_server_keys(A)), {})
        self.assertEqual(self.successResultOf(self.store.get_server_keys("c.test")), {})

    def test_second_notary_after_the_first_fails(self) -> None:
        self.serve_notary()
        down = TrustedKeyServer("down.test", self.notary.verify_keys)
        ring = self.make_ring(trusted_key_servers=[down, self.notary])
        self.assertEqual(b64_of(self.lookup(ring=ring)), b64(self.a_key))
        self.assertEqual([r.destination for r in self.network.log], [A, "down.test", NOTARY])


class ParseKeyResponseTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.key = generate_signing_key("k")
        self.body: JsonDict = {
            "server_name": A,
            "verify_keys": {"ed25519:k": {"key": b64(self.key)}},
            "old_verify_keys": {},
            "valid_until_ts": 5000,
        }

    def parse(self, body: JsonDict) -> list[ServerKeyRow]:
        return parse_key_response(sign_json(body, A, self.key), A, 1000)

    def test_rows(self) -> None:
        old = b64(generate_signing_key("o"))
        self.body["old_verify_keys"] = {
            "ed25519:o": {"key": old, "expired_ts": 10},
            # listed as current and old: current wins
            "ed25519:k": {"key": old, "expired_ts": 10},
        }
        self.body["verify_keys"]["curve25519:x"] = {"key": "whatever"}  # other algorithm: skipped
        rows = {row.key_id: row for row in self.parse(self.body)}
        self.assertEqual(sorted(rows), ["ed25519:k", "ed25519:o"])
        current, old_row = rows["ed25519:k"], rows["ed25519:o"]
        self.assertEqual((current.verify_key, current.expired_ts), (b64(self.key), None))
        self.assertEqual((old_row.verify_key, old_row.expired_ts), (old, 10))
        self.assertEqual(rows["ed25519:k"].fetched_ts, 1000)

    def test_malformed(self) -> None:
        cases: list[tuple[str, Any]] = [
            ("valid_until_ts", None),
            ("valid_until_ts", "5000"),
            ("valid_until_ts", True),
            ("verify_keys", None),
            ("verify_keys", {"ed25519:k": b64(self.key)}),
            ("verify_keys", {"ed25519:k": {"key": "not base64!"}}),
            ("verify_keys", {}),
            ("old_verify_keys", {"ed25519:o": {"key": b64(self.key)}}),
            ("old_verify_keys", []),
        ]
        for field_name, value in cases:
            with self.subTest(field=field_name, value=value):
                body = dict(self.body)
                if value is None:
                    del body[field_name]
                else:
                    body[field_name] = value
                with self.assertRaises(KeyResponseError):
                    self.parse(body)
        with self.assertRaises(KeyResponseError):
            parse_key_response(["not", "an", "object"], A, 1000)
        with self.assertRaises(KeyResponseError):
            parse_key_response(self.body, A, 1000)  # unsigned


class TrustedKeyServersConfigTests(SynchronousTestCase):
    def test_synapse_shape(self) -> None:
        key = generate_signing_key("auto")
        (notary,) = parse_trusted_key_servers(
            [{"server_name": "matrix.org", "verify_keys": {"ed25519:auto": b64(key)}}]
        )
        self.assertEqual(notary.server_name, "matrix.org")
        self.assertEqual([b64_of(k) for k in notary.verify_keys], [b64(key)])
        self.assertEqual(parse_trusted_key_servers(None), [])
        self.assertEqual(parse_trusted_key_servers([]), [])

    def test_errors(self) -> None:
        good = b64(generate_signing_key("auto"))
        for config, fragment in (
            ({"server_name": "x.org"}, "expected a list"),
            (["x.org"], "trusted_key_servers[0]"),
            ([{"verify_keys": {"ed25519:a": good}}], "server_name"),
            ([{"server_name": "bad name!", "verify_keys": {"ed25519:a": good}}], "server_name"),
            ([{"server_name": "x.org"}], "verify_keys"),
            ([{"server_name": "x.org", "verify_keys": {}}], "verify_keys"),
            ([{"server_name": "x.org", "verify_keys": {"rsa:a": good}}], "rsa:a"),
            ([{"server_name": "x.org", "verify_keys": {"ed25519:a": "!!"}}], "ed25519:a"),
            ([{"server_name": "x.org", "verify_keys": {"ed25519:a": 5}}], "ed25519:a"),
            (
                [
                    {"server_name": "x.org", "verify_keys": {"ed25519:a": good}},
                    {"server_name": "x.org", "verify_keys": {"ed25519:a": good}},
                ],
                "twice",
            ),
        ):
            with self.subTest(config=config):
                with self.assertRaises(TrustedKeyServersError) as cm:
                    parse_trusted_key_servers(config)
                self.assertIn(fragment, str(cm.exception))
