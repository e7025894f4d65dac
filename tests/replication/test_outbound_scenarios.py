"""SCENARIOS.md 13-20: A's users' device changes reach S, on a simulated clock.

A is a full instance (store, transport, handler, sender); S records every
``/send`` transaction and runs what it receives through
``core.inbound.decide``, resyncing from A's ``/user/devices`` when it must
(see ``outbound_harness``).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from twisted.internet.defer import Deferred

from devicelist_plugin.core.inbound import Action, Reason
from devicelist_plugin.core.models import EDU_DEVICE_LIST_UPDATE, EDU_SIGNING_KEY_UPDATE, JsonDict
from devicelist_plugin.federation.client import HttpResponseError
from devicelist_plugin.federation.errors import M_INVALID_PARAM
from devicelist_plugin.membership import InMemoryMembership
from devicelist_plugin.membership_store import StoreMembership
from tests.local.keys import ClientDevice, CrossSigning
from tests.replication.outbound_harness import (
    A,
    ALICE,
    BOB,
    HANG,
    SEND_PREFIX,
    S,
    T,
    Answer,
    LocalInstance,
    OutboundCase,
    ReceivingServer,
    backoff_delays,
)


class Devices:
    """Client devices of a user, with real signed keys."""

    def __init__(self, case: OutboundCase, user_id: str) -> None:
        self.case = case
        self.user_id = user_id
        self.clients: dict[str, ClientDevice] = {}

    def create(self, device_id: str, name: str | None = None, *, keys: bool = True) -> list[int]:
        """Create the device (and upload its keys); return the stream ids."""
        handler = self.case.a.handler
        ids = [self.case.successResultOf(handler.create_device(self.user_id, device_id, name))]
        if keys:
            client = self.clients[device_id] = ClientDevice(self.user_id, device_id)
            stream_id = self.case.successResultOf(
                handler.upload_device_keys(self.user_id, device_id, client.device_keys())
            )
            assert stream_id is not None
            ids.append(stream_id)
        return ids


def truth(case: OutboundCase, user_id: str) -> dict[str, JsonDict]:
    """What A serves as the user's devices with keys."""
    body = case.successResultOf(case.a.handler.user_devices_snapshot(user_id))
    return {d["device_id"]: d["keys"] for d in body["devices"]}


class FirstUpdateTests(OutboundCase):
    """Scenario 13: the first EDU to a destination has prev_id [], the next
    ones chain; two users chain independently."""

    def test_first_edu_has_empty_prev_id_then_chains(self) -> None:
        first = self.settle(self.handler.create_device(ALICE, "PHONE"))
        edus = self.s.edus()
        self.assertEqual(
            edus, [{"user_id": ALICE, "device_id": "PHONE", "stream_id": first, "prev_id": []}]
        )
        second = self.settle(self.handler.rename_device(ALICE, "PHONE", "Phone"))
        edus = self.s.edus()
        self.assertEqual(len(edus), 2)
        self.assertEqual(edus[1]["stream_id"], second)
        self.assertEqual(edus[1]["prev_id"], [first])
        # names are not sent over federation by default
        self.assertNotIn("device_display_name", edus[1])
        # S resynced once (first contact) and applied the second without a fetch
        self.assertEqual(self.s.resync_reasons(ALICE), [Reason.FIRST_CONTACT])
        self.assertEqual(self.s.actions(ALICE)[-1], (second, Action.APPLY, Reason.PREV_KNOWN))
        self.assertEqual([t.origin for t in self.s.txns], [A, A])
        self.assertEqual(self.s.max_in_progress, 1)

    def test_edu_carries_the_keys_at_send_time(self) -> None:
        phone = ClientDevice(ALICE, "PHONE")
        self.settle(self.handler.create_device(ALICE, "PHONE"))
        self.settle(self.handler.upload_device_keys(ALICE, "PHONE", phone.device_keys()))
        last = self.s.edus()[-1]
        self.assertEqual(last["keys"], phone.device_keys())
        self.assertEqual(self.s.keyed_devices(ALICE), {"PHONE": phone.device_keys()})

    def test_two_users_chain_independently(self) -> None:
        a1 = self.settle(self.handler.create_device(ALICE, "A1"))
        b1 = self.settle(self.handler.create_device(BOB, "B1"))
        # several changes of both users while a transaction is on its way:
        # the next transaction holds both users' EDUs, each user's chained
        a2 = self.successResultOf(self.handler.create_device(ALICE, "A2"))
        b2 = self.successResultOf(self.handler.create_device(BOB, "B2"))
        a3 = self.successResultOf(self.handler.rename_device(ALICE, "A1", "x"))
        b3 = self.successResultOf(self.handler.rename_device(BOB, "B1", "y"))
        self.flush()
        alice = [e for e in self.s.edus() if e["user_id"] == ALICE]
        bob = [e for e in self.s.edus() if e["user_id"] == BOB]
        self.assertEqual([e["stream_id"] for e in alice], [a1, a2, a3])
        self.assertEqual([e["stream_id"] for e in bob], [b1, b2, b3])
        self.assertChained(alice, [])
        self.assertChained(bob, [])
        # the last transaction mixes both users, in stream order
        last = self.s.txns[-1].edus(EDU_DEVICE_LIST_UPDATE)
        self.assertEqual({e["user_id"] for e in last}, {ALICE, BOB})
        self.assertEqual(
            [e["stream_id"] for e in last], sorted(e["stream_id"] for e in last)
        )
        self.assertEqual(self.s.resync_reasons(ALICE), [Reason.FIRST_CONTACT])
        self.assertEqual(self.s.resync_reasons(BOB), [Reason.FIRST_CONTACT])

    def test_sent_at_once_without_other_traffic(self) -> None:
        # Synapse #3781: nothing else needs to happen for the EDU to go out
        self.successResultOf(self.handler.create_device(ALICE, "PHONE"))
        self.assertEqual(len(self.send_requests()), 1)
        self.flush()
        self.assertEqual(len(self.s.txns), 1)
        self.assertNoDelayedCalls()


