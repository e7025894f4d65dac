"""Parsing and validation of the device-list protocol's wire objects.

Every function here takes a decoded JSON value (``object``: the caller has not
checked anything yet) and either returns a frozen model from
:mod:`devicelist_plugin.core.models` or raises :class:`ParseError` naming the
offending field by its path, e.g. ``content.prev_id[2]`` or
``devices[3].keys.algorithms``.

The rules are the seed schema's (``m.device_list_update``, ``/user/devices``)
plus what deployed servers are known to send: ``null`` for absent optional
fields (Dendrite sends ``"master_key": null``), unknown fields (ignored), and
devices without keys.  Integers must be in canonical JSON's range,
``±(2**53 - 1)``; booleans and floats are never integers.

Pure: no twisted, no I/O, no clock.
"""

from __future__ import annotations

import ipaddress
import json
import re
from typing import Optional

from devicelist_plugin.core.models import (
    USAGE_MASTER,
    USAGE_SELF_SIGNING,
    CrossSigningKey,
    DeviceKeys,
    DeviceListUpdate,
    JsonDict,
    ParseProblem,
    RemoteDevice,
    SigningKeyUpdate,
    UserDevicesResponse,
    copy_json,
)

__all__ = [
    "MAX_DEVICE_ID_LENGTH",
    "MAX_DISPLAY_NAME_LENGTH",
    "MAX_JSON_INT",
    "MAX_PREV_IDS",
    "MAX_USER_ID_LENGTH",
    "MIN_JSON_INT",
    "ParseError",
    "parse_cross_signing_key",
    "parse_device_keys",
    "parse_device_list_update",
    "parse_server_name",
    "parse_signing_key_update",
    "parse_user_devices_response",
    "server_name_of",
    "split_user_id",
    "validate_server_name",
]

# Canonical JSON integer range (appendices, "Canonical JSON").
MAX_JSON_INT = 2**53 - 1
MIN_JSON_INT = -MAX_JSON_INT

# A user ID, sigil and domain included, is at most 255 bytes (appendices,
# "User Identifiers"; the limit is in UTF-8 bytes).
MAX_USER_ID_LENGTH = 255
MAX_DEVICE_ID_LENGTH = 255
MAX_DISPLAY_NAME_LENGTH = 1000
# Servers emitting in series send exactly one prev_id; a clustered server
# sends the few it emitted concurrently.  Anything near this is abuse.
MAX_PREV_IDS = 1000

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# dns-name: labels of ALPHA / DIGIT / "-" separated by single dots (the
# appendix grammar's dns-char set; empty labels rejected as Synapse does).
_DNS_NAME = re.compile(r"[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*\Z")
_IPV6_CHARS = re.compile(r"[0-9A-Fa-f:.]{2,45}\Z")
_PORT = re.compile(r"[0-9]{1,5}\Z")
_MAX_DNS_NAME_LENGTH = 255


class ParseError(ValueError):
    """A wire object did not match its schema.

    ``path`` names the offending field (``content.prev_id[2]``); ``message``
    says what is wrong with it.
    """

    def __init__(self, path: str, message: str) -> None:
        super().__init__(path, message)
        self.path = path
        self.message = message

    def __str__(self) -> str:
        if self.path:
            return f"{self.path}: {self.message}"
        return self.message

    def __repr__(self) -> str:
        return f"ParseError(path={self.path!r}, message={self.message!r})"


# --------------------------------------------------------------------------
# paths and primitive checks


def _field(path: str, name: str) -> str:
    """The path of member ``name`` of the object at ``path``."""
    if _IDENTIFIER.match(name):
        return f"{path}.{name}" if path else name
    # names such as "ed25519:DEVICE" or "@u:example.org" are quoted so that
    # the path stays unambiguous
    return f"{path}[{json.dumps(name)}]"


def _index(path: str, i: int) -> str:
    return f"{path}[{i}]"


