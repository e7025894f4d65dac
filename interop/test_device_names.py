"""Device display names stay private when both servers keep
``allow_device_name_lookup_over_federation`` at its default (off): neither
server's EDUs, ``/user/devices`` nor ``/user/keys/query`` carry them."""

from __future__ import annotations

from interop.pair import PASSWORD, PairTestCase
from tests.local.keys import ClientDevice

V3 = "/_matrix/client/v3"
OFF = {"allow_device_name_lookup_over_federation": False}


class PrivateNamesTests(PairTestCase):
    ours_config = OFF
    synapse_config = OFF

    def test_names_are_not_sent_either_way(self) -> None:
        for server, user, other_view in (
            (self.synapse, self.alice, self.our_view),
            (self.ours, self.bob, self.synapse_view),
        ):
            # named before its keys exist: the device shows on the other
            # server only with its keys, so after the rename was handled
            token, device_id = server.login(user, PASSWORD, device_id="PHONE")
            server.rename_device(token, device_id, "a private name")
            server.client_ok("POST", f"{V3}/keys/upload", token,
                             {"device_keys": ClientDevice(user, device_id).device_keys()})
            # the owner's server shows the name to its own user ...
            own = server.query_keys(token, [user])["device_keys"][user][device_id]
            self.assertEqual(own["unsigned"]["device_display_name"], "a private name")
            # ... the other server has the device, without it
            seen = self.eventually(lambda: other_view(user).get(device_id),
                                   f"{user}'s device on the other server")
            self.assertNotIn("device_display_name", seen.get("unsigned", {}))
        self.eventually(lambda: self.our_cache(self.alice).get("PHONE"), "alice's cached phone")
        self.assertIsNone(self.our_cache(self.alice)["PHONE"]["display_name"])