class DeleteTests(OutboundCase):
    """Scenario 14: deleting three devices sends three chained deletions."""

    def test_three_deletions_chained(self) -> None:
        devices = Devices(self, ALICE)
        for device_id in ("D1", "D2", "D3"):
            devices.create(device_id, f"name of {device_id}")
        self.flush()
        before = len(self.s.edus())
        deleted = [
            self.successResultOf(self.handler.delete_device(ALICE, device_id))
            for device_id in ("D1", "D2", "D3")
        ]
        self.flush()
        edus = self.s.edus()[before:]
        self.assertEqual(
            edus,
            [
                {"user_id": ALICE, "device_id": "D1", "stream_id": deleted[0],
                 "prev_id": [deleted[0] - 1], "deleted": True},
                {"user_id": ALICE, "device_id": "D2", "stream_id": deleted[1],
                 "prev_id": [deleted[0]], "deleted": True},
                {"user_id": ALICE, "device_id": "D3", "stream_id": deleted[2],
                 "prev_id": [deleted[1]], "deleted": True},
            ],
        )
        self.assertEqual(self.s.devices[ALICE], {})
        self.assertEqual(self.s.resync_reasons(ALICE), [Reason.FIRST_CONTACT])


class OutageTests(OutboundCase):
    """Scenario 15: S unreachable while @alice makes changes."""

    def setUp(self) -> None:
        super().setUp()
        self.devices = Devices(self, ALICE)
        self.baseline = self.devices.create("PHONE")
        self.flush()
        self.assertEqual(len(self.s.txns), 1)

    def test_nothing_lost_collapsed_chained_same_txn_exact_backoff(self) -> None:
        self.network.faults.take_down(S)
        t0 = self.clock.seconds()
        first = self.successResultOf(self.handler.rename_device(ALICE, "PHONE", "one"))
        self.flush()
        # refused: the sender sleeps for the first backoff delay, exactly
        d = backoff_delays(5)
        self.assertEqual(d, [12.0, 24.0, 48.0, 96.0, 100.0])
        self.assertEqual(self.delayed(), [d[0]])
        # changes while S is down: queued, no request before the retry time
        later = [
            self.successResultOf(self.handler.rename_device(ALICE, "PHONE", "two")),
            *self.devices.create("LAPTOP"),
            *self.devices.create("TMP"),
            self.successResultOf(self.handler.delete_device(ALICE, "TMP")),
            self.successResultOf(self.handler.rename_device(ALICE, "PHONE", "three")),
        ]
        self.flush()
        self.assertEqual(len(self.send_requests()), 2)
        self.assertEqual(self.delayed(), [d[0]])
        # the retries: refused, refused, refused, then a 500 from S itself
        self.network.advance(d[0])  # retry 1 (12 s): refused
        self.network.advance(d[1])  # retry 2 (24 s): refused
        self.network.faults.bring_up(S)
        self.s.script = [Answer(500, {"errcode": "M_UNKNOWN", "error": "busy"})]
        self.network.advance(d[2])  # retry 3 (48 s): S answers 500
        self.assertEqual(self.delayed(), [d[3]])
        self.network.advance(d[3])  # retry 4 (96 s): 200
        self.assertNoDelayedCalls()
        requests = self.network.requests(origin=A, destination=S, path_prefix=SEND_PREFIX)
        retried = requests[1:6]
        self.assertEqual(
            [r.sent_at - t0 for r in retried], [0, d[0], d[0] + d[1], sum(d[:3]), sum(d[:4])]
        )
        # one txnId for all five attempts, then the next transaction
        self.assertEqual({r.path for r in retried}, {SEND_PREFIX + "txn2"})
        self.assertEqual([r.path for r in requests[6:]], [SEND_PREFIX + "txn3"])
        self.assertEqual([r[0] for r in self.s.requests], ["txn1", "txn2", "txn2", "txn3"])
        self.assertEqual(self.s.requests[1][1], self.s.requests[2][1])  # same body
        # what arrived: the first rename, then one EDU per changed device,
        # its latest state, chained
        edus = self.s.edus()
        self.assertEqual(edus[1]["stream_id"], first)
        # S's first-contact resync served it the list at the baseline's
        # last id: the chain goes on from there
        self.assertChained(edus[1:], [self.baseline[-1]])
        rest = edus[2:]
        self.assertEqual(
            [(e["device_id"], e["stream_id"], e.get("deleted", False)) for e in rest],
            [("LAPTOP", later[2], False), ("TMP", later[5], True), ("PHONE", later[6], False)],
        )
        self.assertEqual(rest[0]["keys"], self.devices.clients["LAPTOP"].device_keys())
        # S never had to resync because of the outage, and is exact
        self.assertEqual(self.s.resync_reasons(ALICE), [Reason.FIRST_CONTACT])
        self.assertEqual(self.s.keyed_devices(ALICE), truth(self, ALICE))
        self.assertEqual(self.s.max_in_progress, 1)
        # backoff reset by the success; nothing pending
        self.assertIsNone(self.successResultOf(self.a.store.get_retry_state(S)))
        self.assertEqual(self.successResultOf(self.a.store.get_pending(S, 100)), [])
        self.assertIsNone(self.successResultOf(self.a.store.get_inflight_txn(S)))

    def test_backoff_reset_when_s_contacts_a(self) -> None:
        d = backoff_delays(3)
        self.s.script = [Answer(502), Answer(502), Answer(502)]
        self.successResultOf(self.handler.rename_device(ALICE, "PHONE", "one"))
        self.flush()  # attempt 1: 502
        self.network.advance(d[0])  # attempt 2: 502
        self.assertEqual(self.delayed(), [d[1]])
        # S contacts A (a signed request: here it resyncs @alice): A retries at once
        before = self.clock.seconds()
        self.s.script = []
        self.settle(Deferred.fromCoroutine(self.s.resync(A, ALICE)))
        self.assertEqual(self.clock.seconds(), before)
        self.assertNoDelayedCalls()
        self.assertEqual(len(self.s.requests), 4)  # baseline, 2 x 502, the retry
        self.assertEqual(self.s.requests[-1][0], "txn2")
        self.assertEqual(self.s.requests[-1][2], before)
        self.assertIsNone(self.successResultOf(self.a.store.get_retry_state(S)))
        # the next change goes out at once and chains from what S knows
        self.settle(self.handler.rename_device(ALICE, "PHONE", "two"))
        self.assertEqual(
            [(a, r) for _, a, r in self.s.actions(ALICE)][-1], (Action.APPLY, Reason.PREV_KNOWN)
        )
        self.assertEqual(self.s.keyed_devices(ALICE), truth(self, ALICE))

    def test_one_transaction_in_flight_and_timeout(self) -> None:
        self.s.script = [HANG]
        self.successResultOf(self.handler.rename_device(ALICE, "PHONE", "one"))
        self.flush()
        # S has not answered: more changes make no second request
        self.devices.create("LAPTOP")
        self.successResultOf(self.handler.rename_device(ALICE, "LAPTOP", "x"))
        self.flush()
        self.assertEqual(self.send_requests(), [SEND_PREFIX + "txn1", SEND_PREFIX + "txn2"])
        self.assertEqual(self.delayed(), [30.0])  # the client's request timeout
        self.network.advance(30)  # timed out: a failure
        self.assertEqual(self.delayed(), [backoff_delays(1)[0]])
        self.network.advance(backoff_delays(1)[0])  # the retry: same txnId, then the rest
        self.assertEqual(
            self.send_requests(),
            [SEND_PREFIX + p for p in ("txn1", "txn2", "txn2", "txn3")],
        )
        self.assertNoDelayedCalls()
        self.assertEqual(self.s.keyed_devices(ALICE), truth(self, ALICE))
        self.assertEqual(self.s.resync_reasons(ALICE), [Reason.FIRST_CONTACT])


