"""End to end: two standalone servers as real processes on loopback.

Each server's data directory is made by ``python -m devicelist_plugin
generate-config --test-network`` (self-signed TLS, certificate verification
off, loopback allowed) and the server runs under ``twistd -n devicelist``
(:mod:`tests.standalone.processes`).  The test registers users with the
Synapse-compatible shared-secret API, logs in, uploads keys, puts the users
in one room through both servers' admin API, adds a device on one server and
polls the other's ``/keys/query`` until it shows it.  Everything is bounded
in time and the processes are stopped by pid.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import quote

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.trial.unittest import TestCase

from tests.standalone.processes import ADMIN, V3, ServerProcess, logs_of, sleep

ROOM = "!e2e:localhost"


class TwoServersTest(TestCase):
    timeout = 90

    def test_device_change_reaches_the_other_server(self) -> "Deferred[None]":
        return ensureDeferred(self.run_scenario())

    async def run_scenario(self) -> None:
        deadline = time.monotonic() + 75
        a = ServerProcess(self)
        b = ServerProcess(self)
        a.start()
        b.start()
        await a.wait_ready(deadline)
        await b.wait_ready(deadline)

        await a.register("root", admin=True)
        a_admin = await a.login("root", "ADMIN")
        await b.register("root", admin=True)
        b_admin = await b.login("root", "ADMIN")
        alice = await a.register("alice")
        alice_token = await a.login("alice", "ALICE1")
        await a.upload_keys(alice, "ALICE1", alice_token)
        bob = await b.register("bob")
        bob_token = await b.login("bob", "BOB1")
        await b.upload_keys(bob, "BOB1", bob_token)

        # one room, on both servers (the receiving side first: it then tracks alice)
        for server, token in ((b, b_admin), (a, a_admin)):
            await server.set_membership(token, ROOM, alice)
            await server.set_membership(token, ROOM, bob)
        members = await a.ok("GET", f"{ADMIN}/rooms/{quote(ROOM)}/members", token=a_admin)
        self.assertEqual(members["members"], sorted([alice, bob]))

        async def bobs_view() -> dict[str, Any]:
            answer = await b.ok(
                "POST", f"{V3}/keys/query", {"device_keys": {alice: []}, "timeout": 5000},
                bob_token,
            )
            devices: dict[str, Any] = answer.get("device_keys", {}).get(alice, {})
            return devices

        async def poll(want: set[str]) -> None:
            while True:
                if set(await bobs_view()) == want:
                    return
                if time.monotonic() > deadline:
                    self.fail(f"B never saw {sorted(want)}\n{logs_of((a, b))}")
                await sleep(0.3)

        await poll({"ALICE1"})
        # a device change on A reaches B (pushed as an EDU)
        alice_token2 = await a.login("alice", "ALICE2")
        await a.upload_keys(alice, "ALICE2", alice_token2)
        await poll({"ALICE1", "ALICE2"})
        cached = await b.admin_user_devices(b_admin, alice)
        self.assertFalse(cached["stale"])
        self.assertEqual(
            sorted(d["device_id"] for d in cached["devices"]), ["ALICE1", "ALICE2"]
        )
        # and a deletion (logout deletes the device)
        await a.ok("POST", f"{V3}/logout", {}, alice_token2)
        await poll({"ALICE1"})
        # B's metrics saw the EDUs
        self.assertIn(
            'devicelist_edus_received_total{edu_type="m.device_list_update",outcome="accepted"}',
            await b.metrics(),
        )
