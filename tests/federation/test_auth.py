"""FederationAuthenticator: X-Matrix requests from server A accepted by server B."""

from __future__ import annotations

import json
from typing import Any

from signedjson.key import generate_signing_key, get_verify_key
from signedjson.types import SigningKey, VerifyKey
import treq
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from devicelist_plugin.core.models import JsonDict
from devicelist_plugin.federation.auth import FederationAuthenticator, check_origin_matches
from devicelist_plugin.federation.errors import (
    M_BAD_JSON,
    M_FORBIDDEN,
    M_MISSING_PARAM,
    M_UNAUTHORIZED,
    MatrixError,
)
from devicelist_plugin.federation.resource import JsonRequest, JsonResource
from devicelist_plugin.federation.xmatrix import build_authorization_header
from tests.federation.test_resource import in_memory_client

A = "a.example"
B = "b.example"
SEND = "/_matrix/federation/v1/send/t1"
DEVICES = "/_matrix/federation/v1/user/devices/%40alice%3Ab.example"
NOW_S = 1_700_000_000


class DictKeyLookup:
    """Keys by (server, key id); records every lookup."""

    def __init__(self) -> None:
        self.keys: dict[tuple[str, str], VerifyKey] = {}
        self.lookups: list[tuple[str, str, int]] = []

    def get_verify_key(self, server_name: str, key_id: str, at_ms: int) -> Deferred[VerifyKey | None]:
        self.lookups.append((server_name, key_id, at_ms))
        return succeed(self.keys.get((server_name, key_id)))


class AuthTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW_S)  # an arbitrary "now"
        self.a_key = generate_signing_key("a_1")
        self.lookup = DictKeyLookup()
        self.lookup.keys[(A, "ed25519:a_1")] = get_verify_key(self.a_key)
        self.authenticator = FederationAuthenticator(B, self.lookup, self.clock)
        self.resource = JsonResource(authenticator=self.authenticator)
        self.seen: list[tuple[str | None, JsonDict | None]] = []

        async def handler(request: JsonRequest) -> tuple[int, JsonDict]:
            self.seen.append((request.origin, request.content))
            return 200, {}

        self.resource.register(
            "PUT", "/_matrix/federation/v1/send/{txnId}", handler, requires_auth=True, json_body=True
        )
        self.resource.register(
            "GET", "/_matrix/federation/v1/user/devices/{userId}", handler, requires_auth=True
        )
        self.http, self.agent = in_memory_client(self.resource)

    def sign(
        self,
        method: str,
        uri: str,
        content: object | None = None,
        key: SigningKey | None = None,
        origin: str = A,
        destination: str = B,
    ) -> bytes:
        return build_authorization_header(key or self.a_key, origin, destination, method, uri, content)

    def request(
        self, method: str, uri: str, headers: list[bytes], body: object | None = None
    ) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        d = self.http.request(
            method, "https://" + B + uri, data=data, headers=Headers({b"Authorization": headers})
        )
        self.agent.flush()
        response = self.successResultOf(d)
        return response.code, json.loads(self.successResultOf(treq.content(response)))

    def assertUnauthorized(self, result: tuple[int, Any], *fragments: str) -> None:
        code, body = result
        self.assertEqual((code, body["errcode"]), (401, M_UNAUTHORIZED))
        for fragment in fragments:
            self.assertIn(fragment, body["error"])
        self.assertEqual(self.seen, [])


