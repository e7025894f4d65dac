"""SCENARIOS.md 21-23 against A's ``/send``: bad signatures, malformed EDUs,
transaction limits, with a valid signed sender (S) and hand-built requests."""

from __future__ import annotations

import json
from typing import Any, Optional

import treq
from signedjson.key import generate_signing_key
from signedjson.types import SigningKey
from twisted.internet.defer import Deferred
from twisted.web.http_headers import Headers

from devicelist_plugin.core.models import JsonDict
from devicelist_plugin.federation.client import HttpResponseError
from devicelist_plugin.federation.send import PDU_NOT_HANDLED
from devicelist_plugin.federation.xmatrix import build_authorization_header
from tests.helpers.store import dump_store
from tests.replication.inbound_harness import (
    NOW_S,
    S,
    SEND_PREFIX,
    FakeRemoteServer,
    InboundCase,
    capture_logs,
)

U = "@u:s.test"


class AuthenticationTests(InboundCase):
    """Scenario 21."""

    def setUp(self) -> None:
        super().setUp()
        self.a.track(U)
        self.u = self.s.user("u")
        self.edu = self.u.edu("D1")
        self.before = dump_store(self, self.a.store)

    def put(
        self,
        *,
        key: Optional[SigningKey] = None,
        key_id: Optional[str] = None,
        destination: str = "a.test",
        signed: bool = True,
        origin: str = S,
    ) -> tuple[int, Any]:
        path = SEND_PREFIX + "t1"
        body: JsonDict = {"origin": origin, "origin_server_ts": 0, "pdus": [], "edus": [self.edu]}
        headers = Headers({b"Content-Type": [b"application/json"]})
        if signed:
            header = build_authorization_header(
                key or self.s.key, origin, destination, "PUT", path, body
            )
            if key_id is not None:
                header = header.replace(
                    f'key="ed25519:{(key or self.s.key).version}"'.encode(),
                    f'key="{key_id}"'.encode(),
                )
            headers.addRawHeader(b"Authorization", header)
        d = self.network.client_for(origin).request(
            "PUT", f"https://a.test{path}", data=json.dumps(body).encode(), headers=headers
        )
        self.network.flush()
        response = self.successResultOf(d)
        content = self.successResultOf(treq.content(response))
        return response.code, json.loads(content)

    def assertRefused(self, code: int, body: Any, fragment: str) -> None:
        self.assertEqual(code, 401)
        self.assertEqual(body["errcode"], "M_UNAUTHORIZED")
        self.assertIn(fragment, body["error"])
        after = dump_store(self, self.a.store)
        # only S's keys may have been fetched and cached
        for table in ("server_keys", "server_key_fetch_failures"):
            after.pop(table, None)
            self.before.pop(table, None)
        self.assertEqual(after, self.before)
        self.assertEqual(self.fetches(), 0)

    def test_unsigned(self) -> None:
        self.assertRefused(*self.put(signed=False), "Missing X-Matrix Authorization header")

    def test_wrongly_signed(self) -> None:
        impostor = generate_signing_key(self.s.key.version)
        self.assertRefused(*self.put(key=impostor), "signature")

    def test_wrong_destination(self) -> None:
        self.assertRefused(*self.put(destination="b.test"), "destination")

    def test_unknown_key(self) -> None:
        self.assertRefused(*self.put(key_id="ed25519:nope"), "key")

    def test_expired_key(self) -> None:
        old = generate_signing_key("old")
        r = FakeRemoteServer(self, self.network, "r.test", old_keys=((old, NOW_S * 1000 - 1),))
        self.edu = r.user("u").edu("D1")
        self.a.track("@u:r.test")
        self.before = dump_store(self, self.a.store)
        self.assertRefused(*self.put(key=old, origin="r.test"), "key")

    def test_valid_signature_is_accepted(self) -> None:
        code, body = self.put()
        self.assertEqual((code, body), (200, {"pdus": {}}))
        self.assertEqual(set(self.a.cached_devices(U)), {"D1"})


