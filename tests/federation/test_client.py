"""The outbound federation client, the federation agent and its TLS policy.

- :class:`FederationClient` over treq's in-memory ``RequestTraversalAgent``
  (a real twisted.web server behind it) and over failing fake agents;
- :class:`MatrixFederationAgent` on a ``MemoryReactorClock``: which address it
  connects to (``connectSSL`` calls recorded), with which TLS settings, the
  blocklist, fallback between targets, and the bytes of the request it writes;
- :class:`FederationTLSPolicy` through real in-memory TLS handshakes
  (``twisted.test.iosim``) against certificates made for the test.

No sockets and no DNS anywhere.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import random
from typing import Any, Optional, Sequence, cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
)
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from treq.testing import RequestTraversalAgent
from twisted.internet import ssl
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.error import ConnectionRefusedError, DNSLookupError
from twisted.internet.interfaces import (
    IHandshakeListener,
    IHostnameResolver,
    IHostResolution,
    IOpenSSLClientConnectionCreator,
    IResolutionReceiver,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.error import SchemeNotSupported
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from devicelist_plugin.core.models import JsonDict
from devicelist_plugin.federation.agent import (
    FederationTLSPolicy,
    MatrixFederationAgent,
    ResponseTooLarge,
    TLSConfigError,
    TreqWellKnownFetcher,
    build_federation_agent,
    load_ca_certificates,
    make_well_known_agent,
)
from devicelist_plugin.federation.client import (
    FederationClient,
    FederationClientError,
    HttpResponseError,
    InvalidResponseError,
    NotRetryingDestination,
    RequestSendFailed,
    ResponseTooLargeError,
)
from devicelist_plugin.federation.discovery import (
    ResolvedServer,
    ServerResolutionError,
    ServerResolver,
    WellKnownResponse,
)
from devicelist_plugin.federation.errors import MatrixError
from devicelist_plugin.federation.ipfilter import BlockedAddressError, IPRangeFilter

ORIGIN = "origin.example"
DEST = "remote.example"


class FakeSigner:
    """Records its calls; the header value is a function of the inputs."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, bytes, Optional[JsonDict]]] = []

    @staticmethod
    def header(method: str, destination: str, uri: bytes, content: Optional[JsonDict]) -> bytes:
        body = "-" if content is None else json.dumps(content, sort_keys=True)
        return (
            f'X-Matrix origin="{ORIGIN}",destination="{destination}",'
            f'key="ed25519:k",sig="{method} {uri.decode()} {body}"'
        ).encode()

    def __call__(
        self, method: str, destination: str, uri: bytes, content: Optional[JsonDict]
    ) -> bytes:
        self.calls.append((method, destination, uri, content))
        return self.header(method, destination, uri, content)


