"""Declaring shared rooms in tests."""

from __future__ import annotations

from devicelist_plugin.membership import InMemoryMembership


def room_for(user_id: str, server_name: str) -> str:
    return f"!{user_id.lstrip('@').replace(':', '_')}-{server_name}:rooms.test"


def share_room(membership: InMemoryMembership, user_id: str, server_name: str) -> None:
    """Put ``user_id`` and a user of ``server_name`` in a room of their own."""
    room = room_for(user_id, server_name)
    membership.join(room, user_id)
    membership.join(room, f"@peer:{server_name}")


def unshare_room(membership: InMemoryMembership, user_id: str, server_name: str) -> None:
    """Undo :func:`share_room`."""
    room = room_for(user_id, server_name)
    membership.leave(room, f"@peer:{server_name}")
    membership.leave(room, user_id)
