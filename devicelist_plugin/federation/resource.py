"""The JSON resource every HTTP endpoint of the plugin is served through.

One :class:`JsonResource` holds routes, each a method, a path pattern with
named segments (``/_matrix/federation/v1/user/devices/{userId}``) and an
``async`` handler taking a :class:`JsonRequest` and returning
``(status, json_object)``.  The resource does everything around the handler
once, the same way for federation, the key server, client-server and admin
endpoints:

- routing on the raw (percent-encoded) path, split into segments before
  decoding, so ``%2F`` inside a user id stays inside its segment;
  unknown path: 404 ``M_UNRECOGNIZED``; known path, other method: 405
  ``M_UNRECOGNIZED`` with an ``Allow`` header; ``HEAD`` is served by the
  ``GET`` handler unless one is registered for it;
- a body size limit, checked on ``Content-Length`` before reading and on the
  bytes actually read (and, with :class:`SizeLimitingRequest` as the Site's
  request factory, while receiving): 413 ``M_TOO_LARGE``;
- JSON in: a non-empty body must be a JSON object (UTF-8, no ``NaN`` or
  ``Infinity``), else 400 ``M_NOT_JSON``; a route registered with
  ``json_body=True`` also requires one;
- authentication (``requires_auth=True``) by the injected
  :class:`RequestAuthenticator`, which sets :attr:`JsonRequest.origin`;
- JSON out as canonical JSON with ``Content-Type: application/json`` (a
  handler may return an :class:`EncodedJson` it encoded itself);
  :class:`~devicelist_plugin.federation.errors.MatrixError` becomes its
  ``{"errcode", "error"}``, anything else a 500 ``M_UNKNOWN`` with the
  failure logged and no detail sent; never an HTML page;
- a client that disconnects before its handler finishes is no error: the
  handler runs to completion and its answer is dropped.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from io import BytesIO
from typing import Awaitable, Callable, ClassVar, Mapping, Protocol, Sequence
from urllib.parse import parse_qs, unquote_to_bytes

from canonicaljson import encode_canonical_json
from twisted.internet.defer import ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.resource import Resource

from devicelist_plugin import __version__
from devicelist_plugin.core.models import JsonDict
from devicelist_plugin.federation.errors import (
    M_INVALID_PARAM,
    M_NOT_JSON,
    M_TOO_LARGE,
    M_UNKNOWN,
    M_UNRECOGNIZED,
    MatrixError,
)

# Synapse's federation request limit is far larger than any device-list
# request needs; 1 MiB holds a transaction of 50 PDUs and 100 EDUs.
DEFAULT_MAX_BODY_SIZE = 1024 * 1024

# Twisted keeps request bodies shorter than this in memory, longer ones in a
# temporary file.
_IN_MEMORY_BODY_SIZE = 100_000

SERVER_SOFTWARE_NAME = "devicelist-plugin"
VERSION_PATH = "/_matrix/federation/v1/version"

_PARAM_RE = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")
_LITERAL_RE = re.compile(r"^[^{}/?#]+$")


@dataclass(frozen=True)
class JsonRequest:
    """What a handler sees of a request.

    :ivar method: the HTTP method, e.g. ``"GET"``.
    :ivar path_params: the named path segments, percent-decoded (UTF-8).
    :ivar query: the query string's arguments, percent-decoded (UTF-8),
        each with all its values in order.
    :ivar content: the JSON object body, or ``None`` without a body.
    :ivar raw: the Twisted request (headers, ``uri`` exactly as sent).
    :ivar origin: the authenticated server name on ``requires_auth`` routes,
        else ``None``.
    """

    method: str
    path_params: Mapping[str, str]
    query: Mapping[str, Sequence[str]]
    content: JsonDict | None
    raw: server.Request = field(repr=False)
    origin: str | None = None

    def query_param(self, name: str) -> str | None:
        """The first value of a query argument, or ``None``."""
        values = self.query.get(name)
        return values[0] if values else None

    def require_content(self) -> JsonDict:
        """The JSON body; 400 ``M_NOT_JSON`` when there is none."""
        if self.content is None:
            raise MatrixError(400, M_NOT_JSON, "Content not JSON.")
        return self.content

    def require_origin(self) -> str:
        """The authenticated origin; only for handlers of ``requires_auth`` routes."""
        if self.origin is None:
            raise RuntimeError("require_origin() on a route without requires_auth")
        return self.origin


@dataclass(frozen=True)
class EncodedJson:
    """A response body a handler has already encoded as canonical JSON.

    For big answers (a user with thousands of devices): the handler can
    encode them off the reactor thread, or splice stored JSON text, instead
    of handing the resource an object to encode on the reactor thread.
    ``data`` must be canonical JSON of a JSON object; it is sent as is.
    """

    data: bytes


Handler = Callable[[JsonRequest], Awaitable[tuple[int, "JsonDict | EncodedJson"]]]


class RequestAuthenticator(Protocol):
    """Authenticates a request; see :class:`~devicelist_plugin.federation.auth.FederationAuthenticator`."""

    def authenticate(self, request: JsonRequest) -> Awaitable[str]:
        """The authenticated origin, or raise a :class:`MatrixError` (401)."""
        ...


@dataclass(frozen=True)
class _Route:
    method: bytes
    pattern: str
    # a literal segment, or (None, name) for a parameter
    segments: tuple[tuple[str | None, str], ...]
    handler: Handler
    requires_auth: bool
    json_body: bool

    @property
    def shape(self) -> tuple[str | None, ...]:
        """The segments without parameter names: two routes of one shape match the same paths."""
        return tuple(literal for literal, _ in self.segments)

    def match(self, raw_segments: Sequence[str]) -> dict[str, str] | None:
        if len(raw_segments) != len(self.segments):
            return None
        params: dict[str, str] = {}
        for raw, (literal, name) in zip(raw_segments, self.segments):
            if literal is not None:
                if raw != literal:
                    return None
            elif raw == "":
                return None
            else:
                params[name] = raw
        return params


def _compile(pattern: str) -> tuple[tuple[str | None, str], ...]:
    if not pattern.startswith("/"):
        raise ValueError(f"path pattern must start with '/': {pattern!r}")
    segments: list[tuple[str | None, str]] = []
    names: set[str] = set()
    for segment in pattern[1:].split("/"):
        m = _PARAM_RE.match(segment)
        if m:
            name = m.group(1)
            if name in names:
                raise ValueError(f"path parameter {name!r} repeated in {pattern!r}")
            names.add(name)
            segments.append((None, name))
        elif _LITERAL_RE.match(segment):
            segments.append((segment, ""))
        else:
            raise ValueError(f"invalid segment {segment!r} in path pattern {pattern!r}")
    return tuple(segments)


def _text(value: bytes) -> str:
    return value.decode("latin-1")


# the constant parts of every answer
_JSON_CONTENT_TYPE = [b"application/json"]
_NO_CACHE = [b"no-cache, no-store, must-revalidate"]
_INTERNAL_ERROR = encode_canonical_json(
    MatrixError(500, M_UNKNOWN, "Internal server error").to_json()
)


def _decode_param(raw: str) -> str:
    if "%" not in raw:
        # nothing to decode: the raw path is latin-1, its decoding UTF-8
        if raw.isascii():
            return raw
    try:
        return unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise MatrixError(400, M_INVALID_PARAM, "Path parameter is not valid UTF-8") from None


def _parse_query(uri: bytes) -> dict[str, list[str]]:
    """The query arguments of the URI as sent (never form fields of the body)."""
    _, sep, query = uri.partition(b"?")
    if not sep:
        return {}
    try:
        return parse_qs(
            query.decode("ascii"), keep_blank_values=True, encoding="utf-8", errors="strict"
        )
    except (UnicodeDecodeError, ValueError):
        raise MatrixError(400, M_INVALID_PARAM, "Query string is not valid UTF-8") from None


def _encode_error(e: MatrixError) -> bytes:
    """The JSON of an error answer; if its text cannot be encoded (it quotes
    something unencodable), the same code and errcode with a fixed text, so
    that the request is still answered."""
    try:
        return encode_canonical_json(e.to_json())
    except Exception:
        return encode_canonical_json({"errcode": e.errcode, "error": "Invalid request"})


def _reject_constant(name: str) -> None:
    raise ValueError(f"invalid JSON constant {name}")


def utf8_encodable(value: object) -> bool:
    """Whether every string (and key) in parsed JSON ``value`` can be encoded
    as UTF-8: false when the text had a lone surrogate escape (``"\\ud800"``)."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_json_object(body: bytes) -> JsonDict:
    """A request body as a JSON object; 400 ``M_NOT_JSON`` otherwise."""
    try:
        text = body.decode("utf-8")
        value = json.loads(text, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        # RecursionError: nesting deeper than the parser's stack (a few
        # hundred bytes of "[[[..." is enough)
        raise MatrixError(400, M_NOT_JSON, "Content not JSON.") from None
    if "\\u" in text and not utf8_encodable(value):
        # a "\ud800" escape is valid JSON text but no UTF-8 string: it
        # could be neither stored, signed, logged nor echoed in an error
        raise MatrixError(400, M_NOT_JSON, "Content has a lone surrogate escape.")
    if not isinstance(value, dict):
        raise MatrixError(400, M_NOT_JSON, "Content must be a JSON object.")
    return value


class SizeLimitingRequest(server.Request):
    """A request factory for the :class:`~twisted.web.server.Site` that never
    buffers more than :attr:`max_request_size` bytes of body (sygnal's
    ``SizeLimitingRequest``).

    Instead of aborting the connection as sygnal does, it discards the body
    beyond the limit and sets :attr:`content_too_large`, so that
    :class:`JsonResource` can answer a proper 413.  Use
    :meth:`with_limit` for another limit than the default.  Create the Site
    with ``parsePOSTFormSubmission=False`` too: :class:`JsonResource` never
    reads form fields, and Twisted's form parsing would copy the body.
    """

    log: ClassVar[Logger] = Logger()
    max_request_size: ClassVar[int] = DEFAULT_MAX_BODY_SIZE
    content_too_large: bool = False

    @classmethod
    def with_limit(cls, max_request_size: int) -> type[SizeLimitingRequest]:
        """A subclass with another limit, to pass as ``Site(requestFactory=...)``."""
        return type(cls.__name__, (cls,), {"max_request_size": max_request_size})

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.max_request_size:
            self._too_large()
        elif length is None and self.max_request_size < _IN_MEMORY_BODY_SIZE:
            # Twisted spools bodies of unknown length to a temporary file;
            # ours can never outgrow memory.
            self.content = BytesIO()
        else:
            super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.content_too_large:
            return
        content = self.content
        assert content is not None, "handleContentChunk() called before gotLength()"
        if content.tell() + len(data) > self.max_request_size:
            self._too_large()
            return
        super().handleContentChunk(data)

    def _too_large(self) -> None:
        if not self.content_too_large:
            self.log.info(
                "Discarding a request body over {limit} bytes from {client}",
                limit=self.max_request_size,
                client=self.getClientAddress(),
            )
        self.content_too_large = True
        self.content = BytesIO()


class JsonResource(Resource):
    """Routes requests to ``async`` JSON handlers; see the module docstring.

    :param authenticator: runs before handlers registered with
        ``requires_auth=True``.
    :param max_body_size: the largest request body accepted, in bytes.
    """

    isLeaf = True
    log = Logger()

    def __init__(
        self,
        *,
        authenticator: RequestAuthenticator | None = None,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
    ) -> None:
        super().__init__()
        self._authenticator = authenticator
        self._max_body_size = max_body_size
        self._routes: list[_Route] = []

    def register(
        self,
        method: str,
        pattern: str,
        handler: Handler,
        *,
        requires_auth: bool = False,
        json_body: bool = False,
    ) -> None:
        """Serve ``method`` requests on paths matching ``pattern`` with ``handler``.

        :param pattern: a path whose segments are literals (compared with the
            raw, percent-encoded path) or ``{name}`` parameters (one
            non-empty segment each, percent-decoded into
            :attr:`JsonRequest.path_params`).
        :param requires_auth: authenticate the request first.
        :param json_body: require a JSON object body.
        :raise ValueError: a bad pattern, a route registered twice, or
            ``requires_auth`` without an authenticator.
        """
        if requires_auth and self._authenticator is None:
            raise ValueError(f"{method} {pattern} requires auth but the resource has no authenticator")
        route = _Route(
            method=method.encode("ascii"),
            pattern=pattern,
            segments=_compile(pattern),
            handler=handler,
            requires_auth=requires_auth,
            json_body=json_body,
        )
        for existing in self._routes:
            if existing.method == route.method and existing.shape == route.shape:
                raise ValueError(f"{method} {pattern} registered twice")
        self._routes.append(route)

    def render(self, request: server.Request) -> int:
        disconnected: list[Failure] = []
        request.notifyFinish().addErrback(disconnected.append)
        ensureDeferred(self._respond(request, disconnected)).addErrback(
            lambda failure: self.log.failure("Unexpected error answering a request", failure)
        )
        return server.NOT_DONE_YET

    async def _respond(self, request: server.Request, disconnected: list[Failure]) -> None:
        try:
            code, body = await self._dispatch(request)
            payload = body.data if isinstance(body, EncodedJson) else encode_canonical_json(body)
        except MatrixError as e:
            self.log.debug(
                "{method} {path}: {code} {errcode} {msg}",
                method=_text(request.method),
                path=_text(request.path),
                code=e.code,
                errcode=e.errcode,
                # a text quoting a lone surrogate would break a UTF-8 log file
                msg=e.msg.encode("utf-8", "backslashreplace").decode("utf-8"),
            )
            code, payload = e.code, _encode_error(e)
        except Exception:
            self.log.failure(
                "Error handling {method} {path}",
                method=_text(request.method),
                path=_text(request.path),
            )
            code = 500
            payload = _INTERNAL_ERROR
        if disconnected:
            self.log.debug(
                "{method} {path}: client disconnected before the answer",
                method=_text(request.method),
                path=_text(request.path),
            )
            return
        try:
            request.setResponseCode(code)
            headers = request.responseHeaders
            headers.setRawHeaders(b"Content-Type", _JSON_CONTENT_TYPE)
            headers.setRawHeaders(b"Content-Length", [b"%d" % (len(payload),)])
            headers.setRawHeaders(b"Cache-Control", _NO_CACHE)
            request.write(payload)
            request.finish()
        except Exception:
            self.log.failure(
                "Error writing the answer to {method} {path}",
                method=_text(request.method),
                path=_text(request.path),
            )

    async def _dispatch(self, request: server.Request) -> tuple[int, JsonDict | EncodedJson]:
        route, path_params = self._find_route(request)
        content = self._read_body(request, route.json_body)
        method = _text(request.method)
        params = {name: _decode_param(raw) for name, raw in path_params.items()}
        query = _parse_query(request.uri)
        json_request = JsonRequest(method, params, query, content, request)
        if route.requires_auth:
            assert self._authenticator is not None
            origin = await self._authenticator.authenticate(json_request)
            json_request = JsonRequest(method, params, query, content, request, origin)
        return await route.handler(json_request)

    def _find_route(self, request: server.Request) -> tuple[_Route, dict[str, str]]:
        raw_path = request.path.decode("latin-1")
        raw_segments = raw_path[1:].split("/") if raw_path.startswith("/") else None
        allowed: set[bytes] = set()
        head_fallback: tuple[_Route, dict[str, str]] | None = None
        if raw_segments is not None:
            for route in self._routes:
                params = route.match(raw_segments)
                if params is None:
                    continue
                if route.method == request.method:
                    return route, params
                allowed.add(route.method)
                if route.method == b"GET":
                    allowed.add(b"HEAD")
                    if request.method == b"HEAD" and head_fallback is None:
                        head_fallback = (route, params)
        if head_fallback is not None:
            return head_fallback
        if allowed:
            request.setHeader(b"Allow", b", ".join(sorted(allowed)))
            raise MatrixError(405, M_UNRECOGNIZED, "Unrecognized request")
        raise MatrixError(404, M_UNRECOGNIZED, "Unrecognized request")

    def _read_body(self, request: server.Request, required: bool) -> JsonDict | None:
        too_large = MatrixError(
            413, M_TOO_LARGE, f"Request body over {self._max_body_size} bytes"
        )
        length = request.getHeader(b"Content-Length")
        if length is not None and length.strip().isdigit() and int(length) > self._max_body_size:
            raise too_large
        if getattr(request, "content_too_large", False):
            raise too_large
        stream = getattr(request, "content", None)
        body = stream.read(self._max_body_size + 1) if stream is not None else b""
        if len(body) > self._max_body_size:
            raise too_large
        if not body:
            if required:
                raise MatrixError(400, M_NOT_JSON, "Content not JSON.")
            return None
        return parse_json_object(body)


def version_handler(
    name: str = SERVER_SOFTWARE_NAME, version: str = __version__
) -> Handler:
    """The handler of ``GET /_matrix/federation/v1/version`` (:data:`VERSION_PATH`),
    which needs no authentication."""

    async def handle(request: JsonRequest) -> tuple[int, JsonDict]:
        return 200, {"server": {"name": name, "version": version}}

    return handle