class RecordingResource(Resource):
    """Answers every request with ``self.code``/``self.body`` (or leaves it
    pending), recording what it received."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Request] = []
        self.bodies: list[bytes] = []
        self.code = 200
        self.body: bytes = b"{}"
        self.pending = False

    def render(self, request: Request) -> Any:
        self.requests.append(request)
        assert request.content is not None
        self.bodies.append(request.content.read())
        if self.pending:
            return NOT_DONE_YET
        request.setResponseCode(self.code)
        request.setHeader(b"content-type", b"application/json")
        return self.body


@implementer(IAgent)
class FailingAgent:
    def __init__(self, error: Exception) -> None:
        self.error = error

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Optional[Headers] = None,
        bodyProducer: Optional[IBodyProducer] = None,
    ) -> Deferred[IResponse]:
        return fail(self.error)


class ClientTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.signer = FakeSigner()
        self.resource = RecordingResource()
        self.agent = RequestTraversalAgent(self.resource)
        self.client = self.make_client(self.agent)

    def make_client(self, agent: IAgent, **kwargs: Any) -> FederationClient:
        return FederationClient(ORIGIN, agent, self.clock, self.signer, **kwargs)

    def header(self, index: int, name: bytes) -> Optional[list[bytes]]:
        headers = self.resource.requests[index].requestHeaders.getRawHeaders(name)
        return None if headers is None else list(headers)


class SigningTests(ClientTestCase):
    def test_get_signed_with_exact_uri(self) -> None:
        self.resource.body = b'{"devices": []}'
        path = "/_matrix/federation/v1/user/devices/%40alice%3Aremote.example"
        d = Deferred.fromCoroutine(self.client.get_json(DEST, path))
        self.assertEqual(self.successResultOf(d), {"devices": []})

        self.assertEqual(self.signer.calls, [("GET", DEST, path.encode(), None)])
        request = self.resource.requests[0]
        self.assertEqual(request.method, b"GET")
        self.assertEqual(request.uri, path.encode())
        self.assertEqual(self.header(0, b"authorization"), [FakeSigner.header(*self.signer.calls[0])])
        self.assertEqual(self.header(0, b"host"), [DEST.encode()])
        self.assertEqual(self.resource.bodies, [b""])

    def test_query_args_are_part_of_the_signed_uri(self) -> None:
        d = Deferred.fromCoroutine(
            self.client.get_json(DEST, "/_matrix/key/v2/query", args={"a": ["1", "2"], "b": "x y/@"})
        )
        self.successResultOf(d)
        signed_uri = self.signer.calls[0][2]
        self.assertEqual(signed_uri, b"/_matrix/key/v2/query?a=1&a=2&b=x+y%2F%40")
        self.assertEqual(self.resource.requests[0].uri, signed_uri)
        self.assertEqual(self.resource.requests[0].args, {b"a": [b"1", b"2"], b"b": [b"x y/@"]})

    def test_put_canonical_json_body_signed(self) -> None:
        body = {"pdus": [], "origin": ORIGIN, "edus": [{"z": 1, "a": "é"}]}
        d = Deferred.fromCoroutine(
            self.client.put_json(DEST, "/_matrix/federation/v1/send/txn1", body)
        )
        self.assertEqual(self.successResultOf(d), {})
        self.assertEqual(
            self.signer.calls, [("PUT", DEST, b"/_matrix/federation/v1/send/txn1", body)]
        )
        self.assertEqual(self.resource.requests[0].method, b"PUT")
        self.assertEqual(
            self.resource.bodies[0],
            '{"edus":[{"a":"é","z":1}],"origin":"origin.example","pdus":[]}'.encode(),
        )
        self.assertEqual(self.header(0, b"content-type"), [b"application/json"])
        self.assertIsNotNone(self.header(0, b"authorization"))

    def test_post(self) -> None:
        self.resource.body = b'{"one_time_keys": {}}'
        body = {"one_time_keys": {"@a:remote.example": {"DEV": "signed_curve25519"}}}
        d = Deferred.fromCoroutine(
            self.client.post_json(DEST, "/_matrix/federation/v1/user/keys/claim", body)
        )
        self.assertEqual(self.successResultOf(d), {"one_time_keys": {}})
        self.assertEqual(self.signer.calls[0][0], "POST")
        self.assertEqual(self.signer.calls[0][3], body)
        self.assertEqual(json.loads(self.resource.bodies[0]), body)

    def test_each_request_signed_separately(self) -> None:
        for n in range(3):
            self.successResultOf(Deferred.fromCoroutine(self.client.get_json(DEST, f"/p{n}")))
        self.assertEqual([c[2] for c in self.signer.calls], [b"/p0", b"/p1", b"/p2"])
        self.assertEqual(self.header(2, b"authorization"), [FakeSigner.header(*self.signer.calls[2])])

    def test_ipv6_destination(self) -> None:
        self.successResultOf(Deferred.fromCoroutine(self.client.get_json("[2001:db8::1]:8448", "/x")))
        self.assertEqual(self.header(0, b"host"), [b"[2001:db8::1]:8448"])
        self.assertEqual(self.signer.calls[0][1], "[2001:db8::1]:8448")

    def test_path_must_be_absolute(self) -> None:
        d = Deferred.fromCoroutine(self.client.get_json(DEST, "relative"))
        self.failureResultOf(d, ValueError)


class TimeoutTests(ClientTestCase):
    def test_timeout_fires_on_clock(self) -> None:
        self.resource.pending = True
        d = Deferred.fromCoroutine(self.client.get_json(DEST, "/slow"))
        self.clock.advance(29.9)  # not yet the 30 s default deadline
        self.assertNoResult(d)
        self.clock.advance(0.1)  # the request deadline
        error = self.failureResultOf(d, RequestSendFailed).value
        self.assertTrue(error.retryable)
        self.assertIn("timed out after 30s", str(error))
        self.assertEqual(error.destination, DEST)

    def test_per_request_timeout(self) -> None:
        self.resource.pending = True
        d = Deferred.fromCoroutine(self.client.put_json(DEST, "/slow", {}, timeout=5))
        self.clock.advance(5)  # the 5 s deadline given to put_json
        self.failureResultOf(d, RequestSendFailed)

    def test_timeout_covers_the_body(self) -> None:
        """Headers arrived but the body never ends: still a timeout."""
        self.resource.pending = True
        d = Deferred.fromCoroutine(self.client.get_json(DEST, "/slow"))
        request = self.resource.requests[0]
        request.setResponseCode(200)
        request.write(b'{"partial": ')
        self.agent.flush()
        self.assertNoResult(d)
        self.clock.advance(30)  # the request deadline
        self.failureResultOf(d, RequestSendFailed)

    def test_no_timer_left_after_success(self) -> None:
        self.successResultOf(Deferred.fromCoroutine(self.client.get_json(DEST, "/fast")))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_caller_cancel_is_not_a_send_failure(self) -> None:
        self.resource.pending = True
        d = Deferred.fromCoroutine(self.client.get_json(DEST, "/slow"))
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ResponseTests(ClientTestCase):
    def test_error_response(self) -> None:
        self.resource.code = 500
        self.resource.body = b'{"errcode": "M_UNKNOWN", "error": "database on fire"}'
        d = Deferred.fromCoroutine(self.client.get_json(DEST, "/x"))
        error = self.failureResultOf(d, HttpResponseError).value
        self.assertEqual(
            (error.code, error.errcode, error.message, error.destination),
            (500, "M_UNKNOWN", "database on fire", DEST),
        )
        # Remote text is detail, never our own error type.
        self.assertNotIsInstance(error, MatrixError)
        self.assertIsInstance(error, FederationClientError)
        self.assertEqual(str(error), "remote.example answered 500 M_UNKNOWN: database on fire")

    def test_error_response_without_json(self) -> None:
        self.resource.code = 404
        self.resource.body = b"<html>nope</html>"
        d = Deferred.fromCoroutine(self.client.get_json(DEST, "/x"))
        error = self.failureResultOf(d, HttpResponseError).value
        self.assertEqual((error.code, error.errcode, error.message), (404, None, "Not Found"))

    def test_lone_surrogate_escape_is_an_invalid_response(self) -> None:
        # found by tests.fuzz on our own endpoints, then here: a remote
        # /user/devices answer with "\ud800" reached SQLite, every resync
        # failed with an unexpected error and was retried, logged each time
        self.resource.body = b'{"devices": [{"device_display_name": "a\\ud800"}]}'
        d = Deferred.fromCoroutine(self.client.get_json(DEST, "/x"))
        self.failureResultOf(d, InvalidResponseError)
        self.resource.body = b'{"name": "\\ud83d\\ude00"}'  # an escaped pair is fine
        d = Deferred.fromCoroutine(self.client.get_json(DEST, "/x"))
        self.assertEqual(self.successResultOf(d), {"name": "\U0001f600"})

    def test_error_response_nested_too_deep(self) -> None:
        # the error body of a hostile server: json.loads raised RecursionError
        self.resource.code = 400
        self.resource.body = b"[" * 100_000
        d = Deferred.fromCoroutine(self.client.get_json(DEST, "/x"))
        error = self.failureResultOf(d, HttpResponseError).value
        self.assertEqual((error.code, error.errcode), (400, None))

    def test_error_text_truncated(self) -> None:
        self.resource.code = 403
        self.resource.body = json.dumps({"errcode": "M_FORBIDDEN", "error": "x" * 5000}).encode()
        d = Deferred.fromCoroutine(self.client.get_json(DEST, "/x"))
        self.assertEqual(len(self.failureResultOf(d, HttpResponseError).value.message), 500)

    def test_oversize_response(self) -> None:
        client = self.make_client(self.agent, max_response_size=100)
        self.resource.body = json.dumps({"k": "v" * 200}).encode()
        d = Deferred.fromCoroutine(client.get_json(DEST, "/big"))
        error = self.failureResultOf(d, ResponseTooLargeError).value
        self.assertFalse(error.retryable)
        self.assertIsInstance(error, RequestSendFailed)

    def test_oversize_streamed_response(self) -> None:
        """No Content-Length: cut off as soon as the limit is passed."""
        client = self.make_client(self.agent, max_response_size=100)
        self.resource.pending = True
        d = Deferred.fromCoroutine(client.get_json(DEST, "/big"))
        request = self.resource.requests[0]
        request.write(b'{"k": "' + b"v" * 60)
        self.agent.flush()
        self.assertNoResult(d)
        request.write(b"v" * 60)
        self.agent.flush()
        self.failureResultOf(d, ResponseTooLargeError)

    def test_exactly_at_limit(self) -> None:
        body = json.dumps({"k": "v" * 90}).encode()
        client = self.make_client(self.agent, max_response_size=len(body))
        self.resource.body = body
        self.successResultOf(Deferred.fromCoroutine(client.get_json(DEST, "/x")))

    def test_non_json(self) -> None:
        for body in [b"<html></html>", b"", b"\xff\xfe", b'{"a": NaN}', b"{'a': 1}"]:
            with self.subTest(body=body):
                self.resource.body = body
                d = Deferred.fromCoroutine(self.client.get_json(DEST, "/x"))
                error = self.failureResultOf(d, InvalidResponseError).value
                self.assertFalse(error.retryable)

    def test_json_not_an_object(self) -> None:
        for body in [b"[]", b"1", b'"x"', b"null"]:
            with self.subTest(body=body):
                self.resource.body = body
                d = Deferred.fromCoroutine(self.client.get_json(DEST, "/x"))
                self.failureResultOf(d, InvalidResponseError)


class SendFailureTests(ClientTestCase):
    def send_with(self, error: Exception) -> RequestSendFailed:
        client = self.make_client(FailingAgent(error))
        d = Deferred.fromCoroutine(client.get_json(DEST, "/x"))
        result: RequestSendFailed = self.failureResultOf(d, RequestSendFailed).value
        self.assertNotIsInstance(result, InvalidResponseError)
        self.assertEqual(result.destination, DEST)
        return result

    def test_connection_refused(self) -> None:
        self.assertTrue(self.send_with(ConnectionRefusedError()).retryable)

    def test_dns(self) -> None:
        error = self.send_with(DNSLookupError("no address for remote.example"))
        self.assertTrue(error.retryable)
        self.assertIn("no address for remote.example", str(error))

    def test_blocked_ip_not_retryable(self) -> None:
        error = self.send_with(BlockedAddressError("10.0.0.1", "remote.example"))
        self.assertFalse(error.retryable)
        self.assertIn("blocked IP range", str(error))

    def test_resolution_errors(self) -> None:
        self.assertFalse(
            self.send_with(ServerResolutionError(DEST, "SRV says no", retryable=False)).retryable
        )
        self.assertTrue(
            self.send_with(ServerResolutionError(DEST, "SERVFAIL", retryable=True)).retryable
        )

    def test_destination_no_url_can_carry_is_not_retryable_nor_logged(self) -> None:
        # found by tests.fuzz: a request signed as origin "-" made the key
        # ring fetch from "-", and treq's IDNA encoding failure was logged
        # as an unexpected error
        for name in ["-", "a..b", "-a.example"]:
            with self.subTest(name=name):
                d = Deferred.fromCoroutine(self.client.get_json(name, "/x"))
                error = self.failureResultOf(d, RequestSendFailed).value
                self.assertFalse(error.retryable)
                self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual(self.resource.requests, [])

    def test_unexpected_error_logged_and_wrapped(self) -> None:
        error = self.send_with(RuntimeError("bug"))
        self.assertTrue(error.retryable)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_not_retrying_destination(self) -> None:
        error = NotRetryingDestination(DEST, retry_at=600.0)
        self.assertIsInstance(error, FederationClientError)
        self.assertEqual((error.destination, error.retry_at), (DEST, 600.0))
        self.assertIn(DEST, str(error))


# ----------------------------------------------------------------------
# the agent


@implementer(IHostResolution)
class _Resolution:
    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        pass


@implementer(IHostnameResolver)
class FakeNameResolver:
    """Host name -> addresses, answered synchronously."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.calls: list[str] = []

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Optional[Sequence[type]] = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        self.calls.append(hostName)
        resolution = _Resolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        for ip in self.table.get(hostName, []):
            address_type = IPv6Address if ":" in ip else IPv4Address
            resolutionReceiver.addressResolved(address_type("TCP", ip, portNumber))
        resolutionReceiver.resolutionComplete()
        return resolution


