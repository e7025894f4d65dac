"""SCENARIOS.md 1-12 (inbound) as multi-server tests: instance A (this
project's inbound side) caches the device lists of the users of S, a scripted
remote server that serves ``/user/devices`` and sends A signed transactions,
over the in-memory network on a simulated clock."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred

from devicelist_plugin.replication.updater import RemoteDeviceListChange
from tests.helpers import FaultKind
from tests.helpers.store import dump_store
from tests.replication.inbound_harness import (
    KEYS_QUERY_PATH,
    InboundCase,
    RemoteDevice,
    fake_cross_signing_key,
    fake_device_keys,
)

U = "@u:s.test"


def names(body: dict[str, Any], user_id: str) -> dict[str, Any]:
    """device id -> unsigned.device_display_name in a /keys/query answer."""
    return {
        device_id: keys.get("unsigned", {}).get("device_display_name")
        for device_id, keys in body["device_keys"].get(user_id, {}).items()
    }


class FirstContactTests(InboundCase):
    """Scenario 1."""

    def test_first_edu_fetches_then_increments_apply_without_fetch(self) -> None:
        self.a.track(U)
        u = self.s.user("u")
        first = u.edu("PHONE", name="phone")
        self.assertEqual(first["content"]["stream_id"], 1)
        self.assertEqual(first["content"]["prev_id"], [])
        self.assertEqual(self.deliver(self.s, [first]), {"pdus": {}})
        # no cache: the EDU made A fetch the whole list
        self.assertEqual(self.fetches(U), 1)
        self.assertEqual(set(self.a.cached_devices(U)), {"PHONE"})
        state = self.a.sync_state(U)
        self.assertEqual((state.snapshot_stream_id, state.stale), (1, False))

        second = u.edu("PHONE", name="new name")
        self.assertEqual(second["content"]["prev_id"], [1])
        self.deliver(self.s, [second])
        self.assertEqual(self.fetches(U), 1)
        self.assertEqual(self.a.cached_devices(U)["PHONE"].display_name, "new name")
        body = self.query(U)
        self.assertEqual(names(body, U), {"PHONE": "new name"})
        self.assertEqual(body["device_keys"][U]["PHONE"]["keys"], fake_device_keys(U, "PHONE")["keys"])
        self.assertEqual(body["failures"], {})
        self.assertEqual(self.fetches(U), 1)
        self.assertEqual(
            self.a.changes,
            [
                RemoteDeviceListChange(U, ("PHONE",), resync=True),
                RemoteDeviceListChange(U, ("PHONE",)),
            ],
        )

    def test_a_batch_of_chained_edus_in_one_transaction(self) -> None:
        self.a.track(U)
        u = self.s.user("u", step=2)  # Synapse's ids step by 2
        self.deliver(self.s, [u.edu("D1")])
        edus = [u.edu("D2"), u.edu("D3", name="three"), u.edu("D1", deleted=True)]
        self.deliver(self.s, edus)
        self.assertEqual(self.fetches(U), 1)
        self.assertEqual(set(self.a.cached_devices(U)), {"D2", "D3"})
        self.assertEqual(self.a.sync_state(U).known_ids, frozenset({4, 6, 8}))


class LostUpdateTests(InboundCase):
    """Scenario 2."""

    def test_gap_resyncs_and_clients_see_the_snapshot(self) -> None:
        self.a.track(U)
        u = self.s.user("u")
        self.deliver(self.s, [u.edu("PHONE", name="phone")])
        self.assertEqual(self.fetches(U), 1)
        u.edu("PHONE", version=2, name="lost")  # stream 2: never delivered
        third = u.edu("LAPTOP", name="laptop")
        self.assertEqual(third["content"]["prev_id"], [2])
        self.deliver(self.s, [third])
        # held for the grace: 2 might still come
        self.assertEqual(self.fetches(U), 1)
        self.assertEqual(set(self.a.cached_devices(U)), {"PHONE"})
        self.network.advance(2)  # A's hold timer (hold_grace, 2 s)
        self.assertEqual(self.fetches(U), 2)
        body = self.query(U)
        self.assertEqual(names(body, U), {"PHONE": "lost", "LAPTOP": "laptop"})
        self.assertEqual(
            body["device_keys"][U]["PHONE"]["keys"], fake_device_keys(U, "PHONE", 2)["keys"]
        )
        state = self.a.sync_state(U)
        self.assertEqual((state.snapshot_stream_id, state.stale), (3, False))
        self.assertEqual(self.a.updater.stats["resync:unknown_prev_id"], 1)

    def test_reordering_within_the_grace_costs_no_fetch(self) -> None:
        self.a.track(U)
        u = self.s.user("u")
        self.deliver(self.s, [u.edu("PHONE")])
        second, third = u.edu("PHONE", name="two"), u.edu("PHONE", name="three")
        self.deliver(self.s, [third])
        self.network.advance(1.5)  # within the hold grace
        self.deliver(self.s, [second])
        self.assertEqual(self.fetches(U), 1)
        self.assertEqual(self.a.cached_devices(U)["PHONE"].display_name, "three")
        self.assertEqual(self.a.sync_state(U).known_ids, frozenset({2, 3}))
        self.assertEqual(self.timers(), [])


class QueryWithoutCacheTests(InboundCase):
    """Scenario 3."""

    def setUp(self) -> None:
        super().setUp()
        u = self.s.user("u")
        u.edu("PHONE", name="phone")
        u.edu("LAPTOP")
        u.master_key = fake_cross_signing_key(U, "master", "M1")

    def test_tracked_user_fetched_once_then_from_cache(self) -> None:
        self.a.track(U)
        body = self.query(U)
        self.assertEqual(set(body["device_keys"][U]), {"PHONE", "LAPTOP"})
        self.assertEqual(names(body, U), {"PHONE": "phone", "LAPTOP": None})
        self.assertEqual(body["master_keys"][U], fake_cross_signing_key(U, "master", "M1"))
        self.assertEqual(body["failures"], {})
        self.assertEqual(self.fetches(U), 1)
        self.assertEqual(self.keys_queries(), 0)
        again = self.query(U)
        self.assertEqual(again, body)
        self.assertEqual(self.fetches(U), 1)

    def test_untracked_user_asked_every_time_never_cached(self) -> None:
        body = self.query(U)
        self.assertEqual(names(body, U), {"PHONE": "phone", "LAPTOP": None})
        self.assertEqual(body["master_keys"][U], fake_cross_signing_key(U, "master", "M1"))
        self.assertEqual(self.keys_queries(), 1)
        self.assertEqual(self.fetches(U), 0)
        self.assertIsNone(self.a.sync_state(U))
        self.assertEqual(self.query(U), body)
        self.assertEqual(self.keys_queries(), 2)

    def test_requested_device_ids_filter_the_answer(self) -> None:
        self.a.track(U)
        d = self.a.inbound.querier.query_keys({U: ["PHONE", "NOPE"]})
        self.network.flush()
        self.assertEqual(set(self.successResultOf(d)["device_keys"][U]), {"PHONE"})

    def test_concurrent_queries_share_one_fetch(self) -> None:
        self.a.track(U)
        v = "@v:s.test"
        self.s.user("v").edu("V1")
        first = self.a.query(U, v)
        second = self.a.query(U, v)
        self.network.flush()
        self.assertEqual(self.successResultOf(first), self.successResultOf(second))
        self.assertEqual(self.fetches(U), 1)  # tracked: one /user/devices
        self.assertEqual(self.keys_queries(), 1)  # untracked: one /user/keys/query


class LeaveAndRejoinTests(InboundCase):
    """Scenario 4."""

    def test_cache_dropped_on_leave_fetched_again_after_rejoin(self) -> None:
        self.a.track(U)
        u = self.s.user("u")
        self.deliver(self.s, [u.edu("PHONE")])
        self.assertEqual(set(self.a.cached_devices(U)), {"PHONE"})
        self.a.untrack(U)
        self.network.flush()
        self.assertEqual(self.a.cached_devices(U), {})
        self.assertIsNone(self.a.sync_state(U))
        # while not sharing a room nothing of the user is kept
        u.edu("TABLET")  # not sent to A: no shared room
        edu = u.edu("WATCH")
        self.deliver(self.s, [edu])
        self.assertEqual(self.a.cached_devices(U), {})
        self.assertEqual(self.a.updater.stats["edu_not_tracked"], 1)
        self.a.track(U)
        body = self.query(U)
        self.assertEqual(set(body["device_keys"][U]), {"PHONE", "TABLET", "WATCH"})
        self.assertEqual(self.fetches(U), 2)


class ServerDownTests(InboundCase):
    """Scenario 5."""

    def setUp(self) -> None:
        super().setUp()
        self.v = "@v:s.test"
        self.s.user("u").edu("PHONE", name="phone")
        self.s.user("v").edu("V1")
        self.a.track(U)
        self.cached = self.query(U)
        self.assertEqual(set(self.cached["device_keys"][U]), {"PHONE"})

    def assert_cached_and_failure(self, status: int) -> dict[str, Any]:
        body = self.query(U)
        self.assertEqual(body, self.cached)  # tracked: the cache, no failure
        both = self.query(U, self.v)
        self.assertEqual(both["device_keys"][U], self.cached["device_keys"][U])
        self.assertNotIn(self.v, both["device_keys"])
        failure: dict[str, Any] = both["failures"]["s.test"]
        self.assertEqual(failure["status"], status)
        self.assertIsInstance(failure["message"], str)
        return failure

    def test_5xx(self) -> None:
        self.s.errors = [502]
        failure = self.assert_cached_and_failure(502)
        self.assertEqual(failure["message"], "s.test answered 502")

    def test_4xx(self) -> None:
        self.s.errors = [403]
        self.assert_cached_and_failure(403)

    def test_connection_refused_then_backing_off(self) -> None:
        self.network.faults.take_down("s.test")
        failure = self.assert_cached_and_failure(503)
        self.assertIn("Failed to reach s.test", failure["message"])
        # the failure started S's backoff: the next query does not even try
        before = self.keys_queries()
        failure = self.assert_cached_and_failure(503)
        self.assertEqual(failure["message"], "Not ready for retry")
        self.assertEqual(self.keys_queries(), before)

    def test_no_answer_times_out(self) -> None:
        self.network.faults.inject(FaultKind.BLACKHOLE, origin="a.test", path_prefix=KEYS_QUERY_PATH)
        d = self.a.query(U, self.v, timeout=5)
        self.network.flush()
        self.assertNoResult(d)
        self.network.advance(5)  # the query's timeout (5 s)
        body = self.successResultOf(d)
        self.assertEqual(body["device_keys"][U], self.cached["device_keys"][U])
        self.assertEqual(
            body["failures"]["s.test"], {"status": 504, "message": "Timed out waiting for s.test"}
        )
        # the request itself goes on until its own deadline, then S backs off
        self.network.advance(5)  # the request's deadline (10 s)
        self.assertEqual(self.attempts("s.test"), 1)
        self.assertEqual(self.timers(), [])


class ResyncFailsTests(InboundCase):
    """Scenario 6 (and the restart with stale users pending)."""

    def test_stale_survives_restart_and_retries_at_exact_times(self) -> None:
        self.a.track(U)
        u = self.s.user("u")
        self.network.faults.take_down("s.test")
        # S is down for A's requests; deliver the EDU from S anyway by
        # queueing it through the host API (as if S's transaction got in
        # just before it went down)
        d = self.a.receiver.receive_edus("s.test", [u.edu("PHONE")])
        self.network.flush()
        self.successResultOf(d)
        self.assertEqual(self.fetches(U), 1)  # first attempt, refused
        self.assertTrue(self.a.sync_state(U).stale)
        t0 = self.clock.seconds()
        self.assertEqual([c.getTime() - t0 for c in self.timers()], [60.0])
        self.network.advance(60)  # S's backoff timer (60 s): second attempt
        self.assertEqual(self.fetches(U), 2)
        self.network.advance(119)  # just before the next backoff timer (120 s)
        self.assertEqual(self.fetches(U), 2)

        a = self.restart_a()
        self.network.flush()
        self.assertTrue(a.sync_state(U).stale)
        self.assertEqual(self.fetches(U), 2)  # the restart respects the backoff
        self.network.advance(1)  # S's backoff timer, 120 s after the second attempt
        self.assertEqual(self.fetches(U), 3)
        self.network.faults.bring_up("s.test")
        self.network.advance(239)  # before the third backoff timer (240 s)
        self.assertEqual(self.fetches(U), 3)
        self.network.advance(1)  # S's backoff timer (240 s): succeeds
        self.assertEqual(self.fetches(U), 4)
        self.assertFalse(a.sync_state(U).stale)
        self.assertEqual(set(a.cached_devices(U)), {"PHONE"})
        self.assertIsNone(self.successResultOf(a.store.get_retry_state("s.test")))
        self.assertEqual(self.timers(), [])


class EdusDuringResyncTests(InboundCase):
    """Scenario 7."""

    def test_edus_covered_by_the_snapshot_cost_no_second_fetch(self) -> None:
        self.a.track(U)
        u = self.s.user("u")
        gate: Deferred[None] = Deferred()
        self.s.gate = gate
        self.deliver(self.s, [u.edu("D1")])
        self.assertEqual(self.fetches(U), 1)  # in flight, held by the gate
        # two more changes reach A while the fetch is pending; the snapshot
        # (taken when the gate opens) holds them
        self.deliver(self.s, [u.edu("D2"), u.edu("D3")])
        gate.callback(None)
        self.s.gate = None
        self.network.flush()
        self.assertEqual(self.fetches(U), 1)
        self.assertEqual(set(self.a.cached_devices(U)), {"D1", "D2", "D3"})
        self.assertEqual(self.a.updater.stats["skip:covered_by_snapshot"], 2)
        self.assertEqual(
            self.successResultOf(self.a.store.get_remote_inbox(U)), []
        )

    def test_edus_after_the_snapshot_are_applied_not_refetched(self) -> None:
        self.a.track(U)
        u = self.s.user("u")
        gate: Deferred[None] = Deferred()
        self.s.gate = gate
        self.deliver(self.s, [u.edu("D1")])
        # the snapshot will be taken at stream 1; D2 (2, prev [1]) happens
        # after it but arrives while the fetch is in flight
        snapshot_at_1 = u.snapshot()
        self.s.answer_override = lambda user_id, body: snapshot_at_1
        self.deliver(self.s, [u.edu("D2", name="two")])
        gate.callback(None)
        self.network.flush()
        self.assertEqual(self.fetches(U), 1)
        self.assertEqual(self.a.cached_devices(U)["D2"].display_name, "two")
        self.assertEqual(self.a.sync_state(U).known_ids, frozenset({2}))
        self.assertEqual(self.a.updater.stats["apply:prev_known"], 1)


class DuplicateTests(InboundCase):
    """Scenario 8."""

    def test_same_edu_twice_and_same_transaction_twice_change_nothing(self) -> None:
        self.a.track(U)
        u = self.s.user("u")
        self.deliver(self.s, [u.edu("PHONE")])
        edu = u.edu("PHONE", name="x")
        first = self.deliver(self.s, [edu], txn_id="t-1")
        self.assertEqual(self.a.cached_devices(U)["PHONE"].display_name, "x")
        changes = list(self.a.changes)
        before = dump_store(self, self.a.store)
        # the same EDU in another transaction
        self.assertEqual(self.deliver(self.s, [edu], txn_id="t-2"), {"pdus": {}})
        # the same transaction id again, even with other content: the stored answer
        again = self.deliver(self.s, [u.edu("PHONE", name="ignored")], txn_id="t-1")
        self.assertEqual(again, first)
        after = dump_store(self, self.a.store)
        after["received_transactions"] = [
            r for r in after["received_transactions"] if r[1] != "t-2"
        ]
        self.assertEqual(after, before)
        self.assertEqual(self.a.changes, changes)
        self.assertEqual(self.a.updater.stats["skip:duplicate"], 1)
        self.assertEqual(self.a.receiver.stats[("transaction", "duplicate")], 1)
        self.assertEqual(self.fetches(U), 1)


class DeletedDeviceTests(InboundCase):
    """Scenario 9."""

    def test_deleted_device_disappears_and_its_id_counts_as_known(self) -> None:
        self.a.track(U)
        u = self.s.user("u")
        self.deliver(self.s, [u.edu("PHONE"), u.edu("LAPTOP")])
        self.deliver(self.s, [u.edu("LAPTOP", deleted=True)])
        self.assertEqual(set(self.a.cached_devices(U)), {"PHONE"})
        self.assertNotIn("LAPTOP", self.query(U)["device_keys"][U])
        # the next EDU names the deletion as prev_id: applied without a fetch
        later = u.edu("PHONE", name="later")
        self.assertEqual(later["content"]["prev_id"], [u.stream_id - 1])
        self.deliver(self.s, [later])
        self.assertEqual(self.fetches(U), 1)
        self.assertEqual(self.a.cached_devices(U)["PHONE"].display_name, "later")


class CrossSigningTests(InboundCase):
    """Scenario 10."""

    def test_keys_from_snapshot_and_edus_stored_and_never_devices(self) -> None:
        self.a.track(U)
        u = self.s.user("u")
        u.master_key = fake_cross_signing_key(U, "master", "M1")
        u.self_signing_key = fake_cross_signing_key(U, "self_signing", "S1")
        self.deliver(self.s, [u.edu("PHONE")])
        body = self.query(U)
        self.assertEqual(set(body["device_keys"][U]), {"PHONE"})
        self.assertEqual(body["master_keys"][U], u.master_key)
        self.assertEqual(body["self_signing_keys"][U], u.self_signing_key)
        self.assertEqual(set(self.a.cached_devices(U)), {"PHONE"})

        master2 = fake_cross_signing_key(U, "master", "M2")
        ssk2 = fake_cross_signing_key(U, "self_signing", "S2")
        self.deliver(
            self.s,
            [
                {"edu_type": "m.signing_key_update", "content": {"user_id": U, "master_key": master2}},
                {
                    "edu_type": "org.matrix.signing_key_update",
                    "content": {"user_id": U, "self_signing_key": ssk2},
                },
            ],
        )
        body = self.query(U)
        self.assertEqual(body["master_keys"][U], master2)
        self.assertEqual(body["self_signing_keys"][U], ssk2)
        self.assertEqual(set(body["device_keys"][U]), {"PHONE"})
        self.assertEqual(self.fetches(U), 1)
        self.assertEqual(
            self.a.changes[-2:],
            [RemoteDeviceListChange(U, (), cross_signing=True)] * 2,
        )

    def test_signing_key_update_during_a_resync_survives_the_older_snapshot(self) -> None:
        self.a.track(U)
        u = self.s.user("u")
        u.master_key = fake_cross_signing_key(U, "master", "OLD")
        gate: Deferred[None] = Deferred()
        self.s.gate = gate
        self.deliver(self.s, [u.edu("PHONE")])
        old_snapshot = u.snapshot()
        self.s.answer_override = lambda user_id, body: old_snapshot
        u.master_key = fake_cross_signing_key(U, "master", "NEW")
        self.deliver(
            self.s,
            [{"edu_type": "m.signing_key_update", "content": {"user_id": U, "master_key": u.master_key}}],
        )
        gate.callback(None)
        self.network.flush()
        self.assertEqual(self.query(U)["master_keys"][U], u.master_key)

    def test_invalid_signing_key_update_is_ignored(self) -> None:
        self.a.track(U)
        bad = fake_cross_signing_key(U, "self_signing", "X")  # not a master key
        self.deliver(
            self.s, [{"edu_type": "m.signing_key_update", "content": {"user_id": U, "master_key": bad}}]
        )
        self.assertEqual(self.successResultOf(self.a.store.get_remote_cross_signing_keys(U)), {})
        self.assertEqual(self.a.receiver.stats[("m.signing_key_update", "malformed")], 1)


class ForgedOriginTests(InboundCase):
    """Scenario 11."""

    def test_edu_for_another_servers_user_is_ignored_and_counted(self) -> None:
        self.a.track(U)
        u = self.s.user("u")
        self.deliver(self.s, [u.edu("PHONE")])
        forged = u.edu("EVIL", name="evil")
        master = fake_cross_signing_key(U, "master", "EVIL")
        response = self.deliver(
            self.t,
            [forged, {"edu_type": "m.signing_key_update", "content": {"user_id": U, "master_key": master}}],
        )
        self.assertEqual(response, {"pdus": {}})
        self.assertEqual(set(self.a.cached_devices(U)), {"PHONE"})
        self.assertEqual(self.successResultOf(self.a.store.get_remote_cross_signing_keys(U)), {})
        self.assertEqual(self.a.updater.stats["edu_wrong_origin"], 2)
        self.assertEqual(self.a.receiver.stats[("m.device_list_update", "wrong_origin")], 1)
        self.assertEqual(self.a.receiver.stats[("m.signing_key_update", "wrong_origin")], 1)
        self.assertEqual(self.successResultOf(self.a.store.get_remote_inbox(U)), [])


class BigUserTests(InboundCase):
    """Scenario 12."""

    def test_ten_thousand_devices_without_blocking_other_users(self) -> None:
        big, small = "@bot:s.test", U
        self.a.track(big)
        self.a.track(small)
        bot = self.s.user("bot")
        for n in range(10_000):
            bot.devices[f"D{n:05d}"] = RemoteDevice(name=f"bot {n}")
        bot.stream_id = 10_000
        u = self.s.user("u")
        self.deliver(self.s, [u.edu("PHONE")])
        gate: Deferred[None] = Deferred()
        self.s.gate = gate
        self.deliver(self.s, [bot.edu("D10000")])
        self.assertEqual(self.fetches(big), 1)  # the big fetch is in flight
        # meanwhile the other user's updates are applied at once
        self.deliver(self.s, [u.edu("PHONE", name="still served")])
        self.assertEqual(self.a.cached_devices(small)["PHONE"].display_name, "still served")
        gate.callback(None)
        self.s.gate = None
        self.network.flush()
        self.assertEqual(len(self.a.cached_devices(big)), 10_001)
        self.assertFalse(self.a.sync_state(big).stale)
        body = self.query(big)
        self.assertEqual(len(body["device_keys"][big]), 10_001)
        self.assertEqual(self.fetches(big), 1)
        self.assertEqual(self.a.changes[-1].user_id, big)
        self.assertEqual(len(self.a.changes[-1].device_ids), 10_001)
