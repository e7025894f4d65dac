"""JSON forms of the device-list protocol's wire objects.

The inverse of :mod:`devicelist_plugin.core.parse`: for every valid model
``x``, ``parse(serialize(x)) == x``.  Signed objects (device keys,
cross-signing keys) are emitted as the ``raw`` object they were parsed from,
so unknown fields and signatures are served as received.  Every function
returns a fresh object the caller may modify.

Pure: no twisted, no I/O, no clock.
"""

from __future__ import annotations

from devicelist_plugin.core.models import (
    CrossSigningKey,
    DeviceKeys,
    DeviceListUpdate,
    JsonDict,
    RemoteDevice,
    SigningKeyUpdate,
    UserDevicesResponse,
    copy_json,
)

__all__ = [
    "cross_signing_key_to_json",
    "device_keys_to_json",
    "device_list_update_to_json",
    "remote_device_to_json",
    "signing_key_update_to_json",
    "user_devices_response_to_json",
]


def device_keys_to_json(keys: DeviceKeys) -> JsonDict:
    """The device keys object as received (a deep copy of ``raw``)."""
    return copy_json(keys.raw)


def cross_signing_key_to_json(key: CrossSigningKey) -> JsonDict:
    """The cross-signing key object as received (a deep copy of ``raw``)."""
    return copy_json(key.raw)


def device_list_update_to_json(u: DeviceListUpdate) -> JsonDict:
    """The ``content`` of an ``m.device_list_update`` EDU.

    ``prev_id`` is always present (``[]`` for the first EDU of a sequence);
    ``deleted`` only when true; ``device_display_name`` and ``keys`` only
    when known.
    """
    content: JsonDict = {
        "user_id": u.user_id,
        "device_id": u.device_id,
        "stream_id": u.stream_id,
        "prev_id": list(u.prev_ids),
    }
    if u.deleted:
        content["deleted"] = True
    if u.display_name is not None:
        content["device_display_name"] = u.display_name
    if u.keys is not None:
        content["keys"] = device_keys_to_json(u.keys)
    return content


def signing_key_update_to_json(u: SigningKeyUpdate) -> JsonDict:
    """The ``content`` of an ``m.signing_key_update`` EDU; absent keys are
    omitted."""
    content: JsonDict = {"user_id": u.user_id}
    if u.master_key is not None:
        content["master_key"] = cross_signing_key_to_json(u.master_key)
    if u.self_signing_key is not None:
        content["self_signing_key"] = cross_signing_key_to_json(u.self_signing_key)
    return content


def remote_device_to_json(device: RemoteDevice) -> JsonDict:
    """One entry of a ``/user/devices`` answer's ``devices`` list.

    ``keys`` and ``device_display_name`` are omitted when unknown.  (The
    seed schema calls ``keys`` required, and Synapse lists only devices that
    have keys: a server that wants to match it leaves keyless devices out.)
    """
    entry: JsonDict = {"device_id": device.device_id}
    if device.keys is not None:
        entry["keys"] = device_keys_to_json(device.keys)
    if device.display_name is not None:
        entry["device_display_name"] = device.display_name
    return entry


def user_devices_response_to_json(r: UserDevicesResponse) -> JsonDict:
    """A ``GET /user/devices/{userId}`` answer body.

    ``master_key`` / ``self_signing_key`` are omitted when absent (never
    ``null``); ``skipped`` is a parse diagnostic and is not serialised.
    """
    body: JsonDict = {
        "user_id": r.user_id,
        "stream_id": r.stream_id,
        "devices": [remote_device_to_json(d) for d in r.devices],
    }
    if r.master_key is not None:
        body["master_key"] = cross_signing_key_to_json(r.master_key)
    if r.self_signing_key is not None:
        body["self_signing_key"] = cross_signing_key_to_json(r.self_signing_key)
    return body
