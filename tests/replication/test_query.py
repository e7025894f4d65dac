"""Key queries beyond the scenarios: validation of remote answers, local
users, failures and timeouts, shared fetches and the per-destination limit."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred

from devicelist_plugin.replication.query import RemoteKeyQuerier
from tests.local.keys import ClientDevice
from tests.replication.inbound_harness import (
    ALICE,
    S,
    InboundCase,
    capture_logs,
    fake_cross_signing_key,
    fake_device_keys,
)

U = "@u:s.test"


class UntrackedAnswerTests(InboundCase):
    def test_remote_answer_is_validated(self) -> None:
        logs = capture_logs(self)
        u = self.s.user("u")
        u.edu("GOOD", name="good")
        u.master_key = fake_cross_signing_key(U, "self_signing", "WRONG")  # wrong usage
        u.self_signing_key = fake_cross_signing_key(U, "self_signing", "S1")

        def tampered(body: dict[str, Any]) -> dict[str, Any]:
            body["device_keys"][U]["OTHER"] = fake_device_keys(U, "NOT_OTHER")
            body["device_keys"][U]["BROKEN"] = {"user_id": U}
            body["device_keys"]["@stranger:s.test"] = {"X": fake_device_keys("@stranger:s.test", "X")}
            return body

        self.s.keys_query_override = tampered
        body = self.query(U)
        self.assertEqual(set(body["device_keys"][U]), {"GOOD"})
        self.assertEqual(body["device_keys"][U]["GOOD"]["unsigned"], {"device_display_name": "good"})
        self.assertNotIn("@stranger:s.test", body["device_keys"])
        self.assertNotIn(U, body["master_keys"])
        self.assertEqual(body["self_signing_keys"][U], u.self_signing_key)
        self.assertEqual(body["failures"], {})
        lines = [line for line in logs if line.startswith("Skipping")]
        self.assertEqual(len(lines), 3, lines)
        self.assertIn(
            "Skipping keys from s.test's key query answer: device_keys['@u:s.test']['OTHER']"
            ".device_id: expected 'OTHER', got 'NOT_OTHER'",
            lines,
        )

    def test_shared_fetch_survives_one_callers_timeout(self) -> None:
        self.s.user("u").edu("D1")
        gate: Deferred[None] = Deferred()
        self.s.gate = gate
        impatient = self.a.query(U, timeout=1)
        patient = self.a.query(U, timeout=10)
        self.network.flush()
        self.network.advance(1)  # the impatient query's timeout (1 s)
        self.assertEqual(
            self.successResultOf(impatient)["failures"],
            {S: {"status": 504, "message": "Timed out waiting for s.test"}},
        )
        self.assertNoResult(patient)
        self.s.gate = None
        gate.callback(None)
        self.network.flush()
        self.assertEqual(set(self.successResultOf(patient)["device_keys"][U]), {"D1"})
        self.assertEqual(self.keys_queries(), 1)

    def test_requests_per_destination_are_limited(self) -> None:
        users = [f"@u{n}:s.test" for n in range(8)]
        for n in range(8):
            self.s.user(f"u{n}").edu("D1")
        gate: Deferred[None] = Deferred()
        self.s.gate = gate
        queries = [self.a.query(u) for u in users]
        self.network.flush()
        self.assertEqual(self.keys_queries(), 5)
        self.assertEqual(self.a.inbound.limiter.in_flight(S), 5)
        self.s.gate = None
        gate.callback(None)
        self.network.flush()
        self.assertEqual(self.keys_queries(), 8)
        for user_id, d in zip(users, queries):
            self.assertEqual(set(self.successResultOf(d)["device_keys"][user_id]), {"D1"})
        self.assertEqual(self.a.inbound.limiter.in_flight(S), 0)


class TrackedFailureTests(InboundCase):
    def test_stale_user_with_a_cache_gets_it_and_a_failure(self) -> None:
        self.a.track(U)
        u = self.s.user("u")
        self.deliver(self.s, [u.edu("D1")])
        self.successResultOf(self.a.store.mark_remote_stale(U, "test", 0))
        self.s.errors = [500]
        body = self.query(U)
        self.assertEqual(set(body["device_keys"][U]), {"D1"})
        self.assertEqual(body["failures"], {S: {"status": 500, "message": "s.test answered 500"}})

    def test_user_backing_off_is_not_fetched_for_a_query(self) -> None:
        self.a.track(U)
        self.s.user("u").edu("D1")
        self.s.errors = [404]
        body = self.query(U)
        self.assertEqual(body["failures"][S]["status"], 404)
        self.assertEqual(body["device_keys"], {})
        body = self.query(U)
        self.assertEqual(
            body["failures"][S],
            {"status": 503, "message": "Resync of @u:s.test is backing off after an error"},
        )
        self.assertEqual(self.fetches(U), 1)

    def test_slow_resync_answers_after_the_timeout_and_still_caches(self) -> None:
        self.a.track(U)
        self.s.user("u").edu("D1")
        gate: Deferred[None] = Deferred()
        self.s.gate = gate
        d = self.a.query(U, timeout=3)
        self.network.flush()
        self.network.advance(3)  # the query's timeout (3 s)
        body = self.successResultOf(d)
        self.assertEqual(body["device_keys"], {})
        self.assertEqual(body["failures"][S]["status"], 504)
        self.s.gate = None
        gate.callback(None)
        self.network.flush()
        self.assertEqual(set(self.a.cached_devices(U)), {"D1"})
        self.assertEqual(set(self.query(U)["device_keys"][U]), {"D1"})
        self.assertEqual(self.fetches(U), 1)


class LocalUserTests(InboundCase):
    def test_local_and_remote_users_in_one_query(self) -> None:
        phone = ClientDevice(ALICE, "PHONE")
        self.successResultOf(self.a.local.create_device(ALICE, "PHONE", "alice's phone"))
        self.successResultOf(self.a.local.upload_device_keys(ALICE, "PHONE", phone.device_keys()))
        self.s.user("u").edu("D1")
        d = self.a.inbound.querier.query_keys({ALICE: [], U: []}, requesting_user_id=ALICE)
        self.network.flush()
        body = self.successResultOf(d)
        self.assertEqual(set(body["device_keys"]), {ALICE, U})
        self.assertEqual(
            body["device_keys"][ALICE]["PHONE"]["unsigned"], {"device_display_name": "alice's phone"}
        )
        self.assertIn("user_signing_keys", body)
        self.assertEqual(body["failures"], {})

    def test_bad_input(self) -> None:
        querier = RemoteKeyQuerier(
            "a.test",
            self.a.store,
            self.a.transport.client,
            self.clock,
            self.a.membership,
            self.a.updater,
            self.a.tracker,
        )
        self.failureResultOf(querier.query_keys({ALICE: []}), ValueError)
        self.failureResultOf(querier.query_keys({"not a user": []}), ValueError)
