"""The outbound federation HTTP client: signed JSON requests to other servers.

:class:`FederationClient` sends ``GET``/``PUT``/``POST`` requests to
``https://<destination><path>`` through an injected ``IAgent`` (in production a
:class:`~devicelist_plugin.federation.agent.MatrixFederationAgent`, which applies
server discovery, TLS and the IP filter; in tests any in-memory agent),
called directly (no treq wrappers: they cost latency and add nothing a
federation request needs).  Every request

- carries ``Authorization: X-Matrix ...`` from the injected ``signer``, computed
  over the exact request target the agent is asked for (path and query as
  sent): the signature is made by a thin agent wrapper given the final URL,
  so URL normalisation can never make it mismatch;
- carries ``Host: <destination>`` (the federation agent replaces it with the
  delegated name when ``.well-known`` delegation applies, as the specification
  requires);
- has a canonical-JSON body (``PUT``/``POST``);
- has a deadline (default 30 s) on the injected clock covering connecting,
  sending and reading the whole response;
- reads at most ``max_response_size`` bytes (default 50 MiB), dropping the
  connection beyond.

Outcomes callers can act on:

- a JSON object: the parsed 2xx response body;
- :class:`HttpResponseError`: the remote answered non-2xx.  Its ``errcode`` and
  ``message`` are the remote's text, kept as detail only: handlers must map
  this to an error of their own, never re-raise the remote's as ours;
- :class:`RequestSendFailed` (``retryable`` says whether trying again later may
  help): DNS, discovery, blocked IP, connection, TLS and timeout failures, and
  its subclass :class:`InvalidResponseError` (never retryable: non-JSON, not an
  object, or :class:`ResponseTooLargeError`);
- :class:`NotRetryingDestination`: raised by the backoff layer in front of this
  client when a destination is in its retry interval (defined here so callers
  catch one family, :class:`FederationClientError`).
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any, Callable, Mapping, NoReturn, Optional, Sequence, Union
from urllib.parse import urlencode

from canonicaljson import encode_canonical_json
from hyperlink import EncodedURL
from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.interfaces import IConsumer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from zope.interface import implementer

from devicelist_plugin import __version__
from devicelist_plugin.core.models import JsonDict

from .agent import ResponseTooLarge, read_body, request_target
from .discovery import ServerResolutionError
from .ipfilter import BlockedAddressError
from .resource import utf8_encodable

#: ``(method, destination, uri, content) -> Authorization header value``.
#: ``uri`` is the request target as sent (path and ``?query``); ``content`` is
#: the JSON body, None for requests without one.
Signer = Callable[[str, str, bytes, Optional[JsonDict]], bytes]

QueryArgs = Mapping[str, Union[str, Sequence[str]]]

DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_RESPONSE_SIZE = 50 * 1024 * 1024
USER_AGENT = f"devicelist-plugin/{__version__}".encode("ascii")
_MAX_ERROR_TEXT = 500
_UNSAFE = frozenset(" \t\r\n#")


class FederationClientError(Exception):
    """Base of every error :class:`FederationClient` raises for a request."""


class HttpResponseError(FederationClientError):
    """The destination answered with a non-2xx status.

    ``errcode`` and ``message`` come from the remote's ``{"errcode", "error"}``
    body when it had one (``message`` falls back to the status line's reason
    phrase).  They are remote text: log them, decide on ``code``/``errcode``,
    never pass them on as our own error.  ``retry_after_ms`` is the body's
    ``retry_after_ms`` (a rate-limited answer, 429 ``M_LIMIT_EXCEEDED``) when
    it is a non-negative integer.
    """

    def __init__(
        self,
        code: int,
        errcode: Optional[str],
        message: str,
        *,
        destination: Optional[str] = None,
        retry_after_ms: Optional[int] = None,
    ) -> None:
        super().__init__(code, errcode, message)
        self.code = code
        self.errcode = errcode
        self.message = message
        self.destination = destination
        self.retry_after_ms = retry_after_ms

    def __str__(self) -> str:
        where = f"{self.destination} answered " if self.destination else ""
        code = f" {self.errcode}" if self.errcode else ""
        return f"{where}{self.code}{code}: {self.message}"


class RequestSendFailed(FederationClientError):
    """No usable answer: the request could not be sent or its response was
    unusable.  ``retryable`` is False when trying again soon cannot help
    (blocked address, malformed server name, invalid response)."""

    def __init__(
        self,
        reason: str,
        retryable: bool,
        *,
        destination: Optional[str] = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable
        self.destination = destination

    def __str__(self) -> str:
        where = f"{self.destination}: " if self.destination else ""
        return f"{where}{self.reason}"


class InvalidResponseError(RequestSendFailed):
    """A 2xx response whose body is not a JSON object."""

    def __init__(self, reason: str, *, destination: Optional[str] = None) -> None:
        super().__init__(reason, retryable=False, destination=destination)


class ResponseTooLargeError(InvalidResponseError):
    """The response body exceeded the client's size limit."""

    def __init__(self, max_size: int, *, destination: Optional[str] = None) -> None:
        super().__init__(f"response larger than {max_size} bytes", destination=destination)
        self.max_size = max_size


