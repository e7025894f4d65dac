"""Users, logins and logouts of the standalone server, over the account store
and the local device handler.

A login creates a device through
:meth:`~devicelist_plugin.local.handler.LocalDeviceHandler.create_device`
(so other servers hear of it) unless the device exists already, then issues
an access token for it.  Logging out deletes the device through the handler
(its keys go, other servers hear of it, and its tokens are deleted with it
in the same transaction), as Synapse does.

User ids follow Synapse's registration rules (:func:`check_localpart`):
localparts are lower-cased and may only contain ``a-z``, ``0-9`` and
``=_-./+``.
"""

from __future__ import annotations

import secrets
import string
from dataclasses import dataclass
from typing import Iterable, Optional

from twisted.internet.interfaces import IReactorTime

from devicelist_plugin.client.auth import generate_access_token, hash_token
from devicelist_plugin.client.errors import M_INVALID_USERNAME, M_USER_IN_USE
from devicelist_plugin.client.passwords import PasswordHasher
from devicelist_plugin.core.parse import MAX_USER_ID_LENGTH
from devicelist_plugin.federation.errors import M_NOT_FOUND, MatrixError
from devicelist_plugin.local.handler import LocalDeviceHandler
from devicelist_plugin.storage.accounts import AccountStore, UserExistsError

__all__ = ["Accounts", "LoginResult", "USER_TYPES", "check_localpart", "generate_device_id"]

#: Synapse's user types (``synapse.api.constants.UserTypes``).
USER_TYPES = ("support", "bot")

_LOCALPART_CHARACTERS = frozenset("_-./=+" + string.ascii_lowercase + string.digits)


def generate_device_id() -> str:
    """Ten random upper-case letters, as Synapse's."""
    return "".join(secrets.choice(string.ascii_uppercase) for _ in range(10))


def check_localpart(localpart: str, server_name: str) -> str:
    """The user id for a new user, checked as Synapse's registration does.

    :raise MatrixError: 400 ``M_INVALID_USERNAME`` with Synapse's messages.
    """
    if not localpart:
        raise MatrixError(400, M_INVALID_USERNAME, "User ID cannot be empty")
    if any(c not in _LOCALPART_CHARACTERS for c in localpart):
        raise MatrixError(
            400, M_INVALID_USERNAME, "User ID can only contain characters a-z, 0-9, or '=_-./+'"
        )
    if localpart.startswith("_"):
        raise MatrixError(400, M_INVALID_USERNAME, "User ID may not begin with _")
    user_id = f"@{localpart}:{server_name}"
    if len(user_id) > MAX_USER_ID_LENGTH:
        raise MatrixError(
            400,
            M_INVALID_USERNAME,
            f"User ID may not be longer than {MAX_USER_ID_LENGTH} characters",
        )
    try:
        int(localpart)
    except ValueError:
        return user_id
    raise MatrixError(400, M_INVALID_USERNAME, "Numeric user IDs are reserved for guest users.")


@dataclass(frozen=True)
class LoginResult:
    user_id: str
    device_id: str
    access_token: str


class Accounts:
    """Registration, password checks, logins and logouts."""

    def __init__(
        self,
        server_name: str,
        store: AccountStore,
        handler: LocalDeviceHandler,
        hasher: PasswordHasher,
        clock: IReactorTime,
    ) -> None:
        self.server_name = server_name
        self.store = store
        self._handler = handler
        self._hasher = hasher
        self._clock = clock

    def _now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    def qualify(self, user: str) -> Optional[str]:
        """A login identifier (``alice`` or ``@alice:server``) as one of our
        user ids, localpart lower-cased; ``None`` if it names no local user."""
        if user.startswith("@"):
            localpart, sep, server = user[1:].partition(":")
            if not sep or server != self.server_name:
                return None
        else:
            localpart = user
        if not localpart:
            return None
        return f"@{localpart.lower()}:{self.server_name}"

    async def register(
        self,
        localpart: str,
        password: Optional[str],
        *,
        admin: bool = False,
        user_type: Optional[str] = None,
    ) -> str:
        """Create a user (``localpart`` is lower-cased); return its id.

        :raise MatrixError: 400 ``M_INVALID_USERNAME`` or ``M_USER_IN_USE``.
        """
        user_id = check_localpart(localpart.lower(), self.server_name)
        if await self.store.get_user(user_id) is not None:
            raise MatrixError(400, M_USER_IN_USE, "User ID already taken.")
        password_hash = None if password is None else await self._hasher.hash(password)
        try:
            await self.store.create_user(
                user_id, password_hash, self._now_ms(), admin=admin, user_type=user_type
            )
        except UserExistsError:
            raise MatrixError(400, M_USER_IN_USE, "User ID already taken.") from None
        return user_id

    async def check_password(self, user_id: str, password: str) -> bool:
        """Whether ``user_id`` exists and ``password`` is its password."""
        account = await self.store.get_user(user_id)
        if account is None or account.password_hash is None:
            return False
        return await self._hasher.verify(password, account.password_hash)

    async def login(
        self, user_id: str, device_id: Optional[str], display_name: Optional[str]
    ) -> LoginResult:
        """Issue a token for ``device_id`` of ``user_id``, creating the device
        (named ``display_name``) unless it exists; a new device id when
        ``device_id`` is ``None``."""
        if device_id is None:
            device_id = generate_device_id()
        if not await self.store.has_device(user_id, device_id):
            await self._handler.create_device(user_id, device_id, display_name)
        token = generate_access_token()
        await self.store.add_access_token(hash_token(token), user_id, device_id, self._now_ms())
        return LoginResult(user_id, device_id, token)

    async def delete_devices(self, user_id: str, device_ids: Iterable[str]) -> None:
        """Delete devices through the handler (their tokens go with them);
        devices that do not exist are skipped."""
        for device_id in dict.fromkeys(device_ids):
            try:
                await self._handler.delete_device(user_id, device_id)
            except MatrixError as e:
                if e.code != 404 or e.errcode != M_NOT_FOUND:
                    raise

    async def logout(self, user_id: str, device_id: str, token_hash: str) -> None:
        """``POST /logout``: delete the device and with it every token of it."""
        await self.delete_devices(user_id, [device_id])
        await self.store.delete_access_token(token_hash)

    async def logout_all(self, user_id: str) -> None:
        """``POST /logout/all``: delete every device and token of the user."""
        devices = await self._handler.get_devices(user_id)
        await self.delete_devices(user_id, [d.device_id for d in devices])
        await self.store.delete_user_tokens(user_id)