class RestartTests(OutboundCase):
    """Scenario 16: A restarts with updates pending; they go out after it."""

    def setUp(self) -> None:
        super().setUp()
        self.devices = Devices(self, ALICE)
        self.devices.create("PHONE")
        self.flush()

    def test_pending_and_in_flight_survive_a_restart(self) -> None:
        self.network.faults.take_down(S)
        self.successResultOf(self.handler.rename_device(ALICE, "PHONE", "one"))
        self.devices.create("LAPTOP")
        self.flush()
        inflight = self.successResultOf(self.a.store.get_inflight_txn(S))
        assert inflight is not None
        self.assertEqual(inflight.txn_id, "txn2")
        failed_at = self.clock.seconds()
        self.clock.advance(5)
        self.a.restart()  # stops (no timer left), reopens the database file
        self.handler = self.a.handler
        # catch-up: S is still backing off, so the retry keeps its time
        self.assertEqual(self.delayed(), [failed_at + backoff_delays(1)[0] - self.clock.seconds()])
        self.network.faults.bring_up(S)
        self.network.advance(backoff_delays(1)[0])
        # the persisted transaction went out again under its txnId, then the rest
        self.assertEqual(
            [t.txn_id for t in self.s.txns], ["txn1", "txn2", "txn3"]
        )
        self.assertEqual(self.s.txns[1].body, inflight.payload["body"])
        self.assertChained(self.s.edus()[1:], [2])
        self.assertEqual(self.s.keyed_devices(ALICE), truth(self, ALICE))
        self.assertEqual(self.s.resync_reasons(ALICE), [Reason.FIRST_CONTACT])
        self.assertNoDelayedCalls()

    def test_request_in_flight_at_stop_is_sent_again_after_restart(self) -> None:
        self.s.script = [HANG]
        self.successResultOf(self.handler.rename_device(ALICE, "PHONE", "one"))
        self.flush()
        self.assertEqual(self.delayed(), [30.0])
        self.a.restart()  # the stop cancels the request: not a failure
        self.flush()
        self.assertIsNone(self.successResultOf(self.a.store.get_retry_state(S)))
        self.assertEqual([t.txn_id for t in self.s.txns], ["txn1", "txn2"])
        self.assertNoDelayedCalls()

    def test_changes_made_while_the_sender_was_down(self) -> None:
        self.a.stop()
        self.assertNoDelayedCalls()
        self.successResultOf(self.handler.rename_device(ALICE, "PHONE", "one"))
        self.devices.create("LAPTOP")
        self.flush()
        self.assertEqual(len(self.s.txns), 1)  # nobody sent them
        self.a.restart()
        self.flush()
        self.assertEqual(len(self.s.txns), 2)
        self.assertChained(self.s.edus()[1:], [2])
        self.assertEqual(self.s.keyed_devices(ALICE), truth(self, ALICE))