class AcceptTests(AuthTestCase):
    def test_get_signed_by_a_reaches_handler_with_origin(self) -> None:
        code, _ = self.request("GET", DEVICES, [self.sign("GET", DEVICES)])
        self.assertEqual(code, 200)
        self.assertEqual(self.seen, [(A, None)])
        self.assertEqual(self.lookup.lookups, [(A, "ed25519:a_1", NOW_S * 1000)])

    def test_put_with_body(self) -> None:
        body = {
            "origin": A,
            "origin_server_ts": 1,
            "pdus": [],
            "edus": [{"edu_type": "m.device_list_update"}],
        }
        code, _ = self.request("PUT", SEND, [self.sign("PUT", SEND, body)], body)
        self.assertEqual(code, 200)
        self.assertEqual(self.seen, [(A, body)])

    def test_query_string_is_signed_as_sent(self) -> None:
        uri = DEVICES + "?a=%2F&b=c"
        code, _ = self.request("GET", uri, [self.sign("GET", uri)])
        self.assertEqual(code, 200)

    def test_header_without_destination_accepted(self) -> None:
        header = self.sign("GET", DEVICES)
        without = header.replace(b',destination="b.example"', b"")
        self.assertNotIn(b"destination", without)
        code, _ = self.request("GET", DEVICES, [without])
        self.assertEqual(code, 200)

    def test_several_headers_any_valid_one(self) -> None:
        good = self.sign("GET", DEVICES)
        bad_sig = self.sign("GET", "/elsewhere")
        unknown_key = self.sign("GET", DEVICES, key=generate_signing_key("nope"))
        for headers in (
            [bad_sig, good],
            [good, bad_sig],
            [b"Bearer xyz", b"X-Matrix garbage", unknown_key, good],
        ):
            with self.subTest(headers=headers):
                self.seen.clear()
                code, _ = self.request("GET", DEVICES, headers)
                self.assertEqual(code, 200)
                self.assertEqual(self.seen, [(A, None)])

    def test_authenticate_parts(self) -> None:
        d = Deferred.fromCoroutine(
            self.authenticator.authenticate_parts("GET", DEVICES, [self.sign("GET", DEVICES).decode()], None)
        )
        self.assertEqual(self.successResultOf(d), A)


