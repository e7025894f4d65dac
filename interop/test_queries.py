"""Scenarios 3 and 4: key queries across the two servers, for users who
share no room with the asking server (``/user/keys/query``, nothing cached)
and for tracked users (``/user/devices`` once, then the cache)."""

from __future__ import annotations

from urllib.parse import quote

from interop.pair import PASSWORD, USER_DEVICES, PairTestCase
from tests.local.keys import ClientDevice

V3 = "/_matrix/client/v3"
USER_KEYS_QUERY = "/_matrix/federation/v1/user/keys/query"


class QueryTests(PairTestCase):
    def test_synapse_asks_us_about_untracked_then_tracked_user(self) -> None:
        # carol, of ours, shares no room with Synapse
        carol, _ = self.ours.register("carol", PASSWORD)
        token, phone = self.ours.login(carol, PASSWORD, device_id="CAROLPHONE")
        keys = ClientDevice(carol, phone).device_keys()
        self.ours.client_ok("POST", f"{V3}/keys/upload", token, {"device_keys": keys})
        self.ours.rename_device(token, phone, "Carol's phone")
        carol_devices = USER_DEVICES + quote(carol, safe="")

        # Synapse asks us with /user/keys/query and shows what we serve
        theirs = self.synapse_view(carol)
        self.assertEqual(theirs, self.our_view(carol))
        self.assertEqual(theirs[phone]["keys"], keys["keys"])
        self.assertEqual(theirs[phone]["unsigned"]["device_display_name"], "Carol's phone")
        self.assertGreaterEqual(len(self.synapse.outbound_requests("POST", USER_KEYS_QUERY)), 1)
        self.assertEqual(self.synapse.outbound_requests("GET", carol_devices), [])

        # carol joins the room: our update (prev_id []) makes Synapse fetch her
        # list with /user/devices, once, and its view still matches ours
        self.join_ours(carol)
        self.eventually(lambda: self.synapse.outbound_requests("GET", carol_devices) or None,
                        "Synapse's /user/devices fetch of carol")
        self.eventually(lambda: self.synapse_view(carol) == self.our_view(carol) or None,
                        "Synapse's cached view of carol")
        self.settle()
        self.assertEqual(len(self.synapse.outbound_requests("GET", carol_devices)), 1)

    def test_we_ask_synapse_about_untracked_and_tracked_users(self) -> None:
        # dave, of Synapse, shares no room with us
        dave, _ = self.synapse.register("dave", PASSWORD)
        token, phone = self.synapse.login(dave, PASSWORD, device_id="DAVEPHONE")
        keys = ClientDevice(dave, phone).device_keys()
        self.synapse.client_ok("POST", f"{V3}/keys/upload", token, {"device_keys": keys})
        self.synapse.rename_device(token, phone, "Dave's phone")

        ours = self.our_view(dave)
        self.assertEqual(ours, self.synapse_view(dave))
        self.assertEqual(ours[phone]["keys"], keys["keys"])
        self.assertEqual(ours[phone]["unsigned"]["device_display_name"], "Dave's phone")
        # asked with /user/keys/query (Synapse logs a request once it has
        # answered it, so maybe just after we got the answer), nothing cached
        self.eventually(lambda: self.synapse.inbound_requests("POST", USER_KEYS_QUERY),
                        "Synapse's access-log line of our /user/keys/query")
        queries = len(self.synapse.inbound_requests("POST", USER_KEYS_QUERY))
        self.assertEqual(
            self.synapse.inbound_requests("GET", USER_DEVICES + quote(dave, safe="")), [])
        cache = self.ours.cached_devices(dave)
        self.assertEqual((cache["tracked"], cache["cached"], cache["devices"]),
                         (False, False, []))
        self.assertEqual(self.ours.user_devices_fetches(), 0)

        # alice shares the room: her update (prev_id []) is our first contact
        alice = self.alice
        token, phone = self.synapse.login(alice, PASSWORD, device_id="ALICEPHONE")
        self.synapse.client_ok("POST", f"{V3}/keys/upload", token,
                               {"device_keys": ClientDevice(alice, phone).device_keys()})
        self.eventually(lambda: (self.our_cache(alice).get(phone) or {}).get("keys"),
                        "alice's keys in our cache")
        # queries are then answered from the cache: no request to Synapse
        for _ in range(3):
            self.assertEqual(self.our_view(alice), self.synapse_view(alice))
        self.settle()
        alice_devices = USER_DEVICES + quote(alice, safe="")
        self.assertEqual(len(self.synapse.inbound_requests("GET", alice_devices)), 1)
        self.assertEqual(len(self.synapse.inbound_requests("POST", USER_KEYS_QUERY)), queries)
        self.assertEqual(self.ours.user_devices_fetches(), 1)
        self.assertTrue(self.ours.cached_devices(alice)["tracked"])
