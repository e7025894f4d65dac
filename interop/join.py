"""Joining a user of ours to a Synapse room over federation (room version
10): ``make_join``, fill the template, content hash, sign with our server's
key, event id from the reference hash, ``send_join`` v2.

This is test-harness code: the plugin is not a room server.  The algorithms
are the spec's (server-server API, "Signing events", "Calculating the
reference hash", and the client-server API's redaction rules for room
versions 1 to 10, with the v8 additions).
"""

from __future__ import annotations

import copy
import hashlib
from typing import Any, Optional
from urllib.parse import quote

from canonicaljson import encode_canonical_json
from signedjson.sign import sign_json
from signedjson.types import SigningKey
from unpaddedbase64 import encode_base64

from interop.common import HarnessError
from interop.federation import signed_request

__all__ = [
    "JoinResult",
    "content_hash",
    "join_room",
    "redact_v10",
    "reference_event_id",
    "sign_event",
]

ROOM_VERSION = "10"

#: top-level keys a redaction keeps (room versions 1 to 10)
_KEPT_KEYS = frozenset({
    "event_id", "type", "room_id", "sender", "state_key", "content", "hashes", "signatures",
    "depth", "prev_events", "prev_state", "auth_events", "origin", "origin_server_ts",
    "membership",
})
#: content keys a redaction keeps, by event type (room version 10)
_KEPT_CONTENT = {
    "m.room.member": ("membership", "join_authorised_via_users_server"),
    "m.room.create": ("creator",),
    "m.room.join_rules": ("join_rule", "allow"),
    "m.room.power_levels": (
        "ban", "events", "events_default", "kick", "redact", "state_default", "users",
        "users_default",
    ),
    "m.room.history_visibility": ("history_visibility",),
}


def redact_v10(event: dict[str, Any]) -> dict[str, Any]:
    """The event as the redaction algorithm of room version 10 leaves it."""
    redacted = {k: copy.deepcopy(v) for k, v in event.items() if k in _KEPT_KEYS}
    content = event.get("content", {})
    kept = _KEPT_CONTENT.get(str(event.get("type")), ())
    redacted["content"] = {k: copy.deepcopy(content[k]) for k in kept if k in content}
    return redacted


def content_hash(event: dict[str, Any]) -> str:
    """``hashes.sha256``: SHA-256 of the canonical event without
    ``unsigned``, ``signatures`` and ``hashes``, unpadded base64."""
    stripped = {k: v for k, v in event.items() if k not in ("unsigned", "signatures", "hashes")}
    return str(encode_base64(hashlib.sha256(encode_canonical_json(stripped)).digest()))


def reference_event_id(event: dict[str, Any]) -> str:
    """The event id of room versions 4 and later: ``$`` and the URL-safe
    unpadded base64 of the reference hash (SHA-256 of the redacted event
    without ``signatures``, ``unsigned`` and ``age_ts``)."""
    redacted = redact_v10(event)
    for key in ("signatures", "unsigned", "age_ts"):
        redacted.pop(key, None)
    digest = hashlib.sha256(encode_canonical_json(redacted)).digest()
    return "$" + str(encode_base64(digest, urlsafe=True))


def sign_event(event: dict[str, Any], origin: str, signing_key: SigningKey) -> dict[str, Any]:
    """``event`` with its content hash and ``origin``'s signature (over the
    redacted event) added."""
    signed = {k: v for k, v in event.items() if k not in ("hashes", "signatures", "unsigned")}
    signed["hashes"] = {"sha256": content_hash(signed)}
    signatures = sign_json(redact_v10(signed), origin, signing_key)["signatures"]
    signed["signatures"] = signatures
    return signed


class JoinResult:
    """What ``send_join`` answered, and the join event as sent."""

    def __init__(self, event_id: str, event: dict[str, Any], answer: dict[str, Any]) -> None:
        self.event_id = event_id
        self.event = event
        self.answer = answer

    @property
    def state_member_ids(self) -> list[str]:
        """The users joined in the room's state as ``send_join`` gave it."""
        return sorted(
            str(e.get("state_key")) for e in self.answer.get("state", [])
            if e.get("type") == "m.room.member"
            and e.get("content", {}).get("membership") == "join"
        )


def join_room(
    synapse: str,
    room_id: str,
    user_id: str,
    origin: str,
    signing_key: SigningKey,
    destination: Optional[str] = None,
    timeout: float = 60,
) -> JoinResult:
    """Join ``user_id`` (of server ``origin``, whose key signs) to ``room_id``
    on ``synapse`` (``host:port``, also its server name unless
    ``destination`` is given).

    :raise HarnessError: if either step is refused or the room is not of
        version 10.
    """
    dest = destination or synapse
    room, user = quote(room_id, safe=""), quote(user_id, safe="")
    status, answer = signed_request(
        "GET", synapse, f"/_matrix/federation/v1/make_join/{room}/{user}?ver={ROOM_VERSION}",
        origin, dest, signing_key, timeout=timeout,
    )
    if status != 200 or not isinstance(answer, dict):
        raise HarnessError(f"make_join {room_id} for {user_id}: {status} {answer}")
    version = answer.get("room_version", "1")
    if version != ROOM_VERSION:
        raise HarnessError(f"room {room_id} is of version {version}, not {ROOM_VERSION}")
    event = sign_event(dict(answer["event"]), origin, signing_key)
    event_id = reference_event_id(event)
    status, joined = signed_request(
        "PUT", synapse, f"/_matrix/federation/v2/send_join/{room}/{quote(event_id, safe='')}",
        origin, dest, signing_key, body=event, timeout=timeout,
    )
    if status != 200 or not isinstance(joined, dict):
        raise HarnessError(f"send_join {event_id} to {room_id}: {status} {joined}")
    return JoinResult(event_id, event, joined)
