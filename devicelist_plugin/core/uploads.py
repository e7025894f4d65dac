"""Validation of what a local user uploads: device keys, one-time and
fallback keys, cross-signing keys and signatures (client-server API,
``/keys/upload``, ``/keys/device_signing/upload``,
``/keys/signatures/upload``).

Every function takes decoded JSON the caller has not checked and either
returns validated values or raises :class:`UploadError`, which names the
offending field by its path (``device_keys.keys["ed25519:OTHER"]``) and
carries the Matrix error code to answer with:

- ``M_BAD_JSON``: the shape is wrong (a required field is missing, a value
  has the wrong type, a float or an integer outside canonical JSON's range,
  a string with a lone surrogate, a malformed key name);
- ``M_INVALID_PARAM``: the shape is right but the content is not acceptable
  (another user's or device's id, a wrong ``usage``, a public key that is
  not an ed25519 key, a missing or invalid signature by the master key).

Signature uploads are different: as in Synapse, each signed object is judged
on its own and the bad ones are reported in ``failures`` (see
:func:`verify_signature_upload`); only a body of the wrong shape is an
:class:`UploadError`.

Signatures are verified with :mod:`signedjson`.  Pure: no twisted, no I/O,
no clock.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from signedjson.key import decode_verify_key_bytes
from signedjson.sign import SignatureVerifyException, verify_signed_json
from signedjson.types import VerifyKey
from unpaddedbase64 import decode_base64

from devicelist_plugin.core.models import (
    USAGE_MASTER,
    USAGE_SELF_SIGNING,
    USAGE_USER_SIGNING,
    CrossSigningKey,
    DeviceKeys,
    JsonDict,
)
from devicelist_plugin.core.parse import (
    MAX_JSON_INT,
    MIN_JSON_INT,
    ParseError,
    parse_cross_signing_key,
    parse_device_keys,
    split_user_id,
)

__all__ = [
    "CROSS_SIGNING_FIELDS",
    "M_BAD_JSON",
    "M_INVALID_PARAM",
    "M_INVALID_SIGNATURE",
    "M_NOT_FOUND",
    "MAX_KEY_ID_LENGTH",
    "OneTimeKey",
    "SignatureUploadContext",
    "SignatureUploadResult",
    "UploadError",
    "UploadedSignature",
    "parse_signature_upload",
    "strip_signed",
    "validate_cross_signing_upload",
    "validate_device_keys_upload",
    "validate_fallback_keys",
    "validate_one_time_keys",
    "signed_objects_needed",
    "verify_signature_upload",
]

M_BAD_JSON = "M_BAD_JSON"
M_INVALID_PARAM = "M_INVALID_PARAM"
M_INVALID_SIGNATURE = "M_INVALID_SIGNATURE"
M_NOT_FOUND = "M_NOT_FOUND"

# Key ids and algorithm names are short in practice ("signed_curve25519",
# "AAAAHQ"); anything near this is abuse.
MAX_KEY_ID_LENGTH = 255
# Deeper nesting than this in an uploaded key is abuse, not a key.
_MAX_DEPTH = 32
# An ed25519 public key is 32 bytes.
_ED25519_KEY_BYTES = 32

# /keys/device_signing/upload body field -> usage
CROSS_SIGNING_FIELDS: tuple[tuple[str, str], ...] = (
    ("master_key", USAGE_MASTER),
    ("self_signing_key", USAGE_SELF_SIGNING),
    ("user_signing_key", USAGE_USER_SIGNING),
)


class UploadError(ValueError):
    """An upload is refused; nothing of it may be stored.

    :ivar errcode: ``M_BAD_JSON`` or ``M_INVALID_PARAM``.
    :ivar field: the path of the offending field.
    :ivar message: what is wrong with it.
    """

    def __init__(self, errcode: str, field: str, message: str) -> None:
        super().__init__(errcode, field, message)
        self.errcode = errcode
        self.field = field
        self.message = message

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message

    def __repr__(self) -> str:
        return f"UploadError({self.errcode!r}, {self.field!r}, {self.message!r})"


def _bad_json(e: ParseError) -> UploadError:
    return UploadError(M_BAD_JSON, e.path, e.message)


# --------------------------------------------------------------------------
# paths and generic checks


def _member(path: str, name: str) -> str:
    """The path of member ``name`` of the object at ``path`` (as core.parse writes it)."""
    if name.isidentifier() and name.isascii():
        return f"{path}.{name}" if path else name
    return f"{path}[{json.dumps(name)}]"


def _entry(path: str, name: str) -> str:
    """The path of the entry ``name`` of a map keyed by data (key ids,
    device ids, user ids): always quoted, ``one_time_keys["AAA"]``."""
    return f"{path}[{json.dumps(name)}]"


def _check_json(value: object, path: str, depth: int = 0) -> None:
    """Only what canonical JSON can sign: objects with string names, lists,
    strings, booleans, null and integers within ±(2**53-1); no floats."""
    if depth > _MAX_DEPTH:
        raise UploadError(M_BAD_JSON, path, f"nested deeper than {_MAX_DEPTH} levels")
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, str):
        _check_text(value, path)
        return
    if isinstance(value, int):
        if not MIN_JSON_INT <= value <= MAX_JSON_INT:
            raise UploadError(
                M_BAD_JSON, path, "integer outside the canonical JSON range ±(2**53-1)"
            )
        return
    if isinstance(value, float):
        raise UploadError(M_BAD_JSON, path, "floating-point numbers cannot be signed")
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_json(item, f"{path}[{i}]", depth + 1)
        return
    if isinstance(value, dict):
        for name, item in value.items():
            if not isinstance(name, str):
                raise UploadError(M_BAD_JSON, path, f"member name {name!r} is not a string")
            _check_text(name, path)
            _check_json(item, _member(path, name), depth + 1)
        return
    raise UploadError(M_BAD_JSON, path, f"not a JSON value: {type(value).__name__}")


def _check_text(value: str, path: str) -> None:
    # JSON "\ud800" decodes to a lone surrogate, which has no UTF-8 form:
    # such a string could be stored but never served.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise UploadError(M_BAD_JSON, path, "string is not valid Unicode") from None


def _object(value: object, path: str) -> JsonDict:
    if not isinstance(value, dict):
        raise UploadError(M_BAD_JSON, path, "expected an object")
    return value


def strip_signed(obj: Mapping[str, Any]) -> JsonDict:
    """The signed content of an object: without ``signatures`` and ``unsigned``."""
    return {k: v for k, v in obj.items() if k not in ("signatures", "unsigned")}


def _ed25519_verify_key(public_key: str) -> Optional[VerifyKey]:
    """The verify key of an unpadded base64 ed25519 public key (its
    version is the public key itself), or None if it is not one."""
    try:
        raw = decode_base64(public_key)
        if len(raw) != _ED25519_KEY_BYTES:
            return None
        key: VerifyKey = decode_verify_key_bytes(f"ed25519:{public_key}", raw)
    except Exception:
        return None
    return key


def _verify(obj: Mapping[str, Any], signer: str, key: VerifyKey) -> bool:
    try:
        verify_signed_json(dict(obj), signer, key)
    except SignatureVerifyException:
        return False
    return True


# --------------------------------------------------------------------------
# device keys


def validate_device_keys_upload(
    obj: object, user_id: str, device_id: str, path: str = "device_keys"
) -> DeviceKeys:
    """Validate the ``DeviceKeys`` a device uploads for itself.

    ``user_id`` and ``device_id`` must be the uploader's; every name in
    ``keys`` must be ``<algorithm>:<device_id>``; ``algorithms``, ``keys``
    and ``signatures`` are required.  The device's own signature is not
    verified (as in Synapse: clients verify it; a server that refused keys
    because of it would only lose the device).
    """
    d = _object(obj, path)
    for name, expected in (("user_id", user_id), ("device_id", device_id)):
        value = d.get(name)
        if isinstance(value, str) and value != expected:
            raise UploadError(
                M_INVALID_PARAM,
                _member(path, name),
                f"must be the uploading device's {name.replace('_', ' ')} {expected!r},"
                f" not {value!r}",
            )
    keys = d.get("keys")
    if isinstance(keys, dict):
        for name in keys:
            if not isinstance(name, str):
                continue
            algorithm, colon, key_device = name.partition(":")
            if not colon or not algorithm:
                raise UploadError(
                    M_BAD_JSON,
                    _entry(_member(path, "keys"), name),
                    f"key name {name!r} is not '<algorithm>:<device_id>'",
                )
            if key_device != device_id:
                raise UploadError(
                    M_INVALID_PARAM,
                    _entry(_member(path, "keys"), name),
                    f"names device {key_device!r}, not the uploading device {device_id!r}",
                )
    _check_json(d, path)
    try:
        parsed = parse_device_keys(
            d, path, expected_user_id=user_id, expected_device_id=device_id
        )
    except ParseError as e:
        raise _bad_json(e) from None
    if not parsed.algorithms:
        raise UploadError(M_BAD_JSON, _member(path, "algorithms"), "must not be empty")
    return parsed


# --------------------------------------------------------------------------
# one-time and fallback keys


@dataclass(frozen=True)
class OneTimeKey:
    """A one-time or fallback key: ``<algorithm>:<key_id>`` -> ``key``."""

    algorithm: str
    key_id: str
    # a bare unpadded base64 string, or an object with ``key`` and ``signatures``
    key: Any = field(compare=False)


def _key_entry(name: object, value: object, path: str) -> OneTimeKey:
    if not isinstance(name, str):
        raise UploadError(M_BAD_JSON, path, f"member name {name!r} is not a string")
    entry_path = _entry(path, name)
    algorithm, colon, key_id = name.partition(":")
    if not colon or not algorithm or not key_id:
        raise UploadError(
            M_BAD_JSON, entry_path, f"key name {name!r} is not '<algorithm>:<key_id>'"
        )
    if len(algorithm) > MAX_KEY_ID_LENGTH or len(key_id) > MAX_KEY_ID_LENGTH:
        raise UploadError(M_BAD_JSON, entry_path, f"longer than {MAX_KEY_ID_LENGTH} characters")
    if isinstance(value, str):
        if not value:
            raise UploadError(M_BAD_JSON, entry_path, "must not be empty")
    elif isinstance(value, dict):
        _check_json(value, entry_path)
        key = value.get("key")
        if not isinstance(key, str) or not key:
            raise UploadError(
                M_BAD_JSON, _member(entry_path, "key"), "required, a non-empty string"
            )
        signatures = value.get("signatures")
        if signatures is not None and not (
            isinstance(signatures, dict)
            and all(isinstance(v, dict) for v in signatures.values())
        ):
            raise UploadError(
                M_BAD_JSON,
                _member(entry_path, "signatures"),
                "expected an object of objects",
            )
    else:
        raise UploadError(
            M_BAD_JSON, entry_path, "expected a key string or an object with 'key'"
        )
    return OneTimeKey(algorithm, key_id, copy.deepcopy(value))


def validate_one_time_keys(obj: object, path: str = "one_time_keys") -> tuple[OneTimeKey, ...]:
    """Validate ``{"<algorithm>:<key_id>": key}``; the order of the body is
    kept (it is the order the keys are claimed in)."""
    d = _object(obj, path)
    return tuple(_key_entry(name, value, path) for name, value in d.items())


def validate_fallback_keys(obj: object, path: str = "fallback_keys") -> tuple[OneTimeKey, ...]:
    """Validate ``{"<algorithm>:<key_id>": key}`` with at most one key per algorithm."""
    keys = validate_one_time_keys(obj, path)
    seen: dict[str, str] = {}
    for key in keys:
        name = f"{key.algorithm}:{key.key_id}"
        other = seen.setdefault(key.algorithm, name)
        if other != name:
            raise UploadError(
                M_INVALID_PARAM,
                _entry(path, name),
                f"a second fallback key for algorithm {key.algorithm!r} (also {other!r})",
            )
    return keys


# --------------------------------------------------------------------------
# cross-signing keys


def _cross_signing_key(
    obj: object, path: str, user_id: str, usage: str
) -> CrossSigningKey:
    d = _object(obj, path)
    claimed_user = d.get("user_id")
    if isinstance(claimed_user, str) and claimed_user != user_id:
        raise UploadError(
            M_INVALID_PARAM,
            _member(path, "user_id"),
            f"must be the uploading user {user_id!r}, not {claimed_user!r}",
        )
    usages = d.get("usage")
    if isinstance(usages, list) and all(isinstance(u, str) for u in usages):
        if usage not in usages:
            raise UploadError(
                M_INVALID_PARAM, _member(path, "usage"), f"must contain {usage!r}"
            )
    keys = d.get("keys")
    if isinstance(keys, dict) and len(keys) != 1:
        raise UploadError(
            M_INVALID_PARAM,
            _member(path, "keys"),
            f"must have exactly one entry, has {len(keys)}",
        )
    _check_json(d, path)
    try:
        key = parse_cross_signing_key(
            d, path, expected_user_id=user_id, expected_usage=usage
        )
    except ParseError as e:
        raise _bad_json(e) from None
    key_path = _entry(_member(path, "keys"), key.key_id)
    algorithm, _, public_key = key.key_id.partition(":")
    if algorithm != "ed25519":
        raise UploadError(M_INVALID_PARAM, key_path, f"unsupported algorithm {algorithm!r}")
    if key.public_key != public_key:
        raise UploadError(
            M_INVALID_PARAM, key_path, "the key name must be 'ed25519:' followed by the key"
        )
    if _ed25519_verify_key(public_key) is None:
        raise UploadError(
            M_INVALID_PARAM, key_path, "not an unpadded base64 ed25519 public key"
        )
    return key


def _signed_by_master(key: CrossSigningKey, master: CrossSigningKey, path: str) -> None:
    master_key_id = master.key_id
    signature_path = _entry(_entry(_member(path, "signatures"), key.user_id), master_key_id)
    if master_key_id not in key.signatures.get(key.user_id, {}):
        raise UploadError(M_INVALID_PARAM, signature_path, "must be signed by the master key")
    verify_key = _ed25519_verify_key(master.public_key)
    if verify_key is None or not _verify(key.raw, key.user_id, verify_key):
        raise UploadError(M_INVALID_PARAM, signature_path, "invalid signature by the master key")


def validate_cross_signing_upload(
    body: object,
    user_id: str,
    existing: Mapping[str, CrossSigningKey],
    path: str = "",
) -> dict[str, CrossSigningKey]:
    """Validate a ``/keys/device_signing/upload`` body.

    ``master_key``, ``self_signing_key`` and ``user_signing_key`` are each
    optional (absent or ``null``); each must belong to ``user_id``, contain
    its usage and exactly one ed25519 key named ``ed25519:<public key>``.
    The self-signing and user-signing keys must carry a valid signature by
    the master key: the one uploaded with them, else the ``existing`` one
    (usage -> key).  Returns the uploaded keys by usage.
    """
    d = _object(body, path or "<body>")
    uploaded: dict[str, CrossSigningKey] = {}
    for name, usage in CROSS_SIGNING_FIELDS:
        value = d.get(name)
        if value is not None:
            uploaded[usage] = _cross_signing_key(value, _member(path, name), user_id, usage)
    master = uploaded.get(USAGE_MASTER) or existing.get(USAGE_MASTER)
    for name, usage in CROSS_SIGNING_FIELDS[1:]:
        key = uploaded.get(usage)
        if key is None:
            continue
        if master is None:
            raise UploadError(
                M_INVALID_PARAM,
                _member(path, "master_key"),
                f"required: {name} must be signed by a master key and none is stored",
            )
        _signed_by_master(key, master, _member(path, name))
    return uploaded


# --------------------------------------------------------------------------
# signatures


@dataclass(frozen=True)
class UploadedSignature:
    """A verified signature to store (the store's ``CrossSigningSignature``).

    ``target_id`` is a device id or the public key of a master key.
    """

    signer_user_id: str
    signer_key_id: str
    target_user_id: str
    target_id: str
    signature: str


@dataclass(frozen=True)
class SignatureUploadContext:
    """What :func:`verify_signature_upload` checks the signatures against.

    :ivar user_id: the uploader.
    :ivar cross_signing_keys: the uploader's keys by usage.
    :ivar devices: the uploader's devices' stored ``DeviceKeys`` objects (at
        least those named in the upload; devices without keys are absent).
    :ivar master_keys: other users' master keys (at least of the users named
        in the upload whose keys are known).
    """

    user_id: str
    cross_signing_keys: Mapping[str, CrossSigningKey]
    devices: Mapping[str, JsonDict]
    master_keys: Mapping[str, CrossSigningKey]


@dataclass(frozen=True)
class SignatureUploadResult:
    # the verified signatures, to store
    signatures: tuple[UploadedSignature, ...]
    # user id -> device id or key -> {"status", "errcode", "message"}
    failures: dict[str, dict[str, JsonDict]]


def parse_signature_upload(body: object, path: str = "") -> dict[str, dict[str, JsonDict]]:
    """Check the shape of a ``/keys/signatures/upload`` body:
    ``{user_id: {device_id or public key: signed object}}``."""
    d = _object(body, path or "<body>")
    result: dict[str, dict[str, JsonDict]] = {}
    for user_id, items in d.items():
        user_path = _entry(path, user_id)
        try:
            split_user_id(user_id, user_path)
        except ParseError as e:
            raise UploadError(M_INVALID_PARAM, e.path, e.message) from None
        items_obj = _object(items, user_path)
        result[user_id] = {}
        for target, signed in items_obj.items():
            target_path = _entry(user_path, target)
            signed_obj = _object(signed, target_path)
            _check_json(signed_obj, target_path)
            result[user_id][target] = signed_obj
    return result


class _Failure(Exception):
    def __init__(self, status: int, errcode: str, message: str) -> None:
        super().__init__(message)
        self.json: JsonDict = {"status": status, "errcode": errcode, "message": message}


def _same_content(signed: Mapping[str, Any], stored: Mapping[str, Any]) -> None:
    if strip_signed(signed) != strip_signed(stored):
        raise _Failure(400, M_INVALID_PARAM, "Key does not match the stored key")


def _signature(signed: Mapping[str, Any], signer: str, key_id: str) -> str:
    signatures = signed.get("signatures")
    by_signer = signatures.get(signer) if isinstance(signatures, dict) else None
    signature = by_signer.get(key_id) if isinstance(by_signer, dict) else None
    if not isinstance(signature, str):
        raise _Failure(400, M_INVALID_SIGNATURE, f"Missing signature by {key_id}")
    return signature


def _check_signature(
    signed: Mapping[str, Any], signer: str, key_id: str, verify_key: Optional[VerifyKey]
) -> str:
    signature = _signature(signed, signer, key_id)
    only_this = dict(strip_signed(signed))
    only_this["signatures"] = {signer: {key_id: signature}}
    if verify_key is None or not _verify(only_this, signer, verify_key):
        raise _Failure(400, M_INVALID_SIGNATURE, f"Invalid signature by {key_id}")
    return signature


def _device_verify_key(device_id: str, keys_json: Mapping[str, Any]) -> Optional[VerifyKey]:
    keys = keys_json.get("keys")
    public_key = keys.get(f"ed25519:{device_id}") if isinstance(keys, dict) else None
    if not isinstance(public_key, str):
        return None
    try:
        raw = decode_base64(public_key)
        if len(raw) != _ED25519_KEY_BYTES:
            return None
        key: VerifyKey = decode_verify_key_bytes(f"ed25519:{device_id}", raw)
    except Exception:
        return None
    return key


def _own_master_signatures(
    ctx: SignatureUploadContext, master: CrossSigningKey, signed: JsonDict
) -> list[UploadedSignature]:
    """The uploader's devices signing the uploader's master key."""
    _same_content(signed, master.raw)
    user_id = ctx.user_id
    signatures = signed.get("signatures")
    by_user = signatures.get(user_id) if isinstance(signatures, dict) else None
    found: list[UploadedSignature] = []
    for key_id in sorted(by_user or {}):
        if key_id == master.key_id:
            continue
        algorithm, _, device_id = key_id.partition(":")
        if algorithm != "ed25519" or device_id not in ctx.devices:
            raise _Failure(400, M_INVALID_SIGNATURE, f"Signature by unknown device key {key_id}")
        verify_key = _device_verify_key(device_id, ctx.devices[device_id])
        signature = _check_signature(signed, user_id, key_id, verify_key)
        found.append(UploadedSignature(user_id, key_id, user_id, master.public_key, signature))
    if not found:
        raise _Failure(400, M_INVALID_SIGNATURE, "Missing signature by one of the user's devices")
    return found


def _own_device_signature(
    ctx: SignatureUploadContext, device_id: str, signed: JsonDict
) -> UploadedSignature:
    """The uploader's self-signing key signing one of the uploader's devices."""
    self_signing = ctx.cross_signing_keys.get(USAGE_SELF_SIGNING)
    if self_signing is None:
        raise _Failure(404, M_NOT_FOUND, "No self-signing key is stored")
    _same_content(signed, ctx.devices[device_id])
    signature = _check_signature(
        signed, ctx.user_id, self_signing.key_id, _ed25519_verify_key(self_signing.public_key)
    )
    return UploadedSignature(ctx.user_id, self_signing.key_id, ctx.user_id, device_id, signature)


def _other_user_signature(
    ctx: SignatureUploadContext, target_user: str, target: str, signed: JsonDict
) -> UploadedSignature:
    """The uploader's user-signing key signing another user's master key."""
    user_signing = ctx.cross_signing_keys.get(USAGE_USER_SIGNING)
    if user_signing is None:
        raise _Failure(404, M_NOT_FOUND, "No user-signing key is stored")
    master = ctx.master_keys.get(target_user)
    if master is None or target != master.public_key:
        raise _Failure(404, M_NOT_FOUND, f"Unknown master key {target!r} of {target_user}")
    _same_content(signed, master.raw)
    signature = _check_signature(
        signed, ctx.user_id, user_signing.key_id, _ed25519_verify_key(user_signing.public_key)
    )
    return UploadedSignature(
        ctx.user_id, user_signing.key_id, target_user, master.public_key, signature
    )


def verify_signature_upload(
    upload: Mapping[str, Mapping[str, JsonDict]], ctx: SignatureUploadContext
) -> SignatureUploadResult:
    """Verify each signed object of a (shape-checked) signature upload.

    For the uploader's own entries: a device is signed by the self-signing
    key; the master key (named by its public key) is signed by one or more of
    the uploader's devices.  For another user: only their master key, signed
    by the uploader's user-signing key.  The object must equal the stored one
    apart from ``signatures`` and ``unsigned``.  Each failed entry is
    reported as Synapse does, ``{"status", "errcode", "message"}``, and
    nothing of it is stored; the others are returned.
    """
    signatures: list[UploadedSignature] = []
    failures: dict[str, dict[str, JsonDict]] = {}
    own_master = ctx.cross_signing_keys.get(USAGE_MASTER)
    for target_user in sorted(upload):
        for target, signed in upload[target_user].items():
            try:
                if target_user != ctx.user_id:
                    signatures.append(_other_user_signature(ctx, target_user, target, signed))
                elif own_master is not None and target == own_master.public_key:
                    signatures.extend(_own_master_signatures(ctx, own_master, signed))
                elif target in ctx.devices:
                    signatures.append(_own_device_signature(ctx, target, signed))
                else:
                    raise _Failure(404, M_NOT_FOUND, f"Unknown device or key {target!r}")
            except _Failure as f:
                failures.setdefault(target_user, {})[target] = f.json
    return SignatureUploadResult(tuple(signatures), failures)


def signed_objects_needed(
    upload: Mapping[str, Mapping[str, JsonDict]], user_id: str
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(own device ids, other user ids) an upload may need: what the caller
    must look up to build the :class:`SignatureUploadContext`.

    The device ids are the uploader's entries (devices to sign) and the
    devices named by ``ed25519:<device_id>`` signatures in them (devices
    signing the master key).
    """
    own = upload.get(user_id, {})
    devices = set(own)
    for signed in own.values():
        signatures = signed.get("signatures")
        by_user = signatures.get(user_id) if isinstance(signatures, dict) else None
        for key_id in by_user or {}:
            algorithm, colon, device_id = key_id.partition(":")
            if algorithm == "ed25519" and colon and device_id:
                devices.add(device_id)
    others = tuple(sorted(u for u in upload if u != user_id))
    return tuple(sorted(devices)), others

