"""core.uploads: the validation table of every upload, and signature checks."""

from __future__ import annotations

import copy
from typing import Any, Callable

from twisted.trial.unittest import SynchronousTestCase

from devicelist_plugin.core.models import CrossSigningKey, JsonDict
from devicelist_plugin.core.parse import parse_cross_signing_key
from devicelist_plugin.core.uploads import (
    M_BAD_JSON,
    M_INVALID_PARAM,
    M_INVALID_SIGNATURE,
    M_NOT_FOUND,
    OneTimeKey,
    SignatureUploadContext,
    UploadError,
    UploadedSignature,
    parse_signature_upload,
    signed_objects_needed,
    strip_signed,
    validate_cross_signing_upload,
    validate_device_keys_upload,
    validate_fallback_keys,
    validate_one_time_keys,
    verify_signature_upload,
)
from tests.local.keys import ClientDevice, CrossSigning

USER = "@alice:b.example"
OTHER = "@bob:b.example"
DEVICE = "DEV1"

Mutation = Callable[[JsonDict], None]


def _set(path: list[Any], value: Any) -> Mutation:
    def mutate(obj: JsonDict) -> None:
        target: Any = obj
        for name in path[:-1]:
            target = target[name]
        target[path[-1]] = value

    return mutate


def _delete(path: list[Any]) -> Mutation:
    def mutate(obj: JsonDict) -> None:
        target: Any = obj
        for name in path[:-1]:
            target = target[name]
        del target[path[-1]]

    return mutate


class DeviceKeysTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.device = ClientDevice(USER, DEVICE)

    def test_valid_keys_kept_as_uploaded(self) -> None:
        body = self.device.device_keys(extra_field={"kept": True})
        parsed = validate_device_keys_upload(body, USER, DEVICE)
        self.assertEqual(parsed.raw, body)
        self.assertEqual(parsed.device_id, DEVICE)
        self.assertEqual(set(parsed.keys), {f"ed25519:{DEVICE}", f"curve25519:{DEVICE}"})

    def test_table(self) -> None:
        ed = f"ed25519:{DEVICE}"
        table: list[tuple[str, Mutation, str, str]] = [
            ("user missing", _delete(["user_id"]), M_BAD_JSON, "device_keys.user_id"),
            ("user not a string", _set(["user_id"], 7), M_BAD_JSON, "device_keys.user_id"),
            ("other user", _set(["user_id"], OTHER), M_INVALID_PARAM, "device_keys.user_id"),
            ("device missing", _delete(["device_id"]), M_BAD_JSON, "device_keys.device_id"),
            ("other device", _set(["device_id"], "D2"), M_INVALID_PARAM, "device_keys.device_id"),
            ("algorithms missing", _delete(["algorithms"]), M_BAD_JSON, "device_keys.algorithms"),
            ("algorithms empty", _set(["algorithms"], []), M_BAD_JSON, "device_keys.algorithms"),
            (
                "algorithm not a string",
                _set(["algorithms"], ["x", 3]),
                M_BAD_JSON,
                "device_keys.algorithms[1]",
            ),
            ("keys missing", _delete(["keys"]), M_BAD_JSON, "device_keys.keys"),
            ("keys a list", _set(["keys"], ["a"]), M_BAD_JSON, "device_keys.keys"),
            (
                "key of another device",
                _set(["keys", "ed25519:OTHER"], "k"),
                M_INVALID_PARAM,
                'device_keys.keys["ed25519:OTHER"]',
            ),
            (
                "key name without algorithm",
                _set(["keys", "nocolon"], "k"),
                M_BAD_JSON,
                'device_keys.keys["nocolon"]',
            ),
            (
                "key not a string",
                _set(["keys", ed], 5),
                M_BAD_JSON,
                f'device_keys.keys["{ed}"]',
            ),
            ("signatures missing", _delete(["signatures"]), M_BAD_JSON, "device_keys.signatures"),
            (
                "signatures not objects",
                _set(["signatures", USER], "x"),
                M_BAD_JSON,
                f'device_keys.signatures["{USER}"]',
            ),
            ("a float", _set(["extra"], 1.5), M_BAD_JSON, "device_keys.extra"),
            ("a huge integer", _set(["extra"], 2**60), M_BAD_JSON, "device_keys.extra"),
            ("a lone surrogate", _set(["extra"], "\ud800"), M_BAD_JSON, "device_keys.extra"),
            ("a lone surrogate name", _set(["\udfff"], 1), M_BAD_JSON, "device_keys"),
        ]
        for name, mutate, errcode, field in table:
            with self.subTest(name):
                body = self.device.device_keys()
                mutate(body)
                with self.assertRaises(UploadError) as caught:
                    validate_device_keys_upload(body, USER, DEVICE)
                self.assertEqual((caught.exception.errcode, caught.exception.field), (errcode, field))
                self.assertTrue(str(caught.exception).startswith(field + ": "))

    def test_not_an_object(self) -> None:
        values: list[object] = [None, [], "keys", 3]
        for value in values:
            with self.assertRaises(UploadError) as caught:
                validate_device_keys_upload(value, USER, DEVICE)
            self.assertEqual(caught.exception.errcode, M_BAD_JSON)
            self.assertEqual(caught.exception.field, "device_keys")

    def test_too_deep(self) -> None:
        body = self.device.device_keys()
        deep: Any = "x"
        for _ in range(40):
            deep = [deep]
        body["extra"] = deep
        with self.assertRaises(UploadError) as caught:
            validate_device_keys_upload(body, USER, DEVICE)
        self.assertEqual(caught.exception.errcode, M_BAD_JSON)