class JoinFanOutTests(OutboundCase):
    """Scenario 17 (Synapse #11374): a server newly sharing a room with
    @alice gets her current devices without her changing anything."""

    share_with_s = False

    def setUp(self) -> None:
        super().setUp()
        self.devices = Devices(self, ALICE)
        self.devices.create("PHONE", "phone")
        self.devices.create("LAPTOP", "laptop")
        self.successResultOf(self.handler.create_device(ALICE, "NOKEYS"))
        self.flush()
        self.assertEqual(self.s.txns, [])  # S shares no room with her yet
        membership = self.a.membership
        assert isinstance(membership, InMemoryMembership)
        self.membership = membership
        self.membership.join("!room:a.test", ALICE)

    def test_remote_user_joins_a_room_of_alice(self) -> None:
        self.membership.join("!room:a.test", "@sam:s.test")
        self.flush()
        edus = self.s.edus()
        self.assertEqual(sorted(e["device_id"] for e in edus), ["LAPTOP", "NOKEYS", "PHONE"])
        for e in edus:
            # a new chain: no continuity claimed
            self.assertEqual(e["prev_id"], [])
        self.assertEqual(
            {e["device_id"]: e.get("keys") for e in edus if "keys" in e},
            truth(self, ALICE),
        )
        self.assertEqual(self.s.resync_reasons(ALICE), [Reason.FIRST_CONTACT])
        self.assertEqual(self.s.keyed_devices(ALICE), truth(self, ALICE))
        # the next change chains as usual
        stream_id = self.settle(self.handler.rename_device(ALICE, "PHONE", "p"))
        self.assertEqual(self.s.edus()[-1]["prev_id"], [max(e["stream_id"] for e in edus)])
        self.assertEqual(self.s.actions(ALICE)[-1], (stream_id, Action.APPLY, Reason.PREV_KNOWN))

    def test_alice_joins_a_room_with_two_servers(self) -> None:
        t = ReceivingServer(self.network, T, self.clock, self.open_store())
        self.membership.join("!other:t.test", "@sam:s.test")
        self.membership.join("!other:t.test", "@tom:t.test")
        self.flush()
        self.assertEqual((self.s.txns, t.txns), ([], []))
        self.membership.join("!other:t.test", ALICE)
        self.flush()
        for server in (self.s, t):
            self.assertEqual(
                sorted(e["device_id"] for e in server.edus()), ["LAPTOP", "NOKEYS", "PHONE"]
            )
            self.assertEqual(server.keyed_devices(ALICE), truth(self, ALICE))

    def test_a_server_already_sharing_gets_nothing_new(self) -> None:
        self.membership.join("!room:a.test", "@sam:s.test")
        self.flush()
        n = len(self.s.txns)
        self.membership.join("!second:a.test", ALICE)
        self.membership.join("!second:a.test", "@sue:s.test")
        self.flush()
        self.assertEqual(len(self.s.txns), n)

    def test_rejoin_after_missed_changes_restarts_the_chain(self) -> None:
        self.membership.join("!room:a.test", "@sam:s.test")
        self.flush()
        self.assertEqual(set(self.s.keyed_devices(ALICE)), {"PHONE", "LAPTOP"})
        # S leaves; while it shares no room, LAPTOP is deleted: S hears nothing
        # (S keeps its cache here, as a receiver not dropping it would)
        self.membership.leave("!room:a.test", "@sam:s.test")
        self.successResultOf(self.handler.delete_device(ALICE, "LAPTOP"))
        # the latest change is of a device S knows: resuming the old chain
        # would have S apply it and never learn of the deletion
        self.successResultOf(self.handler.rename_device(ALICE, "PHONE", "renamed"))
        self.flush()
        n = len(self.s.txns)
        self.assertIn("LAPTOP", self.s.devices[ALICE])
        # S comes back: its old chain must not be resumed as if nothing was missed
        self.membership.join("!room:a.test", "@sam:s.test")
        self.flush()
        new = [e for t in self.s.txns[n:] for e in t.edus(EDU_DEVICE_LIST_UPDATE)]
        self.assertTrue(all(e["prev_id"] == [] for e in new))
        self.assertEqual(self.s.resync_reasons(ALICE)[-1], Reason.EMPTY_PREV_ID)
        self.assertNotIn("LAPTOP", self.s.devices[ALICE])
        self.assertEqual(self.s.keyed_devices(ALICE), truth(self, ALICE))
        # and then chains again from there
        self.settle(self.handler.rename_device(ALICE, "PHONE", "p"))
        self.assertEqual(self.s.actions(ALICE)[-1][1:], (Action.APPLY, Reason.PREV_KNOWN))


