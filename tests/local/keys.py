"""Real, correctly signed keys as a client would upload them."""

from __future__ import annotations

import copy
from typing import Any

from signedjson.key import (
    decode_signing_key_base64,
    encode_signing_key_base64,
    encode_verify_key_base64,
    generate_signing_key,
    get_verify_key,
)
from signedjson.sign import sign_json
from signedjson.types import SigningKey

from devicelist_plugin.core.models import JsonDict

OLM = "m.olm.v1.curve25519-aes-sha2"
MEGOLM = "m.megolm.v1.aes-sha2"


def public_key(key: SigningKey) -> str:
    return str(encode_verify_key_base64(get_verify_key(key)))


class ClientDevice:
    """A device with its own ed25519 key (key version = device id)."""

    def __init__(self, user_id: str, device_id: str) -> None:
        self.user_id = user_id
        self.device_id = device_id
        self.signing_key = generate_signing_key(device_id)

    @property
    def ed25519(self) -> str:
        return public_key(self.signing_key)

    def device_keys(self, **extra: Any) -> JsonDict:
        """The self-signed DeviceKeys object of the device."""
        body: JsonDict = {
            "user_id": self.user_id,
            "device_id": self.device_id,
            "algorithms": [OLM, MEGOLM],
            "keys": {
                f"ed25519:{self.device_id}": self.ed25519,
                f"curve25519:{self.device_id}": "cv" + self.ed25519[:20],
            },
        }
        body.update(extra)
        signed: JsonDict = sign_json(body, self.user_id, self.signing_key)
        return signed

    def sign(self, obj: JsonDict) -> JsonDict:
        """``obj`` with this device's signature added."""
        signed: JsonDict = sign_json(copy.deepcopy(obj), self.user_id, self.signing_key)
        return signed


def _named_by_public_key() -> SigningKey:
    """A signing key whose version is its own public key (cross-signing key ids)."""
    key = generate_signing_key("tmp")
    return decode_signing_key_base64("ed25519", public_key(key), encode_signing_key_base64(key))


class CrossSigning:
    """A user's master, self-signing and user-signing keys."""

    def __init__(self, user_id: str) -> None:
        self.user_id = user_id
        self.master = _named_by_public_key()
        self.self_signing = _named_by_public_key()
        self.user_signing = _named_by_public_key()

    def key_json(self, usage: str, signer: SigningKey | None = None) -> JsonDict:
        key = {
            "master": self.master,
            "self_signing": self.self_signing,
            "user_signing": self.user_signing,
        }[usage]
        pub = public_key(key)
        body: JsonDict = {
            "user_id": self.user_id,
            "usage": [usage],
            "keys": {f"ed25519:{pub}": pub},
        }
        if signer is not None:
            body = sign_json(body, self.user_id, signer)
        return body

    @property
    def master_json(self) -> JsonDict:
        return self.key_json("master")

    @property
    def self_signing_json(self) -> JsonDict:
        return self.key_json("self_signing", self.master)

    @property
    def user_signing_json(self) -> JsonDict:
        return self.key_json("user_signing", self.master)

    def upload_body(self) -> JsonDict:
        return {
            "master_key": self.master_json,
            "self_signing_key": self.self_signing_json,
            "user_signing_key": self.user_signing_json,
        }

    @property
    def master_public(self) -> str:
        return public_key(self.master)

    @property
    def self_signing_public(self) -> str:
        return public_key(self.self_signing)

    @property
    def user_signing_public(self) -> str:
        return public_key(self.user_signing)

    def sign_with(self, usage: str, obj: JsonDict) -> JsonDict:
        """``obj`` (signatures and unsigned removed first) signed by one of the keys."""
        key = {
            "master": self.master,
            "self_signing": self.self_signing,
            "user_signing": self.user_signing,
        }[usage]
        signed: JsonDict = sign_json(copy.deepcopy(obj), self.user_id, key)
        return signed
