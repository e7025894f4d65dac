"""Scenario 1, Synapse -> us: a Synapse user's device changes (and
cross-signing keys) reach our cache by ``m.device_list_update`` EDUs, each step, with no ``/user/devices``
fetch beyond the first contact.

Synapse's first EDU to a destination has ``prev_id: []``, which asks for a
resync (Synapse itself treats it so): that resync is the first contact, so
the test makes no key query before it, else it would cost a second fetch.
"""

from __future__ import annotations

from typing import Any, Optional

from interop.pair import PASSWORD, PairTestCase
from tests.local.keys import ClientDevice, CrossSigning


class SynapseToUsTests(PairTestCase):
    def views_agree(self, user_id: str, what: str) -> dict[str, Any]:
        """Wait until our ``/keys/query`` answers for ``user_id`` exactly what
        Synapse's own answers (keys, signatures, display names)."""

        def agree() -> Optional[dict[str, Any]]:
            ours = self.our_view(user_id)
            return ours if ours == self.synapse_view(user_id) else None

        return self.eventually(agree, what)

    def test_new_device_keys_rename_logout_follow(self) -> None:
        alice = self.alice
        # a new device: Synapse's first EDU to us; our first-contact resync
        token, device_id = self.synapse.login(alice, PASSWORD, device_id="ALICEPHONE")
        self.eventually(lambda: self.ours.cached_devices(alice)["cached"] or None,
                        "our first-contact resync of alice")
        # Synapse lists only devices with keys, in /user/devices and /keys/query
        self.assertNotIn(device_id, self.views_agree(alice, "the keyless device"))
        self.assertEqual(self.ours.user_devices_fetches(), 1)

        # its keys: the cache and our /keys/query serve them, signed as uploaded
        keys = ClientDevice(alice, device_id).device_keys()
        self.synapse.client_ok("POST", "/_matrix/client/v3/keys/upload", token,
                               {"device_keys": keys})
        self.eventually(lambda: (self.our_cache(alice).get(device_id) or {}).get("keys"),
                        "alice's device keys in our cache")
        served = self.views_agree(alice, "alice's device keys on our side")[device_id]
        self.assertEqual(served["keys"], keys["keys"])
        self.assertEqual(served["signatures"][alice], keys["signatures"][alice])

        # a rename: the display name follows (both servers allow name lookup)
        self.synapse.rename_device(token, device_id, "Alice's phone")
        self.eventually(
            lambda: self.our_cache(alice)[device_id]["display_name"] == "Alice's phone" or None,
            "the new display name in our cache",
        )
        view = self.views_agree(alice, "the new display name on our side")
        self.assertEqual(view[device_id]["unsigned"]["device_display_name"], "Alice's phone")

        # logging out deletes the device everywhere
        self.synapse.logout(token)
        self.eventually(lambda: device_id not in self.our_cache(alice) or None,
                        "the device gone from our cache")
        self.assertNotIn(device_id, self.views_agree(alice, "the device gone from our side"))

        self.settle()
        cache = self.ours.cached_devices(alice)
        self.assertFalse(cache["stale"], cache)
        # every step after the first came by EDU, applied in order
        self.assertEqual(self.ours.user_devices_fetches(), 1)
        self.assertEqual(
            self.ours.metric("devicelist_edus_decided_total", action="resync"), 1.0,
            "only Synapse's first EDU (prev_id []) asked for a resync",
        )

    def test_cross_signing_update_then_a_device_change(self) -> None:
        """Synapse's ``m.signing_key_update`` reaches our cache without a
        fetch; but the next device EDU's ``prev_id`` names the stream id
        Synapse gave the cross-signing change, which no EDU carried (Synapse
        #7142), so we hold it, then resync once: the spec's answer to an
        unknown ``prev_id``."""
        alice = self.alice
        token, phone = self.synapse.login(alice, PASSWORD, device_id="ALICEPHONE")
        self.synapse.client_ok("POST", "/_matrix/client/v3/keys/upload", token,
                               {"device_keys": ClientDevice(alice, phone).device_keys()})
        self.eventually(lambda: (self.our_cache(alice).get(phone) or {}).get("keys"),
                        "alice's phone in our cache")
        self.assertEqual(self.ours.user_devices_fetches(), 1)

        cross = CrossSigning(alice)
        self.synapse.client_ok("POST", "/_matrix/client/v3/keys/device_signing/upload", token,
                               cross.upload_body())
        self.eventually(
            lambda: {"master", "self_signing"} <= set(
                self.ours.cached_devices(alice)["cross_signing_keys"]) or None,
            "alice's cross-signing keys in our cache",
        )
        answer = self.eventually(lambda: self.cross_signing_agrees(alice),
                                 "alice's cross-signing keys on our side")
        self.assertEqual(answer["master_keys"][alice]["keys"], cross.master_json["keys"])
        self.assertEqual(self.ours.user_devices_fetches(), 1)

        token2, laptop = self.synapse.login(alice, PASSWORD, device_id="ALICELAPTOP")
        self.synapse.client_ok("POST", "/_matrix/client/v3/keys/upload", token2,
                               {"device_keys": ClientDevice(alice, laptop).device_keys()})
        self.eventually(lambda: (self.our_cache(alice).get(laptop) or {}).get("keys"),
                        "alice's laptop in our cache")
        self.assertEqual(sorted(self.views_agree(alice, "both devices on our side")),
                         sorted([phone, laptop]))
        self.assertIsNotNone(self.cross_signing_agrees(alice))
        self.settle()
        self.assertEqual(self.ours.user_devices_fetches(), 2)
        self.assertEqual(
            self.ours.metric("devicelist_resyncs_total", reason="unknown_prev_id"), 1.0,
            self.ours.metrics_text(),
        )

    def cross_signing_agrees(self, user_id: str) -> Optional[dict[str, Any]]:
        """Our ``/keys/query`` answer if its master and self-signing keys of
        ``user_id`` are Synapse's, else ``None``."""
        ours = self.ours.query_keys(self.bob_token, [user_id])
        theirs = self.synapse.query_keys(self.alice_token, [user_id])
        same = all(ours.get(kind, {}).get(user_id) == theirs.get(kind, {}).get(user_id)
                   for kind in ("master_keys", "self_signing_keys"))
        return ours if same else None
