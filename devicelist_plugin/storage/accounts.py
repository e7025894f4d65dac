"""Accounts of the standalone server: users and their access tokens.

A host embedding the plugin authenticates its own users; only the standalone
server needs accounts.  :class:`AccountStore` runs on the same
:class:`~devicelist_plugin.storage.engines.Database` as the device-list
store (``AccountStore(store.database)``), with its own tables (migration
``0006_accounts``).  Each method is one transaction and returns a Deferred;
timestamps are passed in by the caller.

Passwords arrive here already hashed (bcrypt) and access tokens as their hex
SHA-256 (:func:`devicelist_plugin.client.auth.hash_token`): the database never
holds a usable secret.  Every access token belongs to a device of
``local_devices``; deleting the device deletes its tokens in the same
transaction (a foreign key with ``ON DELETE CASCADE``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from twisted.internet.defer import Deferred

from devicelist_plugin.storage.engines import Database, Txn
from devicelist_plugin.storage.errors import StoreError, UnknownDeviceError

__all__ = ["Account", "AccountStore", "TokenOwner", "UserExistsError"]


class UserExistsError(StoreError):
    """A user with that id is already registered."""

    def __init__(self, user_id: str) -> None:
        self.user_id = user_id
        super().__init__(f"user {user_id!r} already exists")


@dataclass(frozen=True)
class Account:
    """A registered user."""

    user_id: str
    # bcrypt hash; None: no password login
    password_hash: Optional[str]
    admin: bool
    # Synapse's user types ("bot", "support"); None for a regular user
    user_type: Optional[str]
    created_ts: int


@dataclass(frozen=True)
class TokenOwner:
    """Who an access token authenticates."""

    user_id: str
    device_id: str
    admin: bool


class AccountStore:
    """Users and access tokens (see the module docstring)."""

    def __init__(self, database: Database) -> None:
        self.database = database

    def create_user(
        self,
        user_id: str,
        password_hash: Optional[str],
        now_ms: int,
        *,
        admin: bool = False,
        user_type: Optional[str] = None,
    ) -> "Deferred[None]":
        """Register ``user_id``.

        :raise UserExistsError: the user id is taken.
        """

        def txn(t: Txn) -> None:
            t.execute(
                "INSERT INTO users (user_id, password_hash, admin, user_type, created_ts)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (user_id) DO NOTHING",
                (user_id, password_hash, admin, user_type, now_ms),
            )
            if t.rowcount != 1:
                raise UserExistsError(user_id)

        return self.database.run("create_user", txn)

    def get_user(self, user_id: str) -> "Deferred[Optional[Account]]":
        """The account of ``user_id``, or ``None``."""

        def txn(t: Txn) -> Optional[Account]:
            row = t.query_one(
                "SELECT user_id, password_hash, admin, user_type, created_ts"
                " FROM users WHERE user_id = ?",
                (user_id,),
            )
            if row is None:
                return None
            return Account(row[0], row[1], bool(row[2]), row[3], int(row[4]))

        return self.database.run("get_user", txn, readonly=True)

    def set_admin(self, user_id: str, admin: bool) -> "Deferred[bool]":
        """Grant or revoke admin rights; ``False`` if there is no such user."""

        def txn(t: Txn) -> bool:
            t.execute("UPDATE users SET admin = ? WHERE user_id = ?", (admin, user_id))
            return t.rowcount == 1

        return self.database.run("set_admin", txn)

    def has_device(self, user_id: str, device_id: str) -> "Deferred[bool]":
        """Whether the local device exists (a login may name an existing one)."""

        def txn(t: Txn) -> bool:
            row = t.query_one(
                "SELECT 1 FROM local_devices WHERE user_id = ? AND device_id = ?",
                (user_id, device_id),
            )
            return row is not None

        return self.database.run("has_device", txn, readonly=True)

    def add_access_token(
        self, token_hash: str, user_id: str, device_id: str, now_ms: int
    ) -> "Deferred[None]":
        """Record a token (its hash) for a device of ``user_id``.

        :raise UnknownDeviceError: the device does not exist.
        """

        def txn(t: Txn) -> None:
            # lock the device row so that it cannot be deleted before the
            # token row referencing it is in
            exists = t.query_one(
                "SELECT 1 FROM local_devices WHERE user_id = ? AND device_id = ?"
                + t.dialect.for_update,
                (user_id, device_id),
            )
            if exists is None:
                raise UnknownDeviceError(user_id, device_id)
            t.execute(
                "INSERT INTO access_tokens (token_hash, user_id, device_id, created_ts)"
                " VALUES (?, ?, ?, ?)",
                (token_hash, user_id, device_id, now_ms),
            )

        return self.database.run("add_access_token", txn)

    def get_token_owner(self, token_hash: str) -> "Deferred[Optional[TokenOwner]]":
        """Who the token with this hash authenticates, or ``None``."""

        def txn(t: Txn) -> Optional[TokenOwner]:
            row = t.query_one(
                "SELECT t.user_id, t.device_id, u.admin FROM access_tokens t"
                " JOIN users u ON u.user_id = t.user_id WHERE t.token_hash = ?",
                (token_hash,),
            )
            return None if row is None else TokenOwner(row[0], row[1], bool(row[2]))

        return self.database.run("get_token_owner", txn, readonly=True)

    def delete_access_token(self, token_hash: str) -> "Deferred[bool]":
        """Forget one token; ``False`` if it was unknown."""

        def txn(t: Txn) -> bool:
            t.execute("DELETE FROM access_tokens WHERE token_hash = ?", (token_hash,))
            return t.rowcount > 0

        return self.database.run("delete_access_token", txn)

    def delete_user_tokens(self, user_id: str) -> "Deferred[int]":
        """Forget every token of ``user_id``; return how many there were."""

        def txn(t: Txn) -> int:
            t.execute("DELETE FROM access_tokens WHERE user_id = ?", (user_id,))
            return t.rowcount

        return self.database.run("delete_user_tokens", txn)

    def count_device_tokens(self, user_id: str, device_id: str) -> "Deferred[int]":
        """How many tokens a device has (0 once the device is deleted)."""

        def txn(t: Txn) -> int:
            row = t.query_one(
                "SELECT COUNT(*) FROM access_tokens WHERE user_id = ? AND device_id = ?",
                (user_id, device_id),
            )
            return int(row[0]) if row else 0

        return self.database.run("count_device_tokens", txn, readonly=True)
