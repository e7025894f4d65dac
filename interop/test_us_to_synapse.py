"""Scenario 2, us -> Synapse: our user's device changes and cross-signing
keys reach Synapse by EDU; after its first-contact fetch Synapse never
re-fetches our ``/user/devices``."""

from __future__ import annotations

from typing import Any, Optional

from interop.pair import PASSWORD, PairTestCase
from tests.local.keys import ClientDevice, CrossSigning


class UsToSynapseTests(PairTestCase):
    def synapse_agrees(self, what: str) -> dict[str, Any]:
        """Wait until Synapse's ``/keys/query`` of bob answers what ours does."""

        def agree() -> Optional[dict[str, Any]]:
            theirs = self.synapse_view(self.bob)
            return theirs if theirs == self.our_view(self.bob) else None

        return self.eventually(agree, what)

    def test_add_rename_delete_and_cross_signing_reach_synapse(self) -> None:
        bob = self.bob
        # first contact: our join fan-out (prev_id []) made Synapse fetch once
        self.eventually(lambda: self.synapse_fetches_of_ours() >= 1 or None,
                        "Synapse's first-contact fetch of bob's list")
        self.settle()  # Synapse stores the snapshot after logging the fetch
        first_contact = self.synapse_fetches_of_ours()
        self.assertEqual(first_contact, 1)

        # a new device with keys
        token, device_id = self.ours.login(bob, PASSWORD, device_id="BOBPHONE")
        keys = ClientDevice(bob, device_id).device_keys()
        self.ours.client_ok("POST", "/_matrix/client/v3/keys/upload", token, {"device_keys": keys})
        view = self.eventually(lambda: self.synapse_view(bob).get(device_id),
                               "bob's new device on Synapse")
        self.assertEqual(view["keys"], keys["keys"])
        self.assertEqual(view["signatures"][bob], keys["signatures"][bob])
        self.synapse_agrees("Synapse's view of bob with the new device")

        # a rename
        self.ours.rename_device(token, device_id, "Bob's phone")
        self.eventually(
            lambda: self.synapse_view(bob).get(device_id, {}).get("unsigned", {})
            .get("device_display_name") == "Bob's phone" or None,
            "the new display name on Synapse",
        )

        # a second device, then the first deleted (user-interactive auth)
        token2, device2 = self.ours.login(bob, PASSWORD, device_id="BOBLAPTOP")
        self.ours.client_ok("POST", "/_matrix/client/v3/keys/upload", token2,
                            {"device_keys": ClientDevice(bob, device2).device_keys()})
        self.ours.delete_device(token2, bob, PASSWORD, device_id)
        view = self.eventually(
            lambda: (lambda v: v if device2 in v and device_id not in v else None)(
                self.synapse_view(bob)),
            "the deletion and the second device on Synapse",
        )
        self.synapse_agrees("Synapse's view of bob after the deletion")

        # cross-signing keys: m.signing_key_update
        cross = CrossSigning(bob)
        self.ours.client_ok("POST", "/_matrix/client/v3/keys/device_signing/upload", token2,
                            cross.upload_body())

        def cross_signing() -> Optional[dict[str, Any]]:
            answer = self.synapse.query_keys(self.alice_token, [bob])
            if bob in answer.get("master_keys", {}) and bob in answer.get("self_signing_keys", {}):
                return answer
            return None

        answer = self.eventually(cross_signing, "bob's cross-signing keys on Synapse")
        self.assertEqual(answer["master_keys"][bob]["keys"], cross.master_json["keys"])
        self.assertEqual(answer["self_signing_keys"][bob]["keys"],
                         cross.self_signing_json["keys"])
        ours = self.ours.query_keys(self.bob_token, [bob])
        self.assertEqual(answer["master_keys"][bob], ours["master_keys"][bob])
        self.assertEqual(answer["self_signing_keys"][bob], ours["self_signing_keys"][bob])

        # a device change after the cross-signing upload: our chain has no
        # hole there (unlike Synapse's, see test_synapse_to_us), so Synapse
        # applies it without a fetch
        self.ours.rename_device(token2, device2, "Bob's laptop")
        self.eventually(
            lambda: self.synapse_view(bob).get(device2, {}).get("unsigned", {})
            .get("device_display_name") == "Bob's laptop" or None,
            "the laptop's new name on Synapse",
        )
        self.synapse_agrees("Synapse's view of bob after the cross-signing upload")

        # every change came by EDU: Synapse never had to re-fetch our list
        self.settle()
        self.assertEqual(self.synapse_fetches_of_ours(), first_contact,
                         self.synapse.outbound_requests("GET", "/_matrix/federation"))
        resyncs = self.synapse_resync_decisions()
        self.assertEqual(resyncs, 1, "only our first EDU (prev_id []) asked Synapse to resync")

    def synapse_resync_decisions(self) -> int:
        """Synapse's ``Received device list update for <bob>, requiring
        resync: True`` log lines."""
        marker = f"Received device list update for {self.bob}, requiring resync: True"
        with open(self.synapse.log_path, encoding="utf-8", errors="replace") as f:
            return sum(1 for line in f if marker in line)
