"""The crash machinery of the simulation: a process's clock and store."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from devicelist_plugin.storage import Store, open_sqlite_store
from tests.simulation.process import CrashableStore, ProcessClock

USER = "@u:s.test"


class ProcessClockTests(SynchronousTestCase):
    def test_kill_cancels_only_the_process_calls(self) -> None:
        shared = Clock()
        one, other = ProcessClock(shared), ProcessClock(shared)
        ran: list[str] = []
        one.callLater(1, ran.append, "one")
        done = one.callLater(0, ran.append, "done")
        other.callLater(1, ran.append, "other")
        shared.advance(0)
        self.assertFalse(done.active())
        self.assertEqual(len(one.getDelayedCalls()), 1)
        self.assertEqual(one.kill(), 1)
        # a call made by code still on the dying stack never runs
        one.callLater(0, ran.append, "zombie")
        self.assertEqual(one.calls_after_death, 1)
        shared.advance(5)
        self.assertEqual(ran, ["done", "other"])
        self.assertEqual((shared.getDelayedCalls(), one.getDelayedCalls()), ([], []))
        self.assertEqual(one.seconds(), shared.seconds())


class CrashableStoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.inner: Store = self.successResultOf(
            open_sqlite_store(":memory:", MemoryReactorClock(), synchronous=True)
        )
        self.addCleanup(self.inner.close)
        self.crashes: list[None] = []

        def crash() -> None:
            self.crashes.append(None)
            self.store.kill()

        self.store = CrashableStore(self.inner, crash)

    def create(self, device_id: str) -> Any:
        return self.store.create_device(USER, device_id, None, 1000, ())

    def test_dies_at_the_armed_call_which_never_runs(self) -> None:
        self.assertEqual(self.store.engine, "sqlite")
        self.store.arm(2)
        self.successResultOf(self.create("D1"))
        self.assertEqual(self.crashes, [])
        d = self.create("D2")  # the crash point: not run, never answered
        self.assertEqual(self.crashes, [None])
        self.assertNoResult(d)
        self.assertNoResult(self.create("D3"))  # dead: nothing runs any more
        devices = self.successResultOf(self.inner.get_devices(USER))
        self.assertEqual([d.device_id for d in devices], ["D1"])

    def test_disarmed_store_never_crashes(self) -> None:
        self.store.arm(1)
        self.store.disarm()
        for i in range(3):
            self.successResultOf(self.create(f"D{i}"))
        self.assertEqual(self.crashes, [])