class StoreMembershipFanOutTests(OutboundCase):
    """Scenario 17 with the standalone server's membership table, including
    a fan-out whose listeners never ran (the process died after the join)."""

    share_with_s = False

    def make_local(self) -> LocalInstance:
        return LocalInstance(
            self,
            self.network,
            self.clock,
            membership_factory=lambda store: StoreMembership(A, store),
        )

    def setUp(self) -> None:
        super().setUp()
        self.handler = self.a.handler
        membership = self.a.membership
        assert isinstance(membership, StoreMembership)
        self.membership = membership
        self.devices = Devices(self, ALICE)
        self.successResultOf(self.membership.join("!room:a.test", ALICE))
        self.devices.create("PHONE")
        self.devices.create("LAPTOP")
        self.flush()
        self.assertEqual(self.s.txns, [])

    def test_join_sends_current_devices(self) -> None:
        self.settle(self.membership.join("!room:a.test", "@sam:s.test"))
        self.assertEqual(sorted(e["device_id"] for e in self.s.edus()), ["LAPTOP", "PHONE"])
        self.assertEqual(self.s.keyed_devices(ALICE), truth(self, ALICE))
        self.assertEqual(
            self.successResultOf(self.membership.servers_sharing_room(ALICE)), frozenset({S})
        )
        # and a change of hers reaches S, chained
        self.settle(self.handler.rename_device(ALICE, "PHONE", "p"))
        self.assertEqual(self.s.actions(ALICE)[-1][1:], (Action.APPLY, Reason.PREV_KNOWN))

    def test_fan_out_survives_a_crash_before_the_listeners(self) -> None:
        self.a.stop()
        # the join commits, then the process dies before telling anyone
        newly = self.successResultOf(self.a.store.join_room("!room:a.test", "@sam:s.test", A))
        self.assertEqual(newly, {ALICE: frozenset({S})})
        self.a.restart()
        self.flush()
        edus = self.s.edus()
        self.assertTrue(edus)
        self.assertEqual(edus[0]["prev_id"], [])
        self.assertEqual(self.s.resync_reasons(ALICE), [Reason.FIRST_CONTACT])
        self.assertEqual(self.s.keyed_devices(ALICE), truth(self, ALICE))


