"""Who shares a room with whom: where local changes must go, and which remote
users' device lists we must keep.

The plugin does not run rooms; the host tells it about memberships through a
:class:`MembershipSource`.  Two questions matter to device lists:

* which servers share at least one room with a *local* user: they must receive
  that user's ``m.device_list_update`` EDUs (:meth:`servers_sharing_room`);
* whether a *remote* user shares at least one room with any local user: only
  then is their device list tracked and cached (:meth:`is_tracked`).

Listeners hear of the two transitions that need work: servers that newly share
a room with a local user (they must be sent the user's current devices,
Synapse #11374), and remote users no longer sharing any room (their cache is
dropped, Synapse #13651).

:class:`InMemoryMembership` keeps room memberships in memory;
:class:`~devicelist_plugin.membership_store.StoreMembership` keeps them in the
database (the standalone server); a host with its own room state implements
the protocol over it.  Both built-in sources compute the transitions with
the pure functions of :mod:`devicelist_plugin.core.membership`.
"""

from __future__ import annotations

from typing import Callable, Collection, Protocol, runtime_checkable

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.logger import Logger

from devicelist_plugin.core.membership import (
    join_concerns,
    leave_concerns,
    server_of,
    servers_newly_sharing_on_join,
    untracked_on_leave,
)


class MembershipListener(Protocol):
    def servers_newly_sharing(self, local_user_id: str, servers: frozenset[str]) -> object:
        """``servers`` did not share a room with ``local_user_id`` and now do."""
        ...

    def remote_user_untracked(self, remote_user_id: str) -> object:
        """``remote_user_id`` no longer shares any room with a local user."""
        ...


class MembershipSource(Protocol):
    """Room memberships, as far as device lists need them."""

    def servers_sharing_room(self, user_id: str) -> "Deferred[frozenset[str]]":
        """The server names that share at least one room with the local user
        ``user_id``, never including our own server name."""
        ...

    def is_tracked(self, remote_user_id: str) -> "Deferred[bool]":
        """Whether the remote user shares at least one room with a local user."""
        ...

    def add_listener(self, listener: MembershipListener) -> None:
        """Register for the transitions described in the module docstring."""
        ...


@runtime_checkable
class BatchMembershipSource(MembershipSource, Protocol):
    """A :class:`MembershipSource` that answers for many users at once
    (both sources of this package do; a host's may)."""

    def tracked_among(self, remote_user_ids: Collection[str]) -> "Deferred[frozenset[str]]":
        """Those of ``remote_user_ids`` that share a room with a local user."""
        ...


def tracked_among(
    membership: MembershipSource, remote_user_ids: Collection[str]
) -> "Deferred[frozenset[str]]":
    """Those of ``remote_user_ids`` that are tracked: in one call when the
    source has ``tracked_among``, else asking :meth:`~MembershipSource.is_tracked`
    of each."""
    if isinstance(membership, BatchMembershipSource):
        return membership.tracked_among(remote_user_ids)
    users = sorted(set(remote_user_ids))
    answers = gatherResults([membership.is_tracked(u) for u in users], consumeErrors=True)
    return answers.addCallback(
        lambda tracked: frozenset(u for u, yes in zip(users, tracked) if yes)
    )


class InMemoryMembership:
    """A :class:`MembershipSource` over room memberships kept in memory.

    :param own_server_name: our server name: users on it are local, and it is
        never returned as a destination.
    """

    log = Logger()

    def __init__(self, own_server_name: str) -> None:
        self._own = own_server_name
        self._rooms: dict[str, set[str]] = {}
        self._listeners: list[MembershipListener] = []

    def _is_local(self, user_id: str) -> bool:
        return server_of(user_id) == self._own

    def _servers_for_local(self, user_id: str) -> frozenset[str]:
        servers: set[str] = set()
        for members in self._rooms.values():
            if user_id in members:
                servers.update(server_of(m) for m in members)
        return frozenset(servers - {self._own, ""})

    def _remote_tracked(self, user_id: str) -> bool:
        return any(
            user_id in members and any(self._is_local(m) for m in members)
            for members in self._rooms.values()
        )

    def join(self, room_id: str, user_id: str) -> None:
        """``user_id`` (local or remote) is now joined to ``room_id``."""
        members = self._rooms.get(room_id, set())
        concerned = join_concerns(self._own, user_id, members)
        before = {u: self._servers_for_local(u) for u in concerned}
        newly = servers_newly_sharing_on_join(self._own, user_id, frozenset(members), before)
        self._rooms.setdefault(room_id, set()).add(user_id)
        for local_user, servers in sorted(newly.items()):
            self._notify(lambda l: l.servers_newly_sharing(local_user, servers))

    def leave(self, room_id: str, user_id: str) -> None:
        """``user_id`` left ``room_id`` (a no-op if it was not joined)."""
        members = self._rooms.get(room_id)
        if members is None or user_id not in members:
            return
        before = frozenset(members)
        members.discard(user_id)
        if not members:
            del self._rooms[room_id]
        concerned = leave_concerns(self._own, user_id, before)
        after = {remote: self._remote_tracked(remote) for remote in concerned}
        for remote in untracked_on_leave(self._own, user_id, before, after):
            self._notify(lambda l: l.remote_user_untracked(remote))

    def servers_sharing_room(self, user_id: str) -> "Deferred[frozenset[str]]":
        return succeed(self._servers_for_local(user_id))

    def is_tracked(self, remote_user_id: str) -> "Deferred[bool]":
        return succeed(self._remote_tracked(remote_user_id))

    def tracked_among(self, remote_user_ids: Collection[str]) -> "Deferred[frozenset[str]]":
        return succeed(frozenset(u for u in remote_user_ids if self._remote_tracked(u)))

    def add_listener(self, listener: MembershipListener) -> None:
        self._listeners.append(listener)

    def _notify(self, call: Callable[[MembershipListener], object]) -> None:
        for listener in list(self._listeners):
            try:
                call(listener)
            except Exception:
                self.log.failure("membership listener failed")