class NotRetryingDestination(FederationClientError):
    """``destination`` is backing off: no request before ``retry_at`` (clock
    seconds)."""

    def __init__(self, destination: str, retry_at: float) -> None:
        super().__init__(f"not retrying {destination} before {retry_at:.0f}")
        self.destination = destination
        self.retry_at = retry_at


@implementer(IBodyProducer)
class BytesProducer:
    """Writes a byte string at once: no cooperator, hence no global reactor."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@implementer(IAgent)
class _SigningAgent:
    """Adds the X-Matrix header for the exact request target being sent."""

    def __init__(
        self,
        agent: IAgent,
        signer: Signer,
        destination: str,
        content: Optional[JsonDict],
    ) -> None:
        self._agent = agent
        self._signer = signer
        self._destination = destination
        self._content = content

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Optional[Headers] = None,
        bodyProducer: Optional[IBodyProducer] = None,
    ) -> Deferred[IResponse]:
        target = request_target(uri)
        authorization = self._signer(
            method.decode("ascii"), self._destination, target, self._content
        )
        request_headers = headers.copy() if headers is not None else Headers()
        request_headers.setRawHeaders(b"authorization", [authorization])
        return self._agent.request(method, uri, request_headers, bodyProducer)


@lru_cache(maxsize=4096)
def _origin(destination: str) -> str:
    """``https://<destination>`` as a URL carries it: the host IDNA-encoded
    as treq's URL handling (hyperlink) did, which refuses names that no URL
    can carry (``UnicodeError``).  IPv6 literals, which hyperlink 21 cannot
    handle, are taken as they are."""
    if destination.startswith("["):
        return f"https://{destination}"
    return str(EncodedURL.from_text(f"https://{destination}").to_uri().to_text())


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


class FederationClient:
    """Signed JSON requests from ``server_name`` to other servers.

    :param server_name: our server name (the requests' origin; for logs).
    :param agent: the ``IAgent`` requests go through.
    :param clock: the deadline's time source.
    :param signer: makes the ``Authorization`` header value.
    :param default_timeout: seconds per request when a call gives none.
    :param max_response_size: largest response body accepted, in bytes.
    """

    log = Logger()

    def __init__(
        self,
        server_name: str,
        agent: IAgent,
        clock: IReactorTime,
        signer: Signer,
        *,
        default_timeout: float = DEFAULT_TIMEOUT,
        max_response_size: int = DEFAULT_MAX_RESPONSE_SIZE,
        user_agent: bytes = USER_AGENT,
    ) -> None:
        self.server_name = server_name
        self._agent = agent
        self._clock = clock
        self._signer = signer
        self._default_timeout = default_timeout
        self._max_response_size = max_response_size
        self._user_agent = user_agent

    async def get_json(
        self,
        destination: str,
        path: str,
        args: Optional[QueryArgs] = None,
        timeout: Optional[float] = None,
    ) -> JsonDict:
        """``GET`` ``path`` (percent-encoded, starting with ``/``) on
        ``destination``; ``args`` become the query string."""
        return await self._request("GET", destination, path, args, None, timeout)

    async def put_json(
        self,
        destination: str,
        path: str,
        body: JsonDict,
        args: Optional[QueryArgs] = None,
        timeout: Optional[float] = None,
    ) -> JsonDict:
        """``PUT`` the JSON object ``body``."""
        return await self._request("PUT", destination, path, args, body, timeout)

    async def post_json(
        self,
        destination: str,
        path: str,
        body: JsonDict,
        args: Optional[QueryArgs] = None,
        timeout: Optional[float] = None,
    ) -> JsonDict:
        """``POST`` the JSON object ``body``."""
        return await self._request("POST", destination, path, args, body, timeout)

    async def _request(
        self,
        method: str,
        destination: str,
        path: str,
        args: Optional[QueryArgs],
        body: Optional[JsonDict],
        timeout: Optional[float],
    ) -> JsonDict:
        if not path.startswith("/") or not path.isascii() or any(c in path for c in _UNSAFE):
            raise ValueError(f"path must be percent-encoded ASCII starting with '/': {path!r}")
        seconds = self._default_timeout if timeout is None else timeout
        d = Deferred.fromCoroutine(self._send(method, destination, path, args, body))
        d.addTimeout(seconds, self._clock)
        try:
            return await d
        except DeferredTimeoutError:
            self.log.info(
                "{method} {destination}{path}: no response within {timeout}s",
                method=method,
                destination=destination,
                path=path,
                timeout=seconds,
            )
            raise RequestSendFailed(
                f"timed out after {seconds:g}s", retryable=True, destination=destination
            ) from None

    async def _send(
        self,
        method: str,
        destination: str,
        path: str,
        args: Optional[QueryArgs],
        body: Optional[JsonDict],
    ) -> JsonDict:
        url = f"https://{destination}{path}"
        if args:
            url += "?" + urlencode(args, doseq=True)
        headers = Headers(
            {
                b"Host": [destination.encode("ascii")],
                b"User-Agent": [self._user_agent],
            }
        )
        producer: Optional[BytesProducer] = None
        if body is not None:
            headers.setRawHeaders(b"Content-Type", [b"application/json"])
            producer = BytesProducer(encode_canonical_json(body))
        signing_agent = _SigningAgent(self._agent, self._signer, destination, body)

        self.log.debug("{method} {url}", method=method, url=url)
        response: IResponse
        try:
            # The agent is called directly: treq's wrappers (cookies, gzip,
            # URL re-parsing) cost a fraction of a millisecond per request
            # and a federation request needs none of them.
            response = await signing_agent.request(
                method.encode("ascii"),
                (_origin(destination) + url[len("https://") + len(destination):]).encode("ascii"),
                headers,
                producer,
            )
        except CancelledError:
            raise
        except Exception as e:
            if _is_cancellation(e):
                # Our deadline or the caller cancelled: let addTimeout / the
                # caller see a cancellation, not a send failure.
                raise CancelledError() from e
            raise self._send_failed(method, destination, path, e) from e

        try:
            raw = await read_body(response, self._max_response_size)
        except CancelledError:
            raise
        except ResponseTooLarge:
            self.log.warn(
                "{method} {destination}{path}: response over {limit} bytes, dropped",
                method=method,
                destination=destination,
                path=path,
                limit=self._max_response_size,
            )
            raise ResponseTooLargeError(
                self._max_response_size, destination=destination
            ) from None
        except Exception as e:
            raise RequestSendFailed(
                f"reading the response failed: {_describe(e)}",
                retryable=True,
                destination=destination,
            ) from e

        code: int = response.code
        if not 200 <= code < 300:
            error = _error_from_body(code, response.phrase, raw, destination)
            self.log.info(
                "{method} {destination}{path}: {code} {errcode} {message}",
                method=method,
                destination=destination,
                path=path,
                code=code,
                errcode=error.errcode,
                message=error.message,
            )
            raise error
        return _parse_json_object(raw, destination)

    def _send_failed(
        self, method: str, destination: str, path: str, e: Exception
    ) -> RequestSendFailed:
        retryable = True
        if isinstance(e, BlockedAddressError):
            retryable = False
        elif isinstance(e, ServerResolutionError):
            retryable = e.retryable
        elif isinstance(e, UnicodeError):
            # idna's IDNAError: a name the server-name grammar allows ("-",
            # "a..b") that no URL can carry; it names no reachable server
            retryable = False
        elif not isinstance(e, _TRANSPORT_ERRORS):
            self.log.failure(
                "{method} {destination}{path}: unexpected error sending the request",
                method=method,
                destination=destination,
                path=path,
            )
        reason = _describe(e)
        self.log.info(
            "{method} {destination}{path} failed: {reason}",
            method=method,
            destination=destination,
            path=path,
            reason=reason,
        )
        return RequestSendFailed(reason, retryable, destination=destination)


_TRANSPORT_ERRORS = (
    net_error.ConnectError,
    net_error.ConnectingCancelledError,
    net_error.ConnectionLost,
    net_error.ConnectionDone,
    net_error.TimeoutError,
    ResponseFailed,
    ResponseNeverReceived,
    OSError,
)


def _is_cancellation(e: BaseException) -> bool:
    """Whether ``e`` is a cancellation: ``CancelledError``, a cancelled
    connection attempt, or the Agent's wrapping of a cancelled request
    (``ResponseNeverReceived([Failure(CancelledError())])``)."""
    if isinstance(e, (CancelledError, net_error.ConnectingCancelledError)):
        return True
    reasons = getattr(e, "reasons", None)
    return isinstance(reasons, list) and any(
        isinstance(r, Failure) and r.check(CancelledError) for r in reasons
    )


def _describe(e: BaseException) -> str:
    reasons = getattr(e, "reasons", None)
    if isinstance(reasons, list) and reasons:
        inner = "; ".join(str(getattr(r, "value", r)) for r in reasons)
        return f"{type(e).__name__}: {inner}"
    return f"{type(e).__name__}: {e}"


def _parse_json_object(raw: bytes, destination: str) -> JsonDict:
    try:
        parsed: Any = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        # RecursionError: a deeply nested body, hostile or broken
        raise InvalidResponseError(
            f"response is not JSON: {e}", destination=destination
        ) from None
    if not isinstance(parsed, dict):
        raise InvalidResponseError(
            f"response is JSON {type(parsed).__name__}, not an object",
            destination=destination,
        )
    if b"\\u" in raw and not utf8_encodable(parsed):
        # nothing in it could be stored, signed or logged as UTF-8
        raise InvalidResponseError(
            "response has a lone surrogate escape", destination=destination
        )
    return parsed


def _error_from_body(
    code: int, phrase: bytes, raw: bytes, destination: str
) -> HttpResponseError:
    errcode: Optional[str] = None
    retry_after_ms: Optional[int] = None
    message = phrase.decode("ascii", "replace")
    try:
        parsed = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        parsed = None
    if isinstance(parsed, dict):
        if isinstance(parsed.get("errcode"), str):
            errcode = parsed["errcode"][:_MAX_ERROR_TEXT]
        if isinstance(parsed.get("error"), str):
            message = parsed["error"][:_MAX_ERROR_TEXT]
        retry_after = parsed.get("retry_after_ms")
        if isinstance(retry_after, int) and not isinstance(retry_after, bool) and retry_after >= 0:
            retry_after_ms = retry_after
    return HttpResponseError(
        code, errcode, message, destination=destination, retry_after_ms=retry_after_ms
    )
