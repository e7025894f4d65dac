"""User-interactive authentication with ``m.login.password``.

Deleting devices (and replacing cross-signing keys) asks the user for their
password again, as the spec's user-interactive authentication (UIA) API says:

1. A request without ``auth`` is answered 401 ``{"flows": [{"stages":
   ["m.login.password"]}], "params": {}, "session": "<id>"}`` and nothing is
   done.
2. The client repeats the request with ``"auth": {"type":
   "m.login.password", "identifier": {"type": "m.id.user", "user": ...},
   "password": ..., "session": "<id>"}`` (the legacy top-level ``user`` is
   accepted too).  The right password of the requesting user completes the
   only stage: the request goes ahead and the session ends.  A wrong one is
   answered 401 with the same state plus ``completed: []``, ``errcode:
   M_FORBIDDEN`` and ``error``; the session stays usable.

A session belongs to one user and one operation (method and path): using it
for another is 403 ``M_FORBIDDEN``; an unknown or expired session is 400
``M_UNKNOWN``.  Sessions live in memory for :data:`SESSION_LIFETIME_S` (48
hours, as Synapse), at most :data:`MAX_SESSIONS` at once (the oldest are
dropped first).
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from dataclasses import dataclass
from typing import Awaitable, Callable, Optional

from twisted.internet.interfaces import IReactorTime

from devicelist_plugin.client.auth import Requester
from devicelist_plugin.client.errors import InteractiveAuthRequired
from devicelist_plugin.core.models import JsonDict
from devicelist_plugin.federation.errors import (
    M_BAD_JSON,
    M_FORBIDDEN,
    M_MISSING_PARAM,
    M_UNKNOWN,
    M_UNRECOGNIZED,
    MatrixError,
)

__all__ = ["LOGIN_TYPE_PASSWORD", "UserInteractiveAuth", "login_user_of"]

LOGIN_TYPE_PASSWORD = "m.login.password"
SESSION_LIFETIME_S = 48 * 60 * 60
MAX_SESSIONS = 10_000


@dataclass(frozen=True)
class _Session:
    session_id: str
    user_id: str
    operation: str
    created: float


def login_user_of(submission: JsonDict, prefix: str = "") -> str:
    """The user named by a login or ``auth`` submission: ``identifier``
    ``{"type": "m.id.user", "user": ...}`` or the legacy top-level ``user``.

    :param prefix: where the submission is in the body (``"auth."``), for errors.
    :raise MatrixError: 400 for another identifier type or a missing user.
    """
    identifier = submission.get("identifier")
    if identifier is None:
        user = submission.get("user")
        if user is None:
            raise MatrixError(400, M_MISSING_PARAM, f"Missing param: {prefix}identifier")
    else:
        if not isinstance(identifier, dict):
            raise MatrixError(400, M_BAD_JSON, f"{prefix}identifier: expected an object")
        if identifier.get("type") != "m.id.user":
            raise MatrixError(400, M_UNKNOWN, "Unknown login identifier type")
        user = identifier.get("user")
    if not isinstance(user, str) or not user:
        raise MatrixError(400, M_BAD_JSON, f"{prefix}identifier.user: expected a user id or localpart")
    return user


class UserInteractiveAuth:
    """UIA with the ``m.login.password`` stage (see the module docstring).

    :param check_password: ``(user_id, password) -> bool``.
    :param qualify: a login identifier as one of our user ids, or ``None``.
    """

    def __init__(
        self,
        clock: IReactorTime,
        check_password: Callable[[str, str], Awaitable[bool]],
        qualify: Callable[[str], Optional[str]],
    ) -> None:
        self._clock = clock
        self._check_password = check_password
        self._qualify = qualify
        self._sessions: OrderedDict[str, _Session] = OrderedDict()

    def _expire(self) -> None:
        now = self._clock.seconds()
        while self._sessions:
            oldest = next(iter(self._sessions.values()))
            if now - oldest.created < SESSION_LIFETIME_S and len(self._sessions) <= MAX_SESSIONS:
                break
            self._sessions.popitem(last=False)

    def _new_session(self, requester: Requester, operation: str) -> _Session:
        session = _Session(secrets.token_urlsafe(24), requester.user_id, operation, self._clock.seconds())
        self._sessions[session.session_id] = session
        self._expire()
        return session

    @staticmethod
    def _state(session: _Session) -> JsonDict:
        return {
            "flows": [{"stages": [LOGIN_TYPE_PASSWORD]}],
            "params": {},
            "session": session.session_id,
        }

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    async def validate(self, requester: Requester, body: Optional[JsonDict], operation: str) -> None:
        """Return when ``body["auth"]`` completes the password stage for
        ``requester``; otherwise raise the 401 (or 400/403) to answer.

        :param operation: what is being authorised, e.g. ``"POST
            /_matrix/client/v3/delete_devices"``; a session serves only one.
        """
        self._expire()
        auth = None if body is None else body.get("auth")
        if auth is None:
            raise InteractiveAuthRequired(self._state(self._new_session(requester, operation)))
        if not isinstance(auth, dict):
            raise MatrixError(400, M_BAD_JSON, "auth: expected an object")
        session_id = auth.get("session")
        if session_id is None:
            session = self._new_session(requester, operation)
        else:
            found = self._sessions.get(session_id) if isinstance(session_id, str) else None
            if found is None:
                raise MatrixError(400, M_UNKNOWN, f"Unknown session ID: {session_id}")
            if found.user_id != requester.user_id:
                raise MatrixError(403, M_FORBIDDEN, "Invalid auth")
            if found.operation != operation:
                raise MatrixError(
                    403,
                    M_FORBIDDEN,
                    "Requested operation has changed during the UI authentication session.",
                )
            session = found
        login_type = auth.get("type")
        if login_type is None:
            # a client asking for the flows of an existing session
            raise InteractiveAuthRequired(self._state(session))
        if login_type != LOGIN_TYPE_PASSWORD:
            raise MatrixError(400, M_UNRECOGNIZED, f"Unrecognised login type: {login_type}")
        user = login_user_of(auth, "auth.")
        password = auth.get("password")
        if not isinstance(password, str):
            raise MatrixError(400, M_BAD_JSON, "auth.password: expected a string")
        user_id = self._qualify(user)
        if user_id is None or not await self._check_password(user_id, password):
            state = self._state(session)
            state["completed"] = []
            raise InteractiveAuthRequired(state, M_FORBIDDEN, "Invalid username or password")
        if user_id != requester.user_id:
            raise MatrixError(403, M_FORBIDDEN, "Invalid auth")
        self._sessions.pop(session.session_id, None)
