"""Room memberships kept in the database: the standalone server's
:class:`~devicelist_plugin.membership.MembershipSource`.

The standalone server runs no rooms; it is told who is in which room (the
admin API) and keeps it in the ``room_memberships`` table.
:class:`StoreMembership` has the listener semantics of
:class:`~devicelist_plugin.membership.InMemoryMembership` (both compute the
transitions with :mod:`devicelist_plugin.core.membership`), with two
differences that come with a database:

* :meth:`StoreMembership.join` and :meth:`StoreMembership.leave` return a
  Deferred.  Each change, and the transitions it causes, is one database
  transaction; the listeners are called after it commits, and the Deferred
  fires once every listener's own Deferred (if it returned one) has fired,
  so that when a join is answered the new servers' updates are queued.  A
  listener's failure is logged and never fails the change.
* The fan-out of a join is durable: in the join's transaction, each
  (newly sharing server, local user) gets a chain reset
  (``outbound_chain_resets``), so even if the process dies before the
  listeners ran, the sender sends that server an EDU of the user (with
  ``prev_id: []``, making it resync) when it starts again.
"""

from __future__ import annotations

from typing import Any, Callable, Collection, Protocol

from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger

from devicelist_plugin.core.parse import ParseError, split_user_id
from devicelist_plugin.listeners import call_listener
from devicelist_plugin.membership import MembershipListener

__all__ = ["MembershipStore", "StoreMembership"]


class MembershipStore(Protocol):
    """The store methods :class:`StoreMembership` uses."""

    def join_room(
        self, room_id: str, user_id: str, own_server_name: str
    ) -> "Deferred[dict[str, frozenset[str]]]": ...

    def leave_room(
        self, room_id: str, user_id: str, own_server_name: str
    ) -> "Deferred[list[str]]": ...

    def get_servers_sharing_room(
        self, user_id: str, own_server_name: str
    ) -> "Deferred[frozenset[str]]": ...

    def is_user_tracked(self, user_id: str, own_server_name: str) -> "Deferred[bool]": ...

    def get_tracked_users(
        self, user_ids: Collection[str], own_server_name: str
    ) -> "Deferred[frozenset[str]]": ...

    def get_room_members(self, room_id: str) -> "Deferred[list[str]]": ...


class StoreMembership:
    """A :class:`~devicelist_plugin.membership.MembershipSource` over the
    ``room_memberships`` table.

    :param own_server_name: our server name: its users are local, and it is
        never returned as a destination.
    :param store: where memberships live (the plugin's store).
    """

    log = Logger()

    def __init__(self, own_server_name: str, store: MembershipStore) -> None:
        self._own = own_server_name
        self._store = store
        self._listeners: list[MembershipListener] = []

    def join(self, room_id: str, user_id: str) -> "Deferred[None]":
        """Record that ``user_id`` (local or remote) joined ``room_id``.

        :raise ValueError: (in the Deferred) an empty room id or a malformed
            user id.
        """
        return Deferred.fromCoroutine(self._join(room_id, user_id))

    async def _join(self, room_id: str, user_id: str) -> None:
        _check(room_id, user_id)
        newly = await self._store.join_room(room_id, user_id, self._own)
        for local_user, servers in sorted(newly.items()):
            await self._notify(lambda l: l.servers_newly_sharing(local_user, servers))

    def leave(self, room_id: str, user_id: str) -> "Deferred[None]":
        """Record that ``user_id`` left ``room_id`` (a no-op if it was not joined)."""
        return Deferred.fromCoroutine(self._leave(room_id, user_id))

    async def _leave(self, room_id: str, user_id: str) -> None:
        untracked = await self._store.leave_room(room_id, user_id, self._own)
        for remote in untracked:
            await self._notify(lambda l: l.remote_user_untracked(remote))

    def room_members(self, room_id: str) -> "Deferred[list[str]]":
        """The members of ``room_id``, sorted."""
        return self._store.get_room_members(room_id)

    def servers_sharing_room(self, user_id: str) -> "Deferred[frozenset[str]]":
        return self._store.get_servers_sharing_room(user_id, self._own)

    def is_tracked(self, remote_user_id: str) -> "Deferred[bool]":
        return self._store.is_user_tracked(remote_user_id, self._own)

    def tracked_among(self, remote_user_ids: Collection[str]) -> "Deferred[frozenset[str]]":
        return self._store.get_tracked_users(remote_user_ids, self._own)

    def add_listener(self, listener: MembershipListener) -> None:
        self._listeners.append(listener)

    async def _notify(self, call: Callable[[MembershipListener], object]) -> None:
        waiting: list[Deferred[Any]] = []
        for listener in list(self._listeners):
            d = call_listener(
                self.log,
                lambda: call(listener),
                "membership listener {listener!r} failed",
                listener=listener,
            )
            if d is not None:
                waiting.append(d)
        if waiting:
            await gatherResults(waiting)


def _check(room_id: str, user_id: str) -> None:
    if not room_id:
        raise ValueError("room_id must not be empty")
    try:
        split_user_id(user_id)
    except ParseError as e:
        raise ValueError(f"invalid user id {user_id!r}: {e}") from None
