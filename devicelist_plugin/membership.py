"""Which servers share a room with a local user: where its device-list
changes must go.

The plugin does not track rooms itself; the host tells it through a
:class:`MembershipSource`.  :class:`InMemoryMembership` is the simplest one:
for tests, and for a host that has no rooms yet and declares the servers by
hand.
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet.defer import Deferred, succeed


class MembershipSource(Protocol):
    """Where a local user's device-list updates must be sent."""

    def servers_sharing_room(self, user_id: str) -> "Deferred[frozenset[str]]":
        """The server names that share at least one room with the local user
        ``user_id``, never including our own server name."""
        ...


class InMemoryMembership:
    """A :class:`MembershipSource` kept in memory: ``join`` and ``leave``
    declare that ``server_name`` does or no longer does share a room with
    ``user_id``.

    :param own_server_name: our own server name, which is never returned
        even if joined.
    """

    def __init__(self, own_server_name: str | None = None) -> None:
        self._own_server_name = own_server_name
        self._servers: dict[str, set[str]] = {}

    def join(self, user_id: str, server_name: str) -> None:
        """``server_name`` now shares a room with ``user_id``."""
        self._servers.setdefault(user_id, set()).add(server_name)

    def leave(self, user_id: str, server_name: str) -> None:
        """``server_name`` no longer shares any room with ``user_id``."""
        servers = self._servers.get(user_id)
        if servers is not None:
            servers.discard(server_name)
            if not servers:
                del self._servers[user_id]

    def servers_sharing_room(self, user_id: str) -> "Deferred[frozenset[str]]":
        servers = frozenset(self._servers.get(user_id, ()))
        return succeed(servers - {self._own_server_name} if self._own_server_name else servers)
