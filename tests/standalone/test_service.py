"""The service tree: named children, start on a real reactor, serve, stop
with nothing left behind; and the root composition."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
from typing import Any, Optional

import treq
from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent
from twisted.internet import reactor, ssl
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import CannotListenError, ConnectionRefusedError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS
from twisted.web.resource import Resource
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyChannel
from zope.interface import implementer

from devicelist_plugin.core.models import JsonDict
from devicelist_plugin.federation.agent import MatrixFederationAgent
from devicelist_plugin.federation.client import BytesProducer
from devicelist_plugin.federation.resource import JsonRequest, JsonResource
from devicelist_plugin.local.handler import run_inline
from devicelist_plugin.standalone.config import Config, parse_config
from devicelist_plugin.standalone.generate import self_signed_certificate
from devicelist_plugin.standalone.service import FederationKeysService, StandaloneService
from devicelist_plugin.standalone.site import PrefixRoot, XForwardedRequest
from devicelist_plugin.standalone.startup import StartupFiles, load_startup_files

SECRET = "test secret"


class _NotRunning:
    """The real reactor, except that start-up failures cannot stop it (trial runs it)."""

    running = False

    def __getattr__(self, name: str) -> Any:
        return getattr(reactor, name)


@implementer(IPolicyForHTTPS)
class _TrustOnly:
    """Verifies the server's certificate against one trusted certificate."""

    def __init__(self, certificate_pem: bytes) -> None:
        self._root = ssl.Certificate.loadPEM(certificate_pem)

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return ssl.optionsForClientTLS(hostname.decode("ascii"), trustRoot=self._root)