class StubResolver:
    def __init__(self, resolved: ResolvedServer) -> None:
        self.resolved = resolved
        self.calls: list[str] = []

    async def resolve(self, server_name: str) -> ResolvedServer:
        self.calls.append(server_name)
        return self.resolved


class RecordingTLSPolicy(FederationTLSPolicy):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.hostnames: list[str] = []
        self.creators: list[IOpenSSLClientConnectionCreator] = []

    def creator_for(self, hostname: str) -> IOpenSSLClientConnectionCreator:
        self.hostnames.append(hostname)
        creator = super().creator_for(hostname)
        self.creators.append(creator)
        return creator


RESOLVED = ResolvedServer(
    "example.org",
    "matrix.example.net:443",
    "matrix.example.net",
    (("matrix.example.net", 443),),
    delegated_to="matrix.example.net:443",
)


class AgentTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.names = FakeNameResolver(
            {
                "matrix.example.net": ["93.184.216.34"],
                "a.example.net": ["93.184.216.1"],
                "b.example.net": ["2606:4700::2"],
                "internal.example.net": ["10.0.0.5"],
                "mixed.example.net": ["127.0.0.1", "10.1.1.1", "93.184.216.9"],
            }
        )
        self.tls = RecordingTLSPolicy()

    def make_agent(self, resolved: ResolvedServer = RESOLVED, **kwargs: Any) -> MatrixFederationAgent:
        self.resolver = StubResolver(resolved)
        return MatrixFederationAgent(
            self.reactor,
            self.resolver,
            self.tls,
            IPRangeFilter(),
            name_resolver=self.names,
            **kwargs,
        )

    def connected_to(self) -> list[tuple[str, int]]:
        return [(c[0], c[1]) for c in self.reactor.sslClients]

    def complete_connection(self, index: int = -1) -> tuple[Protocol, StringTransport]:
        """Play the TLS connection recorded by connectSSL as established."""
        factory = self.reactor.sslClients[index][2]
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport


