"""call_listener: a listener's failure, at once or later, is logged and
never reaches the caller."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from devicelist_plugin.listeners import call_listener
from tests.replication.inbound_harness import capture_logs

LOG = Logger(namespace="tests.listeners")
MESSAGE = "listener {name} failed for {user_id}"


class CallListenerTests(SynchronousTestCase):
    def call(self, listener: Any) -> "Deferred[Any] | None":
        return call_listener(LOG, listener, MESSAGE, name="L", user_id="@u:s")

    def test_a_plain_return_gives_nothing_to_wait_for(self) -> None:
        self.assertIsNone(self.call(lambda: 42))

    def test_raising_at_once_is_logged(self) -> None:
        logs = capture_logs(self)

        def broken() -> None:
            raise RuntimeError("boom")

        self.assertIsNone(self.call(broken))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertIn("listener L failed for @u:s", list(logs))

    def test_a_later_failure_is_logged_and_handled(self) -> None:
        gate: Deferred[None] = Deferred()
        d = self.call(lambda: gate)
        assert d is not None
        self.assertNoResult(d)
        gate.errback(RuntimeError("later"))
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_a_coroutine_is_run_and_waited_for(self) -> None:
        ran: list[int] = []

        async def listener() -> int:
            ran.append(1)
            return await succeed(7)

        d = self.call(listener)
        assert d is not None
        self.assertEqual(self.successResultOf(d), 7)
        self.assertEqual(ran, [1])
        failing = self.call(lambda: fail(ValueError("x")))
        assert failing is not None
        self.successResultOf(failing)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
