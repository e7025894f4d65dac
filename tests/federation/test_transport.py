"""Two full federation transports on one FakeNetwork: A's signed requests
reach B's authenticated endpoints, B fetching A's key once; tampering in
flight and a wrong destination are 401 M_UNAUTHORIZED; the Site root."""

from __future__ import annotations

import json
from io import BytesIO
from typing import Any, Callable, Optional

import treq
from signedjson.key import generate_signing_key, get_verify_key
from signedjson.sign import verify_signed_json
from signedjson.types import SigningKey
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer, IProducer
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import FileBodyProducer
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from twisted.web.resource import Resource
from zope.interface import implementer

from devicelist_plugin.core.models import JsonDict
from devicelist_plugin.federation.client import HttpResponseError
from devicelist_plugin.federation.errors import M_TOO_LARGE, M_UNAUTHORIZED, M_UNRECOGNIZED
from devicelist_plugin.federation.key_server import KEY_SERVER_PATH
from devicelist_plugin.federation.resource import VERSION_PATH, JsonRequest
from devicelist_plugin.federation.transport import (
    FederationTransport,
    FederationTransportConfig,
    build_federation_transport,
)
from devicelist_plugin.storage import open_sqlite_store
from tests.helpers import FakeNetwork

A = "a.test"
B = "b.test"
NOW_S = 1_700_000_000
TEST_PATH = "/_matrix/federation/v1/test/{thing}"


@implementer(IConsumer)
class _Collector:
    def __init__(self) -> None:
        self.data = b""

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.data += data


@implementer(IAgent)
class TamperingAgent:
    """Changes requests in flight, after they were signed."""

    def __init__(
        self,
        agent: IAgent,
        uri: Callable[[bytes], bytes] = lambda uri: uri,
        body: Callable[[bytes], bytes] = lambda body: body,
    ) -> None:
        self._agent = agent
        self._uri = uri
        self._body = body

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Optional[Headers] = None,
        bodyProducer: Optional[IBodyProducer] = None,
    ) -> Deferred[IResponse]:
        if bodyProducer is not None:
            collector = _Collector()
            bodyProducer.startProducing(collector)  # the client's producer writes at once
            bodyProducer = FileBodyProducer(BytesIO(self._body(collector.data)))
        return self._agent.request(method, self._uri(uri), headers, bodyProducer)


class TransportTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(NOW_S)  # an arbitrary "now"
        self.network = FakeNetwork(self.clock)
        self.a_key = generate_signing_key("a_1")
        self.b_key = generate_signing_key("b_1")
        self.a = self.transport(A, self.network.agent_for(A), key=self.a_key)
        self.b = self.transport(B, self.network.agent_for(B), key=self.b_key)
        # one mounted as a Site with the size-limiting request factory, one as a bare root
        self.network.add_server(A, self.a.make_site())
        self.network.add_server(B, self.b.root)

        self.seen: list[tuple[Optional[str], str, Optional[JsonDict]]] = []

        async def handler(request: JsonRequest) -> tuple[int, JsonDict]:
            self.seen.append((request.origin, request.path_params["thing"], request.content))
            return 200, {"ok": request.path_params["thing"]}

        for method in ("GET", "PUT"):
            self.b.resource.register(method, TEST_PATH, handler, requires_auth=True)
        self.contacts: list[str] = []
        self.b.authenticator.add_contact_listener(self.contacts.append)

    def transport(
        self,
        name: str,
        agent: IAgent,
        key: SigningKey,
        config: FederationTransportConfig = FederationTransportConfig(),
    ) -> FederationTransport:
        store = self.successResultOf(open_sqlite_store(":memory:", self.clock, synchronous=True))
        self.addCleanup(store.close)
        return build_federation_transport(name, [key], store, self.clock, agent, config=config)

    def tampered_a(self, **kwargs: Any) -> FederationTransport:
        agent = TamperingAgent(self.network.agent_for(A), **kwargs)
        return self.transport(A, agent, key=self.a_key)

    def put(
        self, transport: FederationTransport, thing: str, body: JsonDict, destination: str = B
    ) -> Deferred[JsonDict]:
        d = Deferred.fromCoroutine(
            transport.client.put_json(destination, f"/_matrix/federation/v1/test/{thing}", body)
        )
        self.network.flush()
        return d

    def key_fetches(self) -> int:
        return len(self.network.requests(origin=B, destination=A, path_prefix=KEY_SERVER_PATH))

    def assertUnauthorized(self, d: Deferred[JsonDict], *fragments: str) -> None:
        error = self.failureResultOf(d, HttpResponseError).value
        self.assertEqual((error.code, error.errcode), (401, M_UNAUTHORIZED))
        for fragment in fragments:
            self.assertIn(fragment, error.message)
        self.assertEqual(self.seen, [])
        self.assertEqual(self.contacts, [])

    def test_signed_requests_accepted_key_fetched_once(self) -> None:
        self.assertEqual(self.successResultOf(self.put(self.a, "x", {"n": 1})), {"ok": "x"})
        d = Deferred.fromCoroutine(
            self.a.client.get_json(B, "/_matrix/federation/v1/test/y", {"q": "1"})
        )
        self.network.flush()
        self.assertEqual(self.successResultOf(d), {"ok": "y"})
        self.assertEqual(self.seen, [(A, "x", {"n": 1}), (A, "y", None)])
        self.assertEqual(self.key_fetches(), 1)
        self.assertEqual(self.contacts, [A, A])

    def test_both_directions(self) -> None:
        async def whoami(request: JsonRequest) -> tuple[int, JsonDict]:
            return 200, {"origin": request.require_origin()}

        self.a.resource.register("GET", "/_matrix/federation/v1/whoami", whoami, requires_auth=True)
        d = Deferred.fromCoroutine(self.b.client.get_json(A, "/_matrix/federation/v1/whoami"))
        self.network.flush()
        self.assertEqual(self.successResultOf(d), {"origin": B})

    def test_tampered_body(self) -> None:
        tampered = self.tampered_a(body=lambda body: body.replace(b'"n":1', b'"n":2'))
        self.assertUnauthorized(self.put(tampered, "x", {"n": 1}), "invalid signature")
        (record,) = self.network.requests(origin=A, destination=B)
        self.assertEqual((record.body, record.status), (b'{"n":2}', 401))

    def test_tampered_path(self) -> None:
        tampered = self.tampered_a(uri=lambda uri: uri.replace(b"/test/x", b"/test/z"))
        self.assertUnauthorized(self.put(tampered, "x", {"n": 1}), "invalid signature")
        (record,) = self.network.requests(origin=A, destination=B)
        self.assertEqual(record.path, "/_matrix/federation/v1/test/z")

    def test_wrong_destination(self) -> None:
        # signed for c.test, delivered to b.test
        rerouted = self.tampered_a(uri=lambda uri: uri.replace(b"//c.test/", b"//b.test/"))
        self.assertUnauthorized(self.put(rerouted, "x", {"n": 1}, destination="c.test"), "c.test")
        self.assertEqual([r.destination for r in self.network.requests(origin=A)], [B])

    def test_unsigned_request(self) -> None:
        d = self.network.client_for(A).get("https://b.test/_matrix/federation/v1/test/x")
        self.network.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 401)
        self.assertEqual(response.headers.getRawHeaders(b"Content-Type"), [b"application/json"])
        body = json.loads(self.successResultOf(treq.content(response)))
        self.assertEqual(body["errcode"], M_UNAUTHORIZED)
        self.assertEqual((self.seen, self.contacts), ([], []))

    def get(self, server: str, path: str) -> tuple[int, Any]:
        d = self.network.client_for("client.test").get(f"https://{server}{path}")
        self.network.flush()
        response = self.successResultOf(d)
        return response.code, json.loads(self.successResultOf(treq.content(response)))

    def test_root_serves_version_keys_and_json_404s(self) -> None:
        for server in (A, B):
            with self.subTest(server=server):
                code, body = self.get(server, VERSION_PATH)
                self.assertEqual((code, body["server"]["name"]), (200, "devicelist-plugin"))
                code, body = self.get(server, KEY_SERVER_PATH)
                self.assertEqual((code, body["server_name"]), (200, server))
                key = self.a_key if server == A else self.b_key
                verify_signed_json(body, server, get_verify_key(key))
                for path in ("/", "/other", "/_matrix/nothing/here"):
                    code, body = self.get(server, path)
                    self.assertEqual((code, body["errcode"]), (404, M_UNRECOGNIZED))

    def test_resource_mounted_in_a_host_root(self) -> None:
        host_root = Resource()
        host_root.putChild(b"_matrix", self.b.resource)
        self.network.add_server("host.test", host_root)
        code, body = self.get("host.test", KEY_SERVER_PATH)
        self.assertEqual((code, body["server_name"]), (200, B))
        code, body = self.get("host.test", "/_matrix/federation/v1/unknown")
        self.assertEqual((code, body["errcode"]), (404, M_UNRECOGNIZED))

    def test_config_values_applied(self) -> None:
        config = FederationTransportConfig(key_refresh_interval_ms=1234, max_body_size=10)
        c_agent = self.network.agent_for("c.test")
        c = self.transport("c.test", c_agent, generate_signing_key("c_1"), config)
        self.network.add_server("c.test", c.make_site())
        code, body = self.get("c.test", KEY_SERVER_PATH)
        self.assertEqual(body["valid_until_ts"], NOW_S * 1000 + 1234)

        async def never(request: JsonRequest) -> tuple[int, JsonDict]:
            raise AssertionError("handler reached")

        c.resource.register("PUT", "/_matrix/federation/v1/big", never)
        d = Deferred.fromCoroutine(
            c.client.put_json("c.test", "/_matrix/federation/v1/big", {"x": "0123456789"})
        )
        self.network.flush()
        error = self.failureResultOf(d, HttpResponseError).value
        self.assertEqual((error.code, error.errcode), (413, M_TOO_LARGE))
