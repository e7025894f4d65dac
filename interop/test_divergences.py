"""Where Synapse 1.163 and we answer the same federation request
differently, or act differently in the same situation: each divergence the
README lists ("Interoperating with Synapse"), asserted on both servers so
that a change on either side shows up here.

The same signed request goes to each server about its own user, from the
other server (the harness holds both signing keys).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from interop.common import MatrixServerProcess
from interop.federation import signed_request
from interop.pair import PASSWORD, USER_DEVICES, PairTestCase
from tests.local.keys import ClientDevice

USER_KEYS_QUERY = "/_matrix/federation/v1/user/keys/query"


class DivergenceTests(PairTestCase):
    def ask(
        self, server: MatrixServerProcess, method: str, path: str, body: Any = None
    ) -> tuple[int, Any]:
        """A federation request to ``server``, signed by the other one."""
        other: MatrixServerProcess = self.ours if server is self.synapse else self.synapse
        return signed_request(method, server.server_name, path, other.server_name,
                              server.server_name, other.signing_key, body)

    def both(self, method: str, path_of: Any, body_of: Any = None) -> dict[str, tuple[int, Any]]:
        """The same request to each server about its own user (alice on
        Synapse, bob on ours): ``{"synapse": answer, "ours": answer}``."""
        answers = {}
        for name, server, user in (("synapse", self.synapse, self.alice),
                                   ("ours", self.ours, self.bob)):
            body = None if body_of is None else body_of(server, user)
            answers[name] = self.ask(server, method, path_of(server, user), body)
        return answers

    def test_user_devices_without_cross_signing_keys(self) -> None:
        """Synapse sends ``master_key``/``self_signing_key`` as ``null``; we
        omit them (the spec types them as objects, optional)."""
        answers = self.both("GET", lambda s, u: USER_DEVICES + quote(u, safe=""))
        synapse_status, theirs = answers["synapse"]
        our_status, ours = answers["ours"]
        self.assertEqual((synapse_status, our_status), (200, 200))
        self.assertEqual((theirs["master_key"], theirs["self_signing_key"]), (None, None))
        self.assertNotIn("master_key", ours)
        self.assertNotIn("self_signing_key", ours)
        for answer, user in ((theirs, self.alice), (ours, self.bob)):
            self.assertEqual(answer["user_id"], user)
            self.assertIsInstance(answer["stream_id"], int)

    def test_keys_query_shapes_and_errors(self) -> None:
        answers = self.both("POST", lambda s, u: USER_KEYS_QUERY,
                            lambda s, u: {"device_keys": {u: []}})
        # Synapse adds user_signing_keys, which the federation API does not have
        self.assertEqual(answers["synapse"][1]["user_signing_keys"], {})
        self.assertNotIn("user_signing_keys", answers["ours"][1])
        self.assertEqual(answers["synapse"][0], 200)
        self.assertEqual(answers["ours"][0], 200)

        # device_keys is required: Synapse answers an empty result, we a 400
        answers = self.both("POST", lambda s, u: USER_KEYS_QUERY, lambda s, u: {})
        self.assertEqual(answers["synapse"][0], 200)
        self.assertEqual(answers["synapse"][1]["device_keys"], {})
        self.assertEqual((answers["ours"][0], answers["ours"][1]["errcode"]), (400, "M_BAD_JSON"))

        # a user of a third server: both 400, with different errcodes
        foreign = "@x:elsewhere.example"
        answers = self.both("POST", lambda s, u: USER_KEYS_QUERY,
                            lambda s, u: {"device_keys": {foreign: []}})
        self.assertEqual((answers["synapse"][0], answers["synapse"][1]["errcode"]),
                         (400, "M_UNKNOWN"))
        self.assertEqual((answers["ours"][0], answers["ours"][1]["errcode"]),
                         (400, "M_INVALID_PARAM"))
        answers = self.both("GET", lambda s, u: USER_DEVICES + quote(foreign, safe=""))
        self.assertEqual((answers["synapse"][0], answers["synapse"][1]["errcode"]),
                         (400, "M_UNKNOWN"))
        self.assertEqual((answers["ours"][0], answers["ours"][1]["errcode"]),
                         (400, "M_INVALID_PARAM"))

    def test_a_synapse_user_joining_the_shared_room_is_not_announced(self) -> None:
        """Synapse does not send a joining user's devices to servers already
        in the room (Synapse #11374; the spec says it must): we learn them on
        our first query, with a fetch.  We announce ours (scenario 3)."""
        erin, _ = self.synapse.register("erin", PASSWORD)
        token, phone = self.synapse.login(erin, PASSWORD, device_id="ERINPHONE")
        self.synapse.client_ok("POST", "/_matrix/client/v3/keys/upload", token,
                               {"device_keys": ClientDevice(erin, phone).device_keys()})
        self.join_synapse(erin, token)
        # a later EDU from Synapse to us (bob's view of alice's new device)
        # proves the queue to us has run past erin's join
        alice_token, alice_phone = self.synapse.login(self.alice, PASSWORD, device_id="ALICEPHONE")
        self.synapse.client_ok(
            "POST", "/_matrix/client/v3/keys/upload", alice_token,
            {"device_keys": ClientDevice(self.alice, alice_phone).device_keys()})
        self.eventually(lambda: self.ours.cached_devices(self.alice)["cached"] or None,
                        "alice's update after erin's join")
        self.settle()

        def erin_edus() -> int:
            marker = f"Sending device list update notif for '{erin}'"
            with open(self.synapse.log_path, encoding="utf-8", errors="replace") as f:
                return sum(1 for line in f if marker in line)

        self.assertEqual(erin_edus(), 0)
        self.assertFalse(self.ours.cached_devices(erin)["cached"])
        fetches = self.ours.user_devices_fetches()
        self.assertIn(phone, self.our_view(erin))
        self.assertEqual(self.ours.user_devices_fetches(), fetches + 1)
        self.assertTrue(self.ours.cached_devices(erin)["cached"])