class MalformedEduTests(InboundCase):
    """Scenario 22."""

    def test_malformed_edus_are_logged_counted_and_skipped(self) -> None:
        self.a.track(U)
        u = self.s.user("u")
        logs = capture_logs(self)

        def dlu(**content: Any) -> JsonDict:
            base: JsonDict = {"user_id": U, "device_id": "X", "stream_id": 1, "prev_id": []}
            base.update(content)
            return {"edu_type": "m.device_list_update", "content": {k: v for k, v in base.items() if v is not None}}

        bad = [
            dlu(user_id=None),
            dlu(stream_id="5"),
            dlu(prev_id=3),
            dlu(keys="abc"),
            dlu(device_display_name="n" * 1001),
            dlu(device_id="d" * 256),
            dlu(user_id="@" + "u" * 300 + ":s.test"),
            {"edu_type": "m.device_list_update", "content": "not an object"},
            {"edu_type": "m.signing_key_update", "content": {"user_id": U, "master_key": "x"}},
            ["not", "an", "edu"],
            {"content": {}},
        ]
        good = u.edu("GOOD")
        response = self.deliver(self.s, bad + [good])
        self.assertEqual(response, {"pdus": {}})
        self.assertEqual(set(self.a.cached_devices(U)), {"GOOD"})
        stats = self.a.receiver.stats
        self.assertEqual(stats[("m.device_list_update", "malformed")], 8)
        self.assertEqual(stats[("m.signing_key_update", "malformed")], 1)
        self.assertEqual(stats[("<unknown>", "malformed")], 2)
        self.assertEqual(stats[("m.device_list_update", "accepted")], 1)
        lines = [line for line in logs if line.startswith("Ignoring malformed EDU")]
        prefix = "Ignoring malformed EDU from s.test (transaction txn1): "
        self.assertEqual(
            lines,
            [
                prefix + "edus[0].content.user_id: required field missing",
                prefix + "edus[1].content.stream_id: expected an integer, got a string",
                prefix + "edus[2].content.prev_id: expected a list, got an integer",
                prefix + "edus[3].content.keys: expected an object, got a string",
                prefix + "edus[4].content.device_display_name: longer than 1000 characters",
                prefix + "edus[5].content.device_id: longer than 255 characters",
                prefix + "edus[6].content.user_id: user ID longer than 255 bytes",
                prefix + "edus[7].content: expected an object, got a string",
                prefix + "edus[8].content.master_key: expected an object, got a string",
                prefix + "edus[9]: expected an object",
                prefix + "edus[10].edu_type: expected a string",
            ],
        )


class LimitTests(InboundCase):
    """Scenario 23, and the rest of the transaction checks."""

    def put(self, body: JsonDict, txn_id: str = "t1") -> "Deferred[JsonDict]":
        d = Deferred.fromCoroutine(
            self.s.transport.client.put_json("a.test", SEND_PREFIX + txn_id, body)
        )
        self.network.flush()
        return d

    def body(self, pdus: int = 0, edus: int = 0, **extra: Any) -> JsonDict:
        body: JsonDict = {
            "origin": S,
            "origin_server_ts": 0,
            "pdus": [{"event_id": f"$e{n}", "type": "m.room.message"} for n in range(pdus)],
            "edus": [{"edu_type": "m.typing", "content": {}} for _ in range(edus)],
        }
        body.update(extra)
        return body

    def assertError(self, d: Any, code: int, errcode: str) -> HttpResponseError:
        error = self.failureResultOf(d, HttpResponseError).value
        assert isinstance(error, HttpResponseError)
        self.assertEqual((error.code, error.errcode), (code, errcode), error.message)
        return error

    def test_too_many_pdus_or_edus(self) -> None:
        error = self.assertError(self.put(self.body(pdus=51)), 400, "M_BAD_JSON")
        self.assertEqual(error.message, "Transaction has 51 pdus, more than 50")
        error = self.assertError(self.put(self.body(edus=101)), 400, "M_BAD_JSON")
        self.assertEqual(error.message, "Transaction has 101 edus, more than 100")
        self.assertIsNone(self.successResultOf(self.a.store.get_received_txn(S, "t1")))

    def test_at_the_limits_pdus_are_answered_not_handled(self) -> None:
        result = self.successResultOf(self.put(self.body(pdus=50, edus=100)))
        self.assertEqual(
            result, {"pdus": {f"$e{n}": {"error": PDU_NOT_HANDLED} for n in range(50)}}
        )
        self.assertEqual(self.a.receiver.stats[("<unknown>", "unknown_type")], 100)
        self.assertEqual(self.a.receiver.stats[("pdu", "not_handled")], 50)

    def test_body_over_the_size_limit(self) -> None:
        body = self.body(padding="x" * (1024 * 1024))
        self.assertError(self.put(body), 413, "M_TOO_LARGE")

    def test_origin_must_match(self) -> None:
        self.assertError(self.put(self.body(origin="t.test")), 403, "M_FORBIDDEN")
        body = self.body()
        del body["origin"]
        self.assertError(self.put(body), 400, "M_MISSING_PARAM")

    def test_pdus_and_edus_must_be_lists(self) -> None:
        self.assertError(self.put(self.body(edus=0, pdus=0) | {"edus": {}}), 400, "M_BAD_JSON")
        self.assertError(self.put(self.body() | {"pdus": "x"}), 400, "M_BAD_JSON")
        # absent or null: none
        result = self.successResultOf(self.put({"origin": S, "edus": None}, txn_id="t2"))
        self.assertEqual(result, {"pdus": {}})
