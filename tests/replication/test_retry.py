"""Per-destination backoff: exact retry times, persistence, wake on contact."""

from __future__ import annotations

from typing import Any, Callable, Coroutine, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from devicelist_plugin.core.backoff import BackoffPolicy
from devicelist_plugin.replication.retry import DestinationRetryTracker
from tests.helpers.store import open_inline_store

NOW = 1_700_000_000.0
POLICY = BackoffPolicy(min_interval=10, multiplier=2, max_interval=100)


T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> "Deferred[T]":
    return Deferred.fromCoroutine(coro)


def fixed_jitter(factor: float) -> Callable[[float, float], float]:
    def jitter(low: float, high: float) -> float:
        return factor

    return jitter


class TrackerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(NOW)
        self.store = open_inline_store(self)
        self.tracker = self.make_tracker()

    def make_tracker(self, factor: float = 1.0) -> DestinationRetryTracker:
        return DestinationRetryTracker(self.store, self.clock, POLICY, fixed_jitter(factor))

    def retry_at(self, tracker: DestinationRetryTracker, destination: str) -> object:
        return self.successResultOf(run(tracker.retry_at(destination)))

    def test_healthy_destination_may_be_tried_now(self) -> None:
        self.assertIsNone(self.retry_at(self.tracker, "s.test"))

    def test_failures_grow_exponentially_to_the_cap(self) -> None:
        expected = [10, 20, 40, 80, 100, 100]
        for delay in expected:
            at = self.successResultOf(run(self.tracker.record_failure("s.test")))
            self.assertEqual(at, self.clock.seconds() + delay)
            self.assertEqual(self.retry_at(self.tracker, "s.test"), at)
            # just before the retry time: still backing off; at it: may try
            self.clock.advance(delay - 0.5)
            self.assertEqual(self.retry_at(self.tracker, "s.test"), at)
            self.clock.advance(0.5)
            self.assertIsNone(self.retry_at(self.tracker, "s.test"))

    def test_jitter_is_applied(self) -> None:
        tracker = self.make_tracker(1.4)
        at = self.successResultOf(run(tracker.record_failure("s.test")))
        self.assertEqual(at, NOW + 14)

    def test_state_survives_a_restart(self) -> None:
        self.successResultOf(run(self.tracker.record_failure("s.test")))
        self.successResultOf(run(self.tracker.record_failure("s.test")))
        restarted = self.make_tracker()
        self.assertEqual(self.retry_at(restarted, "s.test"), NOW + 20)
        # and the attempt count continues where it stopped: third failure, 40 s
        self.clock.advance(20)
        at = self.successResultOf(run(restarted.record_failure("s.test")))
        self.assertEqual(at, NOW + 20 + 40)

    def test_success_resets(self) -> None:
        self.successResultOf(run(self.tracker.record_failure("s.test")))
        self.successResultOf(run(self.tracker.record_success("s.test")))
        self.assertIsNone(self.retry_at(self.tracker, "s.test"))
        self.assertIsNone(self.successResultOf(self.store.get_retry_state("s.test")))
        at = self.successResultOf(run(self.tracker.record_failure("s.test")))
        self.assertEqual(at, NOW + 10)

    def test_contact_wakes_a_backing_off_server_once(self) -> None:
        woken: list[str] = []
        self.tracker.add_wake_listener(woken.append)
        self.successResultOf(self.tracker.on_contact("s.test"))
        self.assertEqual(woken, [])  # healthy: nothing to wake
        self.successResultOf(run(self.tracker.record_failure("s.test")))
        self.successResultOf(self.tracker.on_contact("s.test"))
        self.assertEqual(woken, ["s.test"])
        self.assertIsNone(self.retry_at(self.tracker, "s.test"))
        self.successResultOf(self.tracker.on_contact("s.test"))
        self.assertEqual(woken, ["s.test"])

    def test_a_failing_wake_listener_is_logged_not_raised(self) -> None:
        def broken(destination: str) -> None:
            raise RuntimeError("boom")

        woken: list[str] = []
        self.tracker.add_wake_listener(broken)
        self.tracker.add_wake_listener(woken.append)
        self.successResultOf(run(self.tracker.record_failure("s.test")))
        self.successResultOf(self.tracker.on_contact("s.test"))
        self.assertEqual(woken, ["s.test"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_destinations_are_independent(self) -> None:
        self.successResultOf(run(self.tracker.record_failure("a.test")))
        self.assertIsNone(self.retry_at(self.tracker, "b.test"))