class CrossSigningTests(OutboundCase):
    """Scenario 18 (Synapse #7142): a cross-signing upload sends
    m.signing_key_update and breaks no device chain."""

    def setUp(self) -> None:
        super().setUp()
        self.devices = Devices(self, ALICE)
        self.device_ids = self.devices.create("PHONE")
        self.flush()
        self.cs = CrossSigning(ALICE)

    def test_signing_key_update_and_no_resync(self) -> None:
        signing_id = self.settle(
            self.handler.upload_cross_signing_keys(ALICE, self.cs.upload_body())
        )
        self.assertEqual(signing_id, self.device_ids[-1] + 1)  # same per-user stream
        updates = self.s.edus(EDU_SIGNING_KEY_UPDATE)
        self.assertEqual(
            updates,
            [
                {
                    "user_id": ALICE,
                    "master_key": self.cs.master_json,
                    "self_signing_key": self.cs.self_signing_json,
                }
            ],
        )
        self.assertEqual(self.s.signing_keys[ALICE], updates[0])
        # the self-signing key signs the phone: a device change, chained over
        # the signing-key change's id, which no prev_id ever names
        served = self.successResultOf(self.handler.query_keys({ALICE: ["PHONE"]}))
        signed = self.cs.sign_with("self_signing", served["device_keys"][ALICE]["PHONE"])
        self.successResultOf(self.handler.upload_signatures(ALICE, {ALICE: {"PHONE": signed}}))
        self.flush()
        last = self.s.edus()[-1]
        self.assertEqual(last["stream_id"], signing_id + 1)
        self.assertEqual(last["prev_id"], [self.device_ids[-1]])
        self.assertIn(
            f"ed25519:{self.cs.self_signing_public}", last["keys"]["signatures"][ALICE]
        )
        renamed = self.settle(self.handler.rename_device(ALICE, "PHONE", "x"))
        self.assertEqual(self.s.edus()[-1]["prev_id"], [signing_id + 1])
        self.assertEqual(self.s.resync_reasons(ALICE), [Reason.FIRST_CONTACT])
        self.assertEqual(
            [(a, r) for _, a, r in self.s.actions(ALICE)][-2:],
            [(Action.APPLY, Reason.PREV_KNOWN)] * 2,
        )
        self.assertEqual(self.s.actions(ALICE)[-1][0], renamed)
        self.assertEqual(self.s.keyed_devices(ALICE), truth(self, ALICE))

    def test_signing_key_change_between_device_changes_in_one_transaction(self) -> None:
        self.network.faults.take_down(S)
        self.successResultOf(self.handler.rename_device(ALICE, "PHONE", "a"))
        self.flush()  # refused; in flight: the rename
        self.successResultOf(self.handler.upload_cross_signing_keys(ALICE, self.cs.upload_body()))
        laptop_ids = self.devices.create("LAPTOP")
        self.network.faults.bring_up(S)
        self.network.advance(backoff_delays(1)[0])
        txn = self.s.txns[-1]
        types = [e["edu_type"] for e in txn.body["edus"]]
        self.assertEqual(
            types, [EDU_SIGNING_KEY_UPDATE, EDU_DEVICE_LIST_UPDATE]
        )
        laptop = txn.edus(EDU_DEVICE_LIST_UPDATE)[0]
        self.assertEqual(laptop["stream_id"], laptop_ids[-1])
        # chained to the rename, over the signing-key change's id
        self.assertEqual(laptop["prev_id"], [self.device_ids[-1] + 1])
        self.assertEqual(self.s.resync_reasons(ALICE), [Reason.FIRST_CONTACT])
        self.assertEqual(self.s.keyed_devices(ALICE), truth(self, ALICE))

    def test_snapshot_taken_at_a_signing_key_change(self) -> None:
        signing_id = self.settle(
            self.handler.upload_cross_signing_keys(ALICE, self.cs.upload_body())
        )
        # S resyncs now: the snapshot's stream_id is the signing-key change's
        self.settle(Deferred.fromCoroutine(self.s.resync(A, ALICE)))
        state = self.s.states[ALICE]
        assert state is not None
        self.assertEqual(state.snapshot_stream_id, signing_id)
        self.settle(self.handler.rename_device(ALICE, "PHONE", "x"))
        self.assertEqual(self.s.edus()[-1]["prev_id"], [signing_id])
        self.assertEqual(self.s.actions(ALICE)[-1][1:], (Action.APPLY, Reason.PREV_KNOWN))
        self.assertEqual(self.s.resync_reasons(ALICE), [Reason.FIRST_CONTACT])

    def test_user_signing_key_alone_is_not_federated(self) -> None:
        self.settle(self.handler.upload_cross_signing_keys(ALICE, self.cs.upload_body()))
        n = len(self.s.txns)
        # a new user-signing key (signed by the same master key) is a change
        # of the stream, but private to its owner: nothing goes out
        other = CrossSigning(ALICE)
        body = {"user_signing_key": other.key_json("user_signing", self.cs.master)}
        stream_id = self.settle(self.handler.upload_cross_signing_keys(ALICE, body))
        self.assertIsNotNone(stream_id)
        self.assertEqual(len(self.s.txns), n)
        self.assertEqual(self.successResultOf(self.a.store.get_pending(S, 10)), [])


