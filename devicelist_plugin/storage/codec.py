"""JSON text in the database <-> Python objects and the core's models.

JSON is stored compact with sorted keys, so two uploads of the same object
have the same text and can be compared as strings.  With the uploads
validated (no floats, integers in range) that text is canonical JSON, and
the ``/user/devices`` encoder (``local.serving``) splices stored device keys
into its answers as they are: keep :func:`dumps` canonical.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from devicelist_plugin.core.models import CrossSigningKey, DeviceKeys, JsonDict


def dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def loads(text: str) -> Any:
    return json.loads(text)


def _signatures(raw: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    signatures = raw.get("signatures") or {}
    return {
        str(entity): dict(sigs) for entity, sigs in signatures.items() if isinstance(sigs, dict)
    }


def device_keys_from_json(raw: JsonDict, user_id: str, device_id: str) -> DeviceKeys:
    """Rebuild a stored (already validated) DeviceKeys object."""
    return DeviceKeys(
        user_id=str(raw.get("user_id", user_id)),
        device_id=str(raw.get("device_id", device_id)),
        algorithms=tuple(raw.get("algorithms") or ()),
        keys=dict(raw.get("keys") or {}),
        signatures=_signatures(raw),
        raw=raw,
    )


def cross_signing_key_from_json(raw: JsonDict, user_id: str) -> CrossSigningKey:
    """Rebuild a stored (already validated) cross-signing key."""
    return CrossSigningKey(
        user_id=str(raw.get("user_id", user_id)),
        usage=tuple(raw.get("usage") or ()),
        keys=dict(raw.get("keys") or {}),
        signatures=_signatures(raw),
        raw=raw,
    )
