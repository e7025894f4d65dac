"""
One in-memory HTTP connection of L{tests.helpers.network.FakeNetwork}: the
client's transport, the server's, and the faults that act on the bytes
between them.  Internal to the helpers.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IProducer,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    ISSLTransport,
    IStreamClientEndpoint,
)
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport
from twisted.web.client import URI, FileBodyProducer
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer
from twisted.web.server import Site
from zope.interface import directlyProvides, implementer

from devicelist_plugin.federation.client import BytesProducer

from .faults import Fault, FaultKind

if TYPE_CHECKING:
    from .network import RequestRecord

SERVER_ADDRESS = IPv4Address("TCP", "127.0.0.1", 8448)
CLIENT_ADDRESS = IPv4Address("TCP", "127.0.0.1", 31337)
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3})")


class _Transport(FakeTransport):
    """iosim's transport, telling an abort (data discarded) from a close."""

    aborted = False

    def abortConnection(self) -> None:
        self.aborted = True
        self.stream = []
        super().abortConnection()


class Connection:
    """
    One client connection and the server connection(s) it reaches: the
    primary one and, for a duplicate, a second one fed the same bytes.
    """

    def __init__(
        self,
        record: RequestRecord,
        fault: Fault | None,
        *,
        site: Site,
        secure: bool,
        clock: IReactorTime,
        on_connect: Callable[[Connection], None],
    ) -> None:
        self.record = record
        self._site = site
        self._clock = clock
        self._on_connect = on_connect
        self._kind = fault.kind if fault is not None else None
        self._delay = fault.delay if fault is not None else 0.0
        self._secure = secure
        self.client: _Transport | None = None
        self.server: _Transport | None = None
        self.shadow: _Transport | None = None
        self._sent: list[bytes] = []
        self._head = b""
        self._release: IDelayedCall | None = None
        #: a slow response: the timer releasing it, and whether it was
        self._hold: IDelayedCall | None = None
        self._response_released = self._kind is not FaultKind.SLOW_RESPONSE

    @property
    def done(self) -> bool:
        return bool(
            self.client is not None
            and self.client.disconnected
            and self._release is None
            and self._hold is None
            and all(t is None or t.disconnected for t in (self.server, self.shadow))
        )

    def attach(self, protocol: IProtocol) -> None:
        """The client connected: open the server side, now or later."""
        self.client = self._transport(protocol, is_server=False)
        self._on_connect(self)
        if self._kind is FaultKind.DELAY:
            self._release = self._clock.callLater(self._delay, self._released)
        elif self._kind is not FaultKind.BLACKHOLE:
            self.server = self._open_server()

    def _released(self) -> None:
        self._release = None
        self.server = self._open_server()

    def _transport(self, protocol: IProtocol, is_server: bool) -> _Transport:
        host, peer = (SERVER_ADDRESS, CLIENT_ADDRESS)
        if not is_server:
            host, peer = peer, host
        transport = _Transport(protocol, isServer=is_server, hostAddress=host, peerAddress=peer)
        if self._secure:
            directlyProvides(transport, ISSLTransport)
        protocol.makeConnection(transport)
        return transport

    def _open_server(self) -> _Transport:
        protocol = self._site.buildProtocol(CLIENT_ADDRESS)
        assert protocol is not None
        return self._transport(protocol, is_server=True)

    def pump(self) -> bool:
        """Move pending bytes once; else handle one close.  True if progress."""
        client = self.client
        assert client is not None
        moved = False
        server = self.server
        if server is not None and not server.disconnected:
            data = client.getOutBuffer()
            if data:
                if not self._sent:
                    self.record.deliveries += 1
                self._sent.append(data)
                server.bufferReceived(data)
                moved = True
            if not self._response_released:
                if server.stream and self._hold is None:
                    # the server answered; its answer travels slowly
                    self._note_status(b"".join(server.stream))
                    self._hold = self._clock.callLater(self._delay, self._release_response)
                out = b""
            else:
                out = server.getOutBuffer()
            if out:
                self._note_status(out)
                if self._kind is not FaultKind.LOSE_RESPONSE and not client.disconnected:
                    client.bufferReceived(out)
                moved = True
        if self.shadow is not None and not self.shadow.disconnected:
            moved = bool(self.shadow.getOutBuffer()) or moved  # discarded
        for transport in (client, server, self.shadow):
            if transport is not None and not transport.disconnected:
                transport._checkProducer()
        return moved or self._pump_close()

    def _release_response(self) -> None:
        self._hold = None
        self._response_released = True

    def _pump_close(self) -> bool:
        client, server, shadow = self.client, self.server, self.shadow
        assert client is not None
        if (
            server is not None
            and server.disconnecting
            and not server.disconnected
            and self._response_released
        ):
            clean = not server.aborted
            _lose(server, ConnectionDone() if clean else ConnectionAborted())
            if clean and self._kind is FaultKind.DUPLICATE and self.record.status is not None:
                self._start_shadow()
            if clean and self._kind is not FaultKind.LOSE_RESPONSE:
                _lose(client, ConnectionDone())
            else:
                _lose(client, ConnectionLost("connection lost on the fake network"))
            return True
        if client.disconnecting and not client.disconnected:
            # The client closed, or aborted (e.g. treq's timeout cancelled it).
            _lose(client, ConnectionAborted() if client.aborted else ConnectionDone())
            self.record.abandoned = client.aborted
            self._cancel_timers()
            if server is not None:
                _lose(server, ConnectionLost() if client.aborted else ConnectionDone())
            return True
        if shadow is not None and shadow.disconnecting and not shadow.disconnected:
            _lose(shadow, ConnectionDone() if not shadow.aborted else ConnectionAborted())
            return True
        return False

    def _start_shadow(self) -> None:
        self.shadow = self._open_server()
        self.record.deliveries += 1
        self.shadow.bufferReceived(b"".join(self._sent))

    def _note_status(self, out: bytes) -> None:
        if self.record.status is None and len(self._head) < 64:
            self._head += out
            match = _STATUS_LINE.match(self._head)
            if match:
                self.record.status = int(match.group(1))

    def abort(self) -> None:
        """Lose every side of the connection (the server went away)."""
        self._cancel_timers()
        for transport in (self.server, self.shadow, self.client):
            if transport is not None:
                _lose(transport, ConnectionLost("server removed from the fake network"))

    def sever(self, crashed: str) -> None:
        """
        The process of C{crashed} died: its side of the connection vanishes
        without a word (nothing runs in a dead process); the other side loses
        the connection.
        """
        self._cancel_timers()
        sides = (
            (self.client, self.record.origin == crashed),
            (self.server, self.record.destination == crashed),
            (self.shadow, self.record.destination == crashed),
        )
        for transport, dead in sides:
            if transport is None:
                continue
            if dead:
                transport.disconnecting = transport.disconnected = True
                transport.stream = []
            else:
                _lose(transport, ConnectionLost(f"{crashed} crashed"))

    def _cancel_timers(self) -> None:
        for call in (self._release, self._hold):
            if call is not None and call.active():
                call.cancel()
        self._release = self._hold = None


