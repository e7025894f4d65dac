"""The outbound federation transport: an ``IAgent`` that speaks to Matrix
server names.

:class:`MatrixFederationAgent` takes ``matrix-federation://<server_name>/path``
or ``https://<server_name>/path`` URIs (the authority is always a Matrix server
name here, never a plain web host: port-less names go through ``.well-known`` and
SRV, not to port 443).  For each request it

1. resolves the server name with :class:`~.discovery.ServerResolver` and sets
   ``Host`` to the resolved ``host_header`` (the delegated name when ``.well-known``
   delegated; any ``Host`` the caller set is replaced);
2. resolves each target host to IP addresses with the injected
   ``IHostnameResolver`` (``reactor.nameResolver`` by default) and drops those the
   :class:`~.ipfilter.IPRangeFilter` blocks *before* any connection attempt
   (connecting to the checked address itself, so a second DNS answer cannot
   rebind it); if nothing is left the request fails with
   :class:`~.ipfilter.BlockedAddressError`;
3. connects with TLS (``reactor.connectSSL``) verifying the certificate against
   ``tls_hostname`` with ``service_identity`` via
   :func:`twisted.internet.ssl.optionsForClientTLS`, or per the
   :class:`FederationTLSPolicy` (verification off, custom CA list);
4. tries the targets and their addresses in order until one connects.

Connections are pooled per server name (:class:`twisted.web.client.HTTPConnectionPool`).

:func:`make_well_known_agent` builds the plain ``https`` agent (same TLS policy,
same IP filter) used by :class:`TreqWellKnownFetcher` for ``.well-known``.
:func:`read_body` reads a response body with a size limit.
"""

from __future__ import annotations

import random
import re
from typing import Optional, Sequence
from urllib.parse import urlsplit

from OpenSSL import SSL
from treq.client import HTTPClient
from twisted.internet import ssl
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.endpoints import SSL4ClientEndpoint
from twisted.internet.error import ConnectingCancelledError, DNSLookupError
from twisted.internet.interfaces import (
    IAddress,
    IHostnameResolver,
    IHostResolution,
    IOpenSSLClientConnectionCreator,
    IProtocol,
    IProtocolFactory,
    IPushProducer,
    IReactorPluggableNameResolver,
    IReactorSSL,
    IReactorTime,
    IResolutionReceiver,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import URI, Agent, HTTPConnectionPool, ResponseDone
from twisted.web.error import SchemeNotSupported
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import (
    IAgent,
    IAgentEndpointFactory,
    IBodyProducer,
    IResponse,
)
from zope.interface import implementer

from devicelist_plugin.core.parse import ParseError, parse_server_name

from .discovery import (
    ServerNameResolver,
    ServerResolutionError,
    ServerResolver,
    SrvResolver,
    WellKnownResponse,
)
from .ipfilter import BlockedAddressError, IPRangeFilter, is_ip_literal

#: Seconds allowed for one TCP connection attempt (a request may try several).
DEFAULT_CONNECT_TIMEOUT = 10.0
#: Largest ``.well-known`` body accepted (Synapse's limit).
WELL_KNOWN_MAX_SIZE = 50 * 1024
#: Time allowed for one ``.well-known`` fetch.
WELL_KNOWN_TIMEOUT = 30.0
DEFAULT_USER_AGENT = b"devicelist-plugin"
#: Per-try timeouts of one SRV query (twisted.names' default totals 60 s).
SRV_QUERY_TIMEOUTS = (1, 3, 5)

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)
_FEDERATION_SCHEMES = (b"matrix-federation", b"https")
_INNER_SCHEME = b"matrix-federation"


# ----------------------------------------------------------------------
# TLS