class RejectTests(AuthTestCase):
    def test_missing_header(self) -> None:
        self.assertUnauthorized(self.request("GET", DEVICES, []), "Missing")
        self.assertUnauthorized(self.request("GET", DEVICES, [b"Bearer token"]), "Missing")

    def test_malformed_header(self) -> None:
        self.assertUnauthorized(self.request("GET", DEVICES, [b'X-Matrix origin="a.example"']), "malformed")

    def test_tampered_uri(self) -> None:
        header = self.sign("GET", DEVICES)
        self.assertUnauthorized(self.request("GET", DEVICES + "?x=1", [header]), "invalid signature")
        other = "/_matrix/federation/v1/user/devices/%40bob%3Ab.example"
        self.assertUnauthorized(self.request("GET", other, [header]), "invalid signature")

    def test_tampered_body(self) -> None:
        header = self.sign("PUT", SEND, {"origin": A, "pdus": []})
        self.assertUnauthorized(self.request("PUT", SEND, [header], {"origin": A, "pdus": [{}]}))

    def test_tampered_method(self) -> None:
        header = self.sign("PUT", SEND, {"origin": A})
        self.resource.register("POST", "/_matrix/federation/v1/send/{txnId}", self._never, requires_auth=True)
        self.assertUnauthorized(self.request("POST", SEND, [header], {"origin": A}))

    async def _never(self, request: JsonRequest) -> tuple[int, JsonDict]:
        raise AssertionError("handler reached")

    def test_wrong_destination(self) -> None:
        header = self.sign("GET", DEVICES, destination="c.example")
        self.assertUnauthorized(self.request("GET", DEVICES, [header]), "c.example")

    def test_signed_for_another_destination_without_the_param(self) -> None:
        header = self.sign("GET", DEVICES, destination="c.example").replace(b',destination="c.example"', b"")
        self.assertUnauthorized(self.request("GET", DEVICES, [header]), "invalid signature")

    def test_unknown_key_id(self) -> None:
        header = self.sign("GET", DEVICES, key=generate_signing_key("a_2"))
        self.assertUnauthorized(self.request("GET", DEVICES, [header]), "ed25519:a_2", A)

    def test_expired_key(self) -> None:
        # the key ring returns None for a key no longer valid at the time asked
        header = self.sign("GET", DEVICES)
        del self.lookup.keys[(A, "ed25519:a_1")]
        self.assertUnauthorized(self.request("GET", DEVICES, [header]), "ed25519:a_1")
        self.assertEqual(self.lookup.lookups, [(A, "ed25519:a_1", NOW_S * 1000)])

    def test_claiming_another_origin(self) -> None:
        # signed by A's key but claiming to be C: C's key is looked up, not A's
        header = self.sign("GET", DEVICES, origin="c.example")
        self.assertUnauthorized(self.request("GET", DEVICES, [header]))
        self.assertEqual(self.lookup.lookups, [("c.example", "ed25519:a_1", NOW_S * 1000)])

    def test_unsupported_algorithm(self) -> None:
        header = self.sign("GET", DEVICES).replace(b'key="ed25519:a_1"', b'key="rsa:a_1"')
        self.assertUnauthorized(self.request("GET", DEVICES, [header]), "rsa:a_1")
        self.assertEqual(self.lookup.lookups, [])

    def test_key_lookup_error_is_500_and_logged(self) -> None:
        def broken(server_name: str, key_id: str, at_ms: int) -> Deferred[VerifyKey | None]:
            return fail(RuntimeError("key ring broken"))

        self.lookup.get_verify_key = broken  # type: ignore[method-assign]
        code, body = self.request("GET", DEVICES, [self.sign("GET", DEVICES)])
        self.assertEqual(code, 500)
        self.assertNotIn("key ring", body["error"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class ContactListenerTests(AuthTestCase):
    def test_fired_once_on_success_only(self) -> None:
        contacts: list[str] = []
        self.authenticator.add_contact_listener(contacts.append)
        good = self.sign("GET", DEVICES)
        self.request("GET", DEVICES, [self.sign("GET", "/other")])
        self.request("GET", DEVICES, [])
        self.assertEqual(contacts, [])
        self.request("GET", DEVICES, [good, good])
        self.assertEqual(contacts, [A])
        self.authenticator.remove_contact_listener(contacts.append)
        self.request("GET", DEVICES, [good])
        self.assertEqual(contacts, [A])

    def test_failing_listeners_are_logged_never_fatal(self) -> None:
        contacts: list[str] = []

        def raising(origin: str) -> None:
            raise ValueError("listener bug")

        def failing_deferred(origin: str) -> Deferred[None]:
            return fail(KeyError("async listener bug"))

        async def failing_coroutine(origin: str) -> None:
            raise LookupError("coroutine listener bug")

        for listener in (raising, failing_deferred, failing_coroutine, contacts.append):
            self.authenticator.add_contact_listener(listener)
        code, _ = self.request("GET", DEVICES, [self.sign("GET", DEVICES)])
        self.assertEqual(code, 200)
        self.assertEqual(contacts, [A])
        self.assertEqual(self.seen, [(A, None)])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)
        self.assertEqual(len(self.flushLoggedErrors(LookupError)), 1)


class CheckOriginTests(SynchronousTestCase):
    def test_match(self) -> None:
        check_origin_matches(A, A)

    def test_mismatch_is_403(self) -> None:
        with self.assertRaises(MatrixError) as cm:
            check_origin_matches(A, "c.example")
        self.assertEqual((cm.exception.code, cm.exception.errcode), (403, M_FORBIDDEN))

    def test_missing_is_400(self) -> None:
        with self.assertRaises(MatrixError) as cm:
            check_origin_matches(A, None)
        self.assertEqual((cm.exception.code, cm.exception.errcode), (400, M_MISSING_PARAM))

    def test_not_a_string_is_400(self) -> None:
        with self.assertRaises(MatrixError) as cm:
            check_origin_matches(A, ["a.example"])
        self.assertEqual((cm.exception.code, cm.exception.errcode), (400, M_BAD_JSON))