class AgentConnectTests(AgentTestCase):
    def test_connects_to_resolved_address_with_tls_for_tls_hostname(self) -> None:
        agent = self.make_agent(connect_timeout=7)
        d = agent.request(b"GET", b"matrix-federation://example.org/_matrix/federation/v1/version")
        self.assertNoResult(d)
        self.assertEqual(self.resolver.calls[0], "example.org")
        self.assertEqual(self.names.calls, ["matrix.example.net"])
        self.assertEqual(self.connected_to(), [("93.184.216.34", 443)])
        host, port, factory, creator, timeout, bind = self.reactor.sslClients[0]
        self.assertEqual(self.tls.hostnames, ["matrix.example.net"])
        self.assertIs(creator, self.tls.creators[0])
        self.assertEqual(timeout, 7)

    def test_request_bytes_host_header_and_response(self) -> None:
        agent = self.make_agent()
        d = agent.request(
            b"PUT",
            b"matrix-federation://example.org/_matrix/federation/v1/send/t1?x=%2F1",
            Headers({b"Host": [b"example.org"], b"Authorization": [b"X-Matrix sig"]}),
        )
        protocol, transport = self.complete_connection()
        written = transport.value()
        self.assertTrue(
            written.startswith(b"PUT /_matrix/federation/v1/send/t1?x=%2F1 HTTP/1.1\r\n"), written
        )
        # Host: the delegated name replaces the caller's.
        self.assertIn(b"\r\nHost: matrix.example.net:443\r\n", written)
        self.assertNotIn(b"Host: example.org", written)
        self.assertIn(b"\r\nAuthorization: X-Matrix sig\r\n", written)
        self.assertIn(b"\r\nUser-Agent: devicelist-plugin\r\n", written)
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        self.assertEqual(self.successResultOf(d).code, 200)

    def test_https_scheme_is_a_server_name_too(self) -> None:
        agent = self.make_agent()
        agent.request(b"GET", b"https://example.org/x")
        self.assertEqual(self.resolver.calls, ["example.org", "example.org"])
        self.assertEqual(self.connected_to(), [("93.184.216.34", 443)])

    def test_other_schemes_refused(self) -> None:
        agent = self.make_agent()
        self.failureResultOf(agent.request(b"GET", b"http://example.org/x"), SchemeNotSupported)
        self.failureResultOf(agent.request(b"GET", b"example.org/x"), SchemeNotSupported)
        self.assertEqual(self.reactor.sslClients, [])

    def test_invalid_server_name(self) -> None:
        agent = self.make_agent()
        self.failureResultOf(
            agent.request(b"GET", b"matrix-federation://bad name/x"), ServerResolutionError
        )

    def test_blocked_address_refused_before_connecting(self) -> None:
        agent = self.make_agent(
            ResolvedServer("internal.example.net", "internal.example.net", "internal.example.net",
                           (("internal.example.net", 8448),))  # fmt: skip
        )
        d = agent.request(b"GET", b"matrix-federation://internal.example.net/x")
        error = self.failureResultOf(d, BlockedAddressError).value
        self.assertEqual(error.address, "10.0.0.5")
        self.assertIn("internal.example.net resolves to 10.0.0.5", str(error))
        self.assertEqual(self.reactor.sslClients, [])
        self.assertEqual(self.reactor.tcpClients, [])

    def test_blocked_addresses_skipped(self) -> None:
        agent = self.make_agent(
            ResolvedServer("mixed.example.net", "mixed.example.net", "mixed.example.net",
                           (("mixed.example.net", 8448),))  # fmt: skip
        )
        agent.request(b"GET", b"matrix-federation://mixed.example.net/x")
        self.assertEqual(self.connected_to(), [("93.184.216.9", 8448)])

    def test_ip_literal_target_checked(self) -> None:
        agent = self.make_agent(
            ResolvedServer("192.168.1.1", "192.168.1.1", "192.168.1.1", (("192.168.1.1", 8448),))
        )
        d = agent.request(b"GET", b"matrix-federation://192.168.1.1/x")
        self.failureResultOf(d, BlockedAddressError)
        self.assertEqual(self.names.calls, [])

    def test_ipv6_literal_target(self) -> None:
        agent = self.make_agent(
            ResolvedServer("[2606:4700::1]", "[2606:4700::1]", "2606:4700::1", (("2606:4700::1", 8448),))
        )
        agent.request(b"GET", b"matrix-federation://[2606:4700::1]/x")
        self.assertEqual(self.connected_to(), [("2606:4700::1", 8448)])
        self.assertEqual(self.tls.hostnames, ["2606:4700::1"])

    def test_next_target_on_connection_failure(self) -> None:
        agent = self.make_agent(
            ResolvedServer(
                "example.org",
                "example.org",
                "example.org",
                (("nowhere.example.net", 8448), ("a.example.net", 8448), ("b.example.net", 8449)),
            )
        )
        d = agent.request(b"GET", b"matrix-federation://example.org/x")
        # nowhere.example.net has no address: skipped without connecting.
        self.assertEqual(self.connected_to(), [("93.184.216.1", 8448)])
        connector = self.reactor.connectors[0]
        self.reactor.sslClients[0][2].clientConnectionFailed(
            connector, Failure(ConnectionRefusedError())
        )
        self.assertEqual(
            self.connected_to(), [("93.184.216.1", 8448), ("2606:4700::2", 8449)]
        )
        self.assertNoResult(d)
        self.complete_connection()
        self.assertNoResult(d)  # now waiting for the response

    def test_all_targets_fail(self) -> None:
        agent = self.make_agent(
            ResolvedServer(
                "example.org", "example.org", "example.org",
                (("a.example.net", 8448), ("b.example.net", 8448)),
            )  # fmt: skip
        )
        d = agent.request(b"GET", b"matrix-federation://example.org/x")
        self.reactor.sslClients[0][2].clientConnectionFailed(
            self.reactor.connectors[0], Failure(ConnectionRefusedError("first"))
        )
        self.reactor.sslClients[1][2].clientConnectionFailed(
            self.reactor.connectors[1], Failure(ConnectionRefusedError("second"))
        )
        error = self.failureResultOf(d, ConnectionRefusedError).value
        self.assertIn("first", str(error))

    def test_no_address_at_all(self) -> None:
        agent = self.make_agent(
            ResolvedServer("example.org", "example.org", "example.org", (("nowhere.example.net", 8448),))
        )
        d = agent.request(b"GET", b"matrix-federation://example.org/x")
        self.failureResultOf(d, DNSLookupError)

    def test_connection_pooled_per_server_name(self) -> None:
        agent = self.make_agent()
        d = agent.request(b"GET", b"matrix-federation://example.org/one")
        protocol, transport = self.complete_connection()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        response = self.successResultOf(d)
        body: Deferred[bytes] = Deferred()

        class Collect(Protocol):
            def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
                body.callback(b"")

        response.deliverBody(Collect())
        self.successResultOf(body)
        transport.clear()
        agent.request(b"GET", b"matrix-federation://example.org/two")
        self.assertEqual(len(self.reactor.sslClients), 1)  # reused the connection
        self.assertTrue(transport.value().startswith(b"GET /two HTTP/1.1"))


