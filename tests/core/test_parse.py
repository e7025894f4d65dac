"""Tests for devicelist_plugin.core.parse and devicelist_plugin.core.serialize.

Table-driven: each table row is (case name, input, expected error path).  A
table test reports every row that misbehaved, not only the first.
"""

from __future__ import annotations

import copy
import json
from typing import Any, Callable, Optional, Sequence

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from devicelist_plugin.core.models import (
    CrossSigningKey,
    DeviceKeys,
    DeviceListUpdate,
    ParseProblem,
    RemoteDevice,
    SigningKeyUpdate,
    UserDevicesResponse,
)
from devicelist_plugin.core.parse import (
    MAX_JSON_INT,
    ParseError,
    parse_cross_signing_key,
    parse_device_keys,
    parse_device_list_update,
    parse_server_name,
    parse_signing_key_update,
    parse_user_devices_response,
    server_name_of,
    split_user_id,
    validate_server_name,
)
from devicelist_plugin.core.serialize import (
    cross_signing_key_to_json,
    device_keys_to_json,
    device_list_update_to_json,
    signing_key_update_to_json,
    user_devices_response_to_json,
)

ALICE = "@alice:example.org"
BOB = "@bob:example.org"

# marks a field to remove in _with()
DROP: Any = object()


def _with(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A deep copy of ``base`` with fields replaced (or removed with DROP)."""
    out = {name: value for name, value in base.items() if value is not DROP}
    out = copy.deepcopy(out)
    for name, value in changes.items():
        if value is DROP:
            out.pop(name, None)
        else:
            out[name] = value
    return out


def device_keys(user_id: Any = ALICE, device_id: Any = "DEV", **changes: Any) -> dict[str, Any]:
    """A valid DeviceKeys object (``user_id=DROP`` etc. removes the field)."""
    dev = device_id if isinstance(device_id, str) else "DEV"
    user = user_id if isinstance(user_id, str) else ALICE
    base = {
        "user_id": user_id,
        "device_id": device_id,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": {
            f"curve25519:{dev}": "curvekey",
            f"ed25519:{dev}": "edkey",
        },
        "signatures": {user: {f"ed25519:{dev}": "sig"}},
    }
    return _with(base, **changes)


def cs_key(user_id: Any = ALICE, usage: Any = "master", **changes: Any) -> dict[str, Any]:
    """A valid CrossSigningKey object; a string ``usage`` becomes ``[usage]``."""
    user = user_id if isinstance(user_id, str) else ALICE
    base = {
        "user_id": user_id,
        "usage": [usage] if isinstance(usage, str) else usage,
        "keys": {"ed25519:PUBKEY": "PUBKEY"},
        "signatures": {user: {"ed25519:DEV": "sig"}},
    }
    return _with(base, **changes)


def edu(**changes: Any) -> dict[str, Any]:
    base = {
        "user_id": ALICE,
        "device_id": "DEV",
        "stream_id": 6,
        "prev_id": [5],
        "deleted": False,
        "device_display_name": "Alice's phone",
        "keys": device_keys(),
    }
    return _with(base, **changes)


def devices_body(**changes: Any) -> dict[str, Any]:
    base = {
        "user_id": ALICE,
        "stream_id": 40,
        "devices": [
            {"device_id": "DEV", "keys": device_keys(), "device_display_name": "phone"},
            {"device_id": "DEV2", "keys": device_keys(device_id="DEV2")},
        ],
        "master_key": cs_key(usage="master"),
        "self_signing_key": cs_key(usage="self_signing"),
    }
    return _with(base, **changes)


class _TableMixin(SynchronousTestCase):
    def assertErrorPaths(
        self, parse: Callable[[Any], object], cases: Sequence[tuple[str, Any, str]]
    ) -> None:
        """Every case is rejected with a ParseError at exactly its path."""
        problems = []
        for name, value, path in cases:
            try:
                result = parse(value)
            except ParseError as e:
                if e.path != path:
                    problems.append(f"{name}: error at {e.path!r}, expected {path!r} ({e})")
            else:
                problems.append(f"{name}: accepted as {result!r}, expected error at {path!r}")
        if problems:
            self.fail("\n".join(problems))

    def assertAccepted(
        self, parse: Callable[[Any], object], cases: Sequence[tuple[str, Any]]
    ) -> None:
        problems = []
        for name, value in cases:
            try:
                parse(value)
            except ParseError as e:
                problems.append(f"{name}: rejected: {e}")
        if problems:
            self.fail("\n".join(problems))


class ParseErrorTests(SynchronousTestCase):
    def test_fields_and_str(self) -> None:
        e = ParseError("content.prev_id[2]", "expected an integer, got a string")
        self.assertIsInstance(e, ValueError)
        self.assertEqual(e.path, "content.prev_id[2]")
        self.assertEqual(e.message, "expected an integer, got a string")
        self.assertEqual(str(e), "content.prev_id[2]: expected an integer, got a string")

    def test_str_without_path(self) -> None:
        self.assertEqual(str(ParseError("", "expected an object")), "expected an object")


class UserIdTests(_TableMixin):
    def test_valid(self) -> None:
        cases = [
            ("@alice:example.org", ("alice", "example.org")),
            ("@alice:example.org:8448", ("alice", "example.org:8448")),
            ("@a:localhost", ("a", "localhost")),
            ("@a:localhost:1", ("a", "localhost:1")),
            ("@a:localhost:65535", ("a", "localhost:65535")),
            ("@a:1.2.3.4", ("a", "1.2.3.4")),
            ("@a:1.2.3.4:8008", ("a", "1.2.3.4:8008")),
            ("@a:[::1]", ("a", "[::1]")),
            ("@a:[2001:db8::1]:8448", ("a", "[2001:db8::1]:8448")),
            ("@a:[::ffff:1.2.3.4]", ("a", "[::ffff:1.2.3.4]")),
            ("@a:xn--bcher-kva.example", ("a", "xn--bcher-kva.example")),
            # historical localparts: any printable ASCII but ':'
            ("@Alice_=/+!#~:example.org", ("Alice_=/+!#~", "example.org")),
            # 255 bytes exactly
            ("@" + "a" * 242 + ":example.org", ("a" * 242, "example.org")),
        ]
        problems = []
        for user_id, expected in cases:
            try:
                got = split_user_id(user_id)
            except ParseError as e:
                problems.append(f"{user_id!r}: rejected: {e}")
            else:
                if got != expected:
                    problems.append(f"{user_id!r}: {got!r} != {expected!r}")
        if problems:
            self.fail("\n".join(problems))

    def test_invalid(self) -> None:
        cases = [
            "",
            "alice:example.org",
            "#alice:example.org",
            "@alice",
            "@:example.org",
            "@alice:",
            "@alice:example.org:",
            "@alice:example.org:0",
            "@alice:example.org:65536",
            "@alice:example.org:123456",
            "@alice:example.org:http",
            "@alice:example.org:-1",
            "@alice:exa_mple.org",
            "@alice:exa mple.org",
            "@alice:example..org",
            "@alice:.example.org",
            "@alice:example.org.",
            "@alice:example.org/path",
            "@alice:[::1",
            "@alice:[::1]x",
            "@alice:[::1]:",
            "@alice:[zz::1]",
            "@alice:[1.2.3.4]",
            "@alice:[fe80::1%eth0]",
            "@alice:[]",
            "@al\x00ice:example.org",
            # 256 bytes
            "@" + "a" * 243 + ":example.org",
            # 255 characters but more than 255 UTF-8 bytes
            "@" + "é" * 241 + ":example.org",
            "@alice:" + "a" * 256,
            "@\ud800:example.org",
        ]
        self.assertErrorPaths(split_user_id, [(repr(c), c, "user_id") for c in cases])

    def test_error_path_is_callers(self) -> None:
        e = self.assertRaises(ParseError, split_user_id, "nope", "content.user_id")
        self.assertEqual(e.path, "content.user_id")

    def test_server_name_of(self) -> None:
        self.assertEqual(server_name_of("@alice:example.org:8448"), "example.org:8448")
        self.assertEqual(server_name_of("@a:[::1]:8448"), "[::1]:8448")
        self.assertRaises(ParseError, server_name_of, "alice")

    def test_validate_server_name(self) -> None:
        self.assertEqual(validate_server_name("example.org:8448"), "example.org:8448")
        e = self.assertRaises(ParseError, validate_server_name, "exa_mple.org", "origin")
        self.assertEqual(e.path, "origin")

    def test_parse_server_name(self) -> None:
        self.assertEqual(parse_server_name("example.org"), ("example.org", None))
        self.assertEqual(parse_server_name("example.org:8448"), ("example.org", 8448))
        self.assertEqual(parse_server_name("[::1]:80"), ("[::1]", 80))
        self.assertEqual(parse_server_name("10.0.0.1"), ("10.0.0.1", None))
        self.assertRaises(ParseError, parse_server_name, "example.org:0")


class DeviceListUpdateTests(_TableMixin):
    def test_full(self) -> None:
        content = edu(prev_id=[3, 5], unknown_field={"x": 1})
        u = parse_device_list_update(content)
        self.assertEqual(u.user_id, ALICE)
        self.assertEqual(u.device_id, "DEV")
        self.assertEqual(u.stream_id, 6)
        self.assertEqual(u.prev_ids, (3, 5))
        self.assertIs(u.deleted, False)
        self.assertEqual(u.display_name, "Alice's phone")
        assert u.keys is not None
        self.assertEqual(u.keys.user_id, ALICE)
        self.assertEqual(u.keys.device_id, "DEV")
        self.assertEqual(u.keys.algorithms, ("m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"))
        self.assertEqual(u.keys.keys, {"curve25519:DEV": "curvekey", "ed25519:DEV": "edkey"})
        self.assertEqual(u.keys.signatures, {ALICE: {"ed25519:DEV": "sig"}})
        self.assertEqual(u.keys.raw, device_keys())

    def test_deleted(self) -> None:
        u = parse_device_list_update(edu(deleted=True, keys=DROP))
        self.assertIs(u.deleted, True)
        self.assertIsNone(u.keys)

    def test_minimal_and_nulls(self) -> None:
        """Optional fields may be missing or null, with the same meaning."""
        expected = DeviceListUpdate(user_id=ALICE, device_id="DEV", stream_id=6)
        minimal = {"user_id": ALICE, "device_id": "DEV", "stream_id": 6}
        nulls = dict(
            minimal, prev_id=None, deleted=None, device_display_name=None, keys=None
        )
        self.assertEqual(parse_device_list_update(minimal), expected)
        self.assertEqual(parse_device_list_update(nulls), expected)
        self.assertEqual(parse_device_list_update(dict(minimal, prev_id=[])), expected)

    def test_unknown_fields_ignored(self) -> None:
        self.assertEqual(
            parse_device_list_update(edu(org_example_extra=[1, {"a": None}], origin="x")),
            parse_device_list_update(edu()),
        )

    def test_boundaries_accepted(self) -> None:
        self.assertAccepted(
            parse_device_list_update,
            [
                ("stream_id max", edu(stream_id=MAX_JSON_INT)),
                ("stream_id min", edu(stream_id=-MAX_JSON_INT)),
                ("stream_id 0", edu(stream_id=0)),
                ("prev_id max", edu(prev_id=[MAX_JSON_INT, -MAX_JSON_INT])),
                ("1000 prev_ids", edu(prev_id=list(range(1000)))),
                ("display name 1000", edu(device_display_name="n" * 1000)),
                ("display name empty", edu(device_display_name="")),
                (
                    "device_id 255",
                    edu(device_id="d" * 255, keys=device_keys(device_id="d" * 255)),
                ),
                ("device_id with colon", edu(device_id="a:b", keys=device_keys(device_id="a:b"))),
                ("user_id with port", edu(user_id="@a:example.org:8448", keys=DROP)),
            ],
        )

    def test_missing_required(self) -> None:
        self.assertErrorPaths(
            parse_device_list_update,
            [
                ("no user_id", edu(user_id=DROP), "content.user_id"),
                ("no device_id", edu(device_id=DROP), "content.device_id"),
                ("no stream_id", edu(stream_id=DROP), "content.stream_id"),
                ("empty", {}, "content.user_id"),
            ],
        )
        e = self.assertRaises(ParseError, parse_device_list_update, edu(stream_id=DROP))
        self.assertEqual(e.message, "required field missing")

    def test_wrong_types(self) -> None:
        self.assertErrorPaths(
            parse_device_list_update,
            [
                ("content list", [], "content"),
                ("content string", "x", "content"),
                ("content null", None, "content"),
                ("user_id int", edu(user_id=5), "content.user_id"),
                ("user_id null", edu(user_id=None), "content.user_id"),
                ("user_id no sigil", edu(user_id="alice:example.org"), "content.user_id"),
                ("user_id no server", edu(user_id="@alice"), "content.user_id"),
                ("user_id bad server", edu(user_id="@alice:exa_mple"), "content.user_id"),
                ("user_id oversize", edu(user_id="@" + "a" * 300 + ":x.org"), "content.user_id"),
                ("device_id empty", edu(device_id=""), "content.device_id"),
                ("device_id int", edu(device_id=7), "content.device_id"),
                ("device_id null", edu(device_id=None), "content.device_id"),
                ("device_id oversize", edu(device_id="d" * 256), "content.device_id"),
                ("stream_id bool", edu(stream_id=True), "content.stream_id"),
                ("stream_id false", edu(stream_id=False), "content.stream_id"),
                ("stream_id float", edu(stream_id=6.0), "content.stream_id"),
                ("stream_id string", edu(stream_id="6"), "content.stream_id"),
                ("stream_id null", edu(stream_id=None), "content.stream_id"),
                ("stream_id too big", edu(stream_id=2**53), "content.stream_id"),
                ("stream_id too small", edu(stream_id=-(2**53)), "content.stream_id"),
                ("prev_id string", edu(prev_id="5"), "content.prev_id"),
                ("prev_id int", edu(prev_id=5), "content.prev_id"),
                ("prev_id object", edu(prev_id={"5": 5}), "content.prev_id"),
                ("prev_id has string", edu(prev_id=[1, 2, "3"]), "content.prev_id[2]"),
                ("prev_id has bool", edu(prev_id=[True]), "content.prev_id[0]"),
                ("prev_id has float", edu(prev_id=[4, 5.5]), "content.prev_id[1]"),
                ("prev_id has null", edu(prev_id=[None]), "content.prev_id[0]"),
                ("prev_id has big int", edu(prev_id=[2**53]), "content.prev_id[0]"),
                ("prev_id 1001 entries", edu(prev_id=list(range(1001))), "content.prev_id"),
                ("deleted string", edu(deleted="true"), "content.deleted"),
                ("deleted int", edu(deleted=1), "content.deleted"),
                ("name int", edu(device_display_name=5), "content.device_display_name"),
                ("name object", edu(device_display_name={}), "content.device_display_name"),
                (
                    "name oversize",
                    edu(device_display_name="n" * 1001),
                    "content.device_display_name",
                ),
                ("keys string", edu(keys="keys"), "content.keys"),
                ("keys list", edu(keys=[]), "content.keys"),
                ("keys int", edu(keys=5), "content.keys"),
                ("keys bool", edu(keys=False), "content.keys"),
            ],
        )

    def test_bad_device_keys(self) -> None:
        sig_path = 'content.keys.signatures["@alice:example.org"]'
        self.assertErrorPaths(
            parse_device_list_update,
            [
                (
                    "keys for another user",
                    edu(keys=device_keys(user_id=BOB)),
                    "content.keys.user_id",
                ),
                (
                    "keys for another device",
                    edu(keys=device_keys(device_id="OTHER")),
                    "content.keys.device_id",
                ),
                ("keys.user_id missing", edu(keys=device_keys(user_id=DROP)), "content.keys.user_id"),
                (
                    "keys.device_id missing",
                    edu(keys=device_keys(device_id=DROP)),
                    "content.keys.device_id",
                ),
                (
                    "algorithms missing",
                    edu(keys=device_keys(algorithms=DROP)),
                    "content.keys.algorithms",
                ),
                (
                    "algorithms string",
                    edu(keys=device_keys(algorithms="ed25519")),
                    "content.keys.algorithms",
                ),
                (
                    "algorithms has int",
                    edu(keys=device_keys(algorithms=["a", 1])),
                    "content.keys.algorithms[1]",
                ),
                ("keys.keys missing", edu(keys=device_keys(keys=DROP)), "content.keys.keys"),
                ("keys.keys list", edu(keys=device_keys(keys=["x"])), "content.keys.keys"),
                (
                    "key value int",
                    edu(keys=device_keys(keys={"ed25519:DEV": 1})),
                    'content.keys.keys["ed25519:DEV"]',
                ),
                (
                    "key for another device",
                    edu(keys=device_keys(keys={"ed25519:DEV": "k", "ed25519:OTHER": "k"})),
                    'content.keys.keys["ed25519:OTHER"]',
                ),
                (
                    "key name without algorithm",
                    edu(keys=device_keys(keys={":DEV": "k"})),
                    'content.keys.keys[":DEV"]',
                ),
                (
                    "key name without colon",
                    edu(keys=device_keys(keys={"ed25519": "k"})),
                    "content.keys.keys.ed25519",
                ),
                (
                    "signatures missing",
                    edu(keys=device_keys(signatures=DROP)),
                    "content.keys.signatures",
                ),
                (
                    "signatures list",
                    edu(keys=device_keys(signatures=[])),
                    "content.keys.signatures",
                ),
                (
                    "signatures of user not an object",
                    edu(keys=device_keys(signatures={ALICE: "sig"})),
                    sig_path,
                ),
                (
                    "signature not a string",
                    edu(keys=device_keys(signatures={ALICE: {"ed25519:DEV": 5}})),
                    sig_path + '["ed25519:DEV"]',
                ),
            ],
        )

    def test_key_name_error_names_the_devices(self) -> None:
        e = self.assertRaises(
            ParseError,
            parse_device_list_update,
            edu(keys=device_keys(keys={"ed25519:OTHER": "k"})),
        )
        self.assertIn("OTHER", e.message)
        self.assertIn("DEV", e.message)


class DeviceKeysTests(_TableMixin):
    def test_raw_is_deep_copy_with_unknown_fields(self) -> None:
        obj = device_keys(unsigned={"device_display_name": "phone"}, extra=[1, 2])
        k = parse_device_keys(obj)
        obj["unsigned"]["device_display_name"] = "changed"
        obj["keys"]["ed25519:DEV"] = "changed"
        self.assertEqual(k.raw["unsigned"], {"device_display_name": "phone"})
        self.assertEqual(k.raw["extra"], [1, 2])
        self.assertEqual(k.keys["ed25519:DEV"], "edkey")
        self.assertEqual(k.raw["keys"]["ed25519:DEV"], "edkey")

    def test_expected_ids_and_default_path(self) -> None:
        self.assertErrorPaths(
            lambda o: parse_device_keys(o, expected_user_id=BOB),
            [("wrong user", device_keys(), "keys.user_id")],
        )
        self.assertErrorPaths(
            lambda o: parse_device_keys(o, expected_device_id="X"),
            [("wrong device", device_keys(), "keys.device_id")],
        )
        k = parse_device_keys(device_keys(), expected_user_id=ALICE, expected_device_id="DEV")
        self.assertEqual((k.user_id, k.device_id), (ALICE, "DEV"))

    def test_empty_collections_allowed(self) -> None:
        k = parse_device_keys(device_keys(algorithms=[], keys={}, signatures={}))
        self.assertEqual((k.algorithms, dict(k.keys), dict(k.signatures)), ((), {}, {}))

    def test_non_string_member_names(self) -> None:
        """A Python caller's dict with non-string names is a ParseError, not a
        TypeError."""
        self.assertErrorPaths(
            parse_device_keys,
            [("int key name", device_keys(keys={1: "k"}), "keys.keys")],
        )


class CrossSigningKeyTests(_TableMixin):
    def test_valid(self) -> None:
        k = parse_cross_signing_key(
            cs_key(extra=True), "master_key", expected_user_id=ALICE, expected_usage="master"
        )
        self.assertEqual(k.user_id, ALICE)
        self.assertEqual(k.usage, ("master",))
        self.assertEqual(k.key_id, "ed25519:PUBKEY")
        self.assertEqual(k.public_key, "PUBKEY")
        self.assertEqual(k.signatures, {ALICE: {"ed25519:DEV": "sig"}})
        self.assertIs(k.raw["extra"], True)

    def test_signatures_optional(self) -> None:
        for obj in (cs_key(signatures=DROP), cs_key(signatures=None)):
            self.assertEqual(parse_cross_signing_key(obj, "k").signatures, {})

    def test_errors(self) -> None:
        def parse(o: object) -> CrossSigningKey:
            return parse_cross_signing_key(
                o, "ck", expected_user_id=ALICE, expected_usage="master"
            )

        self.assertErrorPaths(
            parse,
            [
                ("not an object", "k", "ck"),
                ("user_id missing", cs_key(user_id=DROP), "ck.user_id"),
                ("other user", cs_key(user_id=BOB), "ck.user_id"),
                ("usage missing", cs_key(usage=DROP), "ck.usage"),
                ("usage empty", cs_key(usage=[]), "ck.usage"),
                ("usage string", _with(cs_key(), usage="master"), "ck.usage"),
                ("usage has int", cs_key(usage=["master", 1]), "ck.usage[1]"),
                ("wrong usage", cs_key(usage="self_signing"), "ck.usage"),
                ("keys missing", cs_key(keys=DROP), "ck.keys"),
                ("no keys", cs_key(keys={}), "ck.keys"),
                ("two keys", cs_key(keys={"ed25519:A": "A", "ed25519:B": "B"}), "ck.keys"),
                ("key value int", cs_key(keys={"ed25519:A": 1}), 'ck.keys["ed25519:A"]'),
                ("key name no colon", cs_key(keys={"A": "A"}), "ck.keys.A"),
                ("key name no id", cs_key(keys={"ed25519:": "A"}), 'ck.keys["ed25519:"]'),
                ("signatures list", cs_key(signatures=[]), "ck.signatures"),
            ],
        )


class SigningKeyUpdateTests(_TableMixin):
    def test_full(self) -> None:
        u = parse_signing_key_update(
            {
                "user_id": ALICE,
                "master_key": cs_key(usage="master"),
                "self_signing_key": cs_key(usage="self_signing"),
                "unknown": 1,
            }
        )
        self.assertEqual(u.user_id, ALICE)
        assert u.master_key is not None and u.self_signing_key is not None
        self.assertEqual(u.master_key.usage, ("master",))
        self.assertEqual(u.self_signing_key.usage, ("self_signing",))

    def test_absent_and_null_keys(self) -> None:
        expected = SigningKeyUpdate(user_id=ALICE)
        self.assertEqual(parse_signing_key_update({"user_id": ALICE}), expected)
        self.assertEqual(
            parse_signing_key_update(
                {"user_id": ALICE, "master_key": None, "self_signing_key": None}
            ),
            expected,
        )

    def test_errors(self) -> None:
        self.assertErrorPaths(
            parse_signing_key_update,
            [
                ("not an object", [], "content"),
                ("user_id missing", {"master_key": cs_key()}, "content.user_id"),
                ("user_id bad", {"user_id": "alice"}, "content.user_id"),
                (
                    "master for another user",
                    {"user_id": ALICE, "master_key": cs_key(user_id=BOB)},
                    "content.master_key.user_id",
                ),
                (
                    "master with self_signing usage",
                    {"user_id": ALICE, "master_key": cs_key(usage="self_signing")},
                    "content.master_key.usage",
                ),
                (
                    "self_signing with master usage",
                    {"user_id": ALICE, "self_signing_key": cs_key(usage="master")},
                    "content.self_signing_key.usage",
                ),
                (
                    "self_signing not an object",
                    {"user_id": ALICE, "self_signing_key": "key"},
                    "content.self_signing_key",
                ),
            ],
        )


class UserDevicesResponseTests(_TableMixin):
    def test_full(self) -> None:
        r = parse_user_devices_response(devices_body(extra={"a": 1}), expected_user_id=ALICE)
        self.assertEqual(r.user_id, ALICE)
        self.assertEqual(r.stream_id, 40)
        self.assertEqual([d.device_id for d in r.devices], ["DEV", "DEV2"])
        self.assertEqual(r.devices[0].display_name, "phone")
        self.assertIsNone(r.devices[1].display_name)
        assert r.devices[1].keys is not None
        self.assertEqual(r.devices[1].keys.device_id, "DEV2")
        assert r.master_key is not None and r.self_signing_key is not None
        self.assertEqual(r.master_key.usage, ("master",))
        self.assertEqual(r.self_signing_key.usage, ("self_signing",))
        self.assertEqual(r.skipped, ())

    def test_keys_are_copied_unless_the_body_is_handed_over(self) -> None:
        body = devices_body()
        copied = parse_user_devices_response(body, expected_user_id=ALICE)
        owned = parse_user_devices_response(body, expected_user_id=ALICE, owned=True)
        raw = body["devices"][1]["keys"]
        assert copied.devices[1].keys is not None and owned.devices[1].keys is not None
        self.assertEqual(copied.devices[1].keys.raw, raw)
        self.assertIsNot(copied.devices[1].keys.raw, raw)
        self.assertIs(owned.devices[1].keys.raw, raw)

    def test_empty_and_minimal(self) -> None:
        r = parse_user_devices_response({"user_id": ALICE, "stream_id": 0, "devices": []})
        self.assertEqual(r, UserDevicesResponse(user_id=ALICE, stream_id=0, devices=()))

    def test_nulls_tolerated(self) -> None:
        """Dendrite sends "master_key": null; keys and names may be null."""
        r = parse_user_devices_response(
            devices_body(
                master_key=None,
                self_signing_key=None,
                devices=[
                    {"device_id": "A", "keys": None, "device_display_name": None},
                    {"device_id": "B"},
                ],
            )
        )
        self.assertEqual(r.devices, (RemoteDevice("A"), RemoteDevice("B")))
        self.assertIsNone(r.master_key)
        self.assertIsNone(r.self_signing_key)
        self.assertEqual(r.skipped, ())

    def test_fatal_errors(self) -> None:
        def parse(b: object) -> UserDevicesResponse:
            return parse_user_devices_response(b, expected_user_id=ALICE)

        self.assertErrorPaths(
            parse,
            [
                ("body list", [], ""),
                ("body null", None, ""),
                ("user_id missing", devices_body(user_id=DROP), "user_id"),
                ("other user", devices_body(user_id=BOB), "user_id"),
                ("user_id malformed", devices_body(user_id="alice"), "user_id"),
                ("stream_id missing", devices_body(stream_id=DROP), "stream_id"),
                ("stream_id string", devices_body(stream_id="40"), "stream_id"),
                ("stream_id bool", devices_body(stream_id=True), "stream_id"),
                ("stream_id float", devices_body(stream_id=40.0), "stream_id"),
                ("stream_id too big", devices_body(stream_id=2**60), "stream_id"),
                ("devices missing", devices_body(devices=DROP), "devices"),
                ("devices object", devices_body(devices={}), "devices"),
                ("devices null", devices_body(devices=None), "devices"),
            ],
        )

    def test_path_prefix(self) -> None:
        e = self.assertRaises(
            ParseError, parse_user_devices_response, devices_body(stream_id="x"), "body"
        )
        self.assertEqual(e.path, "body.stream_id")

    def test_malformed_devices_skipped(self) -> None:
        good = {"device_id": "GOOD", "keys": device_keys(device_id="GOOD")}
        good2 = {"device_id": "GOOD2", "device_display_name": "tablet"}
        body = devices_body(
            devices=[
                good,
                {"device_id": 5},
                "not a device",
                {"device_id": "BAD", "keys": device_keys(device_id="BAD", algorithms="x")},
                {"device_id": "EVE", "keys": device_keys(user_id=BOB, device_id="EVE")},
                {"device_id": "MISMATCH", "keys": device_keys(device_id="OTHER")},
                {"keys": device_keys()},
                {"device_id": "NAME", "device_display_name": "n" * 1001},
                {"device_id": "GOOD", "device_display_name": "duplicate"},
                good2,
            ]
        )
        r = parse_user_devices_response(body, expected_user_id=ALICE)
        self.assertEqual([d.device_id for d in r.devices], ["GOOD", "GOOD2"])
        self.assertIsNone(r.devices[0].display_name)
        self.assertEqual(r.devices[1].display_name, "tablet")
        self.assertEqual(
            [p.path for p in r.skipped],
            [
                "devices[1].device_id",
                "devices[2]",
                "devices[3].keys.algorithms",
                "devices[4].keys.user_id",
                "devices[5].keys.device_id",
                "devices[6].device_id",
                "devices[7].device_display_name",
                "devices[8].device_id",
            ],
        )
        for problem in r.skipped:
            self.assertIsInstance(problem, ParseProblem)
            self.assertTrue(problem.message)
        self.assertIn("duplicate", r.skipped[-1].message)
        # the cross-signing keys are unaffected
        self.assertIsNotNone(r.master_key)

    def test_malformed_cross_signing_key_skipped(self) -> None:
        r = parse_user_devices_response(
            devices_body(
                master_key=cs_key(keys={}),
                self_signing_key=cs_key(usage="master"),
            )
        )
        self.assertIsNone(r.master_key)
        self.assertIsNone(r.self_signing_key)
        self.assertEqual(
            [p.path for p in r.skipped], ["master_key.keys", "self_signing_key.usage"]
        )
        self.assertEqual(len(r.devices), 2)

    def test_cross_signing_key_of_other_user_skipped(self) -> None:
        r = parse_user_devices_response(devices_body(master_key=cs_key(user_id=BOB)))
        self.assertIsNone(r.master_key)
        self.assertEqual(r.skipped, (ParseProblem("master_key.user_id", r.skipped[0].message),))


class SerializeTests(SynchronousTestCase):
    def test_device_list_update_minimal(self) -> None:
        u = DeviceListUpdate(user_id=ALICE, device_id="DEV", stream_id=1)
        self.assertEqual(
            device_list_update_to_json(u),
            {"user_id": ALICE, "device_id": "DEV", "stream_id": 1, "prev_id": []},
        )

    def test_device_list_update_full(self) -> None:
        keys_json = device_keys(unsigned={"x": 1})
        u = DeviceListUpdate(
            user_id=ALICE,
            device_id="DEV",
            stream_id=7,
            prev_ids=(5, 6),
            deleted=True,
            display_name="",
            keys=parse_device_keys(keys_json),
        )
        self.assertEqual(
            device_list_update_to_json(u),
            {
                "user_id": ALICE,
                "device_id": "DEV",
                "stream_id": 7,
                "prev_id": [5, 6],
                "deleted": True,
                "device_display_name": "",
                "keys": keys_json,
            },
        )

    def test_output_is_a_copy(self) -> None:
        k = parse_device_keys(device_keys())
        out = device_keys_to_json(k)
        out["keys"]["ed25519:DEV"] = "changed"
        self.assertEqual(k.raw["keys"]["ed25519:DEV"], "edkey")
        ck = parse_cross_signing_key(cs_key(), "k")
        out = cross_signing_key_to_json(ck)
        out["usage"].append("x")
        self.assertEqual(ck.raw["usage"], ["master"])

    def test_signing_key_update(self) -> None:
        master = cs_key(usage="master")
        self.assertEqual(
            signing_key_update_to_json(
                SigningKeyUpdate(ALICE, master_key=parse_cross_signing_key(master, "m"))
            ),
            {"user_id": ALICE, "master_key": master},
        )

    def test_user_devices_response(self) -> None:
        body = devices_body()
        self.assertEqual(user_devices_response_to_json(parse_user_devices_response(body)), body)
        minimal = {
            "user_id": ALICE,
            "stream_id": 3,
            "devices": [{"device_id": "A"}, {"device_id": "B", "device_display_name": "b"}],
        }
        self.assertEqual(
            user_devices_response_to_json(parse_user_devices_response(minimal)), minimal
        )


# --------------------------------------------------------------------------
# properties

json_ints = st.integers(min_value=-MAX_JSON_INT, max_value=MAX_JSON_INT)
localparts = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E, blacklist_characters=":"),
    min_size=1,
    max_size=30,
)
dns_names = st.from_regex(r"[a-z0-9-]{1,10}(\.[a-z0-9-]{1,10}){0,3}", fullmatch=True)
hosts = st.one_of(
    dns_names,
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda a: f"[{a}]"),
)
server_names = st.builds(
    lambda host, port: host if port is None else f"{host}:{port}",
    hosts,
    st.none() | st.integers(min_value=1, max_value=65535),
)
user_ids = st.builds(lambda lp, sn: f"@{lp}:{sn}", localparts, server_names)
device_ids = st.text(min_size=1, max_size=40)
short_text = st.text(max_size=20)
json_values = st.recursive(
    st.none() | st.booleans() | json_ints | st.floats(allow_nan=False) | short_text,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(short_text, children, max_size=4),
    max_leaves=12,
)


@st.composite
def device_keys_json(draw: st.DrawFn, user_id: str, device_id: str) -> dict[str, Any]:
    algorithm_names = st.text(min_size=1, max_size=10).filter(lambda s: ":" not in s)
    obj: dict[str, Any] = {
        "user_id": user_id,
        "device_id": device_id,
        "algorithms": draw(st.lists(short_text, max_size=3)),
        "keys": {
            f"{alg}:{device_id}": value
            for alg, value in draw(st.dictionaries(algorithm_names, short_text, max_size=3)).items()
        },
        "signatures": draw(
            st.dictionaries(short_text, st.dictionaries(short_text, short_text, max_size=2), max_size=2)
        ),
    }
    if draw(st.booleans()):
        obj["unsigned"] = {"device_display_name": draw(short_text)}
    return obj


@st.composite
def device_list_updates(draw: st.DrawFn) -> DeviceListUpdate:
    user_id = draw(user_ids)
    device_id = draw(device_ids)
    keys: Optional[DeviceKeys] = None
    if draw(st.booleans()):
        keys = parse_device_keys(draw(device_keys_json(user_id, device_id)))
    return DeviceListUpdate(
        user_id=user_id,
        device_id=device_id,
        stream_id=draw(json_ints),
        prev_ids=tuple(draw(st.lists(json_ints, max_size=5))),
        deleted=draw(st.booleans()),
        display_name=draw(st.none() | st.text(max_size=50)),
        keys=keys,
    )


def _via_json(obj: dict[str, Any]) -> Any:
    """What the other side decodes."""
    return json.loads(json.dumps(obj))


class PropertyTests(SynchronousTestCase):
    @given(device_list_updates())
    def test_device_list_update_round_trip(self, u: DeviceListUpdate) -> None:
        wire = device_list_update_to_json(u)
        parsed = parse_device_list_update(_via_json(wire))
        self.assertEqual(parsed, u)
        # the signed keys object survives byte-for-byte in meaning
        self.assertEqual(device_list_update_to_json(parsed), wire)

    @given(user_ids)
    def test_generated_user_ids_split(self, user_id: str) -> None:
        localpart, server_name = split_user_id(user_id)
        self.assertEqual(f"@{localpart}:{server_name}", user_id)
        self.assertNotIn(":", localpart)

    @given(json_values)
    @settings(max_examples=200)
    def test_arbitrary_json_only_parse_errors(self, value: object) -> None:
        """No input makes a parser raise anything but ParseError."""
        for parse in (
            parse_device_list_update,
            parse_signing_key_update,
            parse_user_devices_response,
            parse_device_keys,
        ):
            try:
                parse(value)
            except ParseError:
                pass

    @given(
        st.sampled_from(
            ["user_id", "device_id", "stream_id", "prev_id", "deleted", "device_display_name", "keys"]
        ),
        json_values,
    )
    def test_error_blames_the_changed_field(self, name: str, value: object) -> None:
        """Replacing one field of a valid EDU either parses or fails at that
        field (keys: at keys, or because user/device no longer match them)."""
        content = edu(**{name: value})
        try:
            parse_device_list_update(content)
        except ParseError as e:
            field = f"content.{name}"
            blamed = e.path == field or e.path.startswith((field + ".", field + "["))
            if name in ("user_id", "device_id") and not blamed:
                # the keys object now names a different user/device
                blamed = e.path == f"content.keys.{name}"
            self.assertTrue(blamed, f"{name}={value!r} blamed {e.path!r}: {e.message}")

    @given(st.lists(st.one_of(json_values, st.just({"device_id": "OK"})), max_size=6))
    def test_devices_list_never_fatal(self, items: list[object]) -> None:
        """Whatever the devices list holds, the answer parses; every entry is
        either kept or recorded as skipped."""
        r = parse_user_devices_response({"user_id": ALICE, "stream_id": 1, "devices": items})
        self.assertEqual(len(r.devices) + len(r.skipped), len(items))
        for p in r.skipped:
            self.assertTrue(p.path.startswith("devices["), p.path)