class UserDevicesTests(OutboundCase):
    """Scenario 19: /user/devices from A, and the next EDU's prev_id."""

    allow_names = True

    def test_next_edu_names_the_snapshot_stream_id(self) -> None:
        devices = Devices(self, ALICE)
        devices.create("PHONE", "Phone")
        devices.create("BARE", keys=False)
        self.flush()
        path = "/_matrix/federation/v1/user/devices/" + quote(ALICE, safe="")
        body = self.settle(Deferred.fromCoroutine(self.s.transport.client.get_json(A, path)))
        self.assertEqual([d["device_id"] for d in body["devices"]], ["PHONE"])
        self.assertEqual(body["devices"][0]["device_display_name"], "Phone")
        snapshot_id = body["stream_id"]
        self.assertEqual(snapshot_id, self.successResultOf(self.a.store.get_max_stream_id(ALICE)))
        self.settle(Deferred.fromCoroutine(self.s.resync(A, ALICE)))
        stream_id = self.settle(self.handler.rename_device(ALICE, "PHONE", "New"))
        last = self.s.edus()[-1]
        self.assertEqual((last["stream_id"], last["prev_id"]), (stream_id, [snapshot_id]))
        self.assertEqual(last["device_display_name"], "New")
        self.assertEqual(self.s.actions(ALICE)[-1], (stream_id, Action.APPLY, Reason.PREV_KNOWN))

    def test_non_local_user_is_a_json_4xx(self) -> None:
        path = "/_matrix/federation/v1/user/devices/" + quote("@sam:s.test", safe="")
        d = Deferred.fromCoroutine(self.s.transport.client.get_json(A, path))
        self.flush()
        error = self.failureResultOf(d, HttpResponseError).value
        assert isinstance(error, HttpResponseError)
        self.assertEqual((error.code, error.errcode), (400, M_INVALID_PARAM))


