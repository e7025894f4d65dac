"""The updater beyond the scenarios: races, restarts, retries at scale,
validation of resync answers, clustered senders, storage failures, stop."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed

from devicelist_plugin.federation.client import HttpResponseError
from devicelist_plugin.replication.inbound import InboundConfig
from devicelist_plugin.replication.updater import RemoteDeviceListChange, UpdaterConfig
from tests.helpers import FaultKind
from tests.replication.inbound_harness import (
    DEVICES_PREFIX,
    S,
    USER_POLICY,
    InboundCase,
    capture_logs,
    RemoteDevice,
)

U = "@u:s.test"
V = "@v:s.test"


class EveryoneTracked:
    """A membership source tracking every remote user (10,000 users without
    10,000 rooms)."""

    def __init__(self) -> None:
        self.untracked: set[str] = set()

    def servers_sharing_room(self, user_id: str) -> "Deferred[frozenset[str]]":
        return succeed(frozenset())

    def is_tracked(self, remote_user_id: str) -> "Deferred[bool]":
        return succeed(remote_user_id not in self.untracked)

    def add_listener(self, listener: Any) -> None:
        pass


class RaceTests(InboundCase):
    def test_resync_finishing_after_a_newer_stale_mark_keeps_the_user_stale(self) -> None:
        self.a.track(U)
        u = self.s.user("u")
        gate: Deferred[None] = Deferred()
        self.s.gate = gate
        self.deliver(self.s, [u.edu("D1")])
        self.assertEqual(self.fetches(U), 1)
        # while the fetch runs, another worker notices a gap (Synapse #9866)
        generation = self.successResultOf(
            self.a.store.mark_remote_stale(U, "gap seen by another worker", 0)
        )
        self.assertEqual(generation, 2)
        self.s.gate = None
        gate.callback(None)
        self.network.flush()
        # the first answer did not clear the newer mark: fetched again at once
        self.assertEqual(self.fetches(U), 2)
        state = self.a.sync_state(U)
        self.assertFalse(state.stale)
        self.assertEqual(state.cleared_generation, 2)
        self.assertEqual(self.a.updater.stats["resync_done"], 2)

    def test_gap_after_the_snapshot_found_during_the_fetch_resyncs_again(self) -> None:
        self.a.track(U)
        u = self.s.user("u")
        gate: Deferred[None] = Deferred()
        self.s.gate = gate
        self.deliver(self.s, [u.edu("D1")])
        at_1 = u.snapshot()
        self.s.answer_override = lambda user_id, body: at_1
        u.edu("D2")  # lost
        self.deliver(self.s, [u.edu("D3")])  # prev_id [2]: unknown to the snapshot at 1
        self.s.gate = None
        gate.callback(None)
        self.network.flush()
        self.assertEqual(self.fetches(U), 1)
        self.assertEqual(set(self.a.cached_devices(U)), {"D1"})
        self.s.answer_override = None
        self.network.advance(2)  # A's hold timer (2 s after D3 was queued)
        self.assertEqual(self.fetches(U), 2)
        self.assertEqual(set(self.a.cached_devices(U)), {"D1", "D2", "D3"})

    def test_untracked_during_a_fetch_cancels_it_and_stores_nothing(self) -> None:
        self.a.track(U)
        u = self.s.user("u")
        gate: Deferred[None] = Deferred()
        self.s.gate = gate
        self.deliver(self.s, [u.edu("D1")])
        self.a.untrack(U)
        self.network.flush()
        self.s.gate = None
        gate.callback(None)
        self.network.flush()
        self.assertIsNone(self.a.sync_state(U))
        self.assertEqual(self.a.cached_devices(U), {})
        self.assertEqual(self.a.updater.stats["resync_cancelled"], 1)
        self.assertEqual(self.timers(), [])

    def test_clustered_sender_out_of_order_never_goes_back(self) -> None:
        self.a.track(U)
        u = self.s.user("u")
        self.deliver(self.s, [u.edu("D1"), u.edu("D2")])  # snapshot at stream 2
        # two writers changed D1 concurrently: 4 and 3, both chained from 2
        later = {"edu_type": "m.device_list_update", "content": {
            "user_id": U, "device_id": "D1", "stream_id": 4, "prev_id": [2],
            "device_display_name": "four"}}
        earlier = {"edu_type": "m.device_list_update", "content": {
            "user_id": U, "device_id": "D1", "stream_id": 3, "prev_id": [2],
            "device_display_name": "three"}}
        self.deliver(self.s, [later])
        self.deliver(self.s, [earlier])
        self.assertEqual(self.a.cached_devices(U)["D1"].display_name, "four")
        self.assertEqual(self.a.sync_state(U).known_ids, frozenset({3, 4}))
        # a deletion at 6 and a late update of the same device at 5
        deletion = {"edu_type": "m.device_list_update", "content": {
            "user_id": U, "device_id": "D2", "stream_id": 6, "prev_id": [4], "deleted": True}}
        late = {"edu_type": "m.device_list_update", "content": {
            "user_id": U, "device_id": "D2", "stream_id": 5, "prev_id": [3],
            "device_display_name": "zombie"}}
        self.deliver(self.s, [deletion])
        self.deliver(self.s, [late])
        self.assertNotIn("D2", self.a.cached_devices(U))
        self.assertEqual(self.fetches(U), 1)
        self.assertEqual(
            [c.device_ids for c in self.a.changes if not c.resync], [("D1",), ("D2",)]
        )


class RestartTests(InboundCase):
    def test_held_edu_survives_a_restart_and_its_grace_runs_on(self) -> None:
        self.a.track(U)
        u = self.s.user("u")
        self.deliver(self.s, [u.edu("D1")])
        u.edu("D2")  # lost
        self.deliver(self.s, [u.edu("D3")])  # held: prev_id [2] unknown
        self.assertEqual(len(self.successResultOf(self.a.store.get_remote_inbox(U))), 1)
        self.network.advance(1)  # (nothing fires: 1 s of the 2 s grace)
        a = self.restart_a()
        self.network.flush()
        self.assertEqual(self.fetches(U), 1)  # still held
        self.network.advance(1)  # the new A's hold timer: 2 s after D3 was queued
        self.assertEqual(self.fetches(U), 2)
        self.assertEqual(set(a.cached_devices(U)), {"D1", "D2", "D3"})
        self.assertEqual(self.successResultOf(a.store.get_remote_inbox(U)), [])

    def test_per_user_backoff_survives_a_restart(self) -> None:
        self.a.track(U)
        self.s.user("u").edu("D1")
        self.s.errors = [404]
        self.deliver(self.s, [self.s.user("u").edu("D2")])
        self.assertEqual(self.fetches(U), 1)
        state = self.a.sync_state(U)
        self.assertEqual((state.stale, state.resync_attempts), (True, 1))
        self.assertEqual(state.resync_retry_ts, int((self.clock.seconds() + 300) * 1000))
        self.network.advance(200)  # (nothing fires)
        a = self.restart_a()
        self.network.flush()
        self.assertEqual(self.fetches(U), 1)
        self.network.advance(100)  # the new A's per-user timer (300 s after the 404)
        self.assertEqual(self.fetches(U), 2)
        self.assertFalse(a.sync_state(U).stale)
        self.assertEqual(a.sync_state(U).resync_attempts, 0)


class ManyStaleUsersTests(InboundCase):
    def test_ten_thousand_stale_users_on_a_dead_server_cost_one_probe_per_period(self) -> None:
        everyone = EveryoneTracked()
        users = [f"@u{n:05d}:s.test" for n in range(10_000)]

        def mark_all(t: Any) -> None:
            t.executemany(
                "INSERT INTO remote_sync_state (user_id, stale_generation, stale_since_ts)"
                " VALUES (?, 1, ?)",
                [(user_id, n) for n, user_id in enumerate(users)],
            )

        self.successResultOf(self.a.store.database.run("mark", mark_all))
        self.network.faults.take_down(S)
        a = self.restart_a(membership=everyone)
        self.network.flush()
        self.assertEqual(self.fetches(), 1)  # one probe at start-up
        self.network.advance(60)  # S's backoff timer (60 s)
        self.assertEqual(self.fetches(), 2)
        self.network.advance(120)  # S's backoff timer (120 s)
        self.assertEqual(self.fetches(), 3)
        self.network.advance(240)  # S's backoff timer (240 s)
        self.assertEqual(self.fetches(), 4)
        # one timer for the whole server
        self.assertEqual(len(self.timers()), 1)
        self.assertEqual(self.attempts(S), 4)
        self.assertEqual(len(self.successResultOf(a.store.list_stale_remote_users())), 10_000)
        # every probe asked for another user
        probed = [r.path for r in self.network.requests(origin="a.test", path_prefix=DEVICES_PREFIX)]
        self.assertEqual(len(set(probed)), 4)

    def test_recovered_server_resyncs_its_stale_users_five_at_a_time(self) -> None:
        everyone = EveryoneTracked()
        self.a.updater._membership = everyone
        for n in range(12):
            self.s.user(f"u{n}").edu("D1")
        self.network.faults.take_down(S)
        for n in range(12):
            d = self.a.updater.request_resync(f"@u{n}:s.test")
            self.network.flush()
            self.successResultOf(d)
        self.assertEqual(self.fetches(), 1)  # one probe, then S backs off
        self.network.faults.bring_up(S)
        gate: Deferred[None] = Deferred()
        self.s.gate = gate
        self.network.advance(60)  # S's backoff timer (60 s): the probe goes
        self.assertEqual(self.fetches(), 2)  # ... alone
        gate.callback(None)
        gate = Deferred()
        self.s.gate = gate
        self.network.flush()
        # the probe succeeded: now five at a time
        self.assertEqual(self.fetches(), 7)
        self.assertEqual(self.a.inbound.limiter.in_flight(S), 5)
        self.s.gate = None
        gate.callback(None)
        self.network.flush()
        self.assertEqual(self.fetches(), 13)
        self.assertEqual(self.successResultOf(self.a.store.list_stale_remote_users()), [])

    def test_a_server_that_contacts_us_is_retried_at_once(self) -> None:
        self.a.track(U)
        u = self.s.user("u")
        self.network.faults.inject(
            FaultKind.REFUSE, origin="a.test", destination=S, path_prefix=DEVICES_PREFIX
        )
        self.deliver(self.s, [u.edu("D1")])
        self.assertEqual(self.fetches(U), 1)
        self.assertIsNotNone(self.successResultOf(self.a.store.get_retry_state(S)))
        # S sends us something else, well before its backoff ends
        self.network.advance(5)  # (nothing fires)
        self.deliver(self.s, [])
        self.assertEqual(self.fetches(U), 2)
        self.assertFalse(self.a.sync_state(U).stale)
        self.assertEqual(self.a.updater.stats["server_woken"], 1)
        self.assertEqual(self.timers(), [])


class ResyncAnswerTests(InboundCase):
    def test_user_error_backs_off_that_user_only(self) -> None:
        self.a.track(U)
        self.a.track(V)
        u, v = self.s.user("u"), self.s.user("v")
        self.s.errors = [404]
        self.deliver(self.s, [u.edu("D1")])
        self.deliver(self.s, [v.edu("D1")])
        # U's 404 did not make S back off: V resynced at once
        self.assertIsNone(self.successResultOf(self.a.store.get_retry_state(S)))
        self.assertFalse(self.a.sync_state(V).stale)
        self.assertTrue(self.a.sync_state(U).stale)
        self.assertEqual(self.a.updater.stats["resync_user_failed"], 1)
        self.s.errors = [404]
        self.network.advance(300)  # U's per-user timer (300 s)
        self.assertEqual(self.fetches(U), 2)
        self.network.advance(599)  # (nothing fires: 600 s for the second)
        self.assertEqual(self.fetches(U), 2)
        self.network.advance(1)  # U's per-user timer (600 s)
        self.assertEqual(self.fetches(U), 3)
        self.assertFalse(self.a.sync_state(U).stale)
        self.assertEqual(self.timers(), [])

    def test_more_devices_than_the_cap_are_refused_with_a_clear_log(self) -> None:
        self.a.stop()
        self.a = self.make_a(
            config=InboundConfig(
                updater=UpdaterConfig(max_devices_per_user=3, user_backoff=USER_POLICY)
            )
        )
        logs = capture_logs(self)
        self.a.track(U)
        u = self.s.user("u")
        for n in range(4):
            u.devices[f"D{n}"] = RemoteDevice()
        self.deliver(self.s, [u.edu("D4")])
        self.assertEqual(self.a.cached_devices(U), {})
        self.assertTrue(self.a.sync_state(U).stale)
        self.assertEqual(self.a.sync_state(U).resync_attempts, 1)
        self.assertIn(
            "Refusing the device list of @u:s.test from s.test: 5 devices, over"
            " max_devices_per_user (3); the cached list is kept and the user stays stale",
            list(logs),
        )
        self.assertEqual(self.a.updater.stats["resync_over_device_cap"], 1)

    def test_answer_for_another_user_is_rejected(self) -> None:
        logs = capture_logs(self)
        self.a.track(U)
        u = self.s.user("u")
        self.s.answer_override = lambda user_id, body: {**body, "user_id": "@other:s.test"}
        self.deliver(self.s, [u.edu("D1")])
        self.assertEqual(self.a.cached_devices(U), {})
        self.assertTrue(self.a.sync_state(U).stale)
        self.assertTrue(
            any(
                line.startswith("Rejecting the /user/devices answer for @u:s.test from s.test:"
                                " user_id: expected '@u:s.test'")
                for line in logs
            ),
            list(logs),
        )

    def test_malformed_devices_are_skipped_and_logged_with_their_path(self) -> None:
        logs = capture_logs(self)
        self.a.track(U)
        u = self.s.user("u")
        u.edu("GOOD")

        def damage(user_id: str, body: dict[str, Any]) -> dict[str, Any]:
            bad_keys = {"device_id": "BAD", "keys": {"user_id": U, "device_id": "BAD"}}
            return {**body, "devices": body["devices"] + [bad_keys, {"device_id": 7}]}

        self.s.answer_override = damage
        self.deliver(self.s, [u.edu("ALSO")])
        self.assertEqual(set(self.a.cached_devices(U)), {"GOOD", "ALSO"})
        self.assertFalse(self.a.sync_state(U).stale)
        lines = list(logs)
        self.assertIn(
            "Skipping part of the device list of @u:s.test from s.test:"
            " devices[2].keys.algorithms: required field missing",
            lines,
        )
        self.assertIn(
            "Skipping part of the device list of @u:s.test from s.test:"
            " devices[3].device_id: expected a string, got an integer",
            lines,
        )

    def test_null_cross_signing_keys_are_tolerated(self) -> None:
        self.a.track(U)
        u = self.s.user("u")
        self.s.answer_override = lambda user_id, body: {**body, "master_key": None}
        self.deliver(self.s, [u.edu("D1")])
        self.assertFalse(self.a.sync_state(U).stale)
        self.assertEqual(set(self.a.cached_devices(U)), {"D1"})

    def test_resync_timeout_is_thirty_seconds(self) -> None:
        self.a.track(U)
        self.network.faults.inject(FaultKind.BLACKHOLE, origin="a.test", path_prefix=DEVICES_PREFIX)
        self.deliver(self.s, [self.s.user("u").edu("D1")])
        self.network.advance(29)  # (nothing fires)
        self.assertEqual(self.a.updater.stats["resync_server_failed"], 0)
        self.network.advance(1)  # A's client deadline (30 s)
        self.assertEqual(self.a.updater.stats["resync_server_failed"], 1)
        self.assertEqual(self.attempts(S), 1)


class StorageFailureTests(InboundCase):
    def test_edu_not_stored_means_500_and_the_retry_is_applied(self) -> None:
        self.a.track(U)
        u = self.s.user("u")
        store = self.a.store
        calls: list[str] = []

        def failing_once(name: str) -> None:
            original = getattr(store, name)

            def failing(*args: Any) -> Any:
                calls.append(name)
                if calls.count(name) == 1:
                    return fail(RuntimeError("disk full"))
                return original(*args)

            setattr(store, name, failing)

        # neither applying nor, then, queueing works
        failing_once("apply_remote_batches")
        failing_once("queue_remote_updates")
        edu = u.edu("D1")
        d = self.s.send([edu], txn_id="t1")
        self.network.flush()
        error = self.failureResultOf(d, HttpResponseError).value
        self.assertEqual(error.code, 500)
        self.assertIsNone(self.successResultOf(self.a.store.get_received_txn(S, "t1")))
        self.assertEqual(self.a.receiver.stats[("m.device_list_update", "failed")], 1)
        self.flushLoggedErrors(RuntimeError)
        # the sender retries the same transaction
        self.assertEqual(self.deliver(self.s, [edu], txn_id="t1"), {"pdus": {}})
        self.assertEqual(set(self.a.cached_devices(U)), {"D1"})

    def test_a_failed_pass_is_retried_later(self) -> None:
        self.a.track(U)
        u = self.s.user("u")
        self.deliver(self.s, [u.edu("D1")])
        original = self.a.store.apply_remote_batches
        self.a.store.apply_remote_batches = (  # type: ignore[method-assign]
            lambda *args: fail(RuntimeError("database gone"))
        )
        self.deliver(self.s, [u.edu("D1", name="x")])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertIsNone(self.a.cached_devices(U)["D1"].display_name)
        self.a.store.apply_remote_batches = original  # type: ignore[method-assign]
        self.network.advance(10)  # A's retry after a storage error (10 s)
        self.assertEqual(self.a.cached_devices(U)["D1"].display_name, "x")


class StopTests(InboundCase):
    def test_no_delayed_calls_left_after_stop(self) -> None:
        self.a.track(U)
        self.a.track(V)
        self.a.track("@w:s.test")
        u, v, w = self.s.user("u"), self.s.user("v"), self.s.user("w")
        self.deliver(self.s, [u.edu("D1"), v.edu("D1")])
        u.edu("D2")
        self.deliver(self.s, [u.edu("D3")])  # held: a hold timer
        self.s.errors = [404]
        self.deliver(self.s, [w.edu("D1")])  # a per-user backoff timer
        self.s.gate = Deferred()
        self.a.updater.request_resync("@x:s.test")  # a fetch in flight (with its deadline)
        self.network.flush()
        self.assertTrue(self.timers())
        self.a.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class HostApiTests(InboundCase):
    def test_host_hands_edus_in_and_hears_of_changes(self) -> None:
        self.a.track(U)
        u = self.s.user("u")
        heard: list[RemoteDeviceListChange] = []
        self.a.updater.add_listener(heard.append)
        d = self.a.receiver.receive_edus(S, [u.edu("D1"), {"edu_type": "m.typing", "content": {}}])
        self.network.flush()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(heard, [RemoteDeviceListChange(U, ("D1",), resync=True)])
        self.assertEqual(self.a.receiver.stats[("<unknown>", "unknown_type")], 1)

    def test_a_failing_listener_is_logged_not_fatal(self) -> None:
        self.a.track(U)

        def broken(change: RemoteDeviceListChange) -> None:
            raise ValueError("listener bug")

        def broken_async(change: RemoteDeviceListChange) -> "Deferred[None]":
            return fail(KeyError("async listener bug"))

        self.a.updater.add_listener(broken)
        self.a.updater.add_listener(broken_async)
        self.deliver(self.s, [self.s.user("u").edu("D1")])
        self.assertEqual(set(self.a.cached_devices(U)), {"D1"})
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)

    def test_is_resync_pending(self) -> None:
        self.a.track(U)
        self.network.faults.take_down(S)
        d = self.a.receiver.receive_edus(S, [self.s.user("u").edu("D1")])
        self.network.flush()
        self.successResultOf(d)
        self.assertTrue(self.a.updater.is_resync_pending(U))
        self.assertFalse(self.a.updater.is_resync_pending(V))


class StaleMarkAcrossProcessesTests(InboundCase):
    """An EDU deferred while the user is already stale must keep the user
    stale against a snapshot fetched before it arrived -- even one fetched by
    another process on the same database."""

    def test_edu_deferred_during_another_processes_fetch_is_not_lost(self) -> None:
        from devicelist_plugin.replication.updater import _UserSlot

        user_id = "@u:s.test"
        self.a.track(user_id)
        u = self.s.user("u")
        self.deliver(self.s, [u.edu("D1")])  # first contact: resync, cached
        self.s.gate = Deferred()  # S holds its /user/devices answers
        u.last_sent = 999  # the next EDU names a prev_id A never saw
        self.deliver(self.s, [u.edu("D2")])
        self.clock.advance(3)  # the hold grace expires: stale, fetch starts (gated)
        self.network.flush()
        self.assertTrue(self.a.sync_state(user_id).stale)
        snapshot_before_d3 = u.snapshot()
        # another process on the same database takes an EDU for D3 while
        # the user is stale and A's fetch is in flight
        content = u.edu("D3")["content"]
        self.successResultOf(
            self.a.store.queue_remote_update(
                user_id, content["stream_id"], content, self.a.updater._now_ms()
            )
        )
        entries = self.successResultOf(self.a.store.get_remote_inbox_state(user_id)).entries
        self.successResultOf(
            Deferred.fromCoroutine(
                self.a.updater._process_batch(
                    user_id, _UserSlot(), self.a.sync_state(user_id), entries
                )
            )
        )
        # A's fetch completes with the snapshot taken before D3 (once: S's
        # later answers are current)
        answers = [snapshot_before_d3]

        def stale_once(uid: str, body: Any) -> Any:
            return answers.pop() if answers else body

        self.s.answer_override = stale_once
        fetches = len(self.network.requests(path_prefix="/_matrix/federation/v1/user/devices/"))
        gate, self.s.gate = self.s.gate, None
        gate.callback(None)
        self.network.flush()
        self.clock.advance(60)  # any retry scheduled for the newer mark
        self.network.flush()
        # the newer mark made A fetch again, and the fresh snapshot has D3
        self.assertEqual(
            len(self.network.requests(path_prefix="/_matrix/federation/v1/user/devices/")),
            fetches + 1,
        )
        self.assertIn("D3", self.a.cached_devices(user_id))
        self.assertFalse(self.a.sync_state(user_id).stale)


class UnexpectedResyncErrorTests(InboundCase):
    """A resync that fails in an unanticipated way backs the user off; it is
    never retried in a tight loop."""

    def test_unexpected_error_backs_off_per_user(self) -> None:
        user_id = "@u:s.test"
        self.a.track(user_id)
        u = self.s.user("u")
        calls: list[str] = []
        real_get_json = self.a.updater._client.get_json

        def broken(destination: str, path: str, *args: Any, **kwargs: Any) -> Any:
            if "/user/devices/" not in path:
                return real_get_json(destination, path, *args, **kwargs)
            calls.append(path)
            raise RecursionError("maximum recursion depth exceeded while decoding")

        self.a.updater._client.get_json = broken
        self.deliver(self.s, [u.edu("D1")])  # first contact: the resync fails
        for _ in range(36):
            self.clock.advance(10)  # six simulated minutes of timers
            self.network.flush()
        self.flushLoggedErrors(RecursionError)
        # the first attempt, then at most one retry after the 5-minute user backoff
        self.assertIn(len(calls), (1, 2))
        self.assertTrue(self.a.sync_state(user_id).stale)


class StopWhileWorkingTests(InboundCase):
    def test_a_store_error_during_stop_schedules_nothing(self) -> None:
        user_id = "@u:s.test"
        self.a.track(user_id)
        u = self.s.user("u")
        self.deliver(self.s, [u.edu("D1")])
        gate: "Deferred[Any]" = Deferred()
        self.a.store.apply_remote_batches = lambda *args: gate  # type: ignore[method-assign]
        self.s.send([u.edu("D1", name="renamed")], txn_id="late")
        self.network.flush()
        self.a.inbound.stop()
        gate.errback(RuntimeError("database closed"))  # the store closing under it
        self.network.flush()  # (the transaction is answered)
        self.flushLoggedErrors(RuntimeError)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class TransactionTogetherTests(InboundCase):
    """The EDUs of one ``/send`` transaction are decided on together: one
    store commit for every user whose worker was idle."""

    def setUp(self) -> None:
        super().setUp()
        self.users = [self.s.user(name) for name in ("u1", "u2", "u3", "u4")]
        for user in self.users:
            self.a.track(user.user_id)
        # first contact: one resync each
        self.deliver(self.s, [user.edu("D1") for user in self.users])
        self.assertEqual(self.fetches(), 4)
        self.commits: list[list[str]] = []
        original = self.a.store.apply_remote_batches

        def counting(batches: Any, now_ms: int) -> Any:
            self.commits.append([b.user_id for b in batches])
            return original(batches, now_ms)

        self.a.store.apply_remote_batches = counting  # type: ignore[method-assign]

    def test_idle_users_are_committed_together(self) -> None:
        u1 = self.users[0]
        edus = [user.edu("D2", name="two") for user in self.users] + [u1.edu("D3")]
        self.deliver(self.s, edus + [edus[-1]])  # (the last one twice)
        self.assertEqual(self.commits, [[u.user_id for u in self.users]])
        for user in self.users:
            self.assertEqual(self.a.cached_devices(user.user_id)["D2"].display_name, "two")
        self.assertIn("D3", self.a.cached_devices(u1.user_id))
        self.assertEqual(self.fetches(), 4)
        self.assertEqual(self.a.updater.stats["apply:prev_known"], 5)
        # every EDU counted once: four first contacts and these five taken,
        # the copy as such
        self.assertEqual(self.a.updater.stats["edu_queued"], 9)
        self.assertEqual(self.a.updater.stats["edu_already_queued"], 1)

    def test_a_busy_user_takes_its_edus_in_its_own_worker(self) -> None:
        u1, u2, u3, _ = self.users
        gate: Deferred[None] = Deferred()
        self.s.gate = gate
        u1.edu("D9")  # lost: u1 resyncs, and its fetch hangs
        self.deliver(self.s, [u1.edu("D2")])
        self.network.advance(2)  # the hold grace: u1 is fetched
        self.assertEqual(self.fetches(u1.user_id), 2)
        self.commits.clear()
        self.deliver(self.s, [u1.edu("D3"), u2.edu("D2"), u3.edu("D2")])
        # u2 and u3 applied at once, in one commit with u1's EDU queued: u1
        # waits for its snapshot
        self.assertEqual(self.commits, [[u1.user_id, u2.user_id, u3.user_id]])
        self.assertIn("D2", self.a.cached_devices(u2.user_id))
        self.assertNotIn("D3", self.a.cached_devices(u1.user_id))
        self.s.gate = None
        gate.callback(None)
        self.network.flush()
        self.assertIn("D3", self.a.cached_devices(u1.user_id))
        self.assertEqual(self.fetches(u1.user_id), 2)
        self.assertFalse(self.a.sync_state(u1.user_id).stale)

    def test_a_failed_joint_commit_falls_back_to_each_users_worker(self) -> None:
        original = self.a.store.apply_remote_batches
        attempts: list[int] = []

        def not_together(batches: Any, now_ms: int) -> Any:
            attempts.append(len(batches))
            if len(batches) > 1:
                return fail(RuntimeError("deadlock"))
            return original(batches, now_ms)

        self.a.store.apply_remote_batches = not_together  # type: ignore[method-assign]
        logs = capture_logs(self)
        self.deliver(self.s, [user.edu("D2") for user in self.users])
        self.assertEqual(attempts, [4, 1, 1, 1, 1])  # the joint one, then one each
        for user in self.users:
            self.assertIn("D2", self.a.cached_devices(user.user_id))
        self.assertEqual(self.flushLoggedErrors(RuntimeError), [])
        self.assertTrue(any("together failed" in line for line in logs))
