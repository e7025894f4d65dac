"""The outbound sender beyond the scenarios: each 4xx answer, long-dead
destinations, several writers over one database, polling, sharding."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Optional

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from devicelist_plugin.core.inbound import Action, Reason, RemoteUserState, decide
from devicelist_plugin.core.models import EDU_DEVICE_LIST_UPDATE, JsonDict
from devicelist_plugin.core.parse import parse_device_list_update
from devicelist_plugin.federation.client import (
    NotRetryingDestination,
    QueryArgs,
    RequestSendFailed,
)
from devicelist_plugin.federation.errors import M_BAD_JSON, M_FORBIDDEN, M_UNAUTHORIZED, M_UNRECOGNIZED
from devicelist_plugin.local.handler import LocalDeviceHandler
from devicelist_plugin.membership import InMemoryMembership
from devicelist_plugin.replication.retry import DestinationRetryTracker
from devicelist_plugin.replication.sender import DeviceListSender, ErrorAction, action_for_error
from devicelist_plugin.storage import Store, open_sqlite_store
from tests.helpers.membership import share_room
from tests.local.keys import ClientDevice, CrossSigning
from tests.replication.outbound_harness import (
    A,
    ALICE,
    BOB,
    NOW,
    POLICY,
    SEND_PREFIX,
    S,
    T,
    Answer,
    LocalInstance,
    OutboundCase,
    backoff_delays,
    fixed_jitter,
)
from tests.helpers.store import SQLiteStoreCase, PostgresStoreCase

if TYPE_CHECKING:
    _Base = TestCase
else:
    _Base = object

M_TOO_LARGE = "M_TOO_LARGE"
M_LIMIT_EXCEEDED = "M_LIMIT_EXCEEDED"


def truth(case: SynchronousTestCase, handler: LocalDeviceHandler, user_id: str) -> dict[str, Any]:
    body = case.successResultOf(handler.user_devices_snapshot(user_id))
    return {d["device_id"]: d["keys"] for d in body["devices"]}


class ActionTableTests(SynchronousTestCase):
    """The 4xx table of the sender's module docstring."""

    def test_table(self) -> None:
        R, SPLIT, REBUILD = ErrorAction.RETRY, ErrorAction.SPLIT, ErrorAction.REBUILD
        table = [
            (400, M_BAD_JSON, 10, REBUILD),
            (400, None, 1, REBUILD),
            (400, M_UNRECOGNIZED, 10, R),
            (401, M_UNAUTHORIZED, 10, R),
            (403, M_FORBIDDEN, 10, R),
            (404, M_UNRECOGNIZED, 10, R),
            (404, None, 10, R),
            (405, M_UNRECOGNIZED, 10, R),
            (408, None, 10, R),
            (413, M_TOO_LARGE, 10, SPLIT),
            (413, M_TOO_LARGE, 2, SPLIT),
            (413, M_TOO_LARGE, 1, REBUILD),
            (429, M_LIMIT_EXCEEDED, 10, R),
            (418, None, 10, R),
            (500, None, 10, R),
            (502, None, 10, R),
            (503, None, 10, R),
            (301, None, 10, R),
        ]
        for code, errcode, n, expected in table:
            self.assertEqual(action_for_error(code, errcode, n), expected, (code, errcode, n))


