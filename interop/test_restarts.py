"""Scenarios 5 and 6: one server down while the other's user changes
devices; once it is back, every change arrives and the caches converge."""

from __future__ import annotations

from typing import Any, Optional

from interop.pair import PASSWORD, PairTestCase
from tests.local.keys import ClientDevice, CrossSigning

V3 = "/_matrix/client/v3"


class RestartTests(PairTestCase):
    # A destination failing for destination_max_retry_interval gets its queue
    # compacted into chain resets (then a re-fetch is right): 10 s, the
    # harness's default, is within reach of a Synapse restart on a busy
    # machine, so the outage here stays well below the limit.
    ours_config = {"federation": {"destination_max_retry_interval": "2m"}}

    def agree(self, user_id: str, what: str) -> dict[str, Any]:
        """Wait until both servers' ``/keys/query`` of ``user_id`` agree
        (devices, and the cross-signing keys either has)."""

        def both() -> Optional[dict[str, Any]]:
            ours = self.ours.query_keys(self.bob_token, [user_id])
            theirs = self.synapse.query_keys(self.alice_token, [user_id])
            if self.our_view(user_id) != self.synapse_view(user_id):
                return None
            for kind in ("master_keys", "self_signing_keys"):
                if ours.get(kind, {}).get(user_id) != theirs.get(kind, {}).get(user_id):
                    return None
            return self.our_view(user_id)

        return self.eventually(both, what)

    def test_synapse_down_while_our_user_changes_devices(self) -> None:
        bob = self.bob
        token, phone = self.ours.login(bob, PASSWORD, device_id="BOBPHONE")
        self.ours.client_ok("POST", f"{V3}/keys/upload", token,
                            {"device_keys": ClientDevice(bob, phone).device_keys()})
        self.assertIn(phone, self.agree(bob, "bob's phone on Synapse"))
        fetches = self.synapse_fetches_of_ours()

        self.synapse.stop()
        self.ours.rename_device(token, phone, "renamed while Synapse was down")
        token2, laptop = self.ours.login(bob, PASSWORD, device_id="BOBLAPTOP")
        self.ours.client_ok("POST", f"{V3}/keys/upload", token2,
                            {"device_keys": ClientDevice(bob, laptop).device_keys()})
        self.ours.delete_device(token2, bob, PASSWORD, phone)
        self.ours.client_ok("POST", f"{V3}/keys/device_signing/upload", token2,
                            CrossSigning(bob).upload_body())
        # our sender tried, failed, and is backing off
        self.eventually(lambda: self.ours.destination(self.synapse.server_name)
                        .get("failing_since_ts"), "our sender to notice Synapse is down")

        self.synapse.start(timeout=120)
        view = self.agree(bob, "every change on Synapse after its restart")
        self.assertEqual(sorted(view), [laptop])
        self.settle()
        # the chain was intact: Synapse applied the queued EDUs without a fetch
        self.assertEqual(self.synapse_fetches_of_ours(), fetches)

    def test_our_server_down_while_synapse_user_changes_devices(self) -> None:
        alice = self.alice
        token, phone = self.synapse.login(alice, PASSWORD, device_id="ALICEPHONE")
        self.synapse.client_ok("POST", f"{V3}/keys/upload", token,
                               {"device_keys": ClientDevice(alice, phone).device_keys()})
        self.eventually(lambda: (self.our_cache(alice).get(phone) or {}).get("keys"),
                        "alice's phone in our cache")
        self.assertIn(phone, self.agree(alice, "alice's phone on our side"))

        self.ours.stop()
        self.synapse.rename_device(token, phone, "renamed while we were down")
        token2, laptop = self.synapse.login(alice, PASSWORD, device_id="ALICELAPTOP")
        self.synapse.client_ok("POST", f"{V3}/keys/upload", token2,
                               {"device_keys": ClientDevice(alice, laptop).device_keys()})
        self.synapse.logout(token)
        # Synapse tried to send them and failed
        self.eventually(
            lambda: self.synapse.outbound_failures(self.ours.server_name) or None,
            "Synapse's failed transaction to us",
        )

        self.ours.start(timeout=60)
        self.eventually(lambda: set(self.our_cache(alice)) == {laptop} or None,
                        "our cache to converge after our restart", timeout=120)
        view = self.agree(alice, "our /keys/query after our restart")
        self.assertEqual(sorted(view), [laptop])
        self.assertFalse(self.ours.cached_devices(alice)["stale"])
        # Synapse's retried EDUs continued the chain our database kept: the
        # restarted process (its counters start at zero) fetched nothing
        self.assertEqual(self.ours.user_devices_fetches(), 0)


class LongOutageTests(PairTestCase):
    # failing for 2 s makes Synapse a long-dead destination for us
    ours_config = {"federation": {"destination_max_retry_interval": "2s"}}

    def test_synapse_down_past_our_dead_destination_limit(self) -> None:
        """Our queue for a long-dead Synapse is compacted into chain resets;
        once it is back, our next update has ``prev_id: []`` and Synapse
        re-fetches the list once, then agrees with us."""
        bob = self.bob
        token, phone = self.ours.login(bob, PASSWORD, device_id="BOBPHONE")
        self.ours.client_ok("POST", f"{V3}/keys/upload", token,
                            {"device_keys": ClientDevice(bob, phone).device_keys()})
        self.eventually(lambda: phone in self.synapse_view(bob) or None, "bob's phone on Synapse")
        self.settle()
        fetches = self.synapse_fetches_of_ours()

        self.synapse.stop()
        self.ours.rename_device(token, phone, "renamed during a long outage")
        token2, laptop = self.ours.login(bob, PASSWORD, device_id="BOBLAPTOP")
        self.ours.client_ok("POST", f"{V3}/keys/upload", token2,
                            {"device_keys": ClientDevice(bob, laptop).device_keys()})
        marker = f"{self.synapse.server_name} has been unreachable"
        self.eventually(lambda: self.ours_logged(marker), "our queue for Synapse compacted")

        self.synapse.start(timeout=120)
        self.eventually(lambda: self.synapse_view(bob) == self.our_view(bob) or None,
                        "Synapse's view of bob after the outage")
        view = self.synapse_view(bob)
        self.assertEqual(sorted(view), sorted([phone, laptop]))
        self.assertEqual(view[phone]["unsigned"]["device_display_name"],
                         "renamed during a long outage")
        self.settle()
        self.assertEqual(self.synapse_fetches_of_ours(), fetches + 1)

    def ours_logged(self, marker: str) -> bool:
        with open(self.ours.output_path, encoding="utf-8", errors="replace") as f:
            return any(marker in line for line in f)
