"""JsonResource: routing, JSON in and out, size limits, the error mapping,
asynchronous handlers and disconnecting clients."""

from __future__ import annotations

import json
from typing import Any

import treq
from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from twisted.web.server import Request, Site

from devicelist_plugin import __version__
from devicelist_plugin.core.models import JsonDict
from devicelist_plugin.federation.client import BytesProducer
from devicelist_plugin.federation.errors import (
    M_FORBIDDEN,
    M_INVALID_PARAM,
    M_NOT_JSON,
    M_TOO_LARGE,
    M_UNAUTHORIZED,
    M_UNKNOWN,
    M_UNRECOGNIZED,
    MatrixError,
)
from devicelist_plugin.federation.resource import (
    VERSION_PATH,
    EncodedJson,
    JsonRequest,
    JsonResource,
    SizeLimitingRequest,
    parse_json_object,
    version_handler,
)

BASE = "https://b.example"
DEVICES = "/_matrix/federation/v1/user/devices/{userId}"


async def echo(request: JsonRequest) -> tuple[int, JsonDict]:
    return 200, {
        "method": request.method,
        "path_params": dict(request.path_params),
        "query": {k: list(v) for k, v in request.query.items()},
        "content": request.content,
        "origin": request.origin,
    }


def in_memory_client(resource: JsonResource) -> tuple[HTTPClient, RequestTraversalAgent]:
    """An HTTP client whose requests reach ``resource`` in memory; call
    ``agent.flush()`` after each request and after each clock advance."""
    agent = RequestTraversalAgent(resource)
    return HTTPClient(agent, data_to_body_producer=BytesProducer), agent


class Client:
    """Requests against a resource through treq's in-memory agent."""

    def __init__(self, case: SynchronousTestCase, resource: JsonResource) -> None:
        self.case = case
        self.http, self.agent = in_memory_client(resource)

    def start(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[bytes, list[bytes]] | None = None,
    ) -> Deferred[Any]:
        d = self.http.request(method, BASE + path, data=body, headers=Headers(headers or {}))
        self.agent.flush()
        return d

    def finish(self, d: Deferred[Any]) -> tuple[int, Headers, bytes]:
        response: IResponse = self.case.successResultOf(d)
        content: bytes = self.case.successResultOf(treq.content(response))
        return response.code, response.headers, content

    def raw(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[bytes, list[bytes]] | None = None,
    ) -> tuple[int, Headers, bytes]:
        return self.finish(self.start(method, path, body, headers))

    def call(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[bytes, list[bytes]] | None = None,
    ) -> tuple[int, Any]:
        code, response_headers, content = self.raw(method, path, body, headers)
        self.case.assertEqual(response_headers.getRawHeaders(b"Content-Type"), [b"application/json"])
        return code, json.loads(content)


def raw_exchange(
    resource: JsonResource,
    data: bytes,
    request_factory: type[Request] | None = None,
) -> tuple[Any, StringTransport]:
    """Feed raw HTTP/1.1 bytes to a Site's channel over a StringTransport."""
    site = Site(resource, requestFactory=request_factory, reactor=MemoryReactorClock())
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 31337))
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(data)
    return channel, transport


