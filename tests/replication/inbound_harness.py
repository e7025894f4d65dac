"""Instances for the inbound tests: A (this project, complete inbound side)
and scripted remote servers that serve their users' device lists and send A
signed transactions, all on one FakeNetwork and one simulated clock.

Timers that exist in these tests (each ``advance`` in a test names one):

- A's hold timer: ``UpdaterConfig.hold_grace`` (2 s) after an EDU with an
  unknown ``prev_id`` was queued;
- A's server backoff timer: the retry tracker's interval (:data:`POLICY`:
  60 s, 120 s, 240 s, ... up to 3600 s, no jitter);
- A's per-user backoff timer: :data:`USER_POLICY` (300 s, 600 s, ...);
- A's federation client deadline: 30 s for ``GET /user/devices``, 10 s for
  ``POST /user/keys/query``;
- A's key query wait: the ``timeout`` of ``query_keys`` (10 s);
- A's transaction pruning: every 30 min, forgetting ids older than 24 h.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional
from urllib.parse import quote

from signedjson.key import generate_signing_key, get_verify_key
from signedjson.types import SigningKey
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from devicelist_plugin.core.backoff import BackoffPolicy
from devicelist_plugin.core.models import JsonDict
from devicelist_plugin.federation.errors import M_INVALID_PARAM, M_UNKNOWN, MatrixError
from devicelist_plugin.federation.resource import JsonRequest
from devicelist_plugin.federation.signing_keys import OldVerifyKey
from devicelist_plugin.federation.transport import (
    FederationTransport,
    FederationTransportConfig,
    build_federation_transport,
)
from devicelist_plugin.local.handler import LocalDeviceHandler
from devicelist_plugin.membership import InMemoryMembership
from devicelist_plugin.replication.inbound import InboundConfig, InboundDeviceLists
from devicelist_plugin.replication.retry import DestinationRetryTracker
from devicelist_plugin.replication.updater import RemoteDeviceListChange, UpdaterConfig
from devicelist_plugin.storage import Store, open_sqlite_store
from tests.helpers import FakeNetwork

NOW_S = 1_700_000_000
A = "a.test"
S = "s.test"
T = "t.test"
ALICE = "@alice:a.test"  # A's local user

#: the shared per-destination backoff in these tests: 60 s, 120 s, 240 s, ...
POLICY = BackoffPolicy(min_interval=60, multiplier=2, max_interval=3600)
#: the per-user backoff in these tests: 300 s, 600 s, ...
USER_POLICY = BackoffPolicy(min_interval=300, multiplier=2, max_interval=7200)

SEND_PREFIX = "/_matrix/federation/v1/send/"
DEVICES_PREFIX = "/_matrix/federation/v1/user/devices/"
KEYS_QUERY_PATH = "/_matrix/federation/v1/user/keys/query"


def no_jitter(low: float, high: float) -> float:
    return 1.0


def fake_device_keys(user_id: str, device_id: str, version: int = 1) -> JsonDict:
    """A DeviceKeys object (not really signed: nothing here verifies it)."""
    return {
        "user_id": user_id,
        "device_id": device_id,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": {
            f"curve25519:{device_id}": f"cv{version}{device_id}",
            f"ed25519:{device_id}": f"ed{version}{device_id}",
        },
        "signatures": {user_id: {f"ed25519:{device_id}": f"sig{version}{device_id}"}},
    }


def fake_cross_signing_key(user_id: str, usage: str, public: str) -> JsonDict:
    return {
        "user_id": user_id,
        "usage": [usage],
        "keys": {f"ed25519:{public}": public},
        "signatures": {user_id: {f"ed25519:{public}x": f"sig{public}"}},
    }


@dataclass
class RemoteDevice:
    version: int = 1
    name: Optional[str] = None
    keys: bool = True


@dataclass
class RemoteUser:
    """A user of a scripted remote server: its devices and its EDU stream."""

    user_id: str
    stream_id: int = 0
    step: int = 1
    devices: dict[str, RemoteDevice] = field(default_factory=dict)
    master_key: Optional[JsonDict] = None
    self_signing_key: Optional[JsonDict] = None
    # the stream id the next EDU names as prev_id (None: [])
    last_sent: Optional[int] = None

    def _next(self) -> tuple[int, list[int]]:
        self.stream_id += self.step
        prev = [] if self.last_sent is None else [self.last_sent]
        self.last_sent = self.stream_id
        return self.stream_id, prev

    def edu(self, device_id: str, **changes: Any) -> JsonDict:
        """Change a device (create it if new; ``deleted=True`` removes it) and
        return the ``m.device_list_update`` EDU announcing it."""
        deleted = changes.pop("deleted", False)
        stream_id, prev = self._next()
        content: JsonDict = {
            "user_id": self.user_id,
            "device_id": device_id,
            "stream_id": stream_id,
            "prev_id": prev,
        }
        if deleted:
            self.devices.pop(device_id, None)
            content["deleted"] = True
        else:
            device = self.devices.setdefault(device_id, RemoteDevice())
            for name, value in changes.items():
                setattr(device, name, value)
            if device.name is not None:
                content["device_display_name"] = device.name
            if device.keys:
                content["keys"] = fake_device_keys(self.user_id, device_id, device.version)
        return {"edu_type": "m.device_list_update", "content": content}

    def snapshot(self) -> JsonDict:
        body: JsonDict = {
            "user_id": self.user_id,
            "stream_id": self.stream_id,
            "devices": [],
        }
        for device_id in sorted(self.devices):
            device = self.devices[device_id]
            entry: JsonDict = {"device_id": device_id}
            if device.keys:
                entry["keys"] = fake_device_keys(self.user_id, device_id, device.version)
            if device.name is not None:
                entry["device_display_name"] = device.name
            body["devices"].append(entry)
        if self.master_key is not None:
            body["master_key"] = self.master_key
        if self.self_signing_key is not None:
            body["self_signing_key"] = self.self_signing_key
        return body


class FakeRemoteServer:
    """A scripted remote homeserver: a real federation transport (keys,
    signing, authentication) with ``/user/devices`` and ``/user/keys/query``
    answered from :attr:`users`, and :meth:`send` to push transactions.

    Scripting: :attr:`errors` (status codes answered, first first, to the
    next requests), :attr:`gate` (a Deferred the answers wait for),
    :attr:`answer_override` / :attr:`keys_query_override` (functions
    replacing a ``/user/devices`` / ``/user/keys/query`` answer).
    """

    def __init__(
        self,
        case: SynchronousTestCase,
        network: FakeNetwork,
        name: str,
        *,
        old_keys: tuple[tuple[SigningKey, int], ...] = (),
    ) -> None:
        self.name = name
        self.network = network
        self.key = generate_signing_key(f"{name.split('.')[0]}1")
        store = case.successResultOf(
            open_sqlite_store(":memory:", MemoryReactorClock(), synchronous=True)
        )
        case.addCleanup(store.close)
        self.transport: FederationTransport = build_federation_transport(
            name,
            [self.key],
            store,
            network.clock,
            network.agent_for(name),
            old_verify_keys=[
                OldVerifyKey(f"ed25519:{k.version}", get_verify_key(k), expired_ts)
                for k, expired_ts in old_keys
            ],
        )
        self.users: dict[str, RemoteUser] = {}
        self.errors: list[int] = []
        self.gate: Optional[Deferred[None]] = None
        self.answer_override: Optional[Callable[[str, JsonDict], JsonDict]] = None
        self.keys_query_override: Optional[Callable[[JsonDict], JsonDict]] = None
        self._txn = 0
        self.transport.resource.register(
            "GET", "/_matrix/federation/v1/user/devices/{userId}", self._user_devices,
            requires_auth=True,
        )
        self.transport.resource.register(
            "POST", KEYS_QUERY_PATH, self._keys_query, requires_auth=True, json_body=True
        )
        network.add_server(name, self.transport.root)

    def user(self, localpart: str, step: int = 1) -> RemoteUser:
        user_id = f"@{localpart}:{self.name}"
        user = self.users.get(user_id)
        if user is None:
            user = self.users[user_id] = RemoteUser(user_id, step=step)
        return user

    async def _user_devices(self, request: JsonRequest) -> tuple[int, JsonDict]:
        user_id = request.path_params["userId"]
        if self.gate is not None:
            await self.gate
        if self.errors:
            code = self.errors.pop(0)
            raise MatrixError(code, M_UNKNOWN, f"scripted {code}")
        user = self.users.get(user_id)
        if user is None:
            raise MatrixError(400, M_INVALID_PARAM, f"{user_id} is not ours")
        body = user.snapshot()
        if self.answer_override is not None:
            body = self.answer_override(user_id, body)
        return 200, body

    async def _keys_query(self, request: JsonRequest) -> tuple[int, JsonDict]:
        if self.gate is not None:
            await self.gate
        if self.errors:
            code = self.errors.pop(0)
            raise MatrixError(code, M_UNKNOWN, f"scripted {code}")
        wanted = request.require_content()["device_keys"]
        body: JsonDict = {"device_keys": {}, "master_keys": {}, "self_signing_keys": {}}
        for user_id in wanted:
            user = self.users.get(user_id)
            if user is None:
                continue
            body["device_keys"][user_id] = {}
            for entry in user.snapshot()["devices"]:
                if "keys" not in entry:
                    continue
                keys = dict(entry["keys"])
                if "device_display_name" in entry:
                    keys["unsigned"] = {"device_display_name": entry["device_display_name"]}
                body["device_keys"][user_id][entry["device_id"]] = keys
            if user.master_key is not None:
                body["master_keys"][user_id] = user.master_key
            if user.self_signing_key is not None:
                body["self_signing_keys"][user_id] = user.self_signing_key
        if self.keys_query_override is not None:
            body = self.keys_query_override(body)
        return 200, body

    def send(
        self,
        edus: list[Any],
        *,
        destination: str = A,
        txn_id: Optional[str] = None,
        pdus: Optional[list[Any]] = None,
        origin: Optional[str] = None,
    ) -> "Deferred[JsonDict]":
        """PUT a signed transaction to ``destination`` (not flushed)."""
        if txn_id is None:
            self._txn += 1
            txn_id = f"txn{self._txn}"
        body: JsonDict = {
            "origin": origin if origin is not None else self.name,
            "origin_server_ts": int(self.network.clock.seconds() * 1000),
            "pdus": pdus if pdus is not None else [],
            "edus": edus,
        }
        return Deferred.fromCoroutine(
            self.transport.client.put_json(
                destination, SEND_PREFIX + quote(txn_id, safe=""), body
            )
        )


def devices_path(user_id: str) -> str:
    return DEVICES_PREFIX + quote(user_id, safe="")


class InboundInstance:
    """Instance A: the inbound side, a local handler, membership, one store file."""

    def __init__(
        self,
        case: SynchronousTestCase,
        network: FakeNetwork,
        db_path: str,
        *,
        name: str = A,
        config: Optional[InboundConfig] = None,
        membership: Optional[Any] = None,
        key: Optional[SigningKey] = None,
        transport_config: FederationTransportConfig = FederationTransportConfig(),
    ) -> None:
        self.case = case
        self.network = network
        self.name = name
        self.clock = network.clock
        self.store: Store = case.successResultOf(
            open_sqlite_store(db_path, MemoryReactorClock(), synchronous=True)
        )
        self.key = key if key is not None else generate_signing_key("a1")
        self.transport = build_federation_transport(
            name,
            [self.key],
            self.store,
            network.clock,
            network.agent_for(name),
            config=transport_config,
        )
        self.membership: Any = membership if membership is not None else InMemoryMembership(name)
        self.tracker = DestinationRetryTracker(self.store, network.clock, POLICY, no_jitter)
        self.transport.authenticator.add_contact_listener(self.tracker.on_contact)
        self.local = LocalDeviceHandler(name, self.store, self.membership, network.clock)
        if config is None:
            config = InboundConfig(updater=UpdaterConfig(user_backoff=USER_POLICY))
        self.inbound = InboundDeviceLists(
            name,
            self.store,
            self.transport.client,
            network.clock,
            self.membership,
            self.tracker,
            config=config,
            local=self.local,
            jitter=no_jitter,
        )
        self.inbound.register(self.transport.resource)
        self.changes: list[RemoteDeviceListChange] = []
        self.updater.add_listener(self.changes.append)
        network.add_server(name, self.transport.make_site())
        self.stopped = False
        case.successResultOf(self.inbound.start())

    @property
    def updater(self) -> Any:
        return self.inbound.updater

    @property
    def receiver(self) -> Any:
        return self.inbound.receiver

    def track(self, user_id: str, local_user: str = ALICE) -> None:
        """Make ``user_id`` share a room with a local user."""
        room = f"!shared-{user_id.lstrip('@').replace(':', '_')}:{self.name}"
        self.membership.join(room, local_user)
        self.membership.join(room, user_id)

    def untrack(self, user_id: str) -> None:
        room = f"!shared-{user_id.lstrip('@').replace(':', '_')}:{self.name}"
        self.membership.leave(room, user_id)

    def query(self, *user_ids: str, timeout: Optional[float] = None) -> "Deferred[JsonDict]":
        return self.inbound.querier.query_keys({u: [] for u in user_ids}, timeout=timeout)

    def cached_devices(self, user_id: str) -> dict[str, Any]:
        devices = self.case.successResultOf(self.store.get_remote_devices(user_id))
        return {d.device_id: d for d in devices}

    def sync_state(self, user_id: str) -> Any:
        return self.case.successResultOf(self.store.get_remote_sync_state(user_id))

    def stop(self) -> None:
        """Stop the inbound side, take A off the network, close its store."""
        if self.stopped:
            return
        self.stopped = True
        self.case.successResultOf(self.inbound.stop())
        self.network.remove_server(self.name)
        self.store.close()


class InboundCase(SynchronousTestCase):
    """A, S and T on one network; A's database in a file (restartable)."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(NOW_S)  # an arbitrary "now"
        self.network = FakeNetwork(self.clock)
        directory = self.mktemp()
        os.makedirs(directory)
        self.db_path = os.path.join(directory, "a.db")
        self.s = FakeRemoteServer(self, self.network, S)
        self.t = FakeRemoteServer(self, self.network, T)
        self.a = self.make_a()
        self.addCleanup(self.stop_a)

    def make_a(self, **kwargs: Any) -> InboundInstance:
        return InboundInstance(self, self.network, self.db_path, **kwargs)

    def stop_a(self) -> None:
        self.a.stop()

    def restart_a(self, **kwargs: Any) -> InboundInstance:
        """Stop A and start a new A on the same database file (a process restart)."""
        kwargs.setdefault("membership", self.a.membership)
        key = self.a.key
        self.a.stop()
        self.a = self.make_a(key=key, **kwargs)
        return self.a

    # -- helpers -------------------------------------------------------------------

    def deliver(self, server: FakeRemoteServer, edus: list[Any], **kwargs: Any) -> JsonDict:
        """Send a transaction and let everything it triggers run; return the response."""
        d = server.send(edus, **kwargs)
        self.network.flush()
        result: JsonDict = self.successResultOf(d)
        return result

    def fetches(self, user_id: Optional[str] = None, origin: str = A) -> int:
        """``GET /user/devices`` requests A made (for one user, or all)."""
        prefix = DEVICES_PREFIX if user_id is None else devices_path(user_id)
        return len(self.network.requests(origin=origin, method="GET", path_prefix=prefix))

    def keys_queries(self, destination: str = S) -> int:
        return len(
            self.network.requests(
                origin=A, destination=destination, method="POST", path_prefix=KEYS_QUERY_PATH
            )
        )

    def attempts(self, destination: str) -> int:
        """Consecutive failures A's tracker recorded for ``destination``."""
        state = self.successResultOf(self.a.store.get_retry_state(destination))
        return 0 if state is None else state.attempts

    def timers(self) -> list[Any]:
        """The clock's pending calls, except A's transaction pruning loop."""
        pruner = self.a.receiver._pruner
        pruning = None if pruner is None else pruner.call
        return [c for c in self.clock.getDelayedCalls() if c is not pruning]

    def query(self, *user_ids: str, timeout: Optional[float] = None) -> JsonDict:
        d = self.a.query(*user_ids, timeout=timeout)
        self.network.flush()
        result: JsonDict = self.successResultOf(d)
        return result


@implementer(ILogObserver)
class LogCollector:
    """Every log event while registered, formatted on demand."""

    def __init__(self) -> None:
        self.events: list[Any] = []

    def __call__(self, event: Any) -> None:
        self.events.append(event)

    def __iter__(self) -> Iterator[str]:
        return iter([formatEvent(e) or "" for e in self.events])


def capture_logs(case: Any) -> LogCollector:
    """Every log event from now on."""
    collector = LogCollector()
    globalLogPublisher.addObserver(collector)
    case.addCleanup(globalLogPublisher.removeObserver, collector)
    return collector
