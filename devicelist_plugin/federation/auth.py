"""Authentication of inbound federation requests (``Authorization: X-Matrix``).

:class:`FederationAuthenticator` is the
:class:`~devicelist_plugin.federation.resource.RequestAuthenticator` of the
federation routes: it rebuilds the signed object from the request as
received (method, ``uri`` exactly as sent, our name as destination, the JSON
body when there is one), finds the origin's key valid now through the
injected :class:`VerifyKeyLookup`, and verifies.  Several X-Matrix headers
may be sent; any valid one authenticates.  Every failure is 401
``M_UNAUTHORIZED`` with the reason.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Coroutine, Protocol, Sequence

from signedjson.key import is_signing_algorithm_supported
from signedjson.types import VerifyKey
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from devicelist_plugin.federation.errors import (
    M_BAD_JSON,
    M_FORBIDDEN,
    M_MISSING_PARAM,
    M_UNAUTHORIZED,
    MatrixError,
)
from devicelist_plugin.federation.resource import JsonRequest
from devicelist_plugin.federation.xmatrix import (
    XMatrixParseError,
    XMatrixVerifyError,
    parse_xmatrix_header,
    verify_request_signature,
)
from devicelist_plugin.listeners import call_listener

ContactListener = Callable[[str], object]


class VerifyKeyLookup(Protocol):
    """Where the authenticator gets remote servers' keys (the key ring)."""

    def get_verify_key(self, server_name: str, key_id: str, at_ms: int) -> Awaitable[VerifyKey | None]:
        """The key ``key_id`` of ``server_name`` valid at ``at_ms``, or
        ``None`` when it is unknown, cannot be fetched, or has expired.  The
        key's ``alg:version`` must be ``key_id``."""
        ...


class FederationAuthenticator:
    """Verifies X-Matrix signatures on requests to ``server_name``.

    :param key_lookup: finds the origin's verify keys.
    :param clock: the time keys must be valid at.
    """

    log = Logger()

    def __init__(self, server_name: str, key_lookup: VerifyKeyLookup, clock: IReactorTime) -> None:
        self._server_name = server_name
        self._key_lookup = key_lookup
        self._clock = clock
        self._contact_listeners: list[ContactListener] = []

    def add_contact_listener(self, listener: ContactListener) -> None:
        """Call ``listener(origin)`` after every successfully authenticated
        request ("a server contacted us": e.g. to reset its backoff).

        Listeners run synchronously; an exception, or the failure of a
        returned Deferred or coroutine, is logged and never fails the request.
        """
        self._contact_listeners.append(listener)

    def remove_contact_listener(self, listener: ContactListener) -> None:
        """Stop calling ``listener``."""
        self._contact_listeners.remove(listener)

    def authenticate(self, request: JsonRequest) -> Coroutine[Any, Any, str]:
        """The origin that signed ``request``; see :meth:`authenticate_parts`."""
        raw = request.raw
        headers = raw.requestHeaders.getRawHeaders(b"Authorization") or []
        return self.authenticate_parts(raw.method, raw.uri, headers, request.content)

    async def authenticate_parts(
        self,
        method: bytes | str,
        uri: bytes | str,
        authorization_headers: Sequence[bytes | str],
        content: object | None,
    ) -> str:
        """The origin of the first X-Matrix header that verifies.

        :param uri: the path and query string exactly as received.
        :param content: the parsed JSON body, ``None`` without a body.
        :raise MatrixError: 401 ``M_UNAUTHORIZED`` when none verifies.
        """
        now_ms = int(self._clock.seconds() * 1000)
        reasons: list[str] = []
        for header in authorization_headers:
            try:
                auth = parse_xmatrix_header(header)
            except XMatrixParseError as e:
                reasons.append(f"malformed X-Matrix header: {e}")
                continue
            if auth is None:
                continue
            if not is_signing_algorithm_supported(auth.key):
                reasons.append(f"unsupported key algorithm in {auth.key!r}")
                continue
            verify_key = await self._key_lookup.get_verify_key(auth.origin, auth.key, now_ms)
            if verify_key is None:
                reasons.append(f"no valid key {auth.key} known for {auth.origin}")
                continue
            try:
                verify_request_signature(auth, verify_key, method, uri, self._server_name, content)
            except XMatrixVerifyError as e:
                reasons.append(str(e))
                continue
            self._notify_contact(auth.origin)
            return auth.origin
        if not reasons:
            raise MatrixError(401, M_UNAUTHORIZED, "Missing X-Matrix Authorization header")
        raise MatrixError(401, M_UNAUTHORIZED, "; ".join(reasons))

    def _notify_contact(self, origin: str) -> None:
        for listener in list(self._contact_listeners):
            call_listener(
                self.log,
                lambda: listener(origin),
                "Contact listener {listener!r} failed for {origin}",
                listener=listener,
                origin=origin,
            )


def check_origin_matches(authenticated_origin: str, claimed: object) -> None:
    """Check a body's ``origin`` claim (e.g. a transaction's) against the
    authenticated origin.

    :raise MatrixError: 400 ``M_MISSING_PARAM`` when absent (``None``), 400
        ``M_BAD_JSON`` when not a string, 403 ``M_FORBIDDEN`` when different.
    """
    if claimed is None:
        raise MatrixError(400, M_MISSING_PARAM, "Missing 'origin'")
    if not isinstance(claimed, str):
        raise MatrixError(400, M_BAD_JSON, "'origin' must be a string")
    if claimed != authenticated_origin:
        raise MatrixError(
            403,
            M_FORBIDDEN,
            f"'origin' {claimed!r} does not match the authenticated origin {authenticated_origin!r}",
        )