class ClientThroughAgentTests(SynchronousTestCase):
    """FederationClient -> MatrixFederationAgent -> ServerResolver, with a
    delegated destination: the signature covers the exact request target
    written on the wire, and Host is the delegated name."""

    def test_signed_request_on_the_wire(self) -> None:
        reactor = MemoryReactorClock()

        class Fetcher:
            def fetch(self, url: str) -> Deferred[WellKnownResponse]:
                assert url == "https://example.org/.well-known/matrix/server"
                d: Deferred[WellKnownResponse] = Deferred()
                d.callback(
                    WellKnownResponse(200, Headers(), b'{"m.server": "matrix.example.net:8443"}')
                )
                return d

        class NoSrv:
            def lookupService(self, name: str) -> Deferred[Any]:
                raise AssertionError("no SRV lookup with a delegated port")

        resolver = ServerResolver(reactor, NoSrv(), Fetcher(), rng=random.Random(0))
        agent = MatrixFederationAgent(
            reactor,
            resolver,
            FederationTLSPolicy(),
            IPRangeFilter(),
            name_resolver=FakeNameResolver({"matrix.example.net": ["93.184.216.34"]}),
        )
        signer = FakeSigner()
        client = FederationClient(ORIGIN, agent, reactor, signer)
        d = Deferred.fromCoroutine(
            client.put_json(
                "example.org", "/_matrix/federation/v1/send/1", {"b": 1, "a": 2}, args={"q": "1 2"}
            )
        )
        self.assertEqual(reactor.sslClients[0][:2], ("93.184.216.34", 8443))
        protocol = reactor.sslClients[0][2].buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        head, _, sent_body = transport.value().partition(b"\r\n\r\n")
        request_line, *header_lines = head.split(b"\r\n")
        self.assertEqual(request_line, b"PUT /_matrix/federation/v1/send/1?q=1+2 HTTP/1.1")
        self.assertEqual(
            signer.calls,
            [("PUT", "example.org", b"/_matrix/federation/v1/send/1?q=1+2", {"b": 1, "a": 2})],
        )
        self.assertIn(b"Host: matrix.example.net:8443", header_lines)
        self.assertIn(b"Authorization: " + FakeSigner.header(*signer.calls[0]), header_lines)
        self.assertEqual(sent_body, b'{"a":2,"b":1}')

        protocol.dataReceived(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b'Content-Length: 11\r\n\r\n{"ok":true}'
        )
        self.assertEqual(self.successResultOf(d), {"ok": True})

    def test_deadline_while_connecting_stops_everything(self) -> None:
        """The client's deadline fires during the first connection attempt: the
        attempt is abandoned, no other target is tried, and the caller sees a
        timeout."""
        reactor = MemoryReactorClock()
        resolved = ResolvedServer(
            "example.org", "example.org", "example.org",
            (("a.example.net", 8448), ("b.example.net", 8448)),
        )  # fmt: skip
        agent = MatrixFederationAgent(
            reactor,
            StubResolver(resolved),
            FederationTLSPolicy(),
            IPRangeFilter(),
            name_resolver=FakeNameResolver(
                {"a.example.net": ["93.184.216.1"], "b.example.net": ["93.184.216.2"]}
            ),
        )
        client = FederationClient(ORIGIN, agent, reactor, FakeSigner(), default_timeout=20)
        d = Deferred.fromCoroutine(client.get_json("example.org", "/x"))
        self.assertEqual(len(reactor.sslClients), 1)
        reactor.advance(20)  # the client's 20 s deadline
        error = self.failureResultOf(d, RequestSendFailed).value
        self.assertIn("timed out after 20s", str(error))
        self.assertTrue(reactor.connectors[0].stoppedConnecting)
        self.assertEqual(len(reactor.sslClients), 1)

    def test_blocked_destination_is_a_send_failure(self) -> None:
        reactor = MemoryReactorClock()

        class NoFetch:
            def fetch(self, url: str) -> Deferred[WellKnownResponse]:
                raise AssertionError("IP literal: no .well-known")

        resolver = ServerResolver(reactor, FakeSrvNone(), NoFetch(), ip_filter=IPRangeFilter())
        agent = MatrixFederationAgent(
            reactor, resolver, FederationTLSPolicy(), IPRangeFilter(), name_resolver=FakeNameResolver({})
        )
        client = FederationClient(ORIGIN, agent, reactor, FakeSigner())
        d = Deferred.fromCoroutine(client.get_json("127.0.0.1:8448", "/x"))
        error = self.failureResultOf(d, RequestSendFailed).value
        self.assertFalse(error.retryable)
        self.assertIn("127.0.0.1 is in a blocked IP range", str(error))
        self.assertNotIn("resolves", str(error))
        self.assertEqual(reactor.sslClients, [])


