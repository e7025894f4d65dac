"""Shared-secret registration, exactly as Synapse's
``/_synapse/admin/v1/register``, so that Synapse's ``register_new_matrix_user``
works against this server unchanged.

``GET`` answers ``{"nonce": <128 hex characters>}``; a nonce is accepted once,
for :data:`NONCE_TIMEOUT_S` seconds (60, as Synapse), and kept in memory.
``POST`` takes ``nonce``, ``username``, ``password``, ``admin`` (optional),
``user_type`` (optional: ``bot`` or ``support``) and ``mac``, the hex
HMAC-SHA1 keyed with ``registration_shared_secret`` of::

    nonce \\0 username \\0 password \\0 ("admin" | "notadmin") [\\0 user_type]

The errors, their order and their texts are Synapse's: no secret configured
400 "Shared secret registration is not enabled"; ``nonce``, ``username``,
``password`` or ``mac`` missing 400 ``M_BAD_JSON``; an unknown or expired
nonce 400 "unrecognised nonce" (a nonce is spent even by a failed attempt);
a wrong MAC 403 "HMAC incorrect"; a taken user id 400 ``M_USER_IN_USE``.
On success the user is created (username lower-cased) and, unless
``inhibit_login`` is true, logged in on a new device (``device_id`` and
``initial_device_display_name`` are honoured): the answer is ``user_id``,
``home_server``, ``access_token`` and ``device_id``.  Refresh tokens are not
issued.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections import OrderedDict
from typing import Optional

from twisted.internet.interfaces import IReactorTime

from devicelist_plugin.client.accounts import USER_TYPES, Accounts
from devicelist_plugin.core.models import JsonDict
from devicelist_plugin.federation.errors import M_BAD_JSON, M_UNKNOWN, MatrixError
from devicelist_plugin.federation.resource import JsonRequest, JsonResource

__all__ = ["NONCE_TIMEOUT_S", "REGISTER_PATH", "SharedSecretRegistration", "registration_mac"]

REGISTER_PATH = "/_synapse/admin/v1/register"
NONCE_TIMEOUT_S = 60
MAX_NONCES = 10_000
MAX_FIELD_LENGTH = 512


def registration_mac(
    secret: str,
    nonce: str,
    username: str,
    password: str,
    admin: bool,
    user_type: Optional[str] = None,
) -> str:
    """The ``mac`` a registration request must carry (hex HMAC-SHA1)."""
    mac = hmac.new(key=secret.encode("utf-8"), digestmod=hashlib.sha1)
    mac.update(nonce.encode("utf-8"))
    mac.update(b"\x00")
    mac.update(username.encode("utf-8"))
    mac.update(b"\x00")
    mac.update(password.encode("utf-8"))
    mac.update(b"\x00")
    mac.update(b"admin" if admin else b"notadmin")
    if user_type:
        mac.update(b"\x00")
        mac.update(user_type.encode("utf-8"))
    return mac.hexdigest()


def _error(code: int, msg: str, errcode: str = M_UNKNOWN) -> MatrixError:
    return MatrixError(code, errcode, msg)


def _checked_field(body: JsonDict, name: str) -> str:
    """``username`` or ``password``: present, a string of at most 512
    characters without NUL (Synapse's checks and texts)."""
    if name not in body:
        raise _error(400, f"{name} must be specified", M_BAD_JSON)
    value = body[name]
    if (
        not isinstance(value, str)
        or len(value) > MAX_FIELD_LENGTH
        or "\x00" in value
    ):
        raise _error(400, f"Invalid {name}")
    return value


class SharedSecretRegistration:
    """The handlers of :data:`REGISTER_PATH`; :meth:`register` mounts them."""

    def __init__(self, accounts: Accounts, clock: IReactorTime, shared_secret: Optional[str]) -> None:
        self._accounts = accounts
        self._clock = clock
        self._secret = shared_secret
        # nonce -> when it was handed out (seconds)
        self._nonces: OrderedDict[str, float] = OrderedDict()

    def register(self, resource: JsonResource) -> None:
        resource.register("GET", REGISTER_PATH, self.on_get)
        resource.register("POST", REGISTER_PATH, self.on_post, json_body=True)

    def _clear_old_nonces(self) -> None:
        now = self._clock.seconds()
        while self._nonces:
            nonce, issued = next(iter(self._nonces.items()))
            if now - issued <= NONCE_TIMEOUT_S and len(self._nonces) <= MAX_NONCES:
                break
            del self._nonces[nonce]

    def new_nonce(self) -> str:
        """A fresh single-use nonce."""
        nonce = secrets.token_hex(64)
        self._nonces[nonce] = self._clock.seconds()
        self._clear_old_nonces()
        return nonce

    async def on_get(self, request: JsonRequest) -> tuple[int, JsonDict]:
        self._clear_old_nonces()
        return 200, {"nonce": self.new_nonce()}

    async def on_post(self, request: JsonRequest) -> tuple[int, JsonDict]:
        self._clear_old_nonces()
        if not self._secret:
            raise _error(400, "Shared secret registration is not enabled")
        body = request.require_content()
        if "nonce" not in body:
            raise _error(400, "nonce must be specified", M_BAD_JSON)
        nonce = body["nonce"]
        if not isinstance(nonce, str) or nonce not in self._nonces:
            raise _error(400, "unrecognised nonce")
        # spent even if the rest of the request is refused
        del self._nonces[nonce]

        username = _checked_field(body, "username")
        password = _checked_field(body, "password")
        admin = bool(body.get("admin"))
        user_type = body.get("user_type")
        if user_type is not None and user_type not in USER_TYPES:
            raise _error(400, "Invalid user type")
        if "mac" not in body:
            raise _error(400, "mac must be specified", M_BAD_JSON)
        got_mac = body["mac"]
        want_mac = registration_mac(self._secret, nonce, username, password, admin, user_type)
        if not isinstance(got_mac, str) or not hmac.compare_digest(
            want_mac.encode("ascii"), got_mac.encode("utf-8")
        ):
            raise _error(403, "HMAC incorrect")
        if not isinstance(body.get("refresh_token", False), bool):
            raise _error(400, "refresh_token must be a boolean")
        inhibit_login = body.get("inhibit_login", False)
        device_id = body.get("device_id")
        display_name = body.get("initial_device_display_name")
        if device_id is not None and not isinstance(device_id, str):
            raise _error(400, "device_id must be a string", M_BAD_JSON)
        if display_name is not None and not isinstance(display_name, str):
            raise _error(400, "initial_device_display_name must be a string", M_BAD_JSON)

        user_id = await self._accounts.register(
            username, password, admin=admin, user_type=user_type
        )
        result: JsonDict = {"user_id": user_id, "home_server": self._accounts.server_name}
        if not inhibit_login:
            login = await self._accounts.login(user_id, device_id, display_name)
            result["access_token"] = login.access_token
            result["device_id"] = login.device_id
        return 200, result