class ErrorAnswerTests(OutboundCase):
    """Each non-200 answer, on a backlog of four devices after S knows @alice."""

    def setUp(self) -> None:
        super().setUp()
        self.settle(self.handler.create_device(ALICE, "FIRST"))
        self.a.stop()
        self.clients = {}
        for i in range(4):
            device = f"D{i}"
            self.clients[device] = ClientDevice(ALICE, device)
            self.successResultOf(self.handler.create_device(ALICE, device))
        self.sent_before = len(self.send_requests())

    def start(self, *answers: Answer) -> None:
        self.s.script = list(answers)
        self.successResultOf(self.a.sender.start())
        self.flush()

    def txn_ids(self) -> list[str]:
        return [p[len(SEND_PREFIX):] for p in self.send_requests()[self.sent_before :]]

    def sizes(self) -> list[int]:
        return [len(body["edus"]) for _, body, _ in self.s.requests[1:]]

    def assertDelivered(self) -> None:
        self.assertNoDelayedCalls()
        self.assertEqual(self.successResultOf(self.a.store.get_pending(S, 100)), [])
        self.assertEqual(sorted(self.s.devices[ALICE]), ["D0", "D1", "D2", "D3"])
        self.assertEqual(self.s.resync_reasons(ALICE), [Reason.FIRST_CONTACT])

    def test_400_rebuilds_a_smaller_transaction_after_the_backoff(self) -> None:
        self.start(Answer(400, {"errcode": M_BAD_JSON, "error": "no"}))
        self.assertEqual(self.delayed(), [backoff_delays(1)[0]])
        # abandoned; the rows are still pending
        self.assertIsNone(self.successResultOf(self.a.store.get_inflight_txn(S)))
        self.assertEqual(len(self.successResultOf(self.a.store.get_pending(S, 100))), 4)
        self.network.advance(backoff_delays(1)[0])
        self.assertEqual(self.txn_ids(), ["txn2", "txn3", "txn4"])
        self.assertEqual(self.sizes(), [4, 2, 2])
        self.assertDelivered()

    def test_endpoint_not_spoken_retries_the_same_transaction(self) -> None:
        self.start(
            Answer(404, {"errcode": M_UNRECOGNIZED, "error": "Unrecognized request"}),
            Answer(400, {"errcode": M_UNRECOGNIZED, "error": "Unrecognized request"}),
            Answer(405, {"errcode": M_UNRECOGNIZED, "error": "Unrecognized request"}),
        )
        d = backoff_delays(3)
        self.network.advance(d[0])
        self.network.advance(d[1])
        self.assertEqual(self.delayed(), [d[2]])
        self.network.advance(d[2])
        self.assertEqual(self.txn_ids(), ["txn2"] * 4)
        self.assertEqual(self.sizes(), [4] * 4)
        self.assertDelivered()

    def test_401_and_403_retry_the_same_transaction(self) -> None:
        self.start(
            Answer(401, {"errcode": M_UNAUTHORIZED, "error": "no key"}),
            Answer(403, {"errcode": M_FORBIDDEN, "error": "acl"}),
        )
        d = backoff_delays(2)
        self.network.advance(d[0])
        self.network.advance(d[1])
        self.assertEqual(self.txn_ids(), ["txn2"] * 3)
        self.assertDelivered()

    def test_413_splits_at_once_without_backoff(self) -> None:
        self.start(Answer(413, {"errcode": M_TOO_LARGE, "error": "too big"}))
        # no clock advance: the same rows went out again as two transactions
        self.assertEqual(self.txn_ids(), ["txn2", "txn3", "txn4"])
        self.assertEqual(self.sizes(), [4, 2, 2])
        self.assertIsNone(self.successResultOf(self.a.store.get_retry_state(S)))
        self.assertDelivered()

    def test_413_of_a_single_edu_backs_off(self) -> None:
        self.start(*[Answer(413, {"errcode": M_TOO_LARGE, "error": "too big"})] * 3)
        # 4 -> 2 -> 1, then that single EDU is refused: backoff
        self.assertEqual(self.sizes(), [4, 2, 1])
        self.assertEqual(self.delayed(), [backoff_delays(1)[0]])
        self.network.advance(backoff_delays(1)[0])
        self.assertEqual(self.sizes()[3:], [1, 2, 1])
        self.assertDelivered()

    def test_429_waits_for_retry_after_ms(self) -> None:
        self.start(Answer(429, {"errcode": M_LIMIT_EXCEEDED, "error": "slow", "retry_after_ms": 50_000}))
        self.assertEqual(self.delayed(), [50.0])  # longer than the 12 s backoff
        self.clock.advance(20)
        # a change does not cut the wait short
        self.successResultOf(self.handler.rename_device(ALICE, "D0", "x"))
        self.flush()
        self.assertEqual(self.txn_ids(), ["txn2"])
        self.network.advance(30)
        self.assertEqual(self.txn_ids(), ["txn2", "txn2", "txn3"])
        self.assertDelivered()

    def test_429_with_a_short_retry_after_uses_the_backoff(self) -> None:
        self.start(Answer(429, {"errcode": M_LIMIT_EXCEEDED, "error": "slow", "retry_after_ms": 1000}))
        self.assertEqual(self.delayed(), [backoff_delays(1)[0]])
        self.network.advance(backoff_delays(1)[0])
        self.assertDelivered()