class TLSConfigError(ValueError):
    """A TLS setting (a custom CA file) is unusable; ``path`` names the file."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"federation_custom_ca_list: {path}: {reason}")
        self.path = path
        self.reason = reason


def load_ca_certificates(paths: Sequence[str]) -> list[ssl.Certificate]:
    """Load every certificate from the given PEM files (each may hold several).

    :raises TLSConfigError: naming the file that cannot be read or holds no
        certificate.
    """
    certificates = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise TLSConfigError(path, f"cannot read: {e.strerror}") from None
        blocks = _PEM_CERTIFICATE.findall(data)
        if not blocks:
            raise TLSConfigError(path, "no PEM certificate in it")
        for block in blocks:
            try:
                certificates.append(ssl.Certificate.loadPEM(block))
            except Exception as e:
                raise TLSConfigError(path, f"invalid certificate: {e!r}") from None
    return certificates


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedClientCreator:
    """TLS without certificate verification (``federation_verify_certificates:
    false``), still sending SNI for DNS names so virtual hosts answer."""

    def __init__(self, context: SSL.Context, hostname: str) -> None:
        self._context = context
        self._sni = None if is_ip_literal(hostname) else hostname.encode("idna")

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        if self._sni is not None:
            connection.set_tlsext_host_name(self._sni)
        return connection


class FederationTLSPolicy:
    """How outbound TLS certificates are checked.

    :param verify: verify certificates (``federation_verify_certificates``).
        When False any certificate is accepted: for test networks only.
    :param ca_certificates: the only CAs to trust; None means the platform's.
    """

    log = Logger()

    def __init__(
        self,
        *,
        verify: bool = True,
        ca_certificates: Optional[Sequence[ssl.Certificate]] = None,
    ) -> None:
        self.verify = verify
        self._trust_root = (
            ssl.trustRootFromCertificates(list(ca_certificates))
            if ca_certificates is not None
            else None
        )
        self._unverified_context: Optional[SSL.Context] = None
        if not verify:
            self._unverified_context = ssl.CertificateOptions(verify=False).getContext()

    @classmethod
    def from_config(
        cls,
        verify_certificates: bool = True,
        custom_ca_files: Optional[Sequence[str]] = None,
    ) -> FederationTLSPolicy:
        """Build from ``federation_verify_certificates`` and
        ``federation_custom_ca_list`` (PEM files; when given, only these CAs are
        trusted, replacing the platform's, as in Synapse).

        :raises TLSConfigError: an unreadable or empty CA file.
        """
        certificates = load_ca_certificates(custom_ca_files) if custom_ca_files else None
        if not verify_certificates:
            cls.log.warn("Federation TLS certificates are NOT verified")
        return cls(verify=verify_certificates, ca_certificates=certificates)

    def creator_for(self, hostname: str) -> IOpenSSLClientConnectionCreator:
        """The TLS client settings for a connection whose certificate must be
        valid for ``hostname`` (a DNS name, or an IP address: no SNI then)."""
        if self._unverified_context is not None:
            return _UnverifiedClientCreator(self._unverified_context, hostname)
        return ssl.optionsForClientTLS(hostname, trustRoot=self._trust_root)


# ----------------------------------------------------------------------
# name resolution and connecting


@implementer(IResolutionReceiver)
class _AddressCollector:
    def __init__(self) -> None:
        self.addresses: list[str] = []
        self.done: Deferred[list[str]] = Deferred()

    def resolutionBegan(self, resolutionInProgress: IHostResolution) -> None:
        pass

    def addressResolved(self, address: IAddress) -> None:
        if isinstance(address, (IPv4Address, IPv6Address)):
            if address.host not in self.addresses:
                self.addresses.append(address.host)

    def resolutionComplete(self) -> None:
        self.done.callback(self.addresses)


async def resolve_addresses(name_resolver: IHostnameResolver, host: str, port: int) -> list[str]:
    """The IP addresses of ``host`` (itself if it is an IP literal).

    :raises DNSLookupError: the name has no address.
    """
    if is_ip_literal(host):
        return [host[1:-1] if host.startswith("[") else host]
    collector = _AddressCollector()
    name_resolver.resolveHostName(
        collector, host, port, addressTypes=[IPv4Address, IPv6Address], transportSemantics="TCP"
    )
    addresses = await collector.done
    if not addresses:
        raise DNSLookupError(f"no address for {host}")
    return addresses


# A cancelled connection attempt fails with ConnectingCancelledError.
_CANCELLED = (CancelledError, ConnectingCancelledError)


class _Connector:
    """Connects to the first reachable, unblocked address of a list of targets."""

    log = Logger()

    def __init__(
        self,
        reactor: IReactorSSL,
        name_resolver: IHostnameResolver,
        ip_filter: IPRangeFilter,
        connect_timeout: float,
    ) -> None:
        self._reactor = reactor
        self._name_resolver = name_resolver
        self._ip_filter = ip_filter
        self._connect_timeout = connect_timeout

    async def connect(
        self,
        name: str,
        targets: Sequence[tuple[str, int]],
        creator: IOpenSSLClientConnectionCreator,
        factory: IProtocolFactory,
    ) -> IProtocol:
        first_error: Optional[BaseException] = None
        blocked: Optional[BlockedAddressError] = None
        for host, port in targets:
            try:
                addresses = await resolve_addresses(self._name_resolver, host, port)
            except _CANCELLED:
                raise
            except Exception as e:
                self.log.info(
                    "{name}: cannot resolve {host}: {error!r}", name=name, host=host, error=e
                )
                first_error = first_error or e
                continue
            for address in addresses:
                if self._ip_filter.is_blocked(address):
                    self.log.warn(
                        "{name}: refusing to connect to {host} ({address}): blocked IP range",
                        name=name,
                        host=host,
                        address=address,
                    )
                    blocked = blocked or BlockedAddressError(address, host)
                    continue
                endpoint = SSL4ClientEndpoint(
                    self._reactor, address, port, creator, timeout=self._connect_timeout
                )
                try:
                    self.log.debug(
                        "{name}: connecting to {address}:{port}",
                        name=name,
                        address=address,
                        port=port,
                    )
                    protocol: IProtocol = await endpoint.connect(factory)
                    return protocol
                except _CANCELLED:
                    # Cancelled by the caller (or its deadline): try nothing else.
                    raise
                except Exception as e:
                    self.log.info(
                        "{name}: connecting to {address}:{port} failed: {error!r}",
                        name=name,
                        address=address,
                        port=port,
                        error=e,
                    )
                    first_error = first_error or e
        if first_error is not None:
            raise first_error
        if blocked is not None:
            raise blocked
        raise DNSLookupError(f"{name}: nothing to connect to")


@implementer(IStreamClientEndpoint)
class _FederationEndpoint:
    def __init__(
        self,
        server_name: str,
        resolver: ServerNameResolver,
        tls_policy: FederationTLSPolicy,
        connector: _Connector,
    ) -> None:
        self._server_name = server_name
        self._resolver = resolver
        self._tls_policy = tls_policy
        self._connector = connector

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        return Deferred.fromCoroutine(self._connect(protocolFactory))

    async def _connect(self, factory: IProtocolFactory) -> IProtocol:
        # Cached by the resolver: this repeats the lookup request() just made.
        resolved = await self._resolver.resolve(self._server_name)
        creator = self._tls_policy.creator_for(resolved.tls_hostname)
        return await self._connector.connect(
            self._server_name, resolved.targets, creator, factory
        )


def _inner_netloc(server_name: str) -> bytes:
    """The authority of the URI given to the inner Agent: the server name with
    its port, or ``:0`` for none.  Port 0 is not a valid server-name port, so
    ``example.org`` and ``example.org:80`` get different pool keys."""
    host, port = parse_server_name(server_name)
    return f"{host}:{port or 0}".encode("ascii")


def _server_name_of(uri: URI) -> str:
    host = uri.host.decode("ascii")
    return host if uri.port == 0 else f"{host}:{uri.port}"


@implementer(IAgentEndpointFactory)
class _FederationEndpointFactory:
    def __init__(
        self,
        resolver: ServerNameResolver,
        tls_policy: FederationTLSPolicy,
        connector: _Connector,
    ) -> None:
        self._resolver = resolver
        self._tls_policy = tls_policy
        self._connector = connector

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        return _FederationEndpoint(
            _server_name_of(uri), self._resolver, self._tls_policy, self._connector
        )


def request_target(uri: bytes) -> bytes:
    """The origin-form request target of an absolute URI: path and ``?query``
    (what an X-Matrix signature covers)."""
    parts = urlsplit(uri)
    target = parts.path or b"/"
    if parts.query:
        target += b"?" + parts.query
    return target


def _name_resolver_of(reactor: object) -> IHostnameResolver:
    if not IReactorPluggableNameResolver.providedBy(reactor):
        raise TypeError(f"{reactor!r} has no nameResolver; pass name_resolver=")
    resolver: IHostnameResolver = IReactorPluggableNameResolver(reactor).nameResolver
    return resolver


@implementer(IAgent)
class MatrixFederationAgent:
    """An ``IAgent`` for Matrix server names (see the module docstring).

    :param reactor: provides ``connectSSL`` and ``callLater`` (and
        ``nameResolver`` unless ``name_resolver`` is given).
    :param resolver: server discovery, normally a
        :class:`~.discovery.ServerResolver`.
    :param tls_policy: certificate checking.
    :param ip_filter: addresses never connected to.
    :param name_resolver: A/AAAA resolution; default ``reactor.nameResolver``.
    :param pool: connection pool; default a persistent pool on ``reactor``.
    :param connect_timeout: seconds per connection attempt.
    :param user_agent: ``User-Agent`` when the caller sets none.
    """

    log = Logger()

    def __init__(
        self,
        reactor: IReactorSSL,
        resolver: ServerNameResolver,
        tls_policy: FederationTLSPolicy,
        ip_filter: IPRangeFilter,
        *,
        name_resolver: Optional[IHostnameResolver] = None,
        pool: Optional[HTTPConnectionPool] = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        user_agent: bytes = DEFAULT_USER_AGENT,
    ) -> None:
        if name_resolver is None:
            name_resolver = _name_resolver_of(reactor)
        clock = IReactorTime(reactor)
        if pool is None:
            pool = HTTPConnectionPool(clock, persistent=True)
            pool.maxPersistentPerHost = 5
            pool.cachedConnectionTimeout = 120
            pool.retryAutomatically = False
        self._resolver = resolver
        self._user_agent = user_agent
        connector = _Connector(reactor, name_resolver, ip_filter, connect_timeout)
        self._agent = Agent.usingEndpointFactory(
            clock, _FederationEndpointFactory(resolver, tls_policy, connector), pool=pool
        )

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Optional[Headers] = None,
        bodyProducer: Optional[IBodyProducer] = None,
    ) -> Deferred[IResponse]:
        scheme, sep, rest = uri.partition(b"://")
        if not sep or scheme.lower() not in _FEDERATION_SCHEMES:
            return fail(SchemeNotSupported(f"not a federation URI: {uri!r}"))
        netloc = rest.split(b"/", 1)[0].split(b"?", 1)[0]
        try:
            server_name = netloc.decode("ascii")
            inner = b"%s://%s%s" % (_INNER_SCHEME, _inner_netloc(server_name), request_target(uri))
        except (UnicodeDecodeError, ParseError) as e:
            return fail(ServerResolutionError(repr(netloc), str(e), retryable=False))
        return Deferred.fromCoroutine(
            self._request(method, server_name, inner, headers, bodyProducer)
        )

    async def _request(
        self,
        method: bytes,
        server_name: str,
        inner_uri: bytes,
        headers: Optional[Headers],
        body: Optional[IBodyProducer],
    ) -> IResponse:
        resolved = await self._resolver.resolve(server_name)
        request_headers = headers.copy() if headers is not None else Headers()
        request_headers.setRawHeaders(b"host", [resolved.host_header.encode("ascii")])
        if not request_headers.hasHeader(b"user-agent"):
            request_headers.setRawHeaders(b"user-agent", [self._user_agent])
        self.log.debug(
            "{method} {server_name} via {targets} (Host: {host}, TLS name {tls})",
            method=method,
            server_name=server_name,
            targets=resolved.targets,
            host=resolved.host_header,
            tls=resolved.tls_hostname,
        )
        response: IResponse = await self._agent.request(method, inner_uri, request_headers, body)
        return response


# ----------------------------------------------------------------------
# plain https (for .well-known)


@implementer(IStreamClientEndpoint)
class _HttpsEndpoint:
    def __init__(
        self, host: str, port: int, tls_policy: FederationTLSPolicy, connector: _Connector
    ) -> None:
        self._host = host
        self._port = port
        self._tls_policy = tls_policy
        self._connector = connector

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        creator = self._tls_policy.creator_for(self._host)
        return Deferred.fromCoroutine(
            self._connector.connect(self._host, [(self._host, self._port)], creator, protocolFactory)
        )


@implementer(IAgentEndpointFactory)
class _HttpsEndpointFactory:
    def __init__(self, tls_policy: FederationTLSPolicy, connector: _Connector) -> None:
        self._tls_policy = tls_policy
        self._connector = connector

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        if uri.scheme != b"https":
            raise SchemeNotSupported(f"only https is allowed, not {uri.scheme!r}")
        host = uri.host.decode("ascii")
        if host.startswith("["):
            host = host[1:-1]
        return _HttpsEndpoint(host, uri.port, self._tls_policy, self._connector)


def make_well_known_agent(
    reactor: IReactorSSL,
    tls_policy: FederationTLSPolicy,
    ip_filter: IPRangeFilter,
    *,
    name_resolver: Optional[IHostnameResolver] = None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
) -> IAgent:
    """A plain ``https://`` agent with the federation TLS policy and IP filter
    (certificates checked against the URL's host)."""
    if name_resolver is None:
        name_resolver = _name_resolver_of(reactor)
    clock = IReactorTime(reactor)
    connector = _Connector(reactor, name_resolver, ip_filter, connect_timeout)
    return Agent.usingEndpointFactory(
        clock,
        _HttpsEndpointFactory(tls_policy, connector),
        pool=HTTPConnectionPool(clock, persistent=False),
    )


# ----------------------------------------------------------------------
# bodies


class ResponseTooLarge(Exception):
    """A response body exceeded ``max_size`` bytes; the connection was dropped."""

    def __init__(self, max_size: int) -> None:
        super().__init__(f"response body larger than {max_size} bytes")
        self.max_size = max_size


class _LimitedBodyReader(Protocol):
    def __init__(self, finished: Deferred[bytes], max_size: int, length: object) -> None:
        self._finished = finished
        self._max_size = max_size
        self._length = length
        self._size = 0
        self._chunks: list[bytes] = []
        self._stopped = False

    def connectionMade(self) -> None:
        if isinstance(self._length, int) and self._length > self._max_size:
            # Fail now; the transport is stopped on the first data (Twisted
            # resumes it right after this call, so it cannot be stopped here).
            self._finished.errback(ResponseTooLarge(self._max_size))

    def stop(self) -> None:
        transport = self.transport
        if not self._stopped and transport is not None and IPushProducer.providedBy(transport):
            self._stopped = True
            IPushProducer(transport).stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self._finished.called:
            self.stop()
            return
        self._size += len(data)
        if self._size > self._max_size:
            self._chunks = []
            self._finished.errback(ResponseTooLarge(self._max_size))
            self.stop()
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._finished.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self._finished.callback(b"".join(self._chunks))
        else:
            self._finished.errback(reason)


def read_body(response: IResponse, max_size: int) -> Deferred[bytes]:
    """Read ``response``'s body, failing with :class:`ResponseTooLarge` as soon
    as it exceeds ``max_size`` bytes, or at once if its ``Content-Length`` does
    (the connection is dropped on the next data).  Cancelling drops the
    connection."""
    reader: Optional[_LimitedBodyReader] = None

    def cancel(_: Deferred[bytes]) -> None:
        if reader is not None:
            reader.stop()

    finished: Deferred[bytes] = Deferred(cancel)
    reader = _LimitedBodyReader(finished, max_size, response.length)
    response.deliverBody(reader)
    return finished


# ----------------------------------------------------------------------
# .well-known fetching and wiring


class TreqWellKnownFetcher:
    """The production :class:`~.discovery.WellKnownFetcher`: treq over an agent
    from :func:`make_well_known_agent`, no redirects followed (the resolver
    follows them), a size limit and a timeout on ``clock``."""

    def __init__(
        self,
        agent: IAgent,
        clock: IReactorTime,
        *,
        timeout: float = WELL_KNOWN_TIMEOUT,
        max_size: int = WELL_KNOWN_MAX_SIZE,
        user_agent: bytes = DEFAULT_USER_AGENT,
    ) -> None:
        self._http = HTTPClient(agent)
        self._clock = clock
        self._timeout = timeout
        self._max_size = max_size
        self._user_agent = user_agent

    def fetch(self, url: str) -> Deferred[WellKnownResponse]:
        d = Deferred.fromCoroutine(self._fetch(url))
        d.addTimeout(self._timeout, self._clock)
        return d

    async def _fetch(self, url: str) -> WellKnownResponse:
        response = await self._http.get(
            url,
            headers=Headers({b"User-Agent": [self._user_agent]}),
            allow_redirects=False,
            unbuffered=True,
        )
        body = await read_body(response, self._max_size)
        return WellKnownResponse(response.code, response.headers, body)


def build_federation_agent(
    reactor: IReactorSSL,
    tls_policy: FederationTLSPolicy,
    ip_filter: IPRangeFilter,
    *,
    srv_resolver: Optional[SrvResolver] = None,
    name_resolver: Optional[IHostnameResolver] = None,
    rng: Optional[random.Random] = None,
    user_agent: bytes = DEFAULT_USER_AGENT,
    pool: Optional[HTTPConnectionPool] = None,
) -> MatrixFederationAgent:
    """Wire the production agent: ``twisted.names`` SRV lookups over the name
    servers of ``/etc/resolv.conf`` (unless ``srv_resolver`` is given), a
    :class:`~.discovery.ServerResolver` with a :class:`TreqWellKnownFetcher`,
    all on ``reactor``.  The one place that builds real DNS and HTTP clients.

    :param pool: the federation connection pool (see
        :class:`MatrixFederationAgent`); pass one to close its connections
        (``closeCachedConnections``) when the server stops."""
    clock = IReactorTime(reactor)
    if srv_resolver is None:
        from twisted.names import client as names_client

        srv_resolver = names_client.Resolver(
            resolv="/etc/resolv.conf", timeout=SRV_QUERY_TIMEOUTS, reactor=reactor
        )
    fetcher = TreqWellKnownFetcher(
        make_well_known_agent(reactor, tls_policy, ip_filter, name_resolver=name_resolver),
        clock,
        user_agent=user_agent,
    )
    resolver = ServerResolver(clock, srv_resolver, fetcher, ip_filter=ip_filter, rng=rng)
    return MatrixFederationAgent(
        reactor,
        resolver,
        tls_policy,
        ip_filter,
        name_resolver=name_resolver,
        pool=pool,
        user_agent=user_agent,
    )