class WellKnownFetcherTests(AgentTestCase):
    """TreqWellKnownFetcher over make_well_known_agent: plain https to the
    URL's host, same TLS policy and IP filter, redirects returned not followed."""

    def make_fetcher(self, **kwargs: Any) -> TreqWellKnownFetcher:
        agent = make_well_known_agent(
            self.reactor, self.tls, IPRangeFilter(), name_resolver=self.names
        )
        return TreqWellKnownFetcher(agent, self.reactor, **kwargs)

    def test_fetch(self) -> None:
        fetcher = self.make_fetcher()
        d = fetcher.fetch("https://matrix.example.net/.well-known/matrix/server")
        self.assertEqual(self.connected_to(), [("93.184.216.34", 443)])
        self.assertEqual(self.tls.hostnames, ["matrix.example.net"])
        protocol, transport = self.complete_connection()
        self.assertTrue(
            transport.value().startswith(b"GET /.well-known/matrix/server HTTP/1.1\r\n")
        )
        self.assertIn(b"\r\nHost: matrix.example.net\r\n", transport.value())
        protocol.dataReceived(
            b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: 27\r\n\r\n"
            b'{"m.server": "other.test"}\n'
        )
        response = self.successResultOf(d)
        self.assertEqual(response.code, 200)
        self.assertEqual(response.body, b'{"m.server": "other.test"}\n')
        self.assertEqual(response.headers.getRawHeaders("cache-control"), ["max-age=60"])

    def test_redirect_returned_not_followed(self) -> None:
        fetcher = self.make_fetcher()
        d = fetcher.fetch("https://matrix.example.net/.well-known/matrix/server")
        protocol, _ = self.complete_connection()
        protocol.dataReceived(
            b"HTTP/1.1 301 Moved\r\nLocation: https://a.example.net/wk\r\n"
            b"Content-Length: 0\r\n\r\n"
        )
        response = self.successResultOf(d)
        self.assertEqual(response.code, 301)
        self.assertEqual(len(self.reactor.sslClients), 1)

    def test_size_limit(self) -> None:
        fetcher = self.make_fetcher(max_size=10)
        d = fetcher.fetch("https://matrix.example.net/.well-known/matrix/server")
        protocol, transport = self.complete_connection()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n")
        # Failed on the announced length alone; dropped on the first data.
        self.failureResultOf(d, ResponseTooLarge)
        self.assertEqual(transport.producerState, "producing")
        protocol.dataReceived(b"12345")
        # stopProducing: a real TCP transport closes the connection.
        self.assertEqual(transport.producerState, "stopped")

    def test_size_limit_streamed(self) -> None:
        fetcher = self.make_fetcher(max_size=10)
        d = fetcher.fetch("https://matrix.example.net/.well-known/matrix/server")
        protocol, transport = self.complete_connection()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        protocol.dataReceived(b"8\r\n12345678\r\n")
        self.assertNoResult(d)
        protocol.dataReceived(b"8\r\n12345678\r\n")
        self.failureResultOf(d, ResponseTooLarge)
        self.assertEqual(transport.producerState, "stopped")

    def test_timeout(self) -> None:
        fetcher = self.make_fetcher(timeout=5)
        d = fetcher.fetch("https://matrix.example.net/.well-known/matrix/server")
        self.reactor.advance(5)  # the fetch's 5 s deadline
        self.failureResultOf(d)
        self.assertTrue(self.reactor.connectors[0].stoppedConnecting)

    def test_blocked_host(self) -> None:
        fetcher = self.make_fetcher()
        d = fetcher.fetch("https://internal.example.net/.well-known/matrix/server")
        self.failureResultOf(d, BlockedAddressError)
        self.assertEqual(self.reactor.sslClients, [])

    def test_https_only(self) -> None:
        fetcher = self.make_fetcher()
        d = fetcher.fetch("http://matrix.example.net/.well-known/matrix/server")
        self.failureResultOf(d, SchemeNotSupported)

    def test_build_federation_agent(self) -> None:
        """The production wiring, with DNS injected: discovery through the
        real fetcher (a refused .well-known connection counts as none)."""
        srv = FakeSrvNone()
        agent = build_federation_agent(
            self.reactor, self.tls, IPRangeFilter(), srv_resolver=srv, name_resolver=self.names
        )
        d = agent.request(b"GET", b"matrix-federation://matrix.example.net:8448/x")
        self.assertEqual(self.connected_to(), [("93.184.216.34", 8448)])
        self.assertNoResult(d)


