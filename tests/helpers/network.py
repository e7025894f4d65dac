"""
Several twisted.web servers talking HTTP to each other in memory, on one
simulated clock, with seeded fault injection.  No sockets, no DNS.

    clock = Clock()
    network = FakeNetwork(clock, FaultPlan(seed=1))
    network.add_server("a.test", module_a.resource)   # any IResource, or a
    network.add_server("b.test", module_b.resource)   # Site(reactor=clock)
    http = HTTPClient(network.agent_for("a.test"))    # a's outbound client
    d = http.get("https://b.test/_matrix/federation/v1/version")
    network.flush()                  # move bytes until nothing moves
    response = self.successResultOf(d)

Requests go to C{https://<server_name>/...} (or C{http://}); the URL's
C{host:port} is looked up first, then the bare host, so C{b.test} is reached
as C{https://b.test:8448/} too.  Each request is a new in-memory connection
driven by a real L{twisted.web.client.Agent} on the client side and the
server's real L{twisted.web.server.Site} on the other: headers, status codes,
request bodies and C{NOT_DONE_YET} rendering all behave as on a socket.

Bytes only move in L{FakeNetwork.flush} (alias C{pump}), which also runs the
clock's calls that are due now.  A resource that answers on a timer completes
after C{clock.advance(n)} and another C{flush()};
L{FakeNetwork.advance} does both, stopping at every timer on the way.

Timeouts are the client's: pass C{reactor=network.clock, timeout=...} to
treq, or a blackholed request waits forever.

L{FakeNetwork.crash_server} models a process crash: the crashed side of
every connection vanishes silently (nothing runs in a dead process), the
other side sees the connection lost, the crashed process's agents never
answer again, and the name is refused until it is added again.  Give each
process its own clock (C{add_server(..., reactor=)}, C{agent_for(...,
reactor=)}) so that its HTTP timers can be cancelled with it.

An unknown server name fails like a closed port:
L{twisted.internet.error.ConnectionRefusedError}.  For faults see
L{tests.helpers.faults}.  Every request, refused or not, is appended to
L{FakeNetwork.log} as a L{RequestRecord}.

Request bodies: treq turns C{data=}/C{json=} into a L{FileBodyProducer}, whose
default cooperator runs on the global reactor; the agent reads such a
producer's file at once instead, so plain C{HTTPClient(agent)} works.  Any
other producer must produce on its own (or on the network's clock).
"""

from __future__ import annotations

from dataclasses import dataclass

from treq.client import HTTPClient
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock
from twisted.web.client import URI, Agent, HTTPConnectionPool
from twisted.web.error import SchemeNotSupported
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from twisted.web.resource import IResource
from twisted.web.server import Session, Site
from zope.interface import implementer

from ._connection import Connection, ConnectionEndpoint, recorded_body
from .faults import REFUSING, FaultPlan

_SCHEMES = (b"http", b"https")


@dataclass
class RequestRecord:
    """One request as the network saw it."""

    origin: str
    #: The server name it was routed to (the URL's netloc if unknown).
    destination: str
    method: str
    #: Path and query, as sent (percent-encoded).
    path: str
    #: C{clock.seconds()} when the client issued it.
    sent_at: float
    #: The request body the client sent.
    body: bytes = b""
    #: The C{FaultKind.value} injected, if any.
    fault: str | None = None
    #: Refused at connect time: unknown server, refuse, partition or down.
    refused: bool = False
    #: The status of the server's first answer, even if the response was
    #: then lost; C{None} if the server has not answered.
    status: int | None = None
    #: How many times a server received it (2 for a duplicate).
    deliveries: int = 0
    #: The client gave up (aborted) before the response ended, e.g. its
    #: timeout fired.
    abandoned: bool = False