def _lose(transport: _Transport, reason: Exception) -> None:
    """Report the end of the connection to C{transport}'s protocol, once."""
    if transport.disconnected:
        return
    transport.disconnecting = True
    transport.disconnected = True
    transport.protocol.connectionLost(Failure(reason))


@implementer(IAgentEndpointFactory, IStreamClientEndpoint)
class ConnectionEndpoint:
    """What the request's own L{Agent} connects through: the connection."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        return self

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        protocol = protocolFactory.buildProtocol(SERVER_ADDRESS)
        assert protocol is not None
        self._connection.attach(protocol)
        return succeed(protocol)


# -- request bodies --------------------------------------------------------


def recorded_body(
    producer: IBodyProducer | None, record: RequestRecord
) -> IBodyProducer | None:
    """C{producer}, copying what it writes into C{record.body}."""
    if producer is None:
        return None
    if isinstance(producer, FileBodyProducer):
        # Its cooperator would run on the global reactor: read the file now.
        record.body = producer._inputFile.read()
        return BytesProducer(record.body)
    return _RecordingProducer(producer, record)


@implementer(IBodyProducer)
class _RecordingProducer:
    def __init__(self, inner: IBodyProducer, record: RequestRecord) -> None:
        self._inner = inner
        self._record = record
        self.length = inner.length

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        return self._inner.startProducing(_Tee(consumer, self._record))

    def pauseProducing(self) -> None:
        self._inner.pauseProducing()

    def resumeProducing(self) -> None:
        self._inner.resumeProducing()

    def stopProducing(self) -> None:
        self._inner.stopProducing()


@implementer(IConsumer)
class _Tee:
    def __init__(self, consumer: IConsumer, record: RequestRecord) -> None:
        self._consumer = consumer
        self._record = record

    def write(self, data: bytes) -> None:
        self._record.body += data
        self._consumer.write(data)

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        self._consumer.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self._consumer.unregisterProducer()
