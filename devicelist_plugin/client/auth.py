"""Access tokens: issuing, hashing, and authenticating client requests.

A token is ``dlt_`` and 43 URL-safe random characters (256 bits); the store
keeps only its hex SHA-256 (:func:`hash_token`).  A request carries it as
``Authorization: Bearer <token>`` or as the ``access_token`` query
parameter, not both (as in Synapse):

- no token, both forms, several ``Authorization`` headers, or another
  scheme: 401 ``M_MISSING_TOKEN``;
- a token we do not know: 401 ``M_UNKNOWN_TOKEN`` with ``soft_logout: false``.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Awaitable, Callable

from devicelist_plugin.client.errors import M_MISSING_TOKEN, M_UNKNOWN_TOKEN
from devicelist_plugin.core.models import JsonDict
from devicelist_plugin.federation.errors import MatrixError
from devicelist_plugin.federation.resource import Handler, JsonRequest
from devicelist_plugin.storage.accounts import AccountStore

__all__ = [
    "AccessTokenAuth",
    "AuthenticatedHandler",
    "Requester",
    "access_token_of",
    "generate_access_token",
    "hash_token",
]

TOKEN_PREFIX = "dlt_"


def generate_access_token() -> str:
    """A new random access token."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """What the store keeps of a token: its hex SHA-256."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Requester:
    """The user (and device) a request is authenticated as."""

    user_id: str
    device_id: str
    admin: bool
    token_hash: str


#: A handler of an authenticated endpoint: ``(request, requester) -> (status, body)``.
AuthenticatedHandler = Callable[[JsonRequest, Requester], Awaitable[tuple[int, JsonDict]]]


def _missing(message: str) -> MatrixError:
    return MatrixError(401, M_MISSING_TOKEN, message)


def access_token_of(request: JsonRequest) -> str:
    """The token a request carries (see the module docstring)."""
    headers = request.raw.requestHeaders.getRawHeaders(b"Authorization")
    query_tokens = request.query.get("access_token")
    if headers:
        if query_tokens is not None:
            raise _missing("Mixing Authorization headers and access_token query parameters.")
        if len(headers) > 1:
            raise _missing("Too many Authorization headers.")
        parts = headers[0].split(b" ")
        if len(parts) == 2 and parts[0] == b"Bearer" and parts[1]:
            try:
                return parts[1].decode("ascii")
            except UnicodeDecodeError:
                raise _missing("Invalid Authorization header.") from None
        raise _missing("Invalid Authorization header.")
    if not query_tokens or not query_tokens[0]:
        raise _missing("Missing access token.")
    return query_tokens[0]


class AccessTokenAuth:
    """Resolves a request's access token to a :class:`Requester`."""

    def __init__(self, accounts: AccountStore) -> None:
        self._accounts = accounts

    async def requester(self, request: JsonRequest) -> Requester:
        """The authenticated user, or raise 401 (see the module docstring)."""
        token_hash = hash_token(access_token_of(request))
        owner = await self._accounts.get_token_owner(token_hash)
        if owner is None:
            raise MatrixError(
                401, M_UNKNOWN_TOKEN, "Unrecognised access token.", {"soft_logout": False}
            )
        return Requester(owner.user_id, owner.device_id, owner.admin, token_hash)

    def wrap(self, handler: AuthenticatedHandler) -> Handler:
        """A :class:`~devicelist_plugin.federation.resource.JsonResource`
        handler that authenticates the request, then calls ``handler``."""

        async def authenticated(request: JsonRequest) -> tuple[int, JsonDict]:
            return await handler(request, await self.requester(request))

        return authenticated