class OneTimeKeyTests(SynchronousTestCase):
    def test_valid_keys_in_body_order(self) -> None:
        body = {
            "signed_curve25519:BBB": {"key": "k2", "signatures": {USER: {"ed25519:D": "s"}}},
            "signed_curve25519:AAA": {"key": "k1", "signatures": {}},
            "curve25519:CCC": "k3",
        }
        keys = validate_one_time_keys(body)
        self.assertEqual(
            [(k.algorithm, k.key_id, k.key) for k in keys],
            [
                ("signed_curve25519", "BBB", body["signed_curve25519:BBB"]),
                ("signed_curve25519", "AAA", body["signed_curve25519:AAA"]),
                ("curve25519", "CCC", "k3"),
            ],
        )
        self.assertEqual(validate_one_time_keys({}), ())

    def test_table(self) -> None:
        table: list[tuple[str, object, str, str]] = [
            ("not an object", ["a"], M_BAD_JSON, "one_time_keys"),
            ("no colon", {"AAA": "k"}, M_BAD_JSON, 'one_time_keys["AAA"]'),
            ("no key id", {"alg:": "k"}, M_BAD_JSON, 'one_time_keys["alg:"]'),
            ("no algorithm", {":AAA": "k"}, M_BAD_JSON, 'one_time_keys[":AAA"]'),
            ("empty key", {"a:A": ""}, M_BAD_JSON, 'one_time_keys["a:A"]'),
            ("a number", {"a:A": 3}, M_BAD_JSON, 'one_time_keys["a:A"]'),
            ("object without key", {"a:A": {"signatures": {}}}, M_BAD_JSON, 'one_time_keys["a:A"].key'),
            (
                "bad signatures",
                {"a:A": {"key": "k", "signatures": {"u": "x"}}},
                M_BAD_JSON,
                'one_time_keys["a:A"].signatures',
            ),
            ("float inside", {"a:A": {"key": "k", "n": 0.5}}, M_BAD_JSON, 'one_time_keys["a:A"].n'),
            ("very long id", {"a:" + "x" * 300: "k"}, M_BAD_JSON, 'one_time_keys["a:' + "x" * 300 + '"]'),
        ]
        for name, body, errcode, field in table:
            with self.subTest(name):
                with self.assertRaises(UploadError) as caught:
                    validate_one_time_keys(body)
                self.assertEqual((caught.exception.errcode, caught.exception.field), (errcode, field))

    def test_fallback_keys_one_per_algorithm(self) -> None:
        keys = validate_fallback_keys({"signed_curve25519:F1": {"key": "f", "fallback": True}})
        self.assertEqual(keys, (OneTimeKey("signed_curve25519", "F1", None),))
        with self.assertRaises(UploadError) as caught:
            validate_fallback_keys({"a:F1": "x", "a:F2": "y"})
        self.assertEqual(caught.exception.errcode, M_INVALID_PARAM)
        self.assertEqual(caught.exception.field, 'fallback_keys["a:F2"]')
        with self.assertRaises(UploadError) as caught:
            validate_fallback_keys({"a": "x"})
        self.assertEqual(caught.exception.field, 'fallback_keys["a"]')


class CrossSigningTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.cs = CrossSigning(USER)

    def existing(self) -> dict[str, CrossSigningKey]:
        return {"master": parse_cross_signing_key(self.cs.master_json, "m")}

    def test_all_three_at_once(self) -> None:
        keys = validate_cross_signing_upload(self.cs.upload_body(), USER, {})
        self.assertEqual(set(keys), {"master", "self_signing", "user_signing"})
        self.assertEqual(keys["master"].public_key, self.cs.master_public)
        self.assertEqual(keys["self_signing"].raw, self.cs.self_signing_json)

    def test_signed_by_the_stored_master(self) -> None:
        body = {"self_signing_key": self.cs.self_signing_json, "master_key": None}
        keys = validate_cross_signing_upload(body, USER, self.existing())
        self.assertEqual(set(keys), {"self_signing"})
        self.assertEqual(validate_cross_signing_upload({}, USER, self.existing()), {})

    def test_new_master_is_what_signs(self) -> None:
        # the uploaded master key replaces the stored one for the check
        other = CrossSigning(USER)
        body = {"master_key": other.master_json, "self_signing_key": self.cs.self_signing_json}
        with self.assertRaises(UploadError) as caught:
            validate_cross_signing_upload(body, USER, self.existing())
        self.assertEqual(caught.exception.errcode, M_INVALID_PARAM)
        self.assertEqual(
            caught.exception.field,
            f'self_signing_key.signatures["{USER}"]["ed25519:{other.master_public}"]',
        )

    def test_table(self) -> None:
        cs = self.cs
        master_field = f'master_key.keys["ed25519:{cs.master_public}"]'
        sig_field = f'self_signing_key.signatures["{USER}"]["ed25519:{cs.master_public}"]'
        bad_signature = cs.self_signing_json
        bad_signature["signatures"][USER][f"ed25519:{cs.master_public}"] = "A" * 86
        forged = CrossSigning(USER)
        table: list[tuple[str, JsonDict, dict[str, CrossSigningKey], str, str]] = [
            (
                "master of another user",
                {"master_key": {**cs.master_json, "user_id": OTHER}},
                {},
                M_INVALID_PARAM,
                "master_key.user_id",
            ),
            (
                "wrong usage",
                {"master_key": {**cs.master_json, "usage": ["self_signing"]}},
                {},
                M_INVALID_PARAM,
                "master_key.usage",
            ),
            (
                "usage missing",
                {"master_key": {k: v for k, v in cs.master_json.items() if k != "usage"}},
                {},
                M_BAD_JSON,
                "master_key.usage",
            ),
            (
                "two keys",
                {"master_key": {**cs.master_json, "keys": {"ed25519:a": "a", "ed25519:b": "b"}}},
                {},
                M_INVALID_PARAM,
                "master_key.keys",
            ),
            (
                "no key",
                {"master_key": {**cs.master_json, "keys": {}}},
                {},
                M_INVALID_PARAM,
                "master_key.keys",
            ),
            (
                "not ed25519",
                {"master_key": {**cs.master_json, "keys": {"curve25519:abc": "abc"}}},
                {},
                M_INVALID_PARAM,
                'master_key.keys["curve25519:abc"]',
            ),
            (
                "name and key differ",
                {"master_key": {**cs.master_json, "keys": {f"ed25519:{cs.master_public}": "x"}}},
                {},
                M_INVALID_PARAM,
                master_field,
            ),
            (
                "not a public key",
                {"master_key": {**cs.master_json, "keys": {"ed25519:abc": "abc"}}},
                {},
                M_INVALID_PARAM,
                'master_key.keys["ed25519:abc"]',
            ),
            ("master not an object", {"master_key": "x"}, {}, M_BAD_JSON, "master_key"),
            (
                "self-signing without any master",
                {"self_signing_key": cs.self_signing_json},
                {},
                M_INVALID_PARAM,
                "master_key",
            ),
            (
                "self-signing unsigned",
                {"master_key": cs.master_json, "self_signing_key": cs.key_json("self_signing")},
                {},
                M_INVALID_PARAM,
                sig_field,
            ),
            (
                "self-signing signed by another key",
                {
                    "master_key": cs.master_json,
                    "self_signing_key": cs.key_json("self_signing", forged.master),
                },
                {},
                M_INVALID_PARAM,
                sig_field,
            ),
            (
                "self-signing with a bad signature",
                {"master_key": cs.master_json, "self_signing_key": bad_signature},
                {},
                M_INVALID_PARAM,
                sig_field,
            ),
            (
                "user-signing unsigned",
                {"user_signing_key": cs.key_json("user_signing")},
                self.existing(),
                M_INVALID_PARAM,
                f'user_signing_key.signatures["{USER}"]["ed25519:{cs.master_public}"]',
            ),
            (
                "self-signing with a float",
                {"self_signing_key": {**cs.self_signing_json, "x": 1.0}},
                self.existing(),
                M_BAD_JSON,
                "self_signing_key.x",
            ),
        ]
        for name, body, existing, errcode, field in table:
            with self.subTest(name):
                with self.assertRaises(UploadError) as caught:
                    validate_cross_signing_upload(body, USER, existing)
                self.assertEqual((caught.exception.errcode, caught.exception.field), (errcode, field))

    def test_body_not_an_object(self) -> None:
        with self.assertRaises(UploadError) as caught:
            validate_cross_signing_upload([], USER, {})
        self.assertEqual(caught.exception.errcode, M_BAD_JSON)


class SignatureTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.cs = CrossSigning(USER)
        self.device = ClientDevice(USER, DEVICE)
        self.device2 = ClientDevice(USER, "DEV2")
        self.bob = CrossSigning(OTHER)
        self.context = SignatureUploadContext(
            user_id=USER,
            cross_signing_keys={
                usage: parse_cross_signing_key(body, usage)
                for usage, body in (
                    ("master", self.cs.master_json),
                    ("self_signing", self.cs.self_signing_json),
                    ("user_signing", self.cs.user_signing_json),
                )
            },
            devices={
                DEVICE: self.device.device_keys(),
                "DEV2": self.device2.device_keys(),
            },
            master_keys={OTHER: parse_cross_signing_key(self.bob.master_json, "m")},
        )

    def test_shape(self) -> None:
        table: list[tuple[object, str, str]] = [
            ([], M_BAD_JSON, "<body>"),
            ({"not a user": {}}, M_INVALID_PARAM, '["not a user"]'),
            ({USER: []}, M_BAD_JSON, f'["{USER}"]'),
            ({USER: {DEVICE: "x"}}, M_BAD_JSON, f'["{USER}"]["{DEVICE}"]'),
            ({USER: {DEVICE: {"a": 0.5}}}, M_BAD_JSON, f'["{USER}"]["{DEVICE}"].a'),
        ]
        for body, errcode, field in table:
            with self.subTest(field):
                with self.assertRaises(UploadError) as caught:
                    parse_signature_upload(body)
                self.assertEqual((caught.exception.errcode, caught.exception.field), (errcode, field))

    def test_own_device_signed_by_self_signing_key(self) -> None:
        stored = self.context.devices[DEVICE]
        signed = self.cs.sign_with("self_signing", {**stored, "unsigned": {"device_display_name": "x"}})
        result = verify_signature_upload({USER: {DEVICE: signed}}, self.context)
        key_id = f"ed25519:{self.cs.self_signing_public}"
        self.assertEqual(
            result.signatures,
            (UploadedSignature(USER, key_id, USER, DEVICE, signed["signatures"][USER][key_id]),),
        )
        self.assertEqual(result.failures, {})

    def test_own_master_signed_by_devices(self) -> None:
        signed = self.device2.sign(self.device.sign(self.cs.master_json))
        result = verify_signature_upload({USER: {self.cs.master_public: signed}}, self.context)
        self.assertEqual(
            [(s.signer_key_id, s.target_id) for s in result.signatures],
            [("ed25519:DEV1", self.cs.master_public), ("ed25519:DEV2", self.cs.master_public)],
        )
        self.assertEqual(result.failures, {})
        devices, others = signed_objects_needed({USER: {self.cs.master_public: signed}}, USER)
        self.assertEqual(set(devices), {"DEV1", "DEV2", self.cs.master_public})
        self.assertEqual(others, ())

    def test_other_users_master_signed_by_user_signing_key(self) -> None:
        signed = self.cs.sign_with("user_signing", self.bob.master_json)
        result = verify_signature_upload({OTHER: {self.bob.master_public: signed}}, self.context)
        key_id = f"ed25519:{self.cs.user_signing_public}"
        self.assertEqual(
            result.signatures,
            (
                UploadedSignature(
                    USER, key_id, OTHER, self.bob.master_public, signed["signatures"][USER][key_id]
                ),
            ),
        )

    def test_failures_per_item(self) -> None:
        stored = self.context.devices[DEVICE]
        good = self.cs.sign_with("self_signing", self.context.devices["DEV2"])
        changed = self.cs.sign_with("self_signing", {**stored, "algorithms": ["other"]})
        tampered = self.cs.sign_with("self_signing", stored)
        tampered["signatures"][USER][f"ed25519:{self.cs.self_signing_public}"] = "A" * 86
        forged_master = self.cs.sign_with("master", self.cs.master_json)
        stranger = ClientDevice(USER, "NOPE")
        by_unknown_device = stranger.sign(self.cs.master_json)
        upload = {
            USER: {
                "DEV2": good,
                DEVICE: changed,
                "GONE": self.cs.sign_with("self_signing", stored),
            },
            OTHER: {"notthekey": self.cs.sign_with("user_signing", self.bob.master_json)},
            "@carol:c.example": {"x": {"a": 1}},
        }
        result = verify_signature_upload(upload, self.context)
        self.assertEqual([s.target_id for s in result.signatures], ["DEV2"])
        self.assertEqual(
            {u: {k: (f["status"], f["errcode"]) for k, f in items.items()} for u, items in result.failures.items()},
            {
                USER: {DEVICE: (400, M_INVALID_PARAM), "GONE": (404, M_NOT_FOUND)},
                OTHER: {"notthekey": (404, M_NOT_FOUND)},
                "@carol:c.example": {"x": (404, M_NOT_FOUND)},
            },
        )
        for upload, errcode in (
            ({USER: {DEVICE: tampered}}, M_INVALID_SIGNATURE),
            ({USER: {DEVICE: stored}}, M_INVALID_SIGNATURE),
            ({USER: {self.cs.master_public: forged_master}}, M_INVALID_SIGNATURE),
            ({USER: {self.cs.master_public: by_unknown_device}}, M_INVALID_SIGNATURE),
            ({OTHER: {self.bob.master_public: self.bob.master_json}}, M_INVALID_SIGNATURE),
        ):
            with self.subTest(errcode=errcode, upload=list(upload)):
                result = verify_signature_upload(upload, self.context)
                self.assertEqual(result.signatures, ())
                (items,) = result.failures.values()
                (failure,) = items.values()
                self.assertEqual(failure["errcode"], errcode)
                self.assertEqual(failure["status"], 400)

    def test_missing_signing_keys(self) -> None:
        bare = SignatureUploadContext(USER, {}, self.context.devices, self.context.master_keys)
        signed = self.cs.sign_with("self_signing", self.context.devices[DEVICE])
        result = verify_signature_upload(
            {
                USER: {DEVICE: signed},
                OTHER: {self.bob.master_public: self.cs.sign_with("user_signing", self.bob.master_json)},
            },
            bare,
        )
        self.assertEqual(result.signatures, ())
        self.assertEqual(result.failures[USER][DEVICE]["errcode"], M_NOT_FOUND)
        self.assertEqual(result.failures[OTHER][self.bob.master_public]["errcode"], M_NOT_FOUND)

    def test_strip_signed(self) -> None:
        obj = {"a": 1, "signatures": {}, "unsigned": {}}
        self.assertEqual(strip_signed(obj), {"a": 1})
        self.assertEqual(obj, {"a": 1, "signatures": {}, "unsigned": {}})
        self.assertIsNot(copy.copy(obj), obj)
