"""The JSON other servers (and the host's clients) are served from a
:class:`~devicelist_plugin.storage.types.LocalUserKeys` read.

Stored objects are served as uploaded, with two server-side changes: the
cross-signing signatures stored separately (``/keys/signatures/upload``) are
merged into ``signatures``, and a client-supplied ``unsigned`` is replaced
by the server's own (``unsigned.device_display_name`` in key queries only).

Linear in the number of devices; no I/O.  :func:`encode_user_devices_body`
is the fast path for big users: it splices the stored canonical JSON text of
each device's keys into the answer and only decodes (and re-encodes) the
keys of devices that have stored signatures to merge.  It is a pure function
of immutable data, safe to run in a worker thread.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional

from devicelist_plugin.core.models import USAGE_MASTER, USAGE_SELF_SIGNING, JsonDict
from devicelist_plugin.storage.types import CrossSigningSignature, KeyedDevice, LocalUserKeys

__all__ = [
    "EncodedUserKeys",
    "cross_signing_key_json",
    "device_keys_json",
    "encode_keys_query_body",
    "encode_user_devices_body",
    "encode_user_keys",
    "public_key_of",
    "signatures_by_target",
    "user_devices_body",
    "user_device_keys",
    "with_signatures",
]


def signatures_by_target(
    signatures: Iterable[CrossSigningSignature],
) -> dict[str, list[CrossSigningSignature]]:
    """Signatures grouped by ``target_id`` (a device id or a public key)."""
    grouped: dict[str, list[CrossSigningSignature]] = {}
    for signature in signatures:
        grouped.setdefault(signature.target_id, []).append(signature)
    return grouped


def with_signatures(
    obj: Mapping[str, Any], signatures: Iterable[CrossSigningSignature]
) -> JsonDict:
    """A copy of a signed object without ``unsigned``, with ``signatures``
    merged in (a stored signature replaces an uploaded one of the same key).

    An object uploaded without ``signatures`` (a master key may be) gets the
    member only if there is a stored signature to put in it.
    """
    out = {k: v for k, v in obj.items() if k != "unsigned"}
    merged: dict[str, dict[str, Any]] = {}
    existing = obj.get("signatures")
    if isinstance(existing, dict):
        for signer, by_key in existing.items():
            if isinstance(by_key, dict):
                merged[signer] = dict(by_key)
    for s in signatures:
        merged.setdefault(s.signer_user_id, {})[s.signer_key_id] = s.signature
    if merged or "signatures" in obj:
        out["signatures"] = merged
    return out


def public_key_of(key_json: Mapping[str, Any]) -> Optional[str]:
    """The public key of a stored cross-signing key (its one ``keys`` value)."""
    keys = key_json.get("keys")
    if isinstance(keys, dict) and len(keys) == 1:
        (value,) = keys.values()
        if isinstance(value, str):
            return value
    return None


def device_keys_json(
    device: KeyedDevice,
    signatures: Iterable[CrossSigningSignature],
    *,
    display_name_in_unsigned: Optional[bool] = None,
) -> JsonDict:
    """A device's ``DeviceKeys`` as served.

    ``display_name_in_unsigned``: ``None`` for no ``unsigned`` at all (the
    ``/user/devices`` and EDU form); ``True`` to add
    ``unsigned.device_display_name`` when the device has a name, ``False``
    to add an empty ``unsigned`` (a key query with names withheld).
    """
    keys = with_signatures(device.keys_json, signatures)
    if display_name_in_unsigned is not None:
        unsigned: JsonDict = {}
        if display_name_in_unsigned and device.display_name is not None:
            unsigned["device_display_name"] = device.display_name
        keys["unsigned"] = unsigned
    return keys


def cross_signing_key_json(user_keys: LocalUserKeys, usage: str) -> Optional[JsonDict]:
    """A cross-signing key with the stored signatures of it merged in, or None."""
    raw = user_keys.cross_signing_keys.get(usage)
    if raw is None:
        return None
    public_key = public_key_of(raw)
    signatures = [s for s in user_keys.signatures if s.target_id == public_key]
    return with_signatures(raw, signatures)


def user_device_keys(
    user_keys: LocalUserKeys, *, display_name_in_unsigned: bool
) -> dict[str, JsonDict]:
    """A user's entry of a key query answer's ``device_keys``: every device
    read, by device id (``display_name_in_unsigned`` as in :func:`device_keys_json`)."""
    by_target = signatures_by_target(user_keys.signatures)
    return {
        device.device_id: device_keys_json(
            device,
            by_target.get(device.device_id, ()),
            display_name_in_unsigned=display_name_in_unsigned,
        )
        for device in user_keys.devices
    }


def user_devices_body(user_keys: LocalUserKeys, *, include_display_names: bool) -> JsonDict:
    """The ``GET /_matrix/federation/v1/user/devices/{userId}`` answer.

    Every device with keys (as Synapse; the spec makes ``keys`` required),
    ``device_display_name`` only when ``include_display_names`` and the
    device has one, ``master_key`` and ``self_signing_key`` only when set.
    """
    by_target = signatures_by_target(user_keys.signatures)
    devices = []
    for device in user_keys.devices:
        entry: JsonDict = {
            "device_id": device.device_id,
            "keys": device_keys_json(device, by_target.get(device.device_id, ())),
        }
        if include_display_names and device.display_name is not None:
            entry["device_display_name"] = device.display_name
        devices.append(entry)
    body: JsonDict = {
        "user_id": user_keys.user_id,
        "stream_id": user_keys.stream_id,
        "devices": devices,
    }
    for name, usage in (("master_key", USAGE_MASTER), ("self_signing_key", USAGE_SELF_SIGNING)):
        key = cross_signing_key_json(user_keys, usage)
        if key is not None:
            body[name] = key
    return body


# canonicaljson's encoder settings (and the store's, see storage.codec)
_CANONICAL = json.JSONEncoder(
    ensure_ascii=False, allow_nan=False, separators=(",", ":"), sort_keys=True
)
_encode = _CANONICAL.encode


def encode_user_devices_body(user_keys: LocalUserKeys, *, include_display_names: bool) -> bytes:
    """:func:`user_devices_body` encoded as canonical JSON, fast.

    A device's stored keys text (canonical JSON already) is used as is
    unless signatures must be merged into it or it carries a client's
    ``unsigned``; members are written in canonical (sorted) order.
    """
    by_target = signatures_by_target(user_keys.signatures)
    entries = []
    for device in user_keys.devices:
        signatures = by_target.get(device.device_id)
        keys_text = device.keys_text
        if signatures or '"unsigned":' in keys_text:
            keys_text = _encode(device_keys_json(device, signatures or ()))
        name = (
            f'"device_display_name":{_encode(device.display_name)},'
            if include_display_names and device.display_name is not None
            else ""
        )
        entries.append(f'{{{name}"device_id":{_encode(device.device_id)},"keys":{keys_text}}}')
    parts = ['{"devices":[', ",".join(entries), "]"]
    for name, usage in (("master_key", USAGE_MASTER), ("self_signing_key", USAGE_SELF_SIGNING)):
        key = cross_signing_key_json(user_keys, usage)
        if key is not None:
            parts.append(f',"{name}":{_encode(key)}')
    parts.append(
        f',"stream_id":{user_keys.stream_id},"user_id":{_encode(user_keys.user_id)}}}'
    )
    return "".join(parts).encode("utf-8")


@dataclass(frozen=True)
class EncodedUserKeys:
    """One user's part of a federation key query answer, encoded: the
    ``device_keys`` entry and the master and self-signing keys (``None``
    when not set), each canonical JSON text.

    A pure function of the user's state at ``stream_id`` (every change
    that shows here moves the stream), so it can be kept and served again
    while the user's stream id stays ``stream_id``.
    """

    stream_id: int
    device_keys: str
    master_key: Optional[str]
    self_signing_key: Optional[str]

    @property
    def size(self) -> int:
        """Roughly the memory it holds, in characters."""
        return (
            len(self.device_keys)
            + len(self.master_key or "")
            + len(self.self_signing_key or "")
        )


def encode_user_keys(user_keys: LocalUserKeys, *, include_display_names: bool) -> EncodedUserKeys:
    """The federation key query answer's part of a user who asked for every
    device: what :meth:`LocalDeviceHandler.query_keys` with
    ``over_federation`` gives, encoded (``unsigned`` carries the display
    name only when ``include_display_names``)."""

    def encoded(key: Optional[JsonDict]) -> Optional[str]:
        return None if key is None else _encode(key)

    return EncodedUserKeys(
        stream_id=user_keys.stream_id,
        device_keys=_encode(
            user_device_keys(user_keys, display_name_in_unsigned=include_display_names)
        ),
        master_key=encoded(cross_signing_key_json(user_keys, USAGE_MASTER)),
        self_signing_key=encoded(cross_signing_key_json(user_keys, USAGE_SELF_SIGNING)),
    )


def encode_keys_query_body(answers: Mapping[str, EncodedUserKeys]) -> bytes:
    """The canonical JSON of a federation key query answer made of users'
    encoded parts: ``device_keys`` of every user, ``master_keys`` and
    ``self_signing_keys`` of those that have them (users in canonical
    order)."""
    users = [(_encode(user_id), answers[user_id]) for user_id in sorted(answers)]
    device_keys = ",".join(f"{user}:{part.device_keys}" for user, part in users)
    masters = ",".join(
        f"{user}:{part.master_key}" for user, part in users if part.master_key is not None
    )
    self_signing = ",".join(
        f"{user}:{part.self_signing_key}"
        for user, part in users
        if part.self_signing_key is not None
    )
    return (
        f'{{"device_keys":{{{device_keys}}},"master_keys":{{{masters}}},'
        f'"self_signing_keys":{{{self_signing}}}}}'
    ).encode("utf-8")
