"""The membership transitions device lists care about, as pure functions.

Two transitions need work (see :mod:`devicelist_plugin.membership`):

* a join that makes servers newly share a room with a local user: they must
  be sent the user's current devices (Synapse #11374);
* a leave after which a remote user shares no room with any local user: its
  cached list is dropped (Synapse #13651).

Both are decided here from one room's members before the change and a few
facts about the other rooms, which the caller looks up (in memory, or with
SQL inside the changing transaction): :func:`join_concerns` /
:func:`servers_newly_sharing_on_join` and :func:`leave_concerns` /
:func:`untracked_on_leave`.  Every membership source (the in-memory one, the
store-backed one of the standalone server) computes its transitions with
them, so they cannot drift apart.

Pure: no twisted, no I/O.  A malformed user id counts as a member of no
server (it is never local, and never a destination).
"""

from __future__ import annotations

from typing import Collection, Mapping

from devicelist_plugin.core.parse import ParseError, server_name_of

__all__ = [
    "join_concerns",
    "leave_concerns",
    "server_of",
    "servers_newly_sharing_on_join",
    "untracked_on_leave",
]


def server_of(user_id: str) -> str:
    """The server name of ``user_id``; ``""`` for a malformed user id."""
    try:
        return server_name_of(user_id)
    except ParseError:
        return ""


def _is_local(own_server_name: str, user_id: str) -> bool:
    return server_of(user_id) == own_server_name


def join_concerns(
    own_server_name: str, user_id: str, members_before: Collection[str]
) -> frozenset[str]:
    """The local users whose sharing servers may grow when ``user_id``
    joins a room whose members were ``members_before``.

    The joiner itself when it is local; every local member when it is
    remote; nobody when it was already a member.
    """
    if user_id in members_before:
        return frozenset()
    if _is_local(own_server_name, user_id):
        return frozenset({user_id})
    if not server_of(user_id):
        return frozenset()
    return frozenset(m for m in members_before if _is_local(own_server_name, m))


def servers_newly_sharing_on_join(
    own_server_name: str,
    user_id: str,
    members_before: Collection[str],
    sharing_before: Mapping[str, Collection[str]],
) -> dict[str, frozenset[str]]:
    """The servers that newly share a room with each local user when
    ``user_id`` joins a room whose members were ``members_before``.

    ``sharing_before[local_user]``, for each user of :func:`join_concerns`:
    the servers that shared a room with that user before the join (at least
    those of this room's members and of the joiner; a missing key means
    none).  Local users with nothing new are absent from the result.
    """
    concerned = join_concerns(own_server_name, user_id, members_before)
    if not concerned:
        return {}
    result: dict[str, frozenset[str]] = {}
    if _is_local(own_server_name, user_id):
        servers = {server_of(m) for m in members_before} - {own_server_name, ""}
        new = frozenset(servers - set(sharing_before.get(user_id, ())))
        if new:
            result[user_id] = new
        return result
    joiner = server_of(user_id)
    for local_user in sorted(concerned):
        if joiner not in sharing_before.get(local_user, ()):
            result[local_user] = frozenset({joiner})
    return result


def leave_concerns(
    own_server_name: str, user_id: str, members_before: Collection[str]
) -> frozenset[str]:
    """The remote users who may stop being tracked when ``user_id`` leaves a
    room whose members were ``members_before``.

    A room tracks its remote members while it has a local member.  A remote
    user leaving concerns itself; the last local member leaving concerns
    every remote member; anything else concerns nobody.
    """
    if user_id not in members_before:
        return frozenset()
    locals_before = {m for m in members_before if _is_local(own_server_name, m)}
    if not locals_before:
        return frozenset()
    if _is_local(own_server_name, user_id):
        if locals_before - {user_id}:
            return frozenset()
        return frozenset(m for m in members_before if not _is_local(own_server_name, m))
    return frozenset({user_id})


def untracked_on_leave(
    own_server_name: str,
    user_id: str,
    members_before: Collection[str],
    tracked_after: Mapping[str, bool],
) -> list[str]:
    """The remote users no longer tracked once ``user_id`` left, sorted.

    ``tracked_after[remote_user]``, for each user of :func:`leave_concerns`:
    whether, after the leave, the user still shares a room with a local user
    (a missing key means no).
    """
    return sorted(
        remote
        for remote in leave_concerns(own_server_name, user_id, members_before)
        if not tracked_after.get(remote, False)
    )