class FakeSrvNone:
    def lookupService(self, name: str) -> Deferred[Any]:
        raise AssertionError("unexpected SRV lookup")


# ----------------------------------------------------------------------
# TLS policy, with real handshakes in memory


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
    dns_names: Sequence[str] = (),
    ips: Sequence[str] = (),
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),  # fmt: skip
            critical=True,
        )
    names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(Encoding.PEM, PrivateFormat.TraditionalOpenSSL, NoEncryption())


@implementer(IHandshakeListener)
class _TLSRecorder(Protocol):
    def __init__(self) -> None:
        self.handshake_done = False
        self.lost: Optional[Failure] = None

    def handshakeCompleted(self) -> None:
        self.handshake_done = True

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        self.lost = reason


class _Certificates:
    """Made once per test run (key generation is the slow part)."""

    def __init__(self) -> None:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        self.ca_cert = _certificate("Test CA", ca_key, "Test CA", ca_key, ca=True)
        other_ca_key = ec.generate_private_key(ec.SECP256R1())
        self.other_ca_cert = _certificate(
            "Other CA", other_ca_key, "Other CA", other_ca_key, ca=True
        )
        leaf_key = ec.generate_private_key(ec.SECP256R1())
        leaf = _certificate(
            "matrix.example.org",
            leaf_key,
            "Test CA",
            ca_key,
            ca=False,
            dns_names=["matrix.example.org"],
            ips=["93.184.216.34"],
        )
        self.server_pem = _key_pem(leaf_key) + leaf.public_bytes(Encoding.PEM)


_certificates: list[_Certificates] = []


def certificates() -> _Certificates:
    if not _certificates:
        _certificates.append(_Certificates())
    return _certificates[0]


