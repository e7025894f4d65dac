"""A local device handler on an inline SQLite store and a simulated clock."""

from __future__ import annotations

from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from devicelist_plugin.federation.errors import MatrixError
from devicelist_plugin.local.handler import LocalDeviceHandler
from devicelist_plugin.membership import InMemoryMembership
from tests.helpers.store import open_inline_store

NOW_S = 1_700_000_000


class HandlerCase(SynchronousTestCase):
    """A handler for server ``b.example`` that records its change notifications."""

    server_name = "b.example"
    allow_names = False

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(NOW_S)  # an arbitrary "now"
        self.store = open_inline_store(self)
        self.membership = InMemoryMembership(self.server_name)
        self.handler = LocalDeviceHandler(
            self.server_name,
            self.store,
            self.membership,
            self.clock,
            allow_device_name_lookup_over_federation=self.allow_names,
        )
        self.notified: list[tuple[str, int, tuple[str, ...]]] = []
        self.handler.add_change_listener(
            lambda user_id, stream_id, device_ids: self.notified.append(
                (user_id, stream_id, device_ids)
            )
        )

    def matrix_error(self, d: Any) -> MatrixError:
        failure = self.failureResultOf(d, MatrixError)
        error = failure.value
        assert isinstance(error, MatrixError)
        return error

    def assertMatrixError(self, d: Any, code: int, errcode: str, starts: str = "") -> MatrixError:
        error = self.matrix_error(d)
        self.assertEqual((error.code, error.errcode), (code, errcode), error.msg)
        if starts:
            self.assertTrue(error.msg.startswith(starts), error.msg)
        return error
