"""The standalone server's service tree.

:class:`StandaloneService` is a ``MultiService`` with named children::

    database         opens (and migrates) the store; closes it last
    federation-keys  the outbound side of federation: the agent (TLS policy,
                     IP-range filter) through which the key ring fetches
                     other servers' keys and the signed client sends;
                     closes its pooled connections when stopping.  Our own
                     keys need no refreshing: every key response is signed
                     when asked for, valid for key_refresh_interval
    replication      the device-list module's updater and sender
                     (:class:`~devicelist_plugin.module.DeviceListModule`),
                     started once the components are built, stopped after
                     the listeners and before the store
    listeners        one child per configured listener ("listener-0", ...),
                     each listening on its bind addresses (TCP, or TLS with
                     the configured certificate)

Start-up is asynchronous and in one direction: the ``database`` child opens
the store; once it is open, the federation transport, the local device
handler and the client API are built (:func:`~.components.build_components`)
and each listener starts listening with the root of its resources
(:func:`~.site.build_root_resource`).  :meth:`StandaloneService.when_ready`
fires with the :class:`~.components.ServerComponents` once every listener
listens, or with ``None`` if start-up failed (the database could not be
opened, a port could not be bound); a failed start-up is logged and stops
the reactor, so twistd exits.

Stopping (twistd on SIGTERM or SIGINT) runs the children's ``stopService``
one after the other in reverse order: the listeners stop listening, the
federation client's pooled connections are closed, then the store is closed.

Extending the tree: a service that needs the components (replication,
metrics) is a child added in ``__init__`` before ``listeners`` (so it stops
after them and before the store) and is handed the components in
:meth:`StandaloneService._start` before the listeners open; its resources go
into :data:`~.site.RESOURCE_MOUNTS`.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import ILogObserver, Logger
from twisted.python.components import Componentized
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool
from twisted.web.iweb import IAgent
from twisted.web.resource import IResource

from devicelist_plugin.federation.agent import build_federation_agent
from devicelist_plugin.federation.resource import DEFAULT_MAX_BODY_SIZE
from devicelist_plugin.local.handler import CpuRunner, thread_pool_runner
from devicelist_plugin.membership import InMemoryMembership, MembershipSource
from devicelist_plugin.membership_store import StoreMembership
from devicelist_plugin.module import DeviceListModule
from devicelist_plugin.standalone.components import ServerComponents, build_components
from devicelist_plugin.standalone.config import Config, ListenerConfig
from devicelist_plugin.standalone.database import DatabaseService
from devicelist_plugin.standalone.site import RequestObserver, build_root_resource, make_site
from devicelist_plugin.standalone.startup import StartupFiles
from devicelist_plugin.storage.store import Store

__all__ = [
    "FederationKeysService",
    "ListenerService",
    "StandaloneService",
]

MembershipFactory = Callable[[Config, Store], MembershipSource]


def in_memory_membership(config: Config, store: Store) -> MembershipSource:
    """Memberships kept in memory, empty at start."""
    return InMemoryMembership(config.server_name)


def store_membership(config: Config, store: Store) -> MembershipSource:
    """Memberships kept in the database (set through the admin API)."""
    return StoreMembership(config.server_name, store)


class ReplicationService(Service):
    """Runs the :class:`~devicelist_plugin.module.DeviceListModule` handed
    to :meth:`attach` (its updater and sender) until the service stops."""

    def __init__(self) -> None:
        self.module: Optional[DeviceListModule] = None

    def attach(self, module: DeviceListModule) -> "Deferred[None]":
        self.module = module
        if not self.running:
            return succeed(None)
        return module.start()

    def stopService(self) -> "Deferred[None]":
        super().stopService()
        module, self.module = self.module, None
        if module is None:
            return succeed(None)
        return module.stop()


class FederationKeysService(Service):
    """The outbound federation agent (see the module docstring).

    :param agent: the outbound ``IAgent``; by default the production agent
        (:func:`~devicelist_plugin.federation.agent.build_federation_agent`
        with the configured TLS policy and IP-range filter), whose connection
        pool this service closes when it stops.
    """

    def __init__(
        self, reactor: Any, config: Config, files: StartupFiles, agent: Optional[IAgent] = None
    ) -> None:
        self._reactor = reactor
        self._config = config
        self._files = files
        self._agent = agent
        self._pool: Optional[HTTPConnectionPool] = None

    def agent(self) -> IAgent:
        """The outbound agent, built on first use."""
        if self._agent is None:
            pool = HTTPConnectionPool(self._reactor, persistent=True)
            pool.maxPersistentPerHost = 5
            pool.cachedConnectionTimeout = 120
            pool.retryAutomatically = False
            self._pool = pool
            self._agent = build_federation_agent(
                self._reactor,
                self._files.tls_policy,
                self._config.ip_range_filter,
                pool=pool,
            )
        return self._agent

    def stopService(self) -> "Deferred[None]":
        super().stopService()
        pool, self._pool = self._pool, None
        if pool is None:
            return succeed(None)
        d: Deferred[None] = pool.closeCachedConnections()
        return d


class ListenerService(Service):
    """One configured listener: a Site on each of its bind addresses.

    It listens once :meth:`serve` gives it its root resource; ``ports`` are
    then the listening ports.  Binding ``0.0.0.0`` fails harmlessly when
    ``::`` is bound too (a dual-stack socket already covers IPv4), as in
    Synapse.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        listener: ListenerConfig,
        tls_options: Any = None,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
    ) -> None:
        if listener.tls and tls_options is None:
            raise ValueError("a TLS listener needs the TLS server options")
        self._reactor = reactor
        self.listener = listener
        self._tls_options = tls_options
        self._max_body_size = max_body_size
        self.ports: list[IListeningPort] = []

    def _endpoint(self, address: str) -> IStreamServerEndpoint:
        port = self.listener.port
        if self.listener.tls:
            return SSL4ServerEndpoint(self._reactor, port, self._tls_options, interface=address)
        if ":" in address:
            return TCP6ServerEndpoint(self._reactor, port, interface=address)
        return TCP4ServerEndpoint(self._reactor, port, interface=address)

    async def serve(
        self, root: IResource, request_observer: Optional[RequestObserver] = None
    ) -> None:
        """Listen with ``root`` on every bind address (``request_observer``:
        see :func:`~.site.make_site`).

        :raise CannotListenError: an address could not be bound (the ports
            already opened are closed again).
        """
        site = make_site(
            root,
            self._reactor,
            x_forwarded=self.listener.x_forwarded,
            max_body_size=self._max_body_size,
            request_observer=request_observer,
        )
        addresses = self.listener.bind_addresses
        try:
            for address in addresses:
                try:
                    port = await self._endpoint(address).listen(site)
                except CannotListenError:
                    if address == "0.0.0.0" and "::" in addresses:
                        continue
                    raise
                if not self.running:
                    # stopped while binding: leave nothing listening
                    await maybeDeferred(port.stopListening)
                    return
                self.ports.append(port)
                self.log.info(
                    "devicelist: serving {resources} on {scheme}://{host}:{port}",
                    resources=", ".join(self.listener.resources),
                    scheme="https" if self.listener.tls else "http",
                    host=address,
                    port=getattr(port.getHost(), "port", self.listener.port),
                )
        except BaseException:
            await self._close_ports()
            raise

    async def _close_ports(self) -> None:
        ports, self.ports = self.ports, []
        await gatherResults([maybeDeferred(port.stopListening) for port in ports])

    def stopService(self) -> "Deferred[None]":
        super().stopService()
        return Deferred.fromCoroutine(self._close_ports())