class ResetSurvivesAbandonTests(OutboundCase):
    """A transaction restarting a chain that is abandoned (400, 413): the
    transaction built instead restarts it too."""

    share_with_s = False

    def test_split_keeps_the_restart(self) -> None:
        membership = self.a.membership
        assert isinstance(membership, InMemoryMembership)
        membership.join("!room:a.test", ALICE)
        membership.join("!room:a.test", "@sam:s.test")
        for device_id in ("D1", "D2", "D3", "D4"):
            self.successResultOf(self.handler.create_device(ALICE, device_id))
            keys = ClientDevice(ALICE, device_id).device_keys()
            self.successResultOf(self.handler.upload_device_keys(ALICE, device_id, keys))
        self.flush()
        self.assertEqual(sorted(self.s.keyed_devices(ALICE)), ["D1", "D2", "D3", "D4"])
        # S leaves; meanwhile D4 is deleted, then D1 renamed (the latest change)
        membership.leave("!room:a.test", "@sam:s.test")
        self.successResultOf(self.handler.delete_device(ALICE, "D4"))
        self.successResultOf(self.handler.rename_device(ALICE, "D1", "one"))
        n = len(self.s.edus())
        self.s.script = [Answer(413, {"errcode": M_TOO_LARGE, "error": "too big"})]
        membership.join("!room:a.test", "@sam:s.test")
        self.flush()
        self.assertEqual(len(self.s.requests[-3][1]["edus"]), 3)  # refused, then 1 + 2
        restarted = self.s.edus()[n:]
        self.assertEqual(len(restarted), 3)
        # every EDU of the rebuilt transactions still restarts the chain, so
        # S resyncs and learns of the deletion it missed
        self.assertTrue(all(e["prev_id"] == [] for e in restarted), restarted)
        self.assertIn(Reason.EMPTY_PREV_ID, self.s.resync_reasons(ALICE))
        self.assertEqual(sorted(self.s.keyed_devices(ALICE)), ["D1", "D2", "D3"])
        self.assertEqual(
            self.successResultOf(self.a.store.count_outbound_rows(S)).chain_resets, 0
        )


class FakeClient:
    """A TransactionClient that records calls and raises scripted errors."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, JsonDict]] = []
        self.errors: list[Exception] = []

    async def put_json(
        self,
        destination: str,
        path: str,
        body: JsonDict,
        args: Optional[QueryArgs] = None,
        timeout: Optional[float] = None,
    ) -> JsonDict:
        self.calls.append((destination, path, body))
        if self.errors:
            raise self.errors.pop(0)
        return {"pdus": {}}


class FakeClientCase(SynchronousTestCase):
    """A sender with a :class:`FakeClient` on an inline store."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(NOW)
        directory = self.mktemp()
        os.makedirs(directory)
        self.path = os.path.join(directory, "devicelist.db")
        self.store = self.open()
        self.membership = InMemoryMembership(A)
        share_room(self.membership, ALICE, S)
        share_room(self.membership, ALICE, T)
        self.handler = LocalDeviceHandler(A, self.store, self.membership, self.clock)
        self.client = FakeClient()
        self.tracker = DestinationRetryTracker(self.store, self.clock, POLICY, fixed_jitter)

    def open(self) -> Store:
        store: Store = self.successResultOf(
            open_sqlite_store(self.path, MemoryReactorClock(), synchronous=True)
        )
        self.addCleanup(store.close)
        return store

    def sender(self, **kwargs: Any) -> DeviceListSender:
        sender = DeviceListSender(
            A, self.store, self.client, self.clock, self.tracker, self.handler, self.membership,
            **kwargs,
        )
        self.successResultOf(sender.start())
        self.addCleanup(lambda: self.successResultOf(sender.stop()))
        return sender

    def edus_to(self, destination: str) -> list[JsonDict]:
        return [
            e["content"] for d, _, body in self.client.calls if d == destination for e in body["edus"]
        ]


