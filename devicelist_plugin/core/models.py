"""Frozen models of the device-list protocol's wire objects.

Each model keeps the validated fields a caller needs and, where the object is
signed or must be re-served byte-for-byte in meaning (device keys,
cross-signing keys), the ``raw`` JSON object exactly as received, so unknown
fields and signatures survive a round trip.  The parsers live in
:mod:`devicelist_plugin.core.parse`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

JsonDict = dict[str, Any]


def copy_json(value: Any) -> Any:
    """A deep copy of a JSON value (dicts, lists, strings, numbers, booleans,
    None), several times faster than :func:`copy.deepcopy`, which it falls
    back to for anything else."""
    if isinstance(value, dict):
        return {k: copy_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [copy_json(v) for v in value]
    if value is None or isinstance(value, (str, int, float)):
        return value
    return copy.deepcopy(value)


EDU_DEVICE_LIST_UPDATE = "m.device_list_update"
EDU_SIGNING_KEY_UPDATE = "m.signing_key_update"
# Synapse sends the cross-signing EDU under both names.
EDU_SIGNING_KEY_UPDATE_UNSTABLE = "org.matrix.signing_key_update"

USAGE_MASTER = "master"
USAGE_SELF_SIGNING = "self_signing"
USAGE_USER_SIGNING = "user_signing"


@dataclass(frozen=True)
class DeviceKeys:
    """A device's identity keys (client-server ``DeviceKeys``)."""

    user_id: str
    device_id: str
    algorithms: tuple[str, ...]
    # "<algorithm>:<device_id>" -> unpadded base64 key
    keys: Mapping[str, str]
    # server or user id -> key id -> signature
    signatures: Mapping[str, Mapping[str, str]]
    raw: JsonDict = field(compare=False, repr=False)


@dataclass(frozen=True)
class CrossSigningKey:
    """A cross-signing key (master, self-signing or user-signing)."""

    user_id: str
    usage: tuple[str, ...]
    # exactly one entry: "ed25519:<public key>" -> public key
    keys: Mapping[str, str]
    signatures: Mapping[str, Mapping[str, str]]
    raw: JsonDict = field(compare=False, repr=False)

    @property
    def key_id(self) -> str:
        return next(iter(self.keys))

    @property
    def public_key(self) -> str:
        return next(iter(self.keys.values()))


@dataclass(frozen=True)
class DeviceListUpdate:
    """The content of one ``m.device_list_update`` EDU."""

    user_id: str
    device_id: str
    stream_id: int
    # every earlier stream id not yet referenced; () when missing or empty
    prev_ids: tuple[int, ...] = ()
    deleted: bool = False
    display_name: Optional[str] = None
    keys: Optional[DeviceKeys] = None


@dataclass(frozen=True)
class SigningKeyUpdate:
    """The content of one ``m.signing_key_update`` EDU."""

    user_id: str
    master_key: Optional[CrossSigningKey] = None
    self_signing_key: Optional[CrossSigningKey] = None


@dataclass(frozen=True)
class RemoteDevice:
    """One entry of a ``/user/devices`` answer (or of a remote user's cache)."""

    device_id: str
    keys: Optional[DeviceKeys] = None
    display_name: Optional[str] = None


@dataclass(frozen=True)
class ParseProblem:
    """A part of an otherwise usable object that was skipped, and why."""

    path: str
    message: str


@dataclass(frozen=True)
class UserDevicesResponse:
    """A ``GET /_matrix/federation/v1/user/devices/{userId}`` answer."""

    user_id: str
    stream_id: int
    devices: tuple[RemoteDevice, ...]
    master_key: Optional[CrossSigningKey] = None
    self_signing_key: Optional[CrossSigningKey] = None
    # malformed devices that were left out of ``devices``
    skipped: tuple[ParseProblem, ...] = ()
