"""Instances for the outbound tests, on one FakeNetwork and a simulated clock.

:class:`LocalInstance` is a full sender side: its store (a SQLite file, so
that a restart can reopen it), federation transport, device handler,
``/user/devices`` endpoints, retry tracker (wired to the authenticator's
contact listener) and :class:`DeviceListSender`.

:class:`ReceivingServer` is the other side: a full transport whose
``PUT /send/{txnId}`` handler records every transaction, answers as scripted
(a status and body, or never), treats a repeated txnId as already processed,
and -- like a real second instance -- runs every ``m.device_list_update``
through :func:`devicelist_plugin.core.inbound.decide`, applying what it
may and resyncing from the sender's ``GET /user/devices`` when it must.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Union
from urllib.parse import quote

from signedjson.key import generate_signing_key
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from devicelist_plugin.core.backoff import BackoffPolicy
from devicelist_plugin.core.inbound import (
    Action,
    Decision,
    Reason,
    RemoteUserState,
    apply_snapshot,
    decide,
)
from devicelist_plugin.core.models import (
    EDU_DEVICE_LIST_UPDATE,
    EDU_SIGNING_KEY_UPDATE,
    DeviceListUpdate,
    JsonDict,
)
from devicelist_plugin.core.parse import parse_device_list_update, parse_user_devices_response
from devicelist_plugin.federation.local_endpoints import LocalDeviceEndpoints
from devicelist_plugin.federation.resource import JsonRequest
from devicelist_plugin.federation.transport import FederationTransport, build_federation_transport
from devicelist_plugin.local.handler import LocalDeviceHandler
from devicelist_plugin.membership import InMemoryMembership, MembershipSource
from devicelist_plugin.replication.retry import DestinationRetryTracker
from devicelist_plugin.replication.sender import DeviceListSender
from devicelist_plugin.storage import Store, open_sqlite_store
from tests.helpers import FakeNetwork

NOW = 1_700_000_000
A = "a.test"
S = "s.test"
T = "t.test"
ALICE = "@alice:a.test"
BOB = "@bob:a.test"

#: 10 s, 20 s, 40 s, 80 s, then 100 s; times the jitter factor, capped at 100 s.
POLICY = BackoffPolicy(min_interval=10, multiplier=2, max_interval=100)
JITTER = 1.2
SEND_PREFIX = "/_matrix/federation/v1/send/"


def fixed_jitter(low: float, high: float) -> float:
    return JITTER


def backoff_delays(n: int) -> list[float]:
    """The first ``n`` delays of :data:`POLICY` with :data:`JITTER`."""
    return [POLICY.delay(attempt, fixed_jitter) for attempt in range(n)]


class Hang:
    """A scripted answer that never comes (the sender's timeout ends it)."""


HANG = Hang()


@dataclass(frozen=True)
class Answer:
    code: int
    body: JsonDict = field(default_factory=dict)


Scripted = Union[Answer, Hang]


@dataclass(frozen=True)
class ReceivedTxn:
    txn_id: str
    origin: str
    body: JsonDict
    at: float
    # the status S answered with
    status: int

    def edus(self, edu_type: Optional[str] = None) -> list[JsonDict]:
        return [
            e["content"]
            for e in self.body.get("edus", [])
            if edu_type is None or e["edu_type"] == edu_type
        ]


class ReceivingServer:
    """See the module docstring."""

    def __init__(self, network: FakeNetwork, name: str, clock: MemoryReactorClock, store: Store) -> None:
        self.name = name
        self.clock = clock
        self.key = generate_signing_key(f"{name}_1")
        self.transport: FederationTransport = build_federation_transport(
            name, [self.key], store, clock, network.agent_for(name)
        )
        self.transport.resource.register(
            "PUT", SEND_PREFIX + "{txnId}", self.on_send, requires_auth=True, json_body=True
        )
        network.add_server(name, self.transport.root)
        #: answers to use, in order, before answering 200
        self.script: list[Scripted] = []
        #: every /send request, answered or not: (txn_id, body, time)
        self.requests: list[tuple[str, JsonDict, float]] = []
        #: the transactions answered with 200, first time only
        self.txns: list[ReceivedTxn] = []
        self.processed: set[str] = set()
        self.in_progress = 0
        self.max_in_progress = 0
        # the inbound side
        self.process = True
        self.states: dict[str, Optional[RemoteUserState]] = {}
        self.devices: dict[str, dict[str, JsonDict]] = {}
        self.signing_keys: dict[str, JsonDict] = {}
        self.decisions: list[Decision] = []
        self.resyncs: list[tuple[str, Reason]] = []

    # -- /send ------------------------------------------------------------

    async def on_send(self, request: JsonRequest) -> tuple[int, JsonDict]:
        txn_id = request.path_params["txnId"]
        body = request.require_content()
        self.requests.append((txn_id, body, self.clock.seconds()))
        self.in_progress += 1
        self.max_in_progress = max(self.max_in_progress, self.in_progress)
        try:
            if self.script:
                answer = self.script.pop(0)
                if isinstance(answer, Hang):
                    # no answer: wait until the client gives up and disconnects
                    try:
                        await request.raw.notifyFinish()
                    except Exception:
                        pass
                    return 500, {}
                if isinstance(answer, Answer) and answer.code != 200:
                    return answer.code, answer.body
            if txn_id not in self.processed:
                self.processed.add(txn_id)
                self.txns.append(
                    ReceivedTxn(txn_id, request.require_origin(), body, self.clock.seconds(), 200)
                )
                if self.process:
                    await self.apply(request.require_origin(), body)
            return 200, {"pdus": {}}
        finally:
            self.in_progress -= 1

    def edus(self, edu_type: str = EDU_DEVICE_LIST_UPDATE) -> list[JsonDict]:
        """Contents of every EDU of that type received, in order."""
        return [content for txn in self.txns for content in txn.edus(edu_type)]

    # -- the inbound decision -------------------------------------------------

    async def apply(self, origin: str, body: JsonDict) -> None:
        by_user: dict[str, list[DeviceListUpdate]] = {}
        for edu in body.get("edus", []):
            if edu["edu_type"] == EDU_DEVICE_LIST_UPDATE:
                update = parse_device_list_update(edu["content"])
                by_user.setdefault(update.user_id, []).append(update)
            elif edu["edu_type"] == EDU_SIGNING_KEY_UPDATE:
                self.signing_keys[edu["content"]["user_id"]] = edu["content"]
        for user_id, updates in by_user.items():
            batch = decide(self.states.get(user_id), updates, tracked=True, allow_hold=False)
            self.decisions.extend(batch.decisions)
            for update in batch.applied:
                self._apply_update(update)
            if batch.resync is None:
                self.states[user_id] = batch.state
                continue
            self.resyncs.append((user_id, batch.resync))
            await self.resync(origin, user_id, batch.deferred)

    def _apply_update(self, update: DeviceListUpdate) -> None:
        devices = self.devices.setdefault(update.user_id, {})
        if update.deleted:
            devices.pop(update.device_id, None)
        else:
            devices[update.device_id] = {
                "keys": None if update.keys is None else update.keys.raw,
                "name": update.display_name,
            }

    async def resync(
        self, origin: str, user_id: str, deferred: tuple[DeviceListUpdate, ...] = ()
    ) -> None:
        path = "/_matrix/federation/v1/user/devices/" + quote(user_id, safe="")
        answer = await self.transport.client.get_json(origin, path)
        snapshot = parse_user_devices_response(answer, expected_user_id=user_id)
        self.devices[user_id] = {
            d.device_id: {"keys": None if d.keys is None else d.keys.raw, "name": d.display_name}
            for d in snapshot.devices
        }
        state = apply_snapshot(snapshot.stream_id)
        if deferred:
            rerun = decide(state, deferred, tracked=True, allow_hold=False)
            self.decisions.extend(rerun.decisions)
            for update in rerun.applied:
                self._apply_update(update)
            assert rerun.resync is None, rerun
            assert rerun.state is not None
            state = rerun.state
        self.states[user_id] = state

    def keyed_devices(self, user_id: str) -> dict[str, JsonDict]:
        """The cached devices that have keys (what /user/devices lists)."""
        return {d: v["keys"] for d, v in self.devices.get(user_id, {}).items() if v["keys"]}

    def resync_reasons(self, user_id: str) -> list[Reason]:
        return [reason for user, reason in self.resyncs if user == user_id]

    def actions(self, user_id: str) -> list[tuple[int, Action, Reason]]:
        return [
            (d.update.stream_id, d.action, d.reason)
            for d in self.decisions
            if d.update.user_id == user_id
        ]


class LocalInstance:
    """Server ``name``: handler, endpoints and sender over a SQLite file."""

    def __init__(
        self,
        case: SynchronousTestCase,
        network: FakeNetwork,
        clock: MemoryReactorClock,
        name: str = A,
        *,
        path: Optional[str] = None,
        membership: Optional[MembershipSource] = None,
        membership_factory: Optional[Callable[[Store], MembershipSource]] = None,
        txn_ids: Optional[Iterator[int]] = None,
        allow_names: bool = False,
        start: bool = True,
        **sender_kwargs: Any,
    ) -> None:
        self.case = case
        self.network = network
        self.clock = clock
        self.name = name
        if path is None:
            directory = case.mktemp()
            os.makedirs(directory)
            path = os.path.join(directory, "devicelist.db")
        self.path = path
        self.key = generate_signing_key(f"{name}_1")
        self.membership_factory = membership_factory
        self.membership: MembershipSource = (
            membership if membership is not None else InMemoryMembership(name)
        )
        self.txn_ids = txn_ids if txn_ids is not None else itertools.count(1)
        self.allow_names = allow_names
        self.sender_kwargs = sender_kwargs
        self._open()
        if start:
            case.successResultOf(self.sender.start())

    def _open(self) -> None:
        self.store: Store = self.case.successResultOf(
            open_sqlite_store(self.path, MemoryReactorClock(), synchronous=True)
        )
        self.case.addCleanup(self.store.close)
        if self.membership_factory is not None:
            self.membership = self.membership_factory(self.store)
        self.transport = build_federation_transport(
            self.name, [self.key], self.store, self.clock, self.network.agent_for(self.name)
        )
        self.handler = LocalDeviceHandler(
            self.name,
            self.store,
            self.membership,
            self.clock,
            allow_device_name_lookup_over_federation=self.allow_names,
        )
        LocalDeviceEndpoints(self.handler).register(self.transport.resource)
        self.tracker = DestinationRetryTracker(self.store, self.clock, POLICY, fixed_jitter)
        self.transport.authenticator.add_contact_listener(self.tracker.on_contact)
        txn_ids = self.txn_ids
        self.sender = DeviceListSender(
            self.name,
            self.store,
            self.transport.client,
            self.clock,
            self.tracker,
            self.handler,
            self.membership,
            txn_id_factory=lambda now_ms: f"txn{next(txn_ids)}",
            **self.sender_kwargs,
        )
        self.network.add_server(self.name, self.transport.root)

    def stop(self) -> None:
        """Stop the sender: no timer may be left behind."""
        self.case.successResultOf(self.sender.stop())

    def restart(self, *, start: bool = True) -> None:
        """Stop everything and start a new instance on the same database
        file, as a process restart would (the membership is the host's)."""
        self.stop()
        self.network.remove_server(self.name)
        self.store.close()
        self._open()
        if start:
            self.case.successResultOf(self.sender.start())


class OutboundCase(SynchronousTestCase):
    """A (sender) and S (receiver) on one network; ALICE and BOB share a room with S."""

    share_with_s = True
    allow_names = False
    sender_kwargs: dict[str, Any] = {}

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(NOW)
        self.network = FakeNetwork(self.clock)
        self.s_store = self.open_store()
        self.s = ReceivingServer(self.network, S, self.clock, self.s_store)
        self.a = self.make_local()
        self.handler = self.a.handler
        if self.share_with_s:
            self.share(ALICE, S)
            self.share(BOB, S)

    def make_local(self) -> LocalInstance:
        return LocalInstance(
            self, self.network, self.clock, allow_names=self.allow_names, **self.sender_kwargs
        )

    def open_store(self) -> Store:
        store: Store = self.successResultOf(
            open_sqlite_store(":memory:", MemoryReactorClock(), synchronous=True)
        )
        self.addCleanup(store.close)
        return store

    def share(self, user_id: str, server: str) -> None:
        membership = self.a.membership
        assert isinstance(membership, InMemoryMembership)
        room = f"!{user_id[1:].split(':')[0]}-{server}:rooms.test"
        membership.join(room, user_id)
        membership.join(room, f"@peer:{server}")

    def flush(self) -> None:
        self.network.flush()

    def settle(self, d: "Deferred[Any]") -> Any:
        """The result of a handler call, after the network settled."""
        self.flush()
        return self.successResultOf(d)

    def send_requests(self, destination: str = S) -> list[str]:
        """The paths of A's /send requests to ``destination``, refused ones included."""
        return [
            r.path
            for r in self.network.requests(origin=A, destination=destination, path_prefix=SEND_PREFIX)
        ]

    def delayed(self) -> list[float]:
        """When each pending delayed call is due, relative to now."""
        now = self.clock.seconds()
        return sorted(round(c.getTime() - now, 6) for c in self.clock.getDelayedCalls())

    def assertNoDelayedCalls(self) -> None:
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def assertChained(self, contents: list[JsonDict], first_prev: list[int]) -> None:
        """Each EDU names the previous one's stream_id; the first names ``first_prev``."""
        self.assertTrue(contents)
        self.assertEqual(contents[0]["prev_id"], first_prev)
        for before, after in zip(contents, contents[1:]):
            self.assertGreater(after["stream_id"], before["stream_id"])
            self.assertEqual(after["prev_id"], [before["stream_id"]])
