"""SharedResult, DestinationLimiter and the updater's configuration checks."""

from __future__ import annotations

from twisted.internet.defer import CancelledError, Deferred
from twisted.trial.unittest import SynchronousTestCase

from devicelist_plugin.replication.inbound_concurrency import DestinationLimiter, SharedResult
from devicelist_plugin.replication.updater import UpdaterConfig


class SharedResultTests(SynchronousTestCase):
    def test_every_observer_gets_the_result_and_may_cancel_alone(self) -> None:
        operation: Deferred[int] = Deferred()
        shared = SharedResult(operation)
        first, second, third = shared.observe(), shared.observe(), shared.observe()
        second.cancel()
        self.failureResultOf(second, CancelledError)
        self.assertFalse(operation.called)
        operation.callback(7)
        self.assertEqual(self.successResultOf(first), 7)
        self.assertEqual(self.successResultOf(third), 7)
        self.assertTrue(shared.done)
        self.assertEqual(self.successResultOf(shared.observe()), 7)

    def test_failures_reach_every_observer(self) -> None:
        operation: Deferred[int] = Deferred()
        shared = SharedResult(operation)
        first = shared.observe()
        operation.errback(ValueError("boom"))
        self.failureResultOf(first, ValueError)
        self.failureResultOf(shared.observe(), ValueError)


class LimiterTests(SynchronousTestCase):
    def test_at_most_limit_per_destination(self) -> None:
        limiter = DestinationLimiter(2)
        gates: list[Deferred[None]] = [Deferred() for _ in range(3)]
        runs = [
            Deferred.fromCoroutine(limiter.run("s.test", lambda g=g: g)) for g in gates  # type: ignore[misc]
        ]
        other = Deferred.fromCoroutine(limiter.run("t.test", lambda: Deferred.fromCoroutine(_one())))
        self.assertEqual(self.successResultOf(other), 1)
        self.assertEqual(limiter.in_flight("s.test"), 2)
        gates[2].callback(None)  # the third waits for a slot whatever its own state
        self.assertNoResult(runs[2])
        gates[0].callback(None)
        self.successResultOf(runs[0])
        self.successResultOf(runs[2])
        gates[1].callback(None)
        self.successResultOf(runs[1])
        self.assertEqual(limiter.in_flight("s.test"), 0)
        self.assertEqual(limiter._semaphores, {})

    def test_limit_must_be_positive(self) -> None:
        with self.assertRaises(ValueError):
            DestinationLimiter(0)


async def _one() -> int:
    return 1


class ConfigTests(SynchronousTestCase):
    def test_bad_values_are_refused(self) -> None:
        for kwargs in (
            {"hold_grace": -1},
            {"resync_timeout": 0},
            {"max_devices_per_user": 0},
            {"resyncs_per_server": 0},
            {"store_retry_delay": -1},
        ):
            with self.assertRaises(ValueError, msg=str(kwargs)):
                UpdaterConfig(**kwargs)  # type: ignore[arg-type]
        self.assertEqual(UpdaterConfig().max_devices_per_user, 50_000)
        self.assertEqual(UpdaterConfig().hold_grace, 2.0)
        self.assertEqual(UpdaterConfig().resync_timeout, 30.0)
