"""The fixture of the interop scenarios: a Synapse and our server on
loopback, sharing one public room (version 10).

:class:`PairTestCase` starts both servers in ``setUp``, registers ``alice``
on Synapse and ``bob`` on ours, has alice create the room, joins bob to it
over federation (:func:`interop.join.join_room`) and records both
memberships in our server through the admin API.  Cleanups stop both
processes by pid and remove the work directory, whatever the outcome.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Any, Callable, Mapping, Optional, TypeVar
from urllib.parse import quote

from twisted.trial.unittest import TestCase

from interop.common import HarnessError, wait_until
from interop.devicelist import DevicelistServer
from interop.join import join_room
from interop.synapse import SynapseServer, synapse_python

__all__ = ["PASSWORD", "PairTestCase", "USER_DEVICES"]

T = TypeVar("T")

PASSWORD = "interop-password"
#: the path prefix of ``GET /user/devices`` requests
USER_DEVICES = "/_matrix/federation/v1/user/devices/"
#: set to keep the work directory (logs, databases) of each test
KEEP_ENV = "DEVICELIST_INTEROP_KEEP"
#: how long a change may take to reach the other server
PROPAGATION_S = 60.0


class PairTestCase(TestCase):
    """Both servers running and sharing :attr:`room_id` (see the module
    docstring)."""

    #: trial's per-test limit: start-up, the scenario and the stops
    timeout = 420
    #: merged into each server's configuration
    ours_config: Mapping[str, Any] = {}
    synapse_config: Mapping[str, Any] = {}

    synapse: SynapseServer
    ours: DevicelistServer
    room_id: str
    alice: str
    alice_token: str
    bob: str
    bob_token: str

    def setUp(self) -> None:
        # the cached venv is installed (once) outside any timed wait
        synapse_python()
        workdir = tempfile.mkdtemp(prefix="devicelist-interop-")
        if os.environ.get(KEEP_ENV):
            print(f"\n{KEEP_ENV}: keeping {workdir}")
        else:
            self.addCleanup(shutil.rmtree, workdir, True)
        # each server takes its ports just before it starts: the shorter the
        # wait, the less likely another process takes one meanwhile
        self.synapse = SynapseServer(f"{workdir}/synapse", extra_config=self.synapse_config)
        self.addCleanup(self.synapse.stop)
        self.synapse.start(timeout=180)
        self.ours = DevicelistServer(f"{workdir}/ours", extra_config=self.ours_config)
        self.addCleanup(self.ours.stop)
        self.ours.start(timeout=60)

        self.alice, self.alice_token = self.synapse.register("alice", PASSWORD)
        self.bob, self.bob_token = self.ours.register("bob", PASSWORD)
        self.room_id = self.synapse.create_room(self.alice_token)
        # our side first tracks alice, so her first update is not ignored
        self.ours.add_member(self.room_id, self.alice)
        self.join_ours(self.bob)

    # -- room ----------------------------------------------------------------

    def join_ours(self, user_id: str) -> None:
        """Join one of our users to the room over federation and record it."""
        result = join_room(
            self.synapse.server_name, self.room_id, user_id,
            self.ours.server_name, self.ours.signing_key,
        )
        self.assertIn(self.alice, result.state_member_ids)
        self.ours.add_member(self.room_id, user_id)

    def join_synapse(self, user_id: str, token: str) -> None:
        """Join a Synapse user to the room and record it on our side."""
        self.synapse.client_ok("POST", f"/_matrix/client/v3/join/{quote(self.room_id, safe='')}", token, {})
        self.ours.add_member(self.room_id, user_id)

    # -- waiting -----------------------------------------------------------

    def eventually(
        self, probe: Callable[[], Optional[T]], what: str, timeout: float = PROPAGATION_S
    ) -> T:
        """:func:`wait_until`, failing the test with both servers' logs."""
        try:
            return wait_until(probe, timeout, what, interval=0.3)
        except HarnessError as e:
            self.fail(f"{e}\n=== ours ===\n{self.ours.output_tail()}\n"
                      f"=== synapse ===\n{self.synapse.output_tail()}")

    def settle(self, seconds: float = 2.0) -> None:
        """Let in-flight traffic land before counting requests."""
        time.sleep(seconds)

    # -- views -------------------------------------------------------------

    def synapse_view(self, user_id: str) -> dict[str, Any]:
        """``device_id -> device keys`` of ``user_id`` as alice's
        ``/keys/query`` on Synapse shows them (see :func:`devices_of`)."""
        return devices_of(self.synapse.query_keys(self.alice_token, [user_id]), user_id)

    def our_view(self, user_id: str) -> dict[str, Any]:
        """The same through bob's ``/keys/query`` on our server."""
        return devices_of(self.ours.query_keys(self.bob_token, [user_id]), user_id)

    def our_cache(self, user_id: str) -> dict[str, Any]:
        """``device_id -> cached device`` from our admin API."""
        cached = self.ours.cached_devices(user_id)
        return {d["device_id"]: d for d in cached["devices"]}

    def synapse_fetches_of_ours(self) -> int:
        """How many ``GET /user/devices`` Synapse completed against us."""
        return len(self.synapse.outbound_requests("GET", USER_DEVICES))


def devices_of(answer: Any, user_id: str) -> dict[str, Any]:
    """``device_id -> device keys`` of one user in a ``/keys/query`` answer,
    an empty ``unsigned`` dropped (Synapse sends ``"unsigned": {}`` for a
    device without a display name, we omit it: both are valid)."""
    devices: dict[str, Any] = {}
    for device_id, keys in answer.get("device_keys", {}).get(user_id, {}).items():
        devices[device_id] = {k: v for k, v in keys.items() if k != "unsigned" or v}
    return devices
