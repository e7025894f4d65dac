"""The embedding façade: one :class:`DeviceListModule` per homeserver.

A Twisted homeserver builds one module from what it already has -- its
server name, signing keys, an open store, its reactor, an outbound
``IAgent`` and a :class:`~devicelist_plugin.membership.MembershipSource` --
and then:

- mounts :attr:`DeviceListModule.resource` (a JSON resource routing on the
  whole path, serving ``/_matrix/federation/*`` and ``/_matrix/key/*``) in
  its own ``Site``, or serves :attr:`DeviceListModule.root` as a Site root;
- starts and stops it (:meth:`~DeviceListModule.start` /
  :meth:`~DeviceListModule.stop`, or as an ``IService``: it is a
  ``Service``, ``setServiceParent`` it under the host's application);
- reports local device changes through :attr:`DeviceListModule.local`
  (the :class:`~devicelist_plugin.local.handler.LocalDeviceHandler`: create,
  rename, delete devices, upload keys); every change is queued to the
  servers sharing a room with the user and sent;
- serves :attr:`DeviceListModule.metrics`\ ``.resource`` (Prometheus text
  format) where it likes;
- asks for devices and keys with :meth:`DeviceListModule.query_keys` (local
  and remote users; remote ones from the exact cache, resynced as needed)
  and :meth:`DeviceListModule.claim_keys`.

Wiring done here, once: the authenticator's contact listener resets the
shared :class:`~devicelist_plugin.replication.retry.DestinationRetryTracker`
(a backing-off destination that sends us a signed request is retried at
once); the device handler's change listener wakes the sender; the membership
source's listeners are the sender (``servers_newly_sharing``: join fan-out)
and the updater (``remote_user_untracked``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

from signedjson.types import SigningKey
from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IAgent
from twisted.web.resource import IResource

from devicelist_plugin.core.backoff import BackoffPolicy
from devicelist_plugin.core.models import JsonDict
from devicelist_plugin.core.parse import ParseError, server_name_of
from devicelist_plugin.federation.client import FederationClient, HttpResponseError
from devicelist_plugin.federation.local_endpoints import KEYS_CLAIM_PATH, LocalDeviceEndpoints
from devicelist_plugin.federation.resource import JsonResource
from devicelist_plugin.federation.signing_keys import OldVerifyKey
from devicelist_plugin.federation.transport import (
    FederationTransport,
    FederationTransportConfig,
    build_federation_transport,
)
from devicelist_plugin.local.handler import CpuRunner, LocalDeviceHandler, run_inline
from devicelist_plugin.membership import MembershipSource
from devicelist_plugin.metrics import DeviceListMetrics
from devicelist_plugin.replication.inbound import InboundConfig, InboundDeviceLists
from devicelist_plugin.replication.query import RemoteKeyQuerier
from devicelist_plugin.replication.retry import DestinationRetryTracker
from devicelist_plugin.replication.sender import DeviceListSender
from devicelist_plugin.replication.updater import UpdaterConfig
from devicelist_plugin.storage.store import Store

__all__ = ["DeviceListModule", "ModuleConfig", "RemoteKeyClaimer", "RemoteKeysQueryAdapter"]

Jitter = Callable[[float, float], float]


@dataclass(frozen=True)
class ModuleConfig:
    """The tunables of a :class:`DeviceListModule`.

    :ivar retry_policy: per-destination backoff shared by the sender, the
        resyncs and the key queries (Synapse's ``destination_*_retry_interval``).
    :ivar allow_device_name_lookup_over_federation: device display names in
        EDUs and ``/user/devices`` answers (Synapse's option, default off).
    :ivar hold_grace: seconds an EDU with an unknown ``prev_id`` waits for
        its predecessor before the user is resynced.
    :ivar resync_timeout: seconds for one ``GET /user/devices``.
    :ivar max_devices_per_user: a resync answer listing more is refused.
    :ivar resyncs_per_server: resyncs in flight to one healthy server.
    :ivar user_backoff: the per-user resync backoff after an error about
        that user (5 min, doubling, up to a day).
    :ivar transport: the federation layer's values (key refresh, notaries,
        body and response size limits, timeouts).
    :ivar old_verify_keys: retired signing keys, still published.
    :ivar query_timeout: default seconds a key query waits for remote servers.
    """

    retry_policy: BackoffPolicy = BackoffPolicy()
    allow_device_name_lookup_over_federation: bool = False
    hold_grace: float = UpdaterConfig.hold_grace
    resync_timeout: float = UpdaterConfig.resync_timeout
    max_devices_per_user: int = UpdaterConfig.max_devices_per_user
    resyncs_per_server: int = UpdaterConfig.resyncs_per_server
    user_backoff: BackoffPolicy = UpdaterConfig.user_backoff
    transport: FederationTransportConfig = field(default_factory=FederationTransportConfig)
    old_verify_keys: tuple[OldVerifyKey, ...] = ()
    query_timeout: float = 10.0

    def inbound_config(self) -> InboundConfig:
        return InboundConfig(
            updater=UpdaterConfig(
                hold_grace=self.hold_grace,
                resync_timeout=self.resync_timeout,
                max_devices_per_user=self.max_devices_per_user,
                resyncs_per_server=self.resyncs_per_server,
                user_backoff=self.user_backoff,
            ),
            query_timeout=self.query_timeout,
        )


def _server_of(user_id: str) -> str:
    try:
        return server_name_of(user_id)
    except ParseError:
        return ""


class RemoteKeysQueryAdapter:
    """The client API's ``RemoteKeysQuery`` over a :class:`RemoteKeyQuerier`."""

    def __init__(self, querier: RemoteKeyQuerier) -> None:
        self._querier = querier

    def query(
        self, device_keys: Mapping[str, Sequence[str]], timeout_ms: int
    ) -> "Deferred[JsonDict]":
        return self._querier.query_keys(device_keys, timeout=timeout_ms / 1000)


class RemoteKeyClaimer:
    """The client API's ``RemoteKeysClient``: ``POST /user/keys/claim`` to
    each user's server; a server that fails is reported in ``failures``."""

    log = Logger()

    def __init__(self, client: FederationClient) -> None:
        self._client = client

    def claim(
        self, one_time_keys: Mapping[str, Mapping[str, str]], timeout_ms: int
    ) -> "Deferred[JsonDict]":
        return Deferred.fromCoroutine(self._claim(one_time_keys, timeout_ms))

    async def _claim(
        self, one_time_keys: Mapping[str, Mapping[str, str]], timeout_ms: int
    ) -> JsonDict:
        by_server: dict[str, dict[str, Mapping[str, str]]] = {}
        for user_id, devices in one_time_keys.items():
            by_server.setdefault(_server_of(user_id), {})[user_id] = devices
        result: JsonDict = {"one_time_keys": {}, "failures": {}}
        servers = sorted(by_server)
        answers = await gatherResults(
            [
                Deferred.fromCoroutine(self._one(server, by_server[server], timeout_ms))
                for server in servers
            ],
            consumeErrors=True,
        )
        for server, (answer, failure) in zip(servers, answers):
            if failure is not None:
                result["failures"][server] = failure
                continue
            keys = answer.get("one_time_keys")
            if isinstance(keys, dict):
                for user_id, devices in keys.items():
                    if user_id in by_server[server] and isinstance(devices, dict):
                        result["one_time_keys"][user_id] = devices
        return result

    async def _one(
        self, server: str, users: Mapping[str, Mapping[str, str]], timeout_ms: int
    ) -> tuple[JsonDict, Optional[JsonDict]]:
        if not server:
            return {}, {"status": 400, "message": "malformed user id"}
        try:
            answer = await self._client.post_json(
                server,
                KEYS_CLAIM_PATH,
                {"one_time_keys": {u: dict(d) for u, d in users.items()}},
                timeout=timeout_ms / 1000 if timeout_ms > 0 else None,
            )
        except HttpResponseError as e:
            return {}, {"status": e.code, "message": "remote server refused the claim"}
        except Exception as e:
            self.log.info(
                "claiming keys from {server} failed: {error}", server=server, error=str(e)
            )
            return {}, {"status": 503, "message": f"Remote key claim failed: {type(e).__name__}"}
        return answer, None


class DeviceListModule(Service):
    """Device-list federation for one homeserver (see the module docstring).

    :param server_name: this homeserver's name.
    :param signing_keys: the current signing keys; the first signs requests.
    :param store: an open :class:`~devicelist_plugin.storage.store.Store`.
    :param reactor: the clock (``IReactorTime``) of every component.
    :param agent: outbound federation requests go through it.
    :param membership: room memberships (who shares rooms with whom).
    :param config: the tunables (:class:`ModuleConfig`).
    :param cpu_runner: runs big encodings and parses (e.g.
        ``thread_pool_runner(reactor, reactor.getThreadPool())``).
    :param jitter: the backoff jitter source (tests pass a fixed one).
    :param sender_kwargs: further keywords of :class:`DeviceListSender`.
    """

    log = Logger()

    def __init__(
        self,
        server_name: str,
        signing_keys: Sequence[SigningKey],
        store: Store,
        reactor: IReactorTime,
        agent: IAgent,
        membership: MembershipSource,
        config: ModuleConfig = ModuleConfig(),
        *,
        cpu_runner: CpuRunner = run_inline,
        jitter: Jitter = random.uniform,
        sender_kwargs: Optional[Mapping[str, Any]] = None,
    ) -> None:
        super().__init__()
        self.setName("devicelist")
        self.server_name = server_name
        self.config = config
        self.store = store
        self.clock = reactor
        self.membership = membership
        self.transport: FederationTransport = build_federation_transport(
            server_name,
            signing_keys,
            store,
            reactor,
            agent,
            old_verify_keys=config.old_verify_keys,
            config=config.transport,
        )
        #: the host API for local users' devices and keys
        self.local = LocalDeviceHandler(
            server_name,
            store,
            membership,
            reactor,
            allow_device_name_lookup_over_federation=config.allow_device_name_lookup_over_federation,
            cpu_runner=cpu_runner,
        )
        LocalDeviceEndpoints(self.local).register(self.transport.resource)
        self.tracker = DestinationRetryTracker(store, reactor, config.retry_policy, jitter)
        self.transport.authenticator.add_contact_listener(self.tracker.on_contact)
        # the updater registers itself as a membership listener
        # (remote_user_untracked); the sender does in start()
        self.inbound = InboundDeviceLists(
            server_name,
            store,
            self.transport.client,
            reactor,
            membership,
            self.tracker,
            config=config.inbound_config(),
            local=self.local,
            cpu_runner=cpu_runner,
            jitter=jitter,
        )
        self.inbound.register(self.transport.resource)
        self.sender = DeviceListSender(
            server_name,
            store,
            self.transport.client,
            reactor,
            self.tracker,
            self.local,
            membership,
            **dict(sender_kwargs or {}),
        )
        self.remote_keys_query = RemoteKeysQueryAdapter(self.inbound.querier)
        self.remote_key_claimer = RemoteKeyClaimer(self.transport.client)
        #: Prometheus metrics (own registry); ``metrics.resource`` serves them
        self.metrics = DeviceListMetrics(self)
        self._running_parts = False

    # -- what the host mounts --------------------------------------------------

    @property
    def resource(self) -> JsonResource:
        """The federation JSON resource (routes on the whole path): mount it
        as the ``_matrix`` child of the host's root."""
        return self.transport.resource

    @property
    def root(self) -> IResource:
        """A Site root serving :attr:`resource` (any other path: JSON 404)."""
        return self.transport.root

    @property
    def querier(self) -> RemoteKeyQuerier:
        return self.inbound.querier

    # -- life cycle ------------------------------------------------------------

    def start(self) -> "Deferred[None]":
        """Start the inbound side (resume resyncs, prune txn ids) and the
        sender (catch-up); fires once both are started."""
        if self._running_parts:
            return Deferred.fromCoroutine(_noop())
        self._running_parts = True
        return gatherResults(
            [self.inbound.start(), self.sender.start()], consumeErrors=True
        ).addCallback(lambda _: None)

    def stop(self) -> "Deferred[None]":
        """Stop every timer and request; fires once in-flight work ended."""
        if not self._running_parts:
            return Deferred.fromCoroutine(_noop())
        self._running_parts = False
        return gatherResults(
            [self.sender.stop(), self.inbound.stop()], consumeErrors=True
        ).addCallback(lambda _: None)

    def startService(self) -> None:
        super().startService()
        self.start().addErrback(lambda f: self.log.failure("devicelist: start failed", f))

    def stopService(self) -> "Deferred[None]":
        super().stopService()
        return self.stop()

    # -- queries ---------------------------------------------------------------

    def query_keys(
        self,
        device_keys: Mapping[str, Sequence[str]],
        *,
        timeout: Optional[float] = None,
        requesting_user_id: Optional[str] = None,
    ) -> "Deferred[JsonDict]":
        """``{user_id: [device_id, ...]}`` (empty list: every device) ->
        ``{"device_keys", "master_keys", "self_signing_keys", "failures"}``
        for local and remote users; ``timeout`` in seconds."""
        return self.inbound.querier.query_keys(
            device_keys, timeout=timeout, requesting_user_id=requesting_user_id
        )

    def claim_keys(
        self, one_time_keys: Mapping[str, Mapping[str, str]], timeout: float = 10.0
    ) -> "Deferred[JsonDict]":
        """Claim one-time keys of remote users ``{user_id: {device_id: algorithm}}``."""
        return self.remote_key_claimer.claim(one_time_keys, int(timeout * 1000))

    def request_resync(self, user_id: str) -> "Deferred[Any]":
        """Resync a remote user's device list now."""
        return self.inbound.updater.request_resync(user_id)


async def _noop() -> None:
    return None