class StandaloneService(MultiService):
    """The whole standalone server (see the module docstring).

    :param agent: the outbound ``IAgent`` (default: the production agent).
    :param membership_factory: the membership source, built on the open
        store (default: memberships in the database, :func:`store_membership`).
    :param cpu_runner: runs bcrypt and big encodings (default: the
        reactor's thread pool).
    :param log_observer: handed to twistd's application as its
        ``ILogObserver`` (``log_config``).
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        config: Config,
        files: StartupFiles,
        *,
        agent: Optional[IAgent] = None,
        membership_factory: MembershipFactory = store_membership,
        cpu_runner: Optional[CpuRunner] = None,
        log_observer: Optional[ILogObserver] = None,
    ) -> None:
        super().__init__()
        self._reactor = reactor
        self.config = config
        self.files = files
        self._membership_factory = membership_factory
        self._cpu_runner = cpu_runner
        self._log_observer = log_observer
        self.components: Optional[ServerComponents] = None
        self._ready: Optional[Optional[ServerComponents]] = None
        self._started = False
        self._waiters: list[Deferred[Optional[ServerComponents]]] = []

        self.database = DatabaseService(reactor, config)
        self.database.setName("database")
        self.database.setServiceParent(self)
        self.federation_keys = FederationKeysService(reactor, config, files, agent)
        self.federation_keys.setName("federation-keys")
        self.federation_keys.setServiceParent(self)
        self.replication = ReplicationService()
        self.replication.setName("replication")
        self.replication.setServiceParent(self)
        self.listeners = MultiService()
        self.listeners.setName("listeners")
        self.listeners.setServiceParent(self)
        self.listener_services: list[ListenerService] = []
        for index, listener in enumerate(config.listeners):
            child = ListenerService(reactor, listener, files.tls_server_options)
            child.setName(f"listener-{index}")
            child.setServiceParent(self.listeners)
            self.listener_services.append(child)

    def setServiceParent(self, parent: Any) -> None:
        # twistd's Application takes its log observer from this component
        if self._log_observer is not None and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self._log_observer)
        super().setServiceParent(parent)

    def when_ready(self) -> "Deferred[Optional[ServerComponents]]":
        """Fires with the components once every listener listens, or with
        ``None`` if start-up failed."""
        if self._started:
            return succeed(self._ready)
        d: Deferred[Optional[ServerComponents]] = Deferred()
        self._waiters.append(d)
        return d

    def _fire(self, components: Optional[ServerComponents]) -> None:
        self._ready, self._started = components, True
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(components)

    def startService(self) -> None:
        super().startService()
        self.database.ready.addCallback(
            lambda store: Deferred.fromCoroutine(self._start(store))
        ).addErrback(self._failed)

    async def _start(self, store: Optional[Store]) -> None:
        if store is None:
            # the database service logged why and stops the reactor
            self._fire(None)
            return
        if not self.running:
            self._fire(None)
            return
        runner = self._cpu_runner
        if runner is None:
            runner = thread_pool_runner(self._reactor, self._reactor.getThreadPool())
        components = build_components(
            self.config,
            self.files,
            store,
            self._reactor,
            self.federation_keys.agent(),
            self._membership_factory(self.config, store),
            runner,
        )
        self.components = components
        await self.replication.attach(components.module)
        if not self.running:
            self._fire(None)
            return
        if not self.listener_services:
            self.log.warn("devicelist: no listeners configured: no HTTP endpoint is served")
        for child in self.listener_services:
            await child.serve(
                build_root_resource(child.listener.resources, components),
                components.module.metrics.observe_request,
            )
            if not self.running:
                break
        self.log.info(
            "devicelist: {server_name} is ready", server_name=self.config.server_name
        )
        self._fire(components if self.running else None)

    def _failed(self, failure: Failure) -> None:
        self.log.failure("devicelist: start-up failed", failure)
        self._fire(None)
        if self._reactor.running:
            self._reactor.stop()

    def stopService(self) -> "Deferred[None]":
        # One child after the other, in reverse order: no request is taken
        # once the store closes.
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop_children())

    async def _stop_children(self) -> None:
        for child in reversed(list(self)):
            try:
                await maybeDeferred(child.stopService)
            except Exception:
                self.log.failure("devicelist: error stopping {name}", name=child.name)
