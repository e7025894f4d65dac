"""Shape checks of key query and claim request bodies (federation
``/user/keys/query`` and ``/user/keys/claim``, and their client-server
twins), before any user id is looked at.

Errors are :class:`~devicelist_plugin.federation.errors.MatrixError`: 400
``M_BAD_JSON`` naming the field for a wrong shape, 400 ``M_INVALID_PARAM``
for a malformed user id.
"""

from __future__ import annotations

import json

from devicelist_plugin.core.parse import MAX_DEVICE_ID_LENGTH, ParseError, split_user_id
from devicelist_plugin.federation.errors import M_BAD_JSON, M_INVALID_PARAM, MatrixError
from devicelist_plugin.core.models import JsonDict

__all__ = ["parse_device_keys_request", "parse_one_time_keys_request"]


def _path(parent: str, name: str) -> str:
    return f"{parent}[{json.dumps(name)}]"


def _bad(field: str, message: str) -> MatrixError:
    return MatrixError(400, M_BAD_JSON, f"{field}: {message}")


def _user(user_id: str, field: str) -> None:
    try:
        split_user_id(user_id, field)
    except ParseError as e:
        raise MatrixError(400, M_INVALID_PARAM, str(e)) from None


def _name(value: object, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise _bad(field, "expected a non-empty string")
    if len(value) > MAX_DEVICE_ID_LENGTH:
        raise _bad(field, f"longer than {MAX_DEVICE_ID_LENGTH} characters")
    return value


def parse_device_keys_request(body: JsonDict) -> dict[str, list[str]]:
    """``{"device_keys": {user_id: [device_id, ...]}}`` (an empty list, or
    ``null``, asks for every device)."""
    requested = body.get("device_keys")
    if not isinstance(requested, dict):
        raise _bad("device_keys", "required, an object of user id to list of device ids")
    result: dict[str, list[str]] = {}
    for user_id, device_ids in requested.items():
        field = _path("device_keys", user_id)
        _user(user_id, field)
        if device_ids is None:
            device_ids = []
        if not isinstance(device_ids, list):
            raise _bad(field, "expected a list of device ids")
        result[user_id] = [_name(d, f"{field}[{i}]") for i, d in enumerate(device_ids)]
    return result


def parse_one_time_keys_request(body: JsonDict) -> dict[str, dict[str, str]]:
    """``{"one_time_keys": {user_id: {device_id: algorithm}}}``."""
    requested = body.get("one_time_keys")
    if not isinstance(requested, dict):
        raise _bad("one_time_keys", "required, an object of user id to device id to algorithm")
    result: dict[str, dict[str, str]] = {}
    for user_id, devices in requested.items():
        field = _path("one_time_keys", user_id)
        _user(user_id, field)
        if not isinstance(devices, dict):
            raise _bad(field, "expected an object of device id to algorithm")
        result[user_id] = {}
        for device_id, algorithm in devices.items():
            device_field = _path(field, device_id)
            _name(device_id, device_field)
            result[user_id][device_id] = _name(algorithm, device_field)
    return result