class _Echo(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        return json.dumps(
            {
                "prepath": [p.decode() for p in request.prepath or []],
                "postpath": [p.decode() for p in request.postpath or []],
            }
        ).encode()


def port_of(port: IListeningPort) -> int:
    address = port.getHost()
    assert isinstance(address, (IPv4Address, IPv6Address))
    return address.port


def standalone_config(directory: str, **extra: Any) -> Config:
    cert, key = self_signed_certificate("127.0.0.1")
    with open(os.path.join(directory, "tls.crt"), "wb") as f:
        f.write(cert)
    with open(os.path.join(directory, "tls.key"), "wb") as f:
        f.write(key)
    raw = {
        "server_name": "a.test",
        "registration_shared_secret": SECRET,
        "bcrypt_rounds": 4,
        "tls_certificate_path": "tls.crt",
        "tls_private_key_path": "tls.key",
        "listeners": [
            {"port": 0, "bind_addresses": ["127.0.0.1"], "resources": [{"names": ["federation", "client"]}]},
            {"port": 0, "bind_addresses": ["127.0.0.1"], "tls": True, "resources": [{"names": ["keys", "client"]}]},
        ],
        **extra,
    }
    return parse_config(raw, directory)


class ServiceTreeTests(SynchronousTestCase):
    def test_named_children(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        config = standalone_config(directory)
        service = StandaloneService(MemoryReactorClock(), config, load_startup_files(config))
        self.assertEqual([s.name for s in service], ["database", "federation-keys", "replication", "listeners"])
        self.assertIs(service.getServiceNamed("database"), service.database)
        self.assertEqual([s.name for s in service.listeners], ["listener-0", "listener-1"])
        self.assertEqual(
            [s.listener.tls for s in service.listener_services], [False, True]
        )

    def test_production_agent_and_its_pool(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        config = standalone_config(directory)
        clock = MemoryReactorClock()
        keys = FederationKeysService(clock, config, load_startup_files(config))
        keys.startService()
        agent = keys.agent()
        self.assertIsInstance(agent, MatrixFederationAgent)
        self.assertIs(keys.agent(), agent)
        self.successResultOf(keys.stopService())


class RunningServiceTests(TestCase):
    """A whole server on the real reactor, on ports the OS chooses."""

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.pool = HTTPConnectionPool(reactor, persistent=False)

    def http(self, policy: Optional[IPolicyForHTTPS] = None) -> HTTPClient:
        kwargs: dict[str, Any] = {"pool": self.pool}
        if policy is not None:
            kwargs["contextFactory"] = policy
        return HTTPClient(Agent(reactor, **kwargs), data_to_body_producer=BytesProducer)

    async def json_call(
        self, http: HTTPClient, method: str, url: str, body: Any = None, token: Optional[str] = None
    ) -> tuple[int, Any]:
        headers = Headers({b"Authorization": [b"Bearer " + token.encode()]} if token else {})
        data = None if body is None else json.dumps(body).encode()
        response = await http.request(method, url, data=data, headers=headers)
        return response.code, json.loads(await treq.content(response))

    def service(self, config: Config, files: Optional[StartupFiles] = None, **kwargs: Any) -> StandaloneService:
        files = files if files is not None else load_startup_files(config)
        # outbound federation is not exercised here
        agent = RequestTraversalAgent(JsonResource())
        return StandaloneService(_NotRunning(), config, files, agent=agent, **kwargs)

    async def test_serves_then_stops_cleanly(self) -> None:
        config = standalone_config(self.dir)
        service = self.service(config)
        service.startService()
        components = await service.when_ready()
        assert components is not None
        self.assertIs(service.components, components)
        plain_port = port_of(service.listener_services[0].ports[0])
        tls_port = port_of(service.listener_services[1].ports[0])
        plain = f"http://127.0.0.1:{plain_port}"
        tls = f"https://127.0.0.1:{tls_port}"
        http = self.http()

        code, body = await self.json_call(http, "GET", plain + "/_matrix/federation/v1/version")
        self.assertEqual((code, body["server"]["name"]), (200, "devicelist-plugin"))
        code, body = await self.json_call(http, "GET", plain + "/_matrix/key/v2/server")
        self.assertEqual((code, body["server_name"]), (200, "a.test"))
        # federation endpoints need a signature
        code, body = await self.json_call(http, "GET", plain + "/_matrix/federation/v1/user/devices/@a:a.test")
        self.assertEqual((code, body["errcode"]), (401, "M_UNAUTHORIZED"))
        code, body = await self.json_call(http, "GET", plain + "/")
        self.assertEqual((code, body["errcode"]), (404, "M_UNRECOGNIZED"))

        # registration (the password hashed in the reactor's thread pool), login, whoami
        code, body = await self.json_call(http, "GET", plain + "/_synapse/admin/v1/register")
        nonce = body["nonce"]
        mac = hmac.new(SECRET.encode(), f"{nonce}\0alice\0pw\0notadmin".encode(), hashlib.sha1).hexdigest()
        code, body = await self.json_call(
            http, "POST", plain + "/_synapse/admin/v1/register",
            {"nonce": nonce, "username": "alice", "password": "pw", "admin": False, "mac": mac},
        )
        self.assertEqual(code, 200, body)

        # the TLS listener, verified against the generated certificate
        https = self.http(_TrustOnly(open(os.path.join(self.dir, "tls.crt"), "rb").read()))
        code, body = await self.json_call(
            https, "POST", tls + "/_matrix/client/v3/login",
            {"type": "m.login.password", "user": "alice", "password": "pw", "device_id": "D"},
        )
        self.assertEqual(code, 200, body)
        code, body = await self.json_call(https, "GET", tls + "/_matrix/client/v3/account/whoami", token=body["access_token"])
        self.assertEqual(body, {"user_id": "@alice:a.test", "device_id": "D", "is_guest": False})
        code, body = await self.json_call(https, "GET", tls + "/_matrix/key/v2/server")
        self.assertEqual(code, 200)
        # "keys" without "federation": no federation endpoints here
        code, body = await self.json_call(https, "GET", tls + "/_matrix/federation/v1/version")
        self.assertEqual((code, body["errcode"]), (404, "M_UNRECOGNIZED"))

        await service.stopService()
        self.assertIsNone(service.database.store)
        for port in (plain_port, tls_port):
            with self.assertRaises(ConnectionRefusedError):
                await http.get(f"http://127.0.0.1:{port}/")
        await self.pool.closeCachedConnections()

    async def test_port_in_use_fails_start_up(self) -> None:
        busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(busy.close)
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        config = standalone_config(
            self.dir,
            listeners=[
                {"port": 0, "bind_addresses": ["127.0.0.1"], "resources": [{"names": ["client"]}]},
                {"port": busy.getsockname()[1], "bind_addresses": ["127.0.0.1"], "resources": [{"names": ["client"]}]},
            ],
        )
        service = self.service(config)
        service.startService()
        self.assertIsNone(await service.when_ready())
        self.assertEqual(len(self.flushLoggedErrors(CannotListenError)), 1)
        # (under twistd the reactor stops now, and with it the service)
        await service.stopService()
        self.assertIsNone(service.database.store)
        self.assertEqual([s.ports for s in service.listener_services], [[], []])

    async def test_stop_while_the_database_opens(self) -> None:
        service = self.service(standalone_config(self.dir))
        service.startService()
        await service.stopService()
        self.assertIsNone(await service.when_ready())
        self.assertIsNone(service.database.store)
        self.assertEqual([s.ports for s in service.listener_services], [[], []])

    async def test_no_listeners(self) -> None:
        config = standalone_config(self.dir, listeners=[])
        service = self.service(config, cpu_runner=run_inline)
        service.startService()
        components = await service.when_ready()
        assert components is not None
        # ready to be reached in-process, e.g. by a host's own Site
        await service.stopService()


class PrefixRootTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.a = JsonResource()
        self.b = JsonResource()

        async def which(request: JsonRequest) -> tuple[int, JsonDict]:
            return 200, {"path": request.raw.path.decode()}

        self.a.register("GET", "/_matrix/client/v3/x", which)
        self.b.register("GET", "/_matrix/client/v3/special/x", which)
        root = PrefixRoot(
            [
                ("/_matrix/client", self.a),
                ("/_matrix/client/v3/special", self.b),
                ("/_matrix/client", self.b),  # the first mount of a prefix wins
                ("/_custom/echo", _Echo()),
            ]
        )
        # longest first, then in mount order
        self.assertEqual(root.prefixes, ["/_matrix/client/v3/special", "/_matrix/client", "/_custom/echo"])
        self.agent = RequestTraversalAgent(root)
        self.http = HTTPClient(self.agent)

    def get(self, path: str) -> tuple[int, Any]:
        d = self.http.get("https://h.test" + path)
        self.agent.flush()
        response = self.successResultOf(d)
        return response.code, json.loads(self.successResultOf(treq.content(response)))

    def test_routing(self) -> None:
        self.assertEqual(self.get("/_matrix/client/v3/x"), (200, {"path": "/_matrix/client/v3/x"}))
        self.assertEqual(self.get("/_matrix/client/v3/special/x"), (200, {"path": "/_matrix/client/v3/special/x"}))
        for path in ("/", "/_matrix", "/_matrix/clientx/v3/x", "/elsewhere", "/_matrix/federation/v1/version"):
            with self.subTest(path):
                code, body = self.get(path)
                self.assertEqual((code, body["errcode"]), (404, "M_UNRECOGNIZED"))

    def test_the_prefix_is_consumed(self) -> None:
        # a resource below a prefix sees the rest of the path as its postpath
        self.assertEqual(
            self.get("/_custom/echo/a/b"),
            (200, {"prepath": ["_custom", "echo"], "postpath": ["a", "b"]}),
        )


class XForwardedTests(SynchronousTestCase):
    def request(self, *forwarded: bytes) -> XForwardedRequest:
        request = XForwardedRequest(DummyChannel())
        for value in forwarded:
            request.requestHeaders.addRawHeader(b"X-Forwarded-For", value)
        return request

    def test_client_address(self) -> None:
        self.assertEqual(self.request(b"203.0.113.7, 10.0.0.1").getClientAddress(), IPv4Address("TCP", "203.0.113.7", 0))
        self.assertEqual(self.request(b"2001:db8::1").getClientAddress(), IPv6Address("TCP", "2001:db8::1", 0))
        direct = self.request().getClientAddress()
        self.assertEqual(self.request(b"not an address").getClientAddress(), direct)