class TLSPolicyTests(SynchronousTestCase):
    def setUp(self) -> None:
        made = certificates()
        self.ca_cert = made.ca_cert
        self.other_ca_cert = made.other_ca_cert
        self.server_pem = made.server_pem

    def ca_file(self, *certs: x509.Certificate) -> str:
        path = self.mktemp()
        with open(path, "wb") as f:
            for cert in certs:
                f.write(cert.public_bytes(Encoding.PEM))
        return path

    def handshake(self, creator: IOpenSSLClientConnectionCreator) -> _TLSRecorder:
        """Run a TLS handshake in memory between the test server certificate
        and a client using ``creator``; return the client's application protocol."""
        clock = Clock()
        recorders: list[_TLSRecorder] = []

        class Recording(Factory):
            def buildProtocol(self, addr: Any) -> _TLSRecorder:
                recorder = _TLSRecorder()
                recorders.append(recorder)
                return recorder

        server_options = ssl.PrivateCertificate.loadPEM(self.server_pem).options()
        server_factory = TLSMemoryBIOFactory(
            server_options, False, Factory.forProtocol(_TLSRecorder), clock=clock
        )
        client_factory = TLSMemoryBIOFactory(creator, True, Recording(), clock=clock)
        address = IPv4Address("TCP", "93.184.216.34", 8448)
        _client, _server, pump = iosim.connectedServerAndClient(
            lambda: server_factory.buildProtocol(address),
            lambda: client_factory.buildProtocol(address),
            greet=False,
        )
        pump.flush()
        self.assertEqual(len(recorders), 1)
        return recorders[0]

    def test_custom_ca_hostname_matches(self) -> None:
        policy = FederationTLSPolicy.from_config(True, [self.ca_file(self.ca_cert)])
        self.assertTrue(self.handshake(policy.creator_for("matrix.example.org")).handshake_done)

    def test_custom_ca_ip_address_matches(self) -> None:
        policy = FederationTLSPolicy.from_config(True, [self.ca_file(self.ca_cert)])
        self.assertTrue(self.handshake(policy.creator_for("93.184.216.34")).handshake_done)

    def test_custom_ca_wrong_hostname_fails(self) -> None:
        policy = FederationTLSPolicy.from_config(True, [self.ca_file(self.ca_cert)])
        client = self.handshake(policy.creator_for("example.org"))
        self.assertFalse(client.handshake_done)
        self.assertIsNotNone(client.lost)

    def test_untrusted_ca_fails(self) -> None:
        """Only the listed CAs are trusted: a certificate from another fails."""
        policy = FederationTLSPolicy.from_config(True, [self.ca_file(self.other_ca_cert)])
        client = self.handshake(policy.creator_for("matrix.example.org"))
        self.assertFalse(client.handshake_done)
        self.assertIsNotNone(client.lost)
        assert client.lost is not None
        self.assertTrue(client.lost.check(SSL.Error), client.lost)

    def test_platform_trust_rejects_test_ca(self) -> None:
        client = self.handshake(FederationTLSPolicy().creator_for("matrix.example.org"))
        self.assertFalse(client.handshake_done)

    def test_verification_off_accepts_anything(self) -> None:
        policy = FederationTLSPolicy.from_config(verify_certificates=False)
        self.assertFalse(policy.verify)
        self.assertTrue(self.handshake(policy.creator_for("some.other.name")).handshake_done)
        self.assertTrue(self.handshake(policy.creator_for("10.9.8.7")).handshake_done)

    def test_verification_off_still_sends_sni(self) -> None:
        policy = FederationTLSPolicy(verify=False)
        no_protocol = cast(TLSMemoryBIOProtocol, None)
        connection = policy.creator_for("matrix.example.org").clientConnectionForTLS(no_protocol)
        self.assertEqual(connection.get_servername(), b"matrix.example.org")
        connection = policy.creator_for("93.184.216.34").clientConnectionForTLS(no_protocol)
        self.assertIsNone(connection.get_servername())
        self.assertEqual(connection.get_context().get_verify_mode(), SSL.VERIFY_NONE)

    def test_ca_file_with_several_certificates(self) -> None:
        path = self.ca_file(self.other_ca_cert, self.ca_cert)
        self.assertEqual(len(load_ca_certificates([path])), 2)
        policy = FederationTLSPolicy.from_config(True, [path])
        self.assertTrue(self.handshake(policy.creator_for("matrix.example.org")).handshake_done)

    def test_bad_ca_files_named(self) -> None:
        missing = self.mktemp()
        with self.assertRaises(TLSConfigError) as cm:
            FederationTLSPolicy.from_config(True, [missing])
        self.assertEqual(cm.exception.path, missing)
        self.assertIn(missing, str(cm.exception))
        self.assertIn("federation_custom_ca_list", str(cm.exception))
        garbage = self.mktemp()
        with open(garbage, "wb") as f:
            f.write(b"not a certificate\n")
        with self.assertRaises(TLSConfigError) as cm:
            FederationTLSPolicy.from_config(True, [self.ca_file(self.ca_cert), garbage])
        self.assertEqual(cm.exception.path, garbage)


class NestedJsonTests(SynchronousTestCase):
    def test_deeply_nested_body_is_an_invalid_response(self) -> None:
        from devicelist_plugin.federation.client import InvalidResponseError, _parse_json_object

        body = b"[" * 100_000 + b"]" * 100_000
        self.assertRaises(InvalidResponseError, _parse_json_object, body, "s.test")