class BigBacklogTests(OutboundCase):
    """Scenario 20: at most 100 EDUs per transaction; a larger backlog goes
    out as several, in order."""

    def test_250_pending_go_out_as_100_100_50(self) -> None:
        # S already caches both users (else its first-contact resync of
        # each would cover the backlog)
        self.settle(self.handler.create_device(ALICE, "FIRST"))
        self.settle(self.handler.create_device(BOB, "FIRST"))
        contact = len(self.s.txns)
        self.a.stop()
        ids = []
        for i in range(250):
            user = ALICE if i % 2 == 0 else BOB
            ids.append((user, self.successResultOf(self.handler.create_device(user, f"D{i:03d}"))))
        self.assertEqual(len(self.successResultOf(self.a.store.get_pending(S, 1000))), 250)
        self.successResultOf(self.a.sender.start())
        self.flush()
        self.assertEqual([len(t.edus()) for t in self.s.txns[contact:]], [100, 100, 50])
        edus = [e for t in self.s.txns[contact:] for e in t.edus()]
        order = [(e["stream_id"], e["user_id"]) for e in edus]
        self.assertEqual(order, sorted(order))
        for user in (ALICE, BOB):
            mine = [e for e in edus if e["user_id"] == user]
            self.assertEqual(len(mine), 125)
            # chained across the three transactions, from the first contact
            self.assertChained(mine, [1])
        self.assertEqual(self.s.resync_reasons(ALICE), [Reason.FIRST_CONTACT])
        self.assertEqual(self.s.resync_reasons(BOB), [Reason.FIRST_CONTACT])
        # every device arrived (FIRST has no keys: /user/devices did not list it)
        self.assertEqual(
            sorted(self.s.devices[ALICE]), [f"D{i:03d}" for i in range(0, 250, 2)]
        )
        self.assertEqual(
            [(a, r) for _, a, r in self.s.actions(ALICE)][2:],
            [(Action.APPLY, Reason.PREV_KNOWN)] * 125,
        )
        self.assertEqual(self.successResultOf(self.a.store.get_pending(S, 1000)), [])


class StopTests(OutboundCase):
    """No delayed call is left after stop, whatever the sender was doing."""

    def test_stop_while_backing_off(self) -> None:
        self.network.faults.take_down(S)
        self.successResultOf(self.handler.create_device(ALICE, "PHONE"))
        self.flush()
        self.assertEqual(self.delayed(), [backoff_delays(1)[0]])
        self.a.stop()
        self.assertNoDelayedCalls()

    def test_stop_with_a_request_in_flight(self) -> None:
        self.s.script = [HANG]
        self.successResultOf(self.handler.create_device(ALICE, "PHONE"))
        self.flush()
        self.assertEqual(self.delayed(), [30.0])
        self.a.stop()
        self.flush()
        self.assertNoDelayedCalls()
        # and changes after stop send nothing
        self.successResultOf(self.handler.create_device(ALICE, "LAPTOP"))
        self.flush()
        self.assertEqual(len(self.send_requests()), 1)

    def test_stop_when_idle_and_twice(self) -> None:
        self.settle(self.handler.create_device(ALICE, "PHONE"))
        self.a.stop()
        self.a.stop()
        self.assertNoDelayedCalls()

    def test_stop_service(self) -> None:
        self.network.faults.take_down(S)
        self.successResultOf(self.handler.create_device(ALICE, "PHONE"))
        self.flush()
        d: Any = self.a.sender.stopService()
        self.successResultOf(d)
        self.assertNoDelayedCalls()
        self.a.sender.startService()
        self.assertEqual(self.delayed(), [backoff_delays(1)[0]])
