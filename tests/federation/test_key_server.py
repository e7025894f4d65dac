"""GET /_matrix/key/v2/server: the self-signed key response."""

from __future__ import annotations

import json

from signedjson.key import (
    decode_verify_key_base64,
    encode_verify_key_base64,
    generate_signing_key,
    get_verify_key,
)
from signedjson.sign import SignatureVerifyException, verify_signed_json
import treq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from devicelist_plugin.federation.key_server import DEFAULT_REFRESH_INTERVAL_MS, KeyServer
from devicelist_plugin.federation.resource import JsonResource
from devicelist_plugin.federation.signing_keys import OldVerifyKey
from tests.federation.test_resource import in_memory_client


class DenyAll:
    async def authenticate(self, request: object) -> str:
        raise AssertionError("the key server must not authenticate")


class KeyServerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)  # an arbitrary "now"
        self.key = generate_signing_key("a_cur")
        self.old_verify_key = get_verify_key(generate_signing_key("a_old"))
        self.old = OldVerifyKey("ed25519:a_old", self.old_verify_key, 1_600_000_000_000)
        self.server = KeyServer("b.example", [self.key], self.clock, old_verify_keys=[self.old])

    def test_shape_and_self_signature(self) -> None:
        body = self.server.response()
        self.assertEqual(body["server_name"], "b.example")
        self.assertEqual(
            body["verify_keys"],
            {"ed25519:a_cur": {"key": encode_verify_key_base64(get_verify_key(self.key))}},
        )
        self.assertEqual(
            body["old_verify_keys"],
            {
                "ed25519:a_old": {
                    "key": encode_verify_key_base64(self.old_verify_key),
                    "expired_ts": 1_600_000_000_000,
                }
            },
        )
        self.assertEqual(list(body["signatures"]), ["b.example"])
        self.assertEqual(list(body["signatures"]["b.example"]), ["ed25519:a_cur"])
        # verify as a remote server would: with the key the response publishes
        published = decode_verify_key_base64("ed25519", "a_cur", body["verify_keys"]["ed25519:a_cur"]["key"])
        verify_signed_json(body, "b.example", published)

    def test_tampered_response_fails_verification(self) -> None:
        body = self.server.response()
        body["valid_until_ts"] += 1
        with self.assertRaises(SignatureVerifyException):
            verify_signed_json(body, "b.example", get_verify_key(self.key))

    def test_valid_until_from_the_clock(self) -> None:
        self.assertEqual(
            self.server.response()["valid_until_ts"], 1_700_000_000_000 + DEFAULT_REFRESH_INTERVAL_MS
        )
        self.clock.advance(60.5)  # a later request: the validity moves with it
        self.assertEqual(
            self.server.response()["valid_until_ts"], 1_700_000_060_500 + DEFAULT_REFRESH_INTERVAL_MS
        )
        short = KeyServer("b.example", [self.key], self.clock, refresh_interval_ms=1000)
        self.assertEqual(short.response()["valid_until_ts"], 1_700_000_061_500)

    def test_every_current_key_published_and_signing(self) -> None:
        second = generate_signing_key("a_two")
        server = KeyServer("b.example", [self.key, second], self.clock)
        body = server.response()
        self.assertEqual(set(body["verify_keys"]), {"ed25519:a_cur", "ed25519:a_two"})
        self.assertEqual(body["old_verify_keys"], {})
        verify_signed_json(body, "b.example", get_verify_key(self.key))
        verify_signed_json(body, "b.example", get_verify_key(second))

    def test_invalid_construction(self) -> None:
        with self.assertRaises(ValueError):
            KeyServer("b.example", [], self.clock)
        clash = OldVerifyKey("ed25519:a_cur", self.old_verify_key, 1)
        with self.assertRaises(ValueError):
            KeyServer("b.example", [self.key], self.clock, old_verify_keys=[clash])

    def test_served_on_both_paths_without_auth(self) -> None:
        resource = JsonResource(authenticator=DenyAll())
        self.server.register(resource)
        http, _ = in_memory_client(resource)
        bodies = []
        paths = [
            "/_matrix/key/v2/server",
            "/_matrix/key/v2/server/ed25519%3Aa_cur",
            "/_matrix/key/v2/server/x",
        ]
        for path in paths:
            response = self.successResultOf(http.get("https://b.example" + path))
            self.assertEqual(response.code, 200)
            self.assertEqual(response.headers.getRawHeaders(b"Content-Type"), [b"application/json"])
            bodies.append(json.loads(self.successResultOf(treq.content(response))))
        self.assertEqual(bodies[0], bodies[1])
        self.assertEqual(bodies[0], bodies[2])
        verify_signed_json(bodies[0], "b.example", get_verify_key(self.key))
