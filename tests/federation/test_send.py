"""The /send endpoint and the EDU registry, with scripted EDU handlers:
dispatch and counting, replays (stored and concurrent), failures, pruning."""

from __future__ import annotations

import json
from typing import Any, Optional, Sequence

import treq
from signedjson.key import generate_signing_key, get_verify_key
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from devicelist_plugin.core.models import JsonDict
from devicelist_plugin.core.parse import ParseError
from devicelist_plugin.federation.auth import FederationAuthenticator
from devicelist_plugin.federation.resource import JsonResource
from devicelist_plugin.federation.send import (
    DEFAULT_PRUNE_INTERVAL,
    DEFAULT_TXN_RETENTION,
    SEND_PATH,
    EduOutcome,
    TransactionReceiver,
)
from devicelist_plugin.federation.xmatrix import build_authorization_header
from tests.federation.test_auth import DictKeyLookup
from tests.helpers import FakeNetwork
from tests.helpers.store import open_inline_store
from tests.replication.inbound_harness import capture_logs

A = "a.example"
B = "b.example"
NOW_S = 1_700_000_000


class SendTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(NOW_S)  # an arbitrary "now"
        self.network = FakeNetwork(self.clock)
        self.store = open_inline_store(self)
        self.b_key = generate_signing_key("b1")
        lookup = DictKeyLookup()
        lookup.keys[(B, "ed25519:b1")] = get_verify_key(self.b_key)
        self.resource = JsonResource(authenticator=FederationAuthenticator(A, lookup, self.clock))
        self.receiver = TransactionReceiver(self.store, self.clock)
        self.receiver.register(self.resource)
        self.network.add_server(A, self.resource)
        self.seen: list[tuple[str, Any]] = []

    def record(self, result: Optional[str] = None) -> Any:
        def handler(origin: str, content: object) -> "Deferred[Optional[str]]":
            self.seen.append((origin, content))
            return succeed(result)

        return handler

    def send(self, txn_id: str, edus: list[Any], pdus: Optional[list[Any]] = None) -> "Deferred[Any]":
        path = SEND_PATH.replace("{txnId}", txn_id)
        body: JsonDict = {"origin": B, "origin_server_ts": 0, "pdus": pdus or [], "edus": edus}
        headers = Headers({b"Content-Type": [b"application/json"]})
        headers.addRawHeader(
            b"Authorization", build_authorization_header(self.b_key, B, A, "PUT", path, body)
        )
        d: Deferred[Any] = self.network.client_for(B).request(
            "PUT", f"https://{A}{path}", data=json.dumps(body).encode(), headers=headers
        )
        return d

    def answer(self, d: "Deferred[Any]") -> tuple[int, Any]:
        self.network.flush()
        response = self.successResultOf(d)
        return response.code, json.loads(self.successResultOf(treq.content(response)))

    def test_edus_dispatched_by_type_and_counted(self) -> None:
        self.receiver.register_edu_handler("m.test", self.record())
        self.receiver.register_edu_handler("m.ignored", self.record("not_tracked"))

        def sync_handler(origin: str, content: object) -> Optional[str]:
            self.seen.append((origin, "sync"))
            return None

        self.receiver.register_edu_handler("m.sync", sync_handler)
        self.assertEqual(self.receiver.edu_types(), ["m.ignored", "m.sync", "m.test"])
        code, body = self.answer(
            self.send(
                "t1",
                [
                    {"edu_type": "m.test", "content": {"n": 1}},
                    {"edu_type": "m.ignored", "content": {"n": 2}},
                    {"edu_type": "m.sync"},
                    {"edu_type": "m.unknown", "content": {}},
                    {"edu_type": "m.test", "content": {"n": 3}},
                ],
                pdus=[{"event_id": "$x"}, {"no": "id"}],
            )
        )
        self.assertEqual(code, 200)
        self.assertEqual(body, {"pdus": {"$x": {"error": "This server does not handle room events"}}})
        self.assertEqual(
            self.seen, [(B, {"n": 1}), (B, {"n": 2}), (B, "sync"), (B, {"n": 3})]
        )
        stats = self.receiver.stats
        self.assertEqual(stats[("m.test", "accepted")], 2)
        self.assertEqual(stats[("m.ignored", "not_tracked")], 1)
        self.assertEqual(stats[("m.sync", "accepted")], 1)
        self.assertEqual(stats[("<unknown>", "unknown_type")], 1)
        self.assertEqual(stats[("pdu", "not_handled")], 1)
        self.assertEqual(stats[("pdu", "no_event_id")], 1)

    def test_a_handler_can_be_replaced(self) -> None:
        self.receiver.register_edu_handler("m.test", self.record("first"))
        self.receiver.register_edu_handler("m.test", self.record("second"))
        self.answer(self.send("t1", [{"edu_type": "m.test", "content": {}}]))
        self.assertEqual(self.receiver.stats[("m.test", "second")], 1)

    def test_parse_errors_skip_the_edu_only(self) -> None:
        def picky(origin: str, content: object) -> "Deferred[Optional[str]]":
            if content == "bad":
                return fail(ParseError("user_id", "required field missing"))
            self.seen.append((origin, content))
            return succeed(None)

        self.receiver.register_edu_handler("m.test", picky)
        code, body = self.answer(
            self.send(
                "t1",
                [{"edu_type": "m.test", "content": "bad"}, {"edu_type": "m.test", "content": "ok"}],
            )
        )
        self.assertEqual((code, body), (200, {"pdus": {}}))
        self.assertEqual(self.seen, [(B, "ok")])
        self.assertEqual(self.receiver.stats[("m.test", "malformed")], 1)

    def test_a_batch_handler_gets_all_edus_of_its_type_in_one_call(self) -> None:
        calls: list[list[object]] = []

        def batch(origin: str, contents: Sequence[object]) -> "Deferred[list[EduOutcome]]":
            calls.append(list(contents))
            outcomes: list[EduOutcome] = []
            for content in contents:
                if content == "bad":
                    outcomes.append(ParseError("content.user_id", "required field missing"))
                else:
                    outcomes.append(None if content != "skip" else "not_tracked")
            return succeed(outcomes)

        self.receiver.register_edu_batch_handler("m.batch", batch)
        self.receiver.register_edu_handler("m.test", self.record())
        self.assertEqual(self.receiver.edu_types(), ["m.batch", "m.test"])
        logs = capture_logs(self)
        code, body = self.answer(
            self.send(
                "t1",
                [
                    {"edu_type": "m.batch", "content": "bad"},
                    {"edu_type": "m.test", "content": 1},
                    "junk",
                    {"edu_type": "m.batch", "content": "ok"},
                    {"edu_type": "m.batch", "content": "skip"},
                ],
            )
        )
        self.assertEqual((code, body), (200, {"pdus": {}}))
        self.assertEqual(calls, [["bad", "ok", "skip"]])
        self.assertEqual(self.seen, [(B, 1)])
        stats = self.receiver.stats
        self.assertEqual(stats[("m.batch", "accepted")], 1)
        self.assertEqual(stats[("m.batch", "not_tracked")], 1)
        self.assertEqual(stats[("m.batch", "malformed")], 1)
        self.assertEqual(stats[("<unknown>", "malformed")], 1)
        # problems are logged in the transaction's order, with the EDU's path
        self.assertEqual(
            [line.split("): ", 1)[1] for line in logs if line.startswith("Ignoring malformed")],
            [
                "edus[0].content.user_id: required field missing",
                "edus[2]: expected an object",
            ],
        )
        # registering a one-by-one handler for the type replaces the batch one
        self.receiver.register_edu_handler("m.batch", self.record())
        self.answer(self.send("t2", [{"edu_type": "m.batch", "content": 2}]))
        self.assertEqual(len(calls), 1)
        self.assertEqual(self.seen[-1], (B, 2))

    def test_a_failing_batch_handler_fails_the_transaction(self) -> None:
        def broken(origin: str, contents: Sequence[object]) -> "Deferred[list[EduOutcome]]":
            return fail(RuntimeError("store down"))

        self.receiver.register_edu_batch_handler("m.batch", broken)
        edus = [{"edu_type": "m.batch", "content": {}}, {"edu_type": "m.batch", "content": {}}]
        self.assertEqual(self.answer(self.send("t1", edus))[0], 500)
        self.flushLoggedErrors(RuntimeError)
        self.assertEqual(self.receiver.stats[("m.batch", "failed")], 2)
        self.assertIsNone(self.successResultOf(self.store.get_received_txn(B, "t1")))

    def test_replay_answers_the_stored_response_without_processing(self) -> None:
        self.receiver.register_edu_handler("m.test", self.record())
        first = self.answer(self.send("t1", [{"edu_type": "m.test", "content": {}}], pdus=[{"event_id": "$e"}]))
        again = self.answer(self.send("t1", [{"edu_type": "m.test", "content": {"other": 1}}]))
        self.assertEqual(again, first)
        self.assertEqual(len(self.seen), 1)
        # persisted: a new receiver on the same store knows it too
        receiver = TransactionReceiver(self.store, self.clock)
        receiver.register_edu_handler("m.test", self.record())
        resource = JsonResource(authenticator=self.resource._authenticator)
        receiver.register(resource)
        self.network.remove_server(A)
        self.network.add_server(A, resource)
        self.assertEqual(self.answer(self.send("t1", [])), first)
        self.assertEqual(len(self.seen), 1)
        self.assertEqual(receiver.stats[("transaction", "duplicate")], 1)

    def test_concurrent_copies_are_processed_once(self) -> None:
        gate: Deferred[None] = Deferred()

        async def slow(origin: str, content: object) -> Optional[str]:
            self.seen.append((origin, content))
            await gate
            return None

        self.receiver.register_edu_handler("m.test", slow)
        edus = [{"edu_type": "m.test", "content": {}}]
        first, second = self.send("t1", edus), self.send("t1", edus)
        self.network.flush()
        self.assertNoResult(first)
        self.assertNoResult(second)
        gate.callback(None)
        self.assertEqual(self.answer(first), (200, {"pdus": {}}))
        self.assertEqual(self.answer(second), (200, {"pdus": {}}))
        self.assertEqual(len(self.seen), 1)
        self.assertEqual(self.receiver.stats[("transaction", "concurrent_duplicate")], 1)

    def test_a_failing_handler_fails_the_transaction_and_every_copy(self) -> None:
        gate: Deferred[None] = Deferred()

        async def broken(origin: str, content: object) -> Optional[str]:
            await gate
            raise RuntimeError("store down")

        self.receiver.register_edu_handler("m.test", broken)
        edus = [{"edu_type": "m.test", "content": {}}]
        first, second = self.send("t1", edus), self.send("t1", edus)
        self.network.flush()
        gate.callback(None)
        self.assertEqual(self.answer(first)[0], 500)
        self.assertEqual(self.answer(second)[0], 500)
        # logged once by the receiver, and once per 500 answered by the resource
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 3)
        self.assertIsNone(self.successResultOf(self.store.get_received_txn(B, "t1")))
        self.assertEqual(self.receiver.stats[("m.test", "failed")], 1)
        # the retry is processed afresh
        self.receiver.register_edu_handler("m.test", self.record())
        self.assertEqual(self.answer(self.send("t1", edus)), (200, {"pdus": {}}))
        self.assertEqual(len(self.seen), 1)

    def test_receive_edus_for_hosts_with_their_own_send(self) -> None:
        self.receiver.register_edu_handler("m.test", self.record())
        d = self.receiver.receive_edus(B, [{"edu_type": "m.test", "content": 1}, "junk"])
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.seen, [(B, 1)])
        self.assertEqual(self.receiver.stats[("<unknown>", "malformed")], 1)

        def broken(origin: str, content: object) -> "Deferred[Optional[str]]":
            return fail(RuntimeError("store down"))

        self.receiver.register_edu_handler("m.test", broken)
        d = self.receiver.receive_edus(B, [{"edu_type": "m.test", "content": 1}])
        self.failureResultOf(d, RuntimeError)
        self.flushLoggedErrors(RuntimeError)

    def test_old_transactions_are_pruned_on_a_schedule(self) -> None:
        self.receiver.register_edu_handler("m.test", self.record())
        self.answer(self.send("old", []))
        self.receiver.start()
        self.clock.advance(DEFAULT_TXN_RETENTION - DEFAULT_PRUNE_INTERVAL)  # pruning runs (48 times)
        self.assertIsNotNone(self.successResultOf(self.store.get_received_txn(B, "old")))
        self.answer(self.send("recent", []))
        self.clock.advance(DEFAULT_PRUNE_INTERVAL)  # the pruning loop, 24 h after "old"
        self.assertIsNotNone(self.successResultOf(self.store.get_received_txn(B, "old")))
        self.clock.advance(DEFAULT_PRUNE_INTERVAL)  # the pruning loop: "old" is over 24 h old
        self.assertIsNone(self.successResultOf(self.store.get_received_txn(B, "old")))
        self.assertIsNotNone(self.successResultOf(self.store.get_received_txn(B, "recent")))
        self.receiver.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        # a forgotten transaction is processed again if it comes back
        self.answer(self.send("old", [{"edu_type": "m.test", "content": {}}]))
        self.assertEqual(len(self.seen), 1)

    def test_configuration_is_checked(self) -> None:
        with self.assertRaises(ValueError):
            TransactionReceiver(self.store, self.clock, retention=0)