class FakeNetwork:
    """
    Server names mapped to resources, linked by in-memory HTTP.

    @ivar clock: the shared simulated clock.
    @ivar faults: the L{FaultPlan} consulted for every request.
    @ivar log: every request, in the order they were issued.
    """

    def __init__(self, clock: Clock | None = None, faults: FaultPlan | None = None) -> None:
        self.clock = clock if clock is not None else Clock()
        self.faults = faults if faults is not None else FaultPlan()
        self.log: list[RequestRecord] = []
        self._sites: dict[str, Site] = {}
        self._connections: list[Connection] = []
        self._agents: dict[str, list[_NetworkAgent]] = {}

    # -- servers ----------------------------------------------------------

    def add_server(
        self,
        server_name: str,
        resource: IResource | Site,
        *,
        reactor: IReactorTime | None = None,
    ) -> Site:
        """
        Serve C{resource} as C{server_name}.  A L{Site} is used as is (so a
        custom C{requestFactory} such as a size-limiting request applies); it
        must have been built with C{reactor=network.clock}, or with the
        C{reactor} given: a clock over the network's (the server process's
        own, see L{crash_server}).
        """
        if server_name in self._sites:
            raise ValueError(f"{server_name!r} is already on the network")
        clock: IReactorTime = reactor if reactor is not None else self.clock
        site: Site
        if isinstance(resource, Site):
            site = resource
            if site.reactor is not clock:
                raise ValueError("build the Site with reactor=network.clock")
        else:
            site = Site(resource, reactor=clock)

            def sessions(site: Site, uid: bytes) -> Session:
                return Session(site, uid, reactor=clock)

            site.sessionFactory = sessions  # type: ignore[assignment]
        self._sites[server_name] = site
        return site

    def remove_server(self, server_name: str) -> None:
        """
        Take C{server_name} off the network, as a process exit would: every
        connection to or from it is lost (C{ConnectionLost} on both sides) and
        new requests to it are refused until it is added again.
        """
        del self._sites[server_name]
        for connection in list(self._connections):
            if server_name in (connection.record.origin, connection.record.destination):
                connection.abort()
        self._reap()

    def crash_server(self, server_name: str) -> list[object]:
        """
        The process serving C{server_name} died: it is taken off the network
        (refused until added again); on every connection to or from it its
        side vanishes without any callback while the other side loses the
        connection (C{ConnectionLost}); requests in flight or delayed are
        dropped in both directions; its agents never answer again (their
        requests are neither logged nor delivered).

        Returns what the dead side leaves behind (its connections, its
        agents and their unanswered requests): keep it referenced as long as
        the test runs, or the garbage collector closes the dead process's
        suspended coroutines, running their C{finally} blocks as if the dead
        process were still alive.
        """
        self._sites.pop(server_name, None)
        remains: list[object] = []
        for agent in self._agents.pop(server_name, []):
            agent.dead = True
            agent.network = None  # the remains must not keep the network alive
            remains.append(agent)
        for connection in list(self._connections):
            if server_name in (connection.record.origin, connection.record.destination):
                connection.sever(server_name)
                remains.append(connection)
        self._reap()
        return remains

    def server_names(self) -> list[str]:
        return sorted(self._sites)

    # -- clients ----------------------------------------------------------

    def agent_for(self, origin: str, *, reactor: IReactorTime | None = None) -> IAgent:
        """
        An L{IAgent} making requests as C{origin} (need not be a server); its
        HTTP machinery runs on C{reactor} (default: the network's clock).
        """
        agent = _NetworkAgent(self, origin, reactor if reactor is not None else self.clock)
        self._agents.setdefault(origin, []).append(agent)
        return agent

    def client_for(self, origin: str) -> HTTPClient:
        """C{treq.client.HTTPClient(self.agent_for(origin))}."""
        return HTTPClient(self.agent_for(origin))

    # -- time and bytes ---------------------------------------------------

    def flush(self, max_rounds: int = 10_000) -> bool:
        """
        Move bytes on every connection, and run the clock's calls that are due
        now, until nothing moves.  Returns whether anything moved.  Raises
        C{AssertionError} if the network does not settle (a livelock).
        """
        moved_any = False
        for _ in range(max_rounds):
            self.clock.advance(0)  # due calls only, e.g. callLater(0)
            moved = False
            for connection in list(self._connections):
                moved = connection.pump() or moved
            self._reap()
            if not moved and not self._due_calls():
                return moved_any
            moved_any = True
        raise AssertionError(f"network did not settle in {max_rounds} rounds")

    pump = flush

    def advance(self, seconds: float, max_steps: int = 100_000) -> None:
        """
        Advance the clock by C{seconds}, stopping at each delayed call on the
        way and flushing after it, so work triggered at time t talks at t.
        """
        target = self.clock.seconds() + seconds
        self.flush()
        for _ in range(max_steps):
            due = [
                c.getTime() for c in self.clock.getDelayedCalls() if c.getTime() <= target
            ]
            if not due:
                break
            self.clock.advance(max(0.0, min(due) - self.clock.seconds()))
            self.flush()
        else:
            raise AssertionError(f"clock did not reach {target} in {max_steps} steps")
        self.clock.advance(max(0.0, target - self.clock.seconds()))
        self.flush()

    def open_connections(self) -> int:
        """Connections not yet closed on every side (0 once all is answered)."""
        return len(self._connections)

    # -- the log ----------------------------------------------------------

    def requests(
        self,
        *,
        origin: str | None = None,
        destination: str | None = None,
        method: str | None = None,
        path_prefix: str | None = None,
    ) -> list[RequestRecord]:
        """The logged requests matching every given filter."""
        return [
            r
            for r in self.log
            if origin in (None, r.origin)
            and destination in (None, r.destination)
            and method in (None, r.method)
            and (path_prefix is None or r.path.startswith(path_prefix))
        ]

    # -- internals --------------------------------------------------------

    def _due_calls(self) -> bool:
        now = self.clock.seconds()
        return any(c.getTime() <= now for c in self.clock.getDelayedCalls())

    def _reap(self) -> None:
        self._connections = [c for c in self._connections if not c.done]

    def _route(self, uri: URI) -> str | None:
        for name in (uri.netloc.decode("ascii"), uri.host.decode("ascii")):
            if name in self._sites:
                return name
        return None

    def _request(
        self,
        origin: str,
        reactor: IReactorTime,
        method: bytes,
        uri: bytes,
        headers: Headers | None,
        bodyProducer: IBodyProducer | None,
    ) -> Deferred[IResponse]:
        parsed = URI.fromBytes(uri)
        if parsed.scheme not in _SCHEMES:
            return fail(SchemeNotSupported(f"unsupported scheme {parsed.scheme!r}"))
        destination = self._route(parsed)
        record = RequestRecord(
            origin=origin,
            destination=destination or parsed.netloc.decode("ascii"),
            method=method.decode("ascii"),
            path=parsed.originForm.decode("ascii"),
            sent_at=self.clock.seconds(),
        )
        self.log.append(record)
        if destination is None:
            record.refused = True
            return fail(
                ConnectionRefusedError(string=f"no server {record.destination!r}")
            )
        fault = self.faults.decide(origin, destination, record.path)
        if fault is not None:
            record.fault = fault.kind.value
            if fault.kind in REFUSING:
                record.refused = True
                return fail(
                    ConnectionRefusedError(string=f"injected fault: {record.fault}")
                )
        connection = Connection(
            record,
            fault,
            site=self._sites[destination],
            secure=parsed.scheme == b"https",
            clock=self.clock,
            on_connect=self._connections.append,
        )
        agent = Agent.usingEndpointFactory(
            reactor,
            ConnectionEndpoint(connection),
            pool=HTTPConnectionPool(reactor, persistent=False),
        )
        body = recorded_body(bodyProducer, record)
        return agent.request(method, uri, headers, body)


@implementer(IAgent)
class _NetworkAgent:
    def __init__(self, network: FakeNetwork, origin: str, reactor: IReactorTime) -> None:
        self.network: FakeNetwork | None = network
        self.origin = origin
        self._reactor = reactor
        #: the origin's process crashed: requests never leave, never end
        self.dead = False
        self.unanswered: list[Deferred[IResponse]] = []

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        if self.dead or self.network is None:
            d: Deferred[IResponse] = Deferred()
            self.unanswered.append(d)
            return d
        return self.network._request(
            self.origin, self._reactor, method, uri, headers, bodyProducer
        )


