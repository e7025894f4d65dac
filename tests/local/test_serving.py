"""local.serving: the fast canonical encoding of /user/devices answers is
exactly the canonical JSON of the reference body."""

from __future__ import annotations

import json
from typing import Any

from canonicaljson import encode_canonical_json
from twisted.trial.unittest import SynchronousTestCase

from devicelist_plugin.local.serving import (
    encode_user_devices_body,
    user_devices_body,
    with_signatures,
)
from devicelist_plugin.storage.codec import dumps
from devicelist_plugin.storage.types import CrossSigningSignature, KeyedDevice, LocalUserKeys

USER = "@alice:b.example"


def keys(device_id: str, **extra: Any) -> dict[str, Any]:
    body = {
        "user_id": USER,
        "device_id": device_id,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2"],
        "keys": {f"ed25519:{device_id}": "pub" + device_id},
        "signatures": {USER: {f"ed25519:{device_id}": "self"}},
    }
    body.update(extra)
    return body


def device(device_id: str, name: str | None = None, **extra: Any) -> KeyedDevice:
    # stored as the store stores it (storage.codec.dumps)
    return KeyedDevice(device_id, name, dumps(keys(device_id, **extra)))


class EncodeTests(SynchronousTestCase):
    def check(self, user_keys: LocalUserKeys) -> None:
        for names in (False, True):
            expected = encode_canonical_json(user_devices_body(user_keys, include_display_names=names))
            fast = encode_user_devices_body(user_keys, include_display_names=names)
            self.assertEqual(fast, expected)
            self.assertEqual(encode_canonical_json(json.loads(fast)), fast)

    def test_plain_devices(self) -> None:
        self.check(
            LocalUserKeys(
                USER,
                12,
                (device("A", "phone"), device("B"), device("C", "")),
                {},
                (),
            )
        )

    def test_empty(self) -> None:
        self.check(LocalUserKeys(USER, 0, (), {}, ()))
        self.assertEqual(
            json.loads(encode_user_devices_body(LocalUserKeys(USER, 0, (), {}, ()), include_display_names=True)),
            {"user_id": USER, "stream_id": 0, "devices": []},
        )

    def test_signatures_unsigned_and_cross_signing(self) -> None:
        master = {"user_id": USER, "usage": ["master"], "keys": {"ed25519:MPUB": "MPUB"}}
        ssk = {
            "user_id": USER,
            "usage": ["self_signing"],
            "keys": {"ed25519:SPUB": "SPUB"},
            "signatures": {USER: {"ed25519:MPUB": "m-sig"}},
        }
        signatures = (
            CrossSigningSignature(USER, "ed25519:SPUB", USER, "A", "ssk-on-A"),
            CrossSigningSignature(USER, "ed25519:A", USER, "MPUB", "A-on-master"),
        )
        user_keys = LocalUserKeys(
            USER,
            99,
            (
                device("A", "signed"),
                device("B", "unsigned from the client", unsigned={"x": 1}),
                device("C", 'quote " backslash \\ newline \n U+2028 \u2028 é 😀'),
            ),
            {"master": master, "self_signing": ssk, "user_signing": {"never": "served"}},
            signatures,
        )
        self.check(user_keys)
        body = json.loads(encode_user_devices_body(user_keys, include_display_names=True))
        self.assertEqual(
            body["devices"][0]["keys"]["signatures"][USER],
            {"ed25519:A": "self", "ed25519:SPUB": "ssk-on-A"},
        )
        self.assertNotIn("unsigned", body["devices"][1]["keys"])
        self.assertEqual(body["master_key"]["signatures"], {USER: {"ed25519:A": "A-on-master"}})
        self.assertEqual(body["self_signing_key"], ssk)
        self.assertNotIn("user_signing_key", body)

    def test_with_signatures(self) -> None:
        obj = {"a": 1, "unsigned": {"u": 1}}
        self.assertEqual(with_signatures(obj, ()), {"a": 1})
        self.assertEqual(
            with_signatures(
                {"signatures": {"@x:y": {"k": "old"}, "bad": 3}},
                [CrossSigningSignature("@x:y", "k", USER, "t", "new")],
            ),
            {"signatures": {"@x:y": {"k": "new"}}},
        )