def parse_raw_response(data: bytes) -> tuple[int, bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    return status, body


def chunked(body: bytes, size: int = 64) -> bytes:
    out = b""
    for i in range(0, len(body), size):
        chunk = body[i : i + size]
        out += b"%x\r\n%s\r\n" % (len(chunk), chunk)
    return out + b"0\r\n\r\n"


class RoutingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.resource = JsonResource()
        self.resource.register("GET", DEVICES, echo)
        self.resource.register("PUT", "/_matrix/federation/v1/send/{txnId}", echo)
        self.resource.register("GET", "/_matrix/federation/v1/send/{txnId}", echo)
        self.client = Client(self, self.resource)

    def test_json_out_is_canonical(self) -> None:
        async def handler(request: JsonRequest) -> tuple[int, JsonDict]:
            return 201, {"b": 1, "a": ["é", {"d": None, "c": True}]}

        self.resource.register("GET", "/x", handler)
        code, headers, body = self.client.raw("GET", "/x")
        self.assertEqual(code, 201)
        self.assertEqual(headers.getRawHeaders(b"Content-Type"), [b"application/json"])
        self.assertEqual(body, '{"a":["é",{"c":true,"d":null}],"b":1}'.encode("utf-8"))

    def test_pre_encoded_body_sent_as_is(self) -> None:
        async def handler(request: JsonRequest) -> tuple[int, EncodedJson]:
            return 200, EncodedJson(b'{"a":1,"b":"\xc3\xa9"}')

        self.resource.register("GET", "/encoded", handler)
        code, headers, body = self.client.raw("GET", "/encoded")
        self.assertEqual(code, 200)
        self.assertEqual(headers.getRawHeaders(b"Content-Type"), [b"application/json"])
        self.assertEqual(body, '{"a":1,"b":"é"}'.encode("utf-8"))

    def test_unknown_path_is_404_json(self) -> None:
        paths = [
            "/",
            "/nothing",
            "/_matrix/federation/v1/user/devices",
            "/_matrix/federation/v1/user/devices/",
            "/_matrix/federation/v1/user/devices/a/b",
            "/_matrix/federation/v1/user/devices/a/",
            "//_matrix/federation/v1/user/devices/a",
        ]
        for path in paths:
            with self.subTest(path):
                code, body = self.client.call("GET", path)
                self.assertEqual(code, 404)
                self.assertEqual(body, {"errcode": M_UNRECOGNIZED, "error": "Unrecognized request"})

    def test_wrong_method_is_405_with_allow(self) -> None:
        code, headers, content = self.client.raw("POST", "/_matrix/federation/v1/send/t1")
        self.assertEqual(code, 405)
        self.assertEqual(headers.getRawHeaders(b"Allow"), [b"GET, HEAD, PUT"])
        self.assertEqual(json.loads(content)["errcode"], M_UNRECOGNIZED)
        code, headers, content = self.client.raw("DELETE", "/_matrix/federation/v1/user/devices/@u:a")
        self.assertEqual(code, 405)
        self.assertEqual(headers.getRawHeaders(b"Allow"), [b"GET, HEAD"])

    def test_head_is_served_by_get(self) -> None:
        code, headers, content = self.client.raw("HEAD", "/_matrix/federation/v1/user/devices/@u:a")
        self.assertEqual(code, 200)
        self.assertEqual(content, b"")
        self.assertEqual(headers.getRawHeaders(b"Content-Type"), [b"application/json"])

    def test_encoded_slash_stays_in_its_segment(self) -> None:
        code, body = self.client.call(
            "GET", "/_matrix/federation/v1/user/devices/%40alice%2Fbob%3Aexample.org"
        )
        self.assertEqual(code, 200)
        self.assertEqual(body["path_params"], {"userId": "@alice/bob:example.org"})
        self.assertEqual(body["method"], "GET")

    def test_path_params_decode_utf8(self) -> None:
        code, body = self.client.call("GET", "/_matrix/federation/v1/user/devices/%40%C3%A9%3Aa")
        self.assertEqual((code, body["path_params"]), (200, {"userId": "@é:a"}))

    def test_path_param_not_utf8_is_400(self) -> None:
        code, body = self.client.call("GET", "/_matrix/federation/v1/user/devices/%FF")
        self.assertEqual((code, body["errcode"]), (400, M_INVALID_PARAM))

    def test_literal_segments_compare_raw(self) -> None:
        # %76 is "v": literal segments are compared as sent.
        code, _ = self.client.call("GET", "/_matrix/federation/%761/user/devices/u")
        self.assertEqual(code, 404)

    def test_query_arguments(self) -> None:
        code, body = self.client.call(
            "GET", "/_matrix/federation/v1/send/t?limit=10&x=%2F&x=b&empty=&u=%C3%A9"
        )
        self.assertEqual(code, 200)
        self.assertEqual(body["query"], {"limit": ["10"], "x": ["/", "b"], "empty": [""], "u": ["é"]})
        self.assertEqual(body["path_params"], {"txnId": "t"})

    def test_query_not_utf8_is_400(self) -> None:
        code, body = self.client.call("GET", "/_matrix/federation/v1/send/t?x=%FF")
        self.assertEqual((code, body["errcode"]), (400, M_INVALID_PARAM))

    def test_query_param_helper(self) -> None:
        seen: list[tuple[str | None, str | None]] = []

        async def handler(request: JsonRequest) -> tuple[int, JsonDict]:
            seen.append((request.query_param("a"), request.query_param("missing")))
            return 200, {}

        self.resource.register("GET", "/q", handler)
        self.client.call("GET", "/q?a=1&a=2")
        self.assertEqual(seen, [("1", None)])

    def test_form_encoded_body_never_becomes_query(self) -> None:
        code, body = self.client.call(
            "PUT",
            "/_matrix/federation/v1/send/t",
            b'{"a":1}',
            {b"Content-Type": [b"application/x-www-form-urlencoded"]},
        )
        self.assertEqual(code, 200)
        self.assertEqual((body["query"], body["content"]), ({}, {"a": 1}))

    def test_version(self) -> None:
        self.resource.register("GET", VERSION_PATH, version_handler())
        code, body = self.client.call("GET", "/_matrix/federation/v1/version")
        self.assertEqual(code, 200)
        self.assertEqual(body, {"server": {"name": "devicelist-plugin", "version": __version__}})

    def test_register_rejects_bad_patterns_and_duplicates(self) -> None:
        for pattern in ["no/slash", "/a/{b", "/a/{1x}", "/a/{x}/{x}", "/a?b", "/a/x{y}"]:
            with self.subTest(pattern):
                with self.assertRaises(ValueError):
                    self.resource.register("GET", pattern, echo)
        with self.assertRaises(ValueError):
            self.resource.register("GET", "/_matrix/federation/v1/user/devices/{other}", echo)
        with self.assertRaises(ValueError):
            self.resource.register("GET", "/auth", echo, requires_auth=True)


class BodyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.resource = JsonResource(max_body_size=100)
        self.resource.register("PUT", "/required", echo, json_body=True)
        self.resource.register("PUT", "/optional", echo)
        self.client = Client(self, self.resource)

    def test_object_body_parsed(self) -> None:
        code, body = self.client.call("PUT", "/required", b'{"a": [1, 2.5, "\\u00e9"]}')
        self.assertEqual((code, body["content"]), (200, {"a": [1, 2.5, "é"]}))

    def test_optional_body_absent_is_none(self) -> None:
        code, body = self.client.call("PUT", "/optional")
        self.assertEqual((code, body["content"]), (200, None))
        code, body = self.client.call("PUT", "/optional", b"")
        self.assertEqual((code, body["content"]), (200, None))

    def test_required_body_absent_is_400(self) -> None:
        code, body = self.client.call("PUT", "/required")
        self.assertEqual((code, body["errcode"]), (400, M_NOT_JSON))

    def test_not_a_json_object_is_400(self) -> None:
        bad = [
            b"{",
            b"[1]",
            b'"s"',
            b"null",
            b"1",
            b'{"a": NaN}',
            b'{"a": -Infinity}',
            b'{"a": "\xff"}',
            b"<html>",
        ]
        for path in ["/required", "/optional"]:
            for content in bad:
                with self.subTest(path=path, content=content):
                    code, body = self.client.call("PUT", path, content)
                    self.assertEqual((code, body["errcode"]), (400, M_NOT_JSON))

    def test_deeply_nested_body_is_400_not_500(self) -> None:
        # found by tests.fuzz: json.loads raised RecursionError, answered 500
        # (this case's body limit is too small for it: the parser itself)
        for content in [b"[" * 100_000, b'{"a":' * 5_000 + b"1" + b"}" * 5_000]:
            with self.subTest(content=content[:10]):
                with self.assertRaises(MatrixError) as caught:
                    parse_json_object(content)
                self.assertEqual(
                    (caught.exception.code, caught.exception.errcode), (400, M_NOT_JSON)
                )

    def test_lone_surrogate_escape_is_400(self) -> None:
        # found by tests.fuzz: "\ud800" is valid JSON text but no UTF-8
        # string; it reached SQLite (500) or an error text (no answer at all)
        for content in [b'{"a": "\\ud800"}', b'{"\\udfff": 1}', b'{"a": ["x\\udbff"]}']:
            with self.subTest(content=content):
                code, body = self.client.call("PUT", "/required", content)
                self.assertEqual((code, body["errcode"]), (400, M_NOT_JSON))
        # an escaped pair is one character
        self.assertEqual(parse_json_object(b'{"a": "\\ud83d\\ude00"}'), {"a": "\U0001f600"})

    def test_content_length_over_limit_is_413(self) -> None:
        exact = b'{"a":"' + b"x" * 92 + b'"}'
        self.assertEqual(len(exact), 100)
        code, _ = self.client.call("PUT", "/required", exact)
        self.assertEqual(code, 200)
        code, body = self.client.call("PUT", "/required", exact + b" ")
        self.assertEqual((code, body["errcode"]), (413, M_TOO_LARGE))

    def test_read_size_over_limit_is_413_without_content_length(self) -> None:
        body = b'{"a":"' + b"x" * 200 + b'"}'
        _, transport = raw_exchange(
            self.resource,
            b"PUT /required HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(body),
        )
        status, content = parse_raw_response(transport.value())
        self.assertEqual(status, 413)
        self.assertEqual(json.loads(content)["errcode"], M_TOO_LARGE)


class RecordingRequest(SizeLimitingRequest):
    max_request_size = 100
    made: list[RecordingRequest] = []
    buffered: list[bytes] = []

    def process(self) -> None:
        self.made.append(self)
        assert self.content is not None
        self.buffered.append(self.content.read())
        self.content.seek(0)
        super().process()


class SizeLimitingRequestTests(SynchronousTestCase):
    def setUp(self) -> None:
        RecordingRequest.made = []
        RecordingRequest.buffered = []
        # the resource's own limit is higher: only the request factory limits
        self.resource = JsonResource(max_body_size=10_000)
        self.resource.register("PUT", "/p", echo)

    def test_declared_length_over_limit_is_not_buffered(self) -> None:
        _, transport = raw_exchange(
            self.resource,
            b"PUT /p HTTP/1.1\r\nHost: b\r\nContent-Length: 1000\r\n\r\n" + b"x" * 1000,
            RecordingRequest,
        )
        status, content = parse_raw_response(transport.value())
        self.assertEqual((status, json.loads(content)["errcode"]), (413, M_TOO_LARGE))
        (request,) = RecordingRequest.made
        self.assertTrue(request.content_too_large)
        self.assertEqual(RecordingRequest.buffered, [b""])

    def test_chunked_body_over_limit_is_413(self) -> None:
        _, transport = raw_exchange(
            self.resource,
            b"PUT /p HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(b"y" * 500, 30),
            RecordingRequest,
        )
        status, _ = parse_raw_response(transport.value())
        self.assertEqual(status, 413)
        (request,) = RecordingRequest.made
        self.assertEqual(RecordingRequest.buffered, [b""])

    def test_under_limit_passes(self) -> None:
        body = b'{"k":"' + b"z" * 80 + b'"}'
        _, transport = raw_exchange(
            self.resource,
            b"PUT /p HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(body, 7),
            RecordingRequest,
        )
        status, content = parse_raw_response(transport.value())
        self.assertEqual(status, 200)
        self.assertEqual(json.loads(content)["content"], {"k": "z" * 80})

    def test_with_limit(self) -> None:
        factory = SizeLimitingRequest.with_limit(5)
        self.assertTrue(issubclass(factory, SizeLimitingRequest))
        self.assertEqual(factory.max_request_size, 5)
        _, transport = raw_exchange(
            self.resource, b"PUT /p HTTP/1.1\r\nHost: b\r\nContent-Length: 7\r\n\r\n{\"a\":1}", factory
        )
        self.assertEqual(parse_raw_response(transport.value())[0], 413)


class ErrorMappingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.resource = JsonResource()
        self.client = Client(self, self.resource)

    def test_matrix_error_with_extra(self) -> None:
        async def handler(request: JsonRequest) -> tuple[int, JsonDict]:
            raise MatrixError(403, M_FORBIDDEN, "Not yours", extra={"retry_after_ms": 5, "errcode": "X"})

        self.resource.register("GET", "/e", handler)
        code, body = self.client.call("GET", "/e")
        self.assertEqual(code, 403)
        self.assertEqual(body, {"errcode": M_FORBIDDEN, "error": "Not yours", "retry_after_ms": 5})

    def test_unexpected_exception_is_500_logged_without_detail(self) -> None:
        async def handler(request: JsonRequest) -> tuple[int, JsonDict]:
            raise RuntimeError("secret internal detail")

        self.resource.register("GET", "/e", handler)
        code, headers, content = self.client.raw("GET", "/e")
        self.assertEqual(code, 500)
        self.assertEqual(json.loads(content), {"errcode": M_UNKNOWN, "error": "Internal server error"})
        self.assertNotIn(b"secret", content)
        self.assertEqual(headers.getRawHeaders(b"Content-Type"), [b"application/json"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_error_whose_text_cannot_be_encoded_is_still_answered(self) -> None:
        async def handler(request: JsonRequest) -> tuple[int, JsonDict]:
            raise MatrixError(400, M_INVALID_PARAM, "bad value '\ud800'")

        self.resource.register("GET", "/e", handler)
        code, body = self.client.call("GET", "/e")
        self.assertEqual((code, body), (400, {"errcode": M_INVALID_PARAM, "error": "Invalid request"}))

    def test_unencodable_answer_is_500_logged(self) -> None:
        async def handler(request: JsonRequest) -> tuple[int, JsonDict]:
            return 200, {"a": object()}

        self.resource.register("GET", "/e", handler)
        code, body = self.client.call("GET", "/e")
        self.assertEqual((code, body["errcode"]), (500, M_UNKNOWN))
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 1)


class AsyncHandlerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.completed: list[str] = []
        self.resource = JsonResource()

        async def slow(request: JsonRequest) -> tuple[int, JsonDict]:
            await deferLater(self.clock, 5, lambda: None)
            self.completed.append(request.path_params["name"])
            return 200, {"name": request.path_params["name"]}

        async def slow_failure(request: JsonRequest) -> tuple[int, JsonDict]:
            await deferLater(self.clock, 5, lambda: None)
            raise RuntimeError("after disconnect")

        self.resource.register("GET", "/slow/{name}", slow)
        self.resource.register("GET", "/slow-failure", slow_failure)

    def test_answer_after_clock_advance(self) -> None:
        client = Client(self, self.resource)
        d = client.start("GET", "/slow/a")
        self.assertNoResult(d)
        self.clock.advance(5)  # fires the handler's deferLater
        client.agent.flush()
        code, _, content = client.finish(d)
        self.assertEqual((code, json.loads(content)), (200, {"name": "a"}))

    def test_disconnect_before_answer_is_no_error(self) -> None:
        channel, transport = raw_exchange(self.resource, b"GET /slow/b HTTP/1.1\r\nHost: b\r\n\r\n")
        self.assertEqual(transport.value(), b"")
        channel.connectionLost(Failure(ConnectionDone()))
        self.clock.advance(5)  # fires the handler's deferLater after the client left
        self.assertEqual(self.completed, ["b"])
        self.assertEqual(transport.value(), b"")

    def test_disconnect_then_handler_failure_is_logged_only(self) -> None:
        channel, transport = raw_exchange(self.resource, b"GET /slow-failure HTTP/1.1\r\nHost: b\r\n\r\n")
        channel.connectionLost(Failure(ConnectionDone()))
        self.clock.advance(5)  # fires the handler's deferLater, then it raises
        self.assertEqual(transport.value(), b"")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class FakeAuthenticator:
    def __init__(self) -> None:
        self.seen: list[JsonDict | None] = []

    async def authenticate(self, request: JsonRequest) -> str:
        self.seen.append(request.content)
        if request.raw.getHeader(b"X-Test-Auth") == b"ok":
            return "a.example"
        raise MatrixError(401, M_UNAUTHORIZED, "no")


class AuthHookTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.auth = FakeAuthenticator()
        self.resource = JsonResource(authenticator=self.auth)
        self.resource.register("PUT", "/secure/{x}", echo, requires_auth=True)
        self.resource.register("GET", "/open", echo)
        self.client = Client(self, self.resource)

    def test_authenticated_origin_reaches_handler(self) -> None:
        code, body = self.client.call("PUT", "/secure/1", b'{"a":1}', {b"X-Test-Auth": [b"ok"]})
        self.assertEqual((code, body["origin"]), (200, "a.example"))
        self.assertEqual(self.auth.seen, [{"a": 1}])

    def test_authenticator_error_is_answered(self) -> None:
        handled: list[object] = []

        async def never(request: JsonRequest) -> tuple[int, JsonDict]:
            handled.append(request)
            return 200, {}

        self.resource.register("GET", "/secure-never", never, requires_auth=True)
        code, body = self.client.call("GET", "/secure-never")
        self.assertEqual((code, body), (401, {"errcode": M_UNAUTHORIZED, "error": "no"}))
        self.assertEqual(handled, [])

    def test_open_routes_skip_the_authenticator(self) -> None:
        code, body = self.client.call("GET", "/open")
        self.assertEqual((code, body["origin"]), (200, None))
        self.assertEqual(self.auth.seen, [])

    def test_require_origin(self) -> None:
        origins: list[str] = []

        async def handler(request: JsonRequest) -> tuple[int, JsonDict]:
            origins.append(request.require_origin())
            return 200, {}

        self.resource.register("GET", "/needs-origin", handler)
        code, _ = self.client.call("GET", "/needs-origin")
        self.assertEqual(code, 500)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