def _describe(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a floating-point number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _expect_object(value: object, path: str) -> JsonDict:
    if not isinstance(value, dict):
        raise ParseError(path, f"expected an object, got {_describe(value)}")
    return value


def _required(obj: JsonDict, name: str, path: str) -> object:
    """The member ``name`` of the object ``obj`` at ``path``, which must exist."""
    if name not in obj:
        raise ParseError(_field(path, name), "required field missing")
    value: object = obj[name]
    return value


def _optional(obj: JsonDict, name: str) -> object:
    """An optional member: ``None`` when absent or ``null``."""
    value: object = obj.get(name)
    return value


def _expect_str(value: object, path: str) -> str:
    if not isinstance(value, str):
        raise ParseError(path, f"expected a string, got {_describe(value)}")
    return value


def _bounded_str(value: object, path: str, max_length: int, *, non_empty: bool) -> str:
    s = _expect_str(value, path)
    if non_empty and not s:
        raise ParseError(path, "must not be empty")
    if len(s) > max_length:
        raise ParseError(path, f"longer than {max_length} characters")
    return s


def _expect_int(value: object, path: str) -> int:
    # bool is a subclass of int in Python; JSON true is not an integer
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParseError(path, f"expected an integer, got {_describe(value)}")
    if not MIN_JSON_INT <= value <= MAX_JSON_INT:
        raise ParseError(path, "integer outside the canonical JSON range ±(2**53-1)")
    return value


def _expect_bool(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        raise ParseError(path, f"expected a boolean, got {_describe(value)}")
    return value


def _expect_list(value: object, path: str) -> list[object]:
    if not isinstance(value, list):
        raise ParseError(path, f"expected a list, got {_describe(value)}")
    return value


def _str_list(value: object, path: str) -> tuple[str, ...]:
    items = _expect_list(value, path)
    return tuple(_expect_str(item, _index(path, i)) for i, item in enumerate(items))


def _names(obj: JsonDict, path: str) -> None:
    # decoded JSON only ever has string names; a Python caller might not
    for name in obj:
        if not isinstance(name, str):
            raise ParseError(path, f"member name {name!r} is not a string")


def _str_map(value: object, path: str) -> dict[str, str]:
    obj = _expect_object(value, path)
    _names(obj, path)
    return {name: _expect_str(v, _field(path, name)) for name, v in obj.items()}


def _signatures(value: object, path: str) -> dict[str, dict[str, str]]:
    obj = _expect_object(value, path)
    _names(obj, path)
    return {name: _str_map(v, _field(path, name)) for name, v in obj.items()}


# --------------------------------------------------------------------------
# identifiers


def parse_server_name(server_name: str, path: str = "server_name") -> tuple[str, Optional[int]]:
    """Split a server name into (hostname, port or None), validating it.

    Grammar (appendices, "Server Name"): ``hostname [":" port]`` where
    hostname is a DNS name, an IPv4 address or a bracketed IPv6 address and
    port is 1 to 65535.
    """
    if not isinstance(server_name, str):
        raise ParseError(path, f"expected a string, got {_describe(server_name)}")
    if not server_name:
        raise ParseError(path, "empty server name")
    host = server_name
    port: Optional[int] = None
    if server_name.startswith("["):
        end = server_name.find("]")
        if end < 0:
            raise ParseError(path, f"unterminated IPv6 literal in server name {server_name!r}")
        host = server_name[: end + 1]
        rest = server_name[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ParseError(path, f"unexpected text after IPv6 literal in {server_name!r}")
            port = _port(rest[1:], server_name, path)
        literal = host[1:-1]
        if not _IPV6_CHARS.match(literal):
            raise ParseError(path, f"invalid IPv6 literal in server name {server_name!r}")
        try:
            ipaddress.IPv6Address(literal)
        except ValueError:
            raise ParseError(path, f"invalid IPv6 literal in server name {server_name!r}") from None
        return host, port
    if ":" in server_name:
        host, _, port_text = server_name.rpartition(":")
        port = _port(port_text, server_name, path)
    if len(host) > _MAX_DNS_NAME_LENGTH or not _DNS_NAME.match(host):
        raise ParseError(path, f"invalid hostname in server name {server_name!r}")
    return host, port


def _port(text: str, server_name: str, path: str) -> int:
    if not _PORT.match(text):
        raise ParseError(path, f"invalid port in server name {server_name!r}")
    port = int(text)
    if not 1 <= port <= 65535:
        raise ParseError(path, f"port out of range in server name {server_name!r}")
    return port


def validate_server_name(server_name: str, path: str = "server_name") -> str:
    """Return ``server_name`` if it follows the appendix grammar, else raise
    :class:`ParseError` (for configuration and ``origin`` checks)."""
    parse_server_name(server_name, path)
    return server_name


def split_user_id(user_id: str, path: str = "user_id") -> tuple[str, str]:
    """Split ``@localpart:server_name`` into (localpart, server_name).

    The localpart is taken leniently (historical and non-conforming
    localparts exist and remote servers send them: it must be non-empty and
    free of NUL); the server name must follow the appendix grammar; the
    whole ID is at most 255 UTF-8 bytes.
    """
    if not isinstance(user_id, str):
        raise ParseError(path, f"expected a string, got {_describe(user_id)}")
    try:
        length = len(user_id.encode("utf-8"))
    except UnicodeEncodeError:
        raise ParseError(path, "user ID is not valid Unicode") from None
    if length > MAX_USER_ID_LENGTH:
        raise ParseError(path, f"user ID longer than {MAX_USER_ID_LENGTH} bytes")
    if not user_id.startswith("@"):
        raise ParseError(path, f"user ID {user_id!r} does not start with '@'")
    localpart, colon, server_name = user_id[1:].partition(":")
    if not colon:
        raise ParseError(path, f"user ID {user_id!r} has no ':server_name'")
    if not localpart:
        raise ParseError(path, f"user ID {user_id!r} has an empty localpart")
    if "\x00" in localpart:
        raise ParseError(path, f"user ID {user_id!r} contains NUL")
    try:
        parse_server_name(server_name, path)
    except ParseError as e:
        raise ParseError(path, f"user ID {user_id!r}: {e.message}") from None
    return localpart, server_name


def server_name_of(user_id: str) -> str:
    """The server name of a user ID (raises :class:`ParseError` if malformed)."""
    return split_user_id(user_id)[1]


def _user_id(value: object, path: str, expected: Optional[str] = None) -> str:
    user_id = _expect_str(value, path)
    split_user_id(user_id, path)
    if expected is not None and user_id != expected:
        raise ParseError(path, f"expected {expected!r}, got {user_id!r}")
    return user_id


def _device_id(value: object, path: str, expected: Optional[str] = None) -> str:
    device_id = _bounded_str(value, path, MAX_DEVICE_ID_LENGTH, non_empty=True)
    if expected is not None and device_id != expected:
        raise ParseError(path, f"expected {expected!r}, got {device_id!r}")
    return device_id


def _display_name(value: object, path: str) -> Optional[str]:
    if value is None:
        return None
    return _bounded_str(value, path, MAX_DISPLAY_NAME_LENGTH, non_empty=False)


# --------------------------------------------------------------------------
# keys


def parse_device_keys(
    obj: object,
    path: str = "keys",
    *,
    expected_user_id: Optional[str] = None,
    expected_device_id: Optional[str] = None,
    owned: bool = False,
) -> DeviceKeys:
    """Parse a client-server ``DeviceKeys`` object.

    ``raw`` keeps a deep copy of the whole object (unknown fields and
    ``unsigned`` included) so that it can be re-served and its signatures
    checked; the object itself when ``owned`` (the caller decoded it and
    hands it over: nothing else holds it).
    """
    d = _expect_object(obj, path)
    user_id = _user_id(
        _required(d, "user_id", path), _field(path, "user_id"), expected_user_id
    )
    device_id = _device_id(
        _required(d, "device_id", path),
        _field(path, "device_id"),
        expected_device_id,
    )
    algorithms = _str_list(_required(d, "algorithms", path), _field(path, "algorithms"))
    keys_path = _field(path, "keys")
    keys = _str_map(_required(d, "keys", path), keys_path)
    for name in keys:
        algorithm, colon, key_device = name.partition(":")
        if not colon or not algorithm:
            raise ParseError(
                _field(keys_path, name), f"key name {name!r} is not '<algorithm>:<device_id>'"
            )
        if key_device != device_id:
            raise ParseError(
                _field(keys_path, name),
                f"key name {name!r} names device {key_device!r}, not {device_id!r}",
            )
    signatures = _signatures(
        _required(d, "signatures", path), _field(path, "signatures")
    )
    return DeviceKeys(
        user_id=user_id,
        device_id=device_id,
        algorithms=algorithms,
        keys=keys,
        signatures=signatures,
        raw=d if owned else copy_json(d),
    )


def parse_cross_signing_key(
    obj: object,
    path: str,
    *,
    expected_user_id: Optional[str] = None,
    expected_usage: Optional[str] = None,
) -> CrossSigningKey:
    """Parse a ``CrossSigningKey`` (master, self-signing or user-signing)."""
    d = _expect_object(obj, path)
    user_id = _user_id(
        _required(d, "user_id", path), _field(path, "user_id"), expected_user_id
    )
    usage_path = _field(path, "usage")
    usage = _str_list(_required(d, "usage", path), usage_path)
    if not usage:
        raise ParseError(usage_path, "must not be empty")
    if expected_usage is not None and expected_usage not in usage:
        raise ParseError(usage_path, f"does not contain {expected_usage!r}")
    keys_path = _field(path, "keys")
    keys = _str_map(_required(d, "keys", path), keys_path)
    if len(keys) != 1:
        raise ParseError(keys_path, f"must have exactly one entry, has {len(keys)}")
    (name,) = keys
    algorithm, colon, public_key = name.partition(":")
    if not colon or not algorithm or not public_key:
        raise ParseError(
            _field(keys_path, name), f"key name {name!r} is not '<algorithm>:<public key>'"
        )
    raw_signatures = _optional(d, "signatures")
    signatures = (
        {} if raw_signatures is None else _signatures(raw_signatures, _field(path, "signatures"))
    )
    return CrossSigningKey(
        user_id=user_id,
        usage=usage,
        keys=keys,
        signatures=signatures,
        raw=copy_json(d),
    )


# --------------------------------------------------------------------------
# EDUs


def parse_device_list_update(content: object, path: str = "content") -> DeviceListUpdate:
    """Parse the content of an ``m.device_list_update`` EDU.

    Does not check that ``user_id`` belongs to the sending server: that is
    the caller's (it knows the origin); :func:`server_name_of` helps.
    """
    c = _expect_object(content, path)
    user_id = _user_id(_required(c, "user_id", path), _field(path, "user_id"))
    device_id = _device_id(_required(c, "device_id", path), _field(path, "device_id"))
    stream_id = _expect_int(
        _required(c, "stream_id", path), _field(path, "stream_id")
    )

    prev_path = _field(path, "prev_id")
    raw_prev = _optional(c, "prev_id")
    prev_ids: tuple[int, ...] = ()
    if raw_prev is not None:
        items = _expect_list(raw_prev, prev_path)
        if len(items) > MAX_PREV_IDS:
            raise ParseError(prev_path, f"more than {MAX_PREV_IDS} entries")
        prev_ids = tuple(_expect_int(item, _index(prev_path, i)) for i, item in enumerate(items))

    raw_deleted = _optional(c, "deleted")
    deleted = False if raw_deleted is None else _expect_bool(raw_deleted, _field(path, "deleted"))

    display_name = _display_name(
        _optional(c, "device_display_name"), _field(path, "device_display_name")
    )

    keys = _optional_device_keys(c, path, user_id, device_id)
    return DeviceListUpdate(
        user_id=user_id,
        device_id=device_id,
        stream_id=stream_id,
        prev_ids=prev_ids,
        deleted=deleted,
        display_name=display_name,
        keys=keys,
    )


def parse_signing_key_update(content: object, path: str = "content") -> SigningKeyUpdate:
    """Parse the content of an ``m.signing_key_update`` EDU (or its
    ``org.matrix.signing_key_update`` twin)."""
    c = _expect_object(content, path)
    user_id = _user_id(_required(c, "user_id", path), _field(path, "user_id"))
    master_key = _optional_cross_signing_key(c, "master_key", path, user_id, USAGE_MASTER)
    self_signing_key = _optional_cross_signing_key(
        c, "self_signing_key", path, user_id, USAGE_SELF_SIGNING
    )
    return SigningKeyUpdate(
        user_id=user_id, master_key=master_key, self_signing_key=self_signing_key
    )


def _optional_cross_signing_key(
    obj: JsonDict, name: str, path: str, user_id: str, usage: str
) -> Optional[CrossSigningKey]:
    value = _optional(obj, name)
    if value is None:
        return None
    return parse_cross_signing_key(
        value, _field(path, name), expected_user_id=user_id, expected_usage=usage
    )


# --------------------------------------------------------------------------
# /user/devices


def parse_user_devices_response(
    body: object, path: str = "", *, expected_user_id: Optional[str] = None, owned: bool = False
) -> UserDevicesResponse:
    """Parse a ``GET /_matrix/federation/v1/user/devices/{userId}`` answer
    (``owned``: the caller hands ``body`` over, see :func:`parse_device_keys`).

    Fatal (:class:`ParseError`): a non-object body, a missing or wrong
    ``user_id``, a bad ``stream_id``, ``devices`` missing or not a list.
    Not fatal: a malformed device (or a second device with an ID already
    seen) and a malformed ``master_key`` / ``self_signing_key`` are left out
    and recorded in ``skipped`` with the path of the offending field, so one
    bad entry does not make the whole list unusable.
    """
    b = _expect_object(body, path)
    user_id = _user_id(
        _required(b, "user_id", path), _field(path, "user_id"), expected_user_id
    )
    stream_id = _expect_int(_required(b, "stream_id", path), _field(path, "stream_id"))
    devices_path = _field(path, "devices")
    items = _expect_list(_required(b, "devices", path), devices_path)

    devices: list[RemoteDevice] = []
    skipped: list[ParseProblem] = []
    first_seen: dict[str, str] = {}
    for i, item in enumerate(items):
        device_path = _index(devices_path, i)
        try:
            device = _parse_remote_device(item, device_path, user_id, owned)
        except ParseError as e:
            skipped.append(ParseProblem(e.path, e.message))
            continue
        earlier = first_seen.get(device.device_id)
        if earlier is not None:
            skipped.append(
                ParseProblem(
                    _field(device_path, "device_id"),
                    f"duplicate device_id {device.device_id!r} (first at {earlier})",
                )
            )
            continue
        first_seen[device.device_id] = device_path
        devices.append(device)

    cross_signing: dict[str, Optional[CrossSigningKey]] = {}
    for name, usage in (("master_key", USAGE_MASTER), ("self_signing_key", USAGE_SELF_SIGNING)):
        try:
            cross_signing[name] = _optional_cross_signing_key(b, name, path, user_id, usage)
        except ParseError as e:
            skipped.append(ParseProblem(e.path, e.message))
            cross_signing[name] = None

    return UserDevicesResponse(
        user_id=user_id,
        stream_id=stream_id,
        devices=tuple(devices),
        master_key=cross_signing["master_key"],
        self_signing_key=cross_signing["self_signing_key"],
        skipped=tuple(skipped),
    )


def _optional_device_keys(
    obj: JsonDict, path: str, user_id: str, device_id: str, owned: bool = False
) -> Optional[DeviceKeys]:
    """The optional ``keys`` of a device entry (missing or null: None); they
    must name the entry's user and device."""
    raw_keys = _optional(obj, "keys")
    if raw_keys is None:
        return None
    return parse_device_keys(
        raw_keys,
        _field(path, "keys"),
        expected_user_id=user_id,
        expected_device_id=device_id,
        owned=owned,
    )


def _parse_remote_device(item: object, path: str, user_id: str, owned: bool) -> RemoteDevice:
    d = _expect_object(item, path)
    device_id = _device_id(_required(d, "device_id", path), _field(path, "device_id"))
    keys = _optional_device_keys(d, path, user_id, device_id, owned)
    display_name = _display_name(
        _optional(d, "device_display_name"), _field(path, "device_display_name")
    )
    return RemoteDevice(device_id=device_id, keys=keys, display_name=display_name)