class ImmediateSendTests(FakeClientCase):
    """A change reaches an idle destination at its commit: no timer, no
    coalescing delay, and no store read that the sender can know the answer
    of."""

    def count_reads(self, *names: str) -> dict[str, int]:
        counts = {name: 0 for name in names}
        for name in names:
            original = getattr(self.store, name)

            def counting(
                *args: Any, _name: str = name, _original: Any = original, **kwargs: Any
            ) -> Any:
                counts[_name] += 1
                return _original(*args, **kwargs)

            self.patch(self.store, name, counting)
        return counts

    def test_sent_at_the_commit_without_a_timer(self) -> None:
        sender = self.sender()
        self.successResultOf(self.handler.create_device(ALICE, "PHONE"))
        # the simulated clock never moved: both requests went out at the commit
        self.assertEqual(sorted(d for d, _, _ in self.client.calls), [S, T])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(sender.transactions_sent, 2)

    def test_a_change_wakes_its_destinations_without_reading_them(self) -> None:
        self.sender()
        names = ("destinations_pending_for_user", "get_inflight_txn", "get_outbound_batch",
                 "get_local_user_keys", "get_device")
        reads = self.count_reads(*names)
        self.successResultOf(self.handler.create_device(ALICE, "PHONE"))
        # the first transaction to each destination reads its in-flight one;
        # each reads its rows with their devices' state at once (and once
        # more after the answer: nothing left)
        self.assertEqual(list(reads.values()), [0, 2, 4, 0, 0])
        self.successResultOf(self.handler.rename_device(ALICE, "PHONE", "mine"))
        # acknowledged by this sender: known to have none
        self.assertEqual(list(reads.values()), [0, 2, 8, 0, 0])
        self.assertEqual(len(self.client.calls), 4)
        self.assertEqual(self.successResultOf(self.store.destinations_to_send()), [])
        self.successResultOf(self.handler.delete_device(ALICE, "PHONE"))
        self.assertEqual(
            [(e.get("device_display_name"), e.get("deleted")) for e in self.edus_to(S)],
            [(None, None), (None, None), (None, True)],
        )

    def test_a_failed_transaction_is_sent_again_unchanged(self) -> None:
        self.sender(owns_destination=lambda d: d == S)
        self.client.errors = [RequestSendFailed("refused", True)]
        self.successResultOf(self.handler.create_device(ALICE, "PHONE"))
        self.successResultOf(self.handler.rename_device(ALICE, "PHONE", "mine"))
        self.assertEqual(len(self.client.calls), 1)
        self.clock.advance(backoff_delays(1)[0])
        self.assertEqual(len(self.client.calls), 3)
        # the retry is the persisted transaction (same txnId and body), then
        # the rename follows in a new one
        self.assertEqual(self.client.calls[0][1:], self.client.calls[1][1:])
        self.assertNotEqual(self.client.calls[1][1], self.client.calls[2][1])
        self.assertEqual(self.successResultOf(self.store.get_pending(S, 10)), [])

    def gate_persisting(self) -> "list[Deferred[None]]":
        gates: "list[Deferred[None]]" = []
        original = self.store.begin_outbound_transaction

        def gated(*args: Any) -> "Deferred[None]":
            gate: "Deferred[None]" = Deferred()
            gates.append(gate)
            return gate.addCallback(lambda _: original(*args))

        self.patch(self.store, "begin_outbound_transaction", gated)
        return gates

    def test_sent_while_persisting_and_acknowledged_after(self) -> None:
        self.sender(owns_destination=lambda d: d == S)
        gates = self.gate_persisting()
        self.successResultOf(self.handler.create_device(ALICE, "PHONE"))
        # the request went out before the in-flight transaction committed
        self.assertEqual(len(self.client.calls), 1)
        self.assertEqual(len(gates), 1)
        # its answer waits for the commit: nothing acknowledged yet
        self.assertEqual(len(self.successResultOf(self.store.get_pending(S, 10))), 1)
        gates[0].callback(None)
        self.assertEqual(self.successResultOf(self.store.get_pending(S, 10)), [])
        self.assertIsNone(self.successResultOf(self.store.get_inflight_txn(S)))

    def test_a_failure_answered_before_the_commit_resends_the_persisted_one(self) -> None:
        self.sender(owns_destination=lambda d: d == S)
        gates = self.gate_persisting()
        self.client.errors = [RequestSendFailed("refused", True)]
        self.successResultOf(self.handler.create_device(ALICE, "PHONE"))
        gates[0].callback(None)
        inflight = self.successResultOf(self.store.get_inflight_txn(S))
        assert inflight is not None
        self.clock.advance(backoff_delays(1)[0])
        self.assertEqual(len(self.client.calls), 2)
        self.assertEqual(self.client.calls[1][1], SEND_PREFIX + inflight.txn_id)
        self.assertEqual(self.successResultOf(self.store.get_pending(S, 10)), [])

    def test_a_failed_commit_loses_nothing(self) -> None:
        self.sender(owns_destination=lambda d: d == S)
        gates = self.gate_persisting()
        self.client.errors = [RequestSendFailed("refused", True)]
        self.successResultOf(self.handler.create_device(ALICE, "PHONE"))
        gates[0].errback(RuntimeError("disk full"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertIsNone(self.successResultOf(self.store.get_inflight_txn(S)))
        # the retry builds a new transaction from the rows still pending
        self.clock.advance(backoff_delays(1)[0])
        gates[1].callback(None)
        self.assertEqual(len(self.client.calls), 2)
        self.assertNotEqual(self.client.calls[0][1], self.client.calls[1][1])
        self.assertEqual([e["device_id"] for e in self.edus_to(S)], ["PHONE", "PHONE"])
        self.assertEqual(self.successResultOf(self.store.get_pending(S, 10)), [])

    def test_stop_waits_for_the_commit_of_a_transaction_it_did_not_send(self) -> None:
        sender = self.sender(owns_destination=lambda d: d == S)
        gates = self.gate_persisting()
        original = self.store.get_outbound_batch

        def stops_meanwhile(*args: Any, **kwargs: Any) -> Any:
            # the sender is stopped while it builds the transaction
            stopped.append(sender.stop())
            return original(*args, **kwargs)

        stopped: "list[Deferred[None]]" = []
        self.patch(self.store, "get_outbound_batch", stops_meanwhile)
        self.successResultOf(self.handler.create_device(ALICE, "PHONE"))
        self.assertEqual(self.client.calls, [])
        self.assertNoResult(stopped[0])
        gates[0].callback(None)
        self.successResultOf(stopped[0])
        self.assertIsNotNone(self.successResultOf(self.store.get_inflight_txn(S)))

    def test_restart_reads_the_in_flight_transaction_again(self) -> None:
        sender = self.sender(owns_destination=lambda d: d == S)
        self.successResultOf(self.handler.create_device(ALICE, "PHONE"))
        self.successResultOf(sender.stop())
        # a transaction left in flight meanwhile (by another run sharing
        # the database) is what the restarted sender sends first
        self.successResultOf(self.handler.rename_device(ALICE, "PHONE", "mine"))
        body = {"origin": A, "origin_server_ts": 0, "pdus": [], "edus": []}
        payload = {"version": 1, "body": body, "sent": [], "unreferenced_after": {},
                   "restarted": []}
        self.successResultOf(self.store.begin_outbound_transaction(S, "left", payload, ()))
        self.successResultOf(sender.start())
        self.assertEqual([path.rsplit("/", 1)[1] for _, path, _ in self.client.calls[1:2]],
                         ["left"])
        self.assertEqual(len(self.client.calls), 3)
        self.assertIsNone(self.successResultOf(self.store.get_inflight_txn(S)))
        self.assertEqual(self.successResultOf(self.store.get_pending(S, 10)), [])


class ShardingAndPollingTests(FakeClientCase):
    def test_only_owned_destinations_are_served(self) -> None:
        self.sender(owns_destination=lambda d: d == T)
        self.successResultOf(self.handler.create_device(ALICE, "PHONE"))
        self.assertEqual([d for d, _, _ in self.client.calls], [T])
        # S's rows stay for the process that owns it
        self.assertEqual(len(self.successResultOf(self.store.get_pending(S, 10))), 1)

    def test_poll_finds_changes_of_other_processes(self) -> None:
        sender = self.sender(poll_interval=5)
        # a second writer whose change listeners this sender does not hear
        other = LocalDeviceHandler(A, self.open(), self.membership, self.clock)
        self.successResultOf(other.create_device(ALICE, "PHONE"))
        self.assertEqual(self.client.calls, [])
        self.clock.advance(5)  # the poll
        self.assertEqual(sorted(d for d, _, _ in self.client.calls), [S, T])
        self.assertEqual(sender.transactions_sent, 2)
        self.successResultOf(sender.stop())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_poll_leaves_a_backing_off_destination_alone(self) -> None:
        self.sender(poll_interval=5, owns_destination=lambda d: d == S)
        self.client.errors = [RequestSendFailed("refused", True)]
        self.successResultOf(self.handler.create_device(ALICE, "PHONE"))
        self.assertEqual(len(self.client.calls), 1)
        self.clock.advance(5)  # poll; S retries only at 12 s
        self.clock.advance(5)
        self.assertEqual(len(self.client.calls), 1)
        self.clock.advance(2)  # 12 s: the retry
        self.assertEqual(len(self.client.calls), 2)

    def test_not_retrying_destination_is_rescheduled_without_a_failure(self) -> None:
        self.sender(owns_destination=lambda d: d == S)
        self.client.errors = [NotRetryingDestination(S, NOW + 30)]
        self.successResultOf(self.handler.create_device(ALICE, "PHONE"))
        self.assertEqual([c.getTime() for c in self.clock.getDelayedCalls()], [NOW + 30])
        self.assertIsNone(self.successResultOf(self.store.get_retry_state(S)))
        self.clock.advance(30)
        self.assertEqual(len(self.client.calls), 2)
        self.assertEqual(self.successResultOf(self.store.get_pending(S, 10)), [])

    def test_unexpected_client_error_is_a_failure_not_a_drop(self) -> None:
        self.sender(owns_destination=lambda d: d == S)
        self.client.errors = [RuntimeError("bug")]
        self.successResultOf(self.handler.create_device(ALICE, "PHONE"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(len(self.successResultOf(self.store.get_pending(S, 10))), 1)
        self.clock.advance(backoff_delays(1)[0])
        self.assertEqual(self.successResultOf(self.store.get_pending(S, 10)), [])

    def test_a_foreign_in_flight_payload_is_rebuilt(self) -> None:
        self.successResultOf(self.handler.create_device(ALICE, "PHONE"))
        self.successResultOf(self.store.set_inflight_txn(S, "old", {"something": "else"}))
        self.sender(owns_destination=lambda d: d == S)
        self.assertEqual(len(self.client.calls), 1)
        self.assertNotIn("/old", self.client.calls[0][1])
        self.assertEqual([e["device_id"] for e in self.edus_to(S)], ["PHONE"])

    def test_catch_up_sends_a_lone_in_flight_transaction(self) -> None:
        sender = self.sender(owns_destination=lambda d: d == S)
        self.client.errors = [RequestSendFailed("refused", True)]
        self.successResultOf(self.handler.create_device(ALICE, "PHONE"))
        self.successResultOf(sender.stop())
        # its rows are acknowledged some other way (a /user/devices snapshot)
        self.successResultOf(self.store.record_snapshot_served(S, ALICE, 1))
        self.assertEqual(self.successResultOf(self.store.get_pending(S, 10)), [])
        self.assertIn(S, self.successResultOf(self.store.destinations_to_send()))
        self.clock.advance(backoff_delays(1)[0])
        self.sender(owns_destination=lambda d: d == S)
        self.assertEqual(len(self.client.calls), 2)
        self.assertEqual(self.client.calls[0][2], self.client.calls[1][2])
        self.assertIsNone(self.successResultOf(self.store.get_inflight_txn(S)))

    def test_bad_arguments(self) -> None:
        with self.assertRaises(ValueError):
            DeviceListSender(A, self.store, self.client, self.clock, self.tracker, self.handler,
                             edu_limit=0)
        with self.assertRaises(ValueError):
            DeviceListSender(A, self.store, self.client, self.clock, self.tracker, self.handler,
                             edu_limit=101)
        with self.assertRaises(ValueError):
            DeviceListSender(A, self.store, self.client, self.clock, self.tracker, self.handler,
                             poll_interval=0)
        with self.assertRaises(ValueError):
            DeviceListSender(A, self.store, self.client, self.clock, self.tracker, self.handler,
                             dead_destination_after=-1)


class DeadDestinationTests(OutboundCase):
    """The long-dead destination policy: bounded storage, convergence on return."""

    sender_kwargs = {"dead_destination_after": 300.0}

    def churn(self, first: int, n: int) -> None:
        for i in range(first, first + n):
            self.successResultOf(self.handler.create_device(ALICE, f"BOT{i}"))
            self.successResultOf(self.handler.delete_device(ALICE, f"BOT{i}"))

    def counts(self) -> tuple[int, int, int]:
        c = self.successResultOf(self.a.store.count_outbound_rows(S))
        return c.pending, c.unreferenced, c.chain_resets

    def test_compacted_then_converges_when_back(self) -> None:
        phone = ClientDevice(ALICE, "PHONE")
        self.successResultOf(self.handler.create_device(ALICE, "PHONE"))
        self.successResultOf(self.handler.upload_device_keys(ALICE, "PHONE", phone.device_keys()))
        self.settle(self.handler.create_device(BOB, "PHONE"))
        cs = CrossSigning(ALICE)
        self.network.faults.take_down(S)
        t0 = self.clock.seconds()
        self.churn(0, 10)
        self.successResultOf(self.handler.rename_device(BOB, "PHONE", "b"))
        self.successResultOf(self.handler.upload_cross_signing_keys(ALICE, cs.upload_body()))
        self.flush()
        # failures at 0, 12, 36, 84, 180, 280 s: not yet dead
        d = backoff_delays(6)
        for delay in d[:5]:
            self.network.advance(delay)
        self.assertEqual(self.clock.seconds() - t0, 280)
        self.assertEqual(self.counts()[0], 12)  # 10 bots, bob's phone, alice's keys
        self.network.advance(d[5])  # 380 s: dead for 300 s: compacted
        self.assertEqual(self.counts(), (1, 2, 2))  # the signing-key row; a reset per user
        self.assertEqual(self.a.sender.compacted_rows, 11)
        # more churn while dead: bounded by what one backoff period adds
        self.churn(10, 5)
        self.assertEqual(self.counts()[0], 6)
        self.network.advance(100)  # 480 s: compacted again
        self.assertEqual(self.counts(), (1, 2, 2))
        # S is back: the in-flight transaction, then one EDU per reset user
        self.network.faults.bring_up(S)
        n = len(self.s.txns)
        self.network.advance(100)
        new = [e for t in self.s.txns[n:] for e in t.edus(EDU_DEVICE_LIST_UPDATE)]
        restarted = new[1:]
        self.assertEqual(sorted(e["user_id"] for e in restarted), [ALICE, BOB])
        self.assertTrue(all(e["prev_id"] == [] for e in restarted))
        self.assertEqual(self.s.resync_reasons(ALICE)[-1], Reason.EMPTY_PREV_ID)
        self.assertEqual(self.s.resync_reasons(BOB)[-1], Reason.EMPTY_PREV_ID)
        # S converged: the bots are gone, the keys are there
        self.assertEqual(sorted(self.s.devices[ALICE]), ["PHONE"])
        self.assertEqual(self.s.keyed_devices(ALICE), truth(self, self.handler, ALICE))
        self.assertEqual(self.s.signing_keys[ALICE]["master_key"], cs.master_json)
        self.assertEqual(self.counts(), (0, 2, 0))
        self.assertNoDelayedCalls()
        # and chains go on from there
        self.settle(self.handler.rename_device(ALICE, "PHONE", "p"))
        self.assertEqual(self.s.actions(ALICE)[-1][1:], (Action.APPLY, Reason.PREV_KNOWN))

    def test_compaction_can_be_turned_off(self) -> None:
        self.a.stop()
        self.network.remove_server(A)
        self.a = LocalInstance(self, self.network, self.clock, compact_dead_destinations=False)
        self.handler = self.a.handler
        share_room_inmemory(self.a, ALICE, S)
        self.network.faults.take_down(S)
        self.churn(0, 5)
        self.network.advance(1000)
        self.assertIsNone(self.a.sender.dead_destination_after)
        self.assertEqual(self.counts()[0], 5)


def share_room_inmemory(instance: LocalInstance, user_id: str, server: str) -> None:
    membership = instance.membership
    assert isinstance(membership, InMemoryMembership)
    share_room(membership, user_id, server)


class TwoWritersTests(OutboundCase):
    """Two handlers (two processes' writers) over one SQLite file: stream
    ids and prev_ids stay right whichever writer made a change."""

    def test_interleaved_writers(self) -> None:
        other_store: Store = self.successResultOf(
            open_sqlite_store(self.a.path, MemoryReactorClock(), synchronous=True)
        )
        self.addCleanup(other_store.close)
        other = LocalDeviceHandler(A, other_store, self.a.membership, self.clock)
        other.add_change_listener(self.a.sender.on_local_change)
        writers = [self.handler, other]
        clients = {f"D{i}": ClientDevice(ALICE, f"D{i}") for i in range(6)}
        ids: list[int] = []
        for i, (device_id, client) in enumerate(clients.items()):
            w = writers[i % 2]
            ids.append(self.successResultOf(w.create_device(ALICE, device_id)))
            if i % 3 == 0:
                self.flush()
            key_id = self.successResultOf(
                writers[(i + 1) % 2].upload_device_keys(ALICE, device_id, client.device_keys())
            )
            assert key_id is not None
            ids.append(key_id)
        self.successResultOf(other.delete_device(ALICE, "D1"))
        self.successResultOf(self.handler.rename_device(ALICE, "D2", "two"))
        cs = CrossSigning(ALICE)
        self.successResultOf(other.upload_cross_signing_keys(ALICE, cs.upload_body()))
        self.successResultOf(self.handler.delete_device(ALICE, "D3"))
        self.flush()
        self.assertEqual(ids, list(range(1, 13)))  # one stream, whichever writer
        self.assertEqual(self.s.resync_reasons(ALICE), [Reason.FIRST_CONTACT])
        self.assertTrue(
            all(a in (Action.APPLY, Action.SKIP) for _, a, _ in self.s.actions(ALICE)[1:])
        )
        self.assertEqual(self.s.keyed_devices(ALICE), truth(self, self.handler, ALICE))
        self.assertEqual(sorted(self.s.keyed_devices(ALICE)), ["D0", "D2", "D4", "D5"])


class ConcurrentWritersMixin(_Base):
    """Two writers with real threads over one database commit changes
    concurrently; the sender's EDUs still chain exactly."""

    def open_store(self) -> "Deferred[Store]":
        raise AssertionError("subclasses provide open_store")

    async def test_concurrent_writers_chain(self) -> None:
        first = await self.open_store()
        self.addCleanup(first.close)
        second = await self.open_store()
        self.addCleanup(second.close)
        membership = InMemoryMembership(A)
        share_room(membership, ALICE, S)
        share_room(membership, BOB, S)
        clock: IReactorTime = reactor
        writers = [
            LocalDeviceHandler(A, store, membership, clock) for store in (first, second)
        ]
        client = FakeClient()
        tracker = DestinationRetryTracker(first, clock, POLICY, fixed_jitter)
        sender = DeviceListSender(A, first, client, clock, tracker, writers[0], membership)
        writers[1].add_change_listener(sender.on_local_change)
        await sender.start()
        changes = []
        for i in range(12):
            user = ALICE if i % 3 else BOB
            changes.append(writers[i % 2].create_device(user, f"D{i}"))
            changes.append(writers[(i + 1) % 2].create_device(user, f"E{i}"))
        await gatherResults(changes)
        await gatherResults(
            [writers[i % 2].rename_device(ALICE, f"D{i}", f"n{i}") for i in (1, 2, 4, 5)]
            + [writers[i % 2].delete_device(BOB, f"E{i}") for i in (0, 3)]
        )
        for _ in range(50):
            await sender.idle()
            if not await first.get_pending(S, 100):
                break
        await sender.stop()
        self.assertEqual(await first.get_pending(S, 100), [])
        # every EDU of a user chains from the one before it, in order
        for user in (ALICE, BOB):
            edus = [
                parse_device_list_update(e["content"])
                for _, _, body in client.calls
                for e in body["edus"]
                if e["content"]["user_id"] == user
            ]
            self.assertEqual(edus[0].prev_ids, ())
            for before, after in zip(edus, edus[1:]):
                self.assertEqual(after.prev_ids, (before.stream_id,))
            # and a receiver holding the first applies all the rest
            state = RemoteUserState(snapshot_stream_id=edus[0].stream_id, known_ids=frozenset(), stale=False)
            batch = decide(state, edus[1:], tracked=True, allow_hold=False)
            self.assertEqual(batch.resync, None)
            self.assertEqual(len(batch.applied), len(edus) - 1)
            # the last EDU of each device is its current state
            last = {e.device_id: e for e in edus}
            devices = {d.device_id for d in await first.get_devices(user)}
            self.assertEqual({d for d, e in last.items() if not e.deleted}, devices)


class SQLiteConcurrentWritersTests(SQLiteStoreCase, ConcurrentWritersMixin):
    pass


class PostgresConcurrentWritersTests(PostgresStoreCase, ConcurrentWritersMixin):
    pass
