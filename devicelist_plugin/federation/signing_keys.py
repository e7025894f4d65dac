"""The server's signing keys, in Synapse's formats.

The signing key file holds one key a line, ``ed25519 <version> <unpadded
base64 seed>`` (what Synapse's ``signing_key_path`` points at, so a Synapse
key file can be reused as is); the first key signs.  ``old_signing_keys`` is
Synapse's configuration shape for keys no longer used but still published:
``{"ed25519:<version>": {"key": "<unpadded base64 public key>", "expired_ts":
<ms>}}``.
"""

from __future__ import annotations

import os
import secrets
import string
from dataclasses import dataclass
from typing import Any, Mapping

from signedjson.key import (
    decode_verify_key_bytes,
    encode_verify_key_base64,
    generate_signing_key,
    get_verify_key,
    is_signing_algorithm_supported,
    read_signing_keys,
    write_signing_keys,
)
from signedjson.types import SigningKey, VerifyKey
from unpaddedbase64 import decode_base64


class SigningKeyFileError(Exception):
    """The signing key file cannot be read, written or parsed; the message names it."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"signing key file {path}: {message}")
        self.path = path


class OldSigningKeysError(ValueError):
    """The ``old_signing_keys`` configuration is malformed; the message says where."""


@dataclass(frozen=True)
class OldVerifyKey:
    """A retired key, published in ``old_verify_keys`` until forgotten."""

    key_id: str
    verify_key: VerifyKey
    expired_ts: int


def key_id(key: SigningKey | VerifyKey) -> str:
    """``"<algorithm>:<version>"``, e.g. ``"ed25519:a_AbCd"``."""
    return f"{key.alg}:{key.version}"


def verify_key_base64(signing_key: SigningKey) -> str:
    """The unpadded base64 public key of a signing key, as published in ``verify_keys``."""
    return encode_verify_key_base64(get_verify_key(signing_key))


def load_signing_keys(path: str) -> list[SigningKey]:
    """Every key of the file, in file order; blank lines are skipped.

    :raise SigningKeyFileError: unreadable, empty, malformed, or a key
        version given twice.
    """
    try:
        with open(path, encoding="ascii") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SigningKeyFileError(path, f"cannot be read: {e}") from None
    keys: list[SigningKey] = []
    versions: set[str] = set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            (key,) = read_signing_keys([line])
        except ValueError as e:
            # ValueError covers a wrong field count, an unknown algorithm, bad
            # base64 and a seed of the wrong length (nacl's ValueError).
            raise SigningKeyFileError(
                path,
                f"line {number}: expected 'ed25519 <version> <unpadded base64 seed>' ({e})",
            ) from None
        if key.version in versions:
            raise SigningKeyFileError(path, f"line {number}: key version {key.version!r} given twice")
        versions.add(key.version)
        keys.append(key)
    if not keys:
        raise SigningKeyFileError(path, "contains no signing key")
    return keys


def _new_version() -> str:
    # Synapse's shape: "a_" and four random letters or digits.
    alphabet = string.ascii_letters + string.digits
    return "a_" + "".join(secrets.choice(alphabet) for _ in range(4))


def load_or_generate_signing_key(path: str) -> SigningKey:
    """The server's signing key: the first key of ``path``, or a new key
    written there when the file does not exist.

    The new file is created exclusively (``O_EXCL``) with mode 0600; if
    another process creates it first, that file is read instead.  A write
    that fails leaves no file behind.

    :raise SigningKeyFileError: the file cannot be read, parsed or created.
    """
    if os.path.exists(path):
        return load_signing_keys(path)[0]
    key = generate_signing_key(_new_version())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return load_signing_keys(path)[0]
    except OSError as e:
        raise SigningKeyFileError(path, f"cannot be created: {e}") from None
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            write_signing_keys(f, [key])
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        try:
            os.unlink(path)
        except OSError:
            pass
        raise SigningKeyFileError(path, f"cannot be written: {e}") from None
    return key


def parse_old_signing_keys(config: object) -> list[OldVerifyKey]:
    """Parse Synapse's ``old_signing_keys`` configuration; ``None`` is no keys.

    :raise OldSigningKeysError: naming the offending key id.
    """
    if config is None:
        return []
    if not isinstance(config, Mapping):
        raise OldSigningKeysError("old_signing_keys: expected a mapping of key id to {key, expired_ts}")
    result: list[OldVerifyKey] = []
    for kid, entry in config.items():
        where = f"old_signing_keys: {kid!r}"
        if not isinstance(kid, str) or not is_signing_algorithm_supported(kid) or kid == "ed25519:":
            raise OldSigningKeysError(f"{where}: key id must be 'ed25519:<version>'")
        if not isinstance(entry, Mapping):
            raise OldSigningKeysError(f"{where}: expected {{key, expired_ts}}")
        result.append(_old_key(where, kid, entry))
    return result


def _old_key(where: str, kid: str, entry: Mapping[Any, Any]) -> OldVerifyKey:
    key_b64 = entry.get("key")
    expired_ts = entry.get("expired_ts")
    if not isinstance(key_b64, str):
        raise OldSigningKeysError(f"{where}: 'key' must be an unpadded base64 string")
    if isinstance(expired_ts, bool) or not isinstance(expired_ts, int) or expired_ts < 0:
        raise OldSigningKeysError(f"{where}: 'expired_ts' must be a timestamp in milliseconds")
    try:
        verify_key = decode_verify_key_bytes(kid, decode_base64(key_b64))
    except ValueError as e:
        raise OldSigningKeysError(f"{where}: invalid key ({e})") from None
    return OldVerifyKey(key_id=kid, verify_key=verify_key, expired_ts=expired_ts)
