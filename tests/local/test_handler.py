"""LocalDeviceHandler: every host API call, its errors, its notifications,
and that a refused upload changes nothing."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed

from devicelist_plugin.core.models import JsonDict
from devicelist_plugin.core.parse import parse_cross_signing_key
from devicelist_plugin.federation.errors import M_BAD_JSON, M_INVALID_PARAM, M_NOT_FOUND
from devicelist_plugin.local import handler as handler_module
from devicelist_plugin.local.handler import LocalDeviceHandler
from devicelist_plugin.storage.types import PendingRow
from tests.helpers.store import dump_store
from tests.local.harness import NOW_S, HandlerCase
from tests.local.keys import ClientDevice, CrossSigning
from tests.helpers.membership import share_room, unshare_room

ALICE = "@alice:b.example"
BOB = "@bob:b.example"
REMOTE = "@carol:a.example"
NOW_MS = NOW_S * 1000


class DeviceTests(HandlerCase):
    def test_create_rename_delete(self) -> None:
        share_room(self.membership, ALICE, "a.example")
        share_room(self.membership, ALICE, "c.example")
        share_room(self.membership, ALICE, "b.example")  # ourselves: never a destination
        self.assertEqual(self.successResultOf(self.handler.create_device(ALICE, "D1", "phone")), 1)
        self.assertEqual(self.successResultOf(self.handler.create_device(ALICE, "D2")), 2)
        self.clock.advance(5)  # a later change
        self.assertEqual(self.successResultOf(self.handler.rename_device(ALICE, "D2", "laptop")), 3)
        self.assertEqual(self.successResultOf(self.handler.rename_device(ALICE, "D1", None)), 4)
        devices = self.successResultOf(self.handler.get_devices(ALICE))
        self.assertEqual(
            [(d.device_id, d.display_name, d.created_ts) for d in devices],
            [("D1", None, NOW_MS), ("D2", "laptop", NOW_MS)],
        )
        self.assertEqual(self.successResultOf(self.handler.delete_device(ALICE, "D1")), 5)
        self.assertEqual(
            [d.device_id for d in self.successResultOf(self.handler.get_devices(ALICE))], ["D2"]
        )
        self.assertEqual(
            self.notified,
            [
                (ALICE, 1, ("D1",)),
                (ALICE, 2, ("D2",)),
                (ALICE, 3, ("D2",)),
                (ALICE, 4, ("D1",)),
                (ALICE, 5, ("D1",)),
            ],
        )
        for destination in ("a.example", "c.example"):
            self.assertEqual(
                self.successResultOf(self.store.get_pending(destination, 10)),
                [PendingRow(ALICE, "D2", 3), PendingRow(ALICE, "D1", 5)],
            )
        self.assertEqual(
            self.successResultOf(self.store.destinations_with_pending()),
            ["a.example", "c.example"],
        )
        changes = self.successResultOf(self.store.get_stream_since(ALICE, 0))
        self.assertEqual([c.ts for c in changes], [NOW_MS, NOW_MS, NOW_MS + 5000, NOW_MS + 5000, NOW_MS + 5000])

    def test_destinations_follow_membership(self) -> None:
        self.successResultOf(self.handler.create_device(ALICE, "D1"))
        share_room(self.membership, ALICE, "a.example")
        self.successResultOf(self.handler.rename_device(ALICE, "D1", "x"))
        unshare_room(self.membership, ALICE, "a.example")
        unshare_room(self.membership, ALICE, "never.example")
        self.successResultOf(self.handler.rename_device(ALICE, "D1", "y"))
        self.assertEqual(
            self.successResultOf(self.store.get_pending("a.example", 10)),
            [PendingRow(ALICE, "D1", 2)],
        )

    def test_users_and_arguments_checked(self) -> None:
        calls = [
            lambda u: self.handler.create_device(u, "D1"),
            lambda u: self.handler.rename_device(u, "D1", "x"),
            lambda u: self.handler.delete_device(u, "D1"),
            lambda u: self.handler.get_devices(u),
            lambda u: self.handler.upload_device_keys(u, "D1", {}),
            lambda u: self.handler.upload_one_time_keys(u, "D1", {}),
            lambda u: self.handler.upload_fallback_keys(u, "D1", {}),
            lambda u: self.handler.upload_keys(u, "D1", {}),
            lambda u: self.handler.upload_cross_signing_keys(u, {}),
            lambda u: self.handler.upload_signatures(u, {}),
            lambda u: self.handler.user_devices_snapshot(u, "a.example"),
            lambda u: self.handler.query_keys({u: []}),
            lambda u: self.handler.claim_keys({u: {"D1": "alg"}}),
            lambda u: self.handler.federation_device_states(u, ["D1"]),
        ]
        for i, call in enumerate(calls):
            with self.subTest(call=i):
                error = self.assertMatrixError(call(REMOTE), 400, M_INVALID_PARAM)
                self.assertIn(REMOTE, error.msg)
                self.assertIn("not local", error.msg)
                error = self.assertMatrixError(call("alice"), 400, M_INVALID_PARAM)
                self.assertIn("alice", error.msg)
        self.assertTrue(self.handler.is_local_user(ALICE))
        self.assertFalse(self.handler.is_local_user(REMOTE))
        self.assertFalse(self.handler.is_local_user("@:b.example"))
        self.assertMatrixError(self.handler.create_device(ALICE, ""), 400, M_INVALID_PARAM, "device_id")
        self.assertMatrixError(
            self.handler.create_device(ALICE, "D" * 256), 400, M_INVALID_PARAM, "device_id"
        )
        self.assertMatrixError(
            self.handler.create_device(ALICE, "D1", "n" * 1001), 400, M_INVALID_PARAM, "display_name"
        )
        self.assertMatrixError(
            self.handler.create_device(ALICE, "D1", "\ud800"), 400, M_INVALID_PARAM, "display_name"
        )
        self.assertMatrixError(
            self.handler.create_device(ALICE, "D\udfff"), 400, M_INVALID_PARAM, "device_id"
        )
        self.assertEqual(self.notified, [])
        self.assertIsNone(self.successResultOf(self.store.get_max_stream_id(ALICE)))

    def test_device_errors(self) -> None:
        self.successResultOf(self.handler.create_device(ALICE, "D1"))
        self.assertMatrixError(self.handler.create_device(ALICE, "D1"), 400, M_INVALID_PARAM)
        for d in (
            self.handler.rename_device(ALICE, "NOPE", "x"),
            self.handler.delete_device(ALICE, "NOPE"),
            self.handler.upload_device_keys(ALICE, "NOPE", ClientDevice(ALICE, "NOPE").device_keys()),
            self.handler.upload_one_time_keys(ALICE, "NOPE", {"a:A": "k"}),
            self.handler.upload_one_time_keys(ALICE, "NOPE", {}),
            self.handler.upload_fallback_keys(ALICE, "NOPE", {"a:F": "k"}),
            self.handler.upload_fallback_keys(ALICE, "NOPE", {}),
            # each shape of /keys/upload checks the device, whichever parts it has
            self.handler.upload_keys(ALICE, "NOPE", {}),
            self.handler.upload_keys(ALICE, "NOPE", {"one_time_keys": {}, "fallback_keys": {}}),
            self.handler.upload_keys(ALICE, "NOPE", {"one_time_keys": {"a:A": "k"}}),
            self.handler.upload_keys(ALICE, "NOPE", {"fallback_keys": {"a:F": "k"}}),
            self.handler.upload_keys(
                ALICE, "NOPE", {"device_keys": ClientDevice(ALICE, "NOPE").device_keys()}
            ),
        ):
            self.assertMatrixError(d, 404, M_NOT_FOUND, "Unknown device 'NOPE'")
        self.assertEqual(self.successResultOf(self.store.get_max_stream_id(ALICE)), 1)
        self.assertEqual(len(self.notified), 1)


class KeyUploadTests(HandlerCase):
    def setUp(self) -> None:
        super().setUp()
        share_room(self.membership, ALICE, "a.example")
        self.successResultOf(self.handler.create_device(ALICE, "D1", "phone"))
        self.device = ClientDevice(ALICE, "D1")
        self.notified.clear()

    def test_device_keys(self) -> None:
        keys = self.device.device_keys()
        self.assertEqual(self.successResultOf(self.handler.upload_device_keys(ALICE, "D1", keys)), 2)
        self.assertEqual(self.notified, [(ALICE, 2, ("D1",))])
        stored = self.successResultOf(self.store.get_device(ALICE, "D1"))
        assert stored is not None
        self.assertEqual(stored.keys_json, keys)
        # the same keys again change nothing
        before = dump_store(self, self.store)
        self.assertIsNone(self.successResultOf(self.handler.upload_device_keys(ALICE, "D1", keys)))
        self.assertEqual(dump_store(self, self.store), before)
        self.assertEqual(len(self.notified), 1)
        # new keys are a change
        other = ClientDevice(ALICE, "D1").device_keys()
        self.assertEqual(self.successResultOf(self.handler.upload_device_keys(ALICE, "D1", other)), 3)
        self.assertEqual(
            self.successResultOf(self.store.get_pending("a.example", 10)),
            [PendingRow(ALICE, "D1", 3)],
        )

    def test_bad_device_keys_change_nothing(self) -> None:
        self.successResultOf(self.handler.upload_device_keys(ALICE, "D1", self.device.device_keys()))
        before = dump_store(self, self.store)
        notified = list(self.notified)
        cases: list[tuple[Any, str, str]] = [
            ({**self.device.device_keys(), "user_id": BOB}, M_INVALID_PARAM, "device_keys.user_id"),
            ({**self.device.device_keys(), "device_id": "D2"}, M_INVALID_PARAM, "device_keys.device_id"),
            ({**self.device.device_keys(), "algorithms": "x"}, M_BAD_JSON, "device_keys.algorithms"),
            (
                {**self.device.device_keys(), "keys": {"ed25519:D9": "k"}},
                M_INVALID_PARAM,
                'device_keys.keys["ed25519:D9"]',
            ),
            (
                {k: v for k, v in self.device.device_keys().items() if k != "signatures"},
                M_BAD_JSON,
                "device_keys.signatures",
            ),
            ("nope", M_BAD_JSON, "device_keys"),
        ]
        for body, errcode, field in cases:
            with self.subTest(field):
                self.assertMatrixError(
                    self.handler.upload_device_keys(ALICE, "D1", body), 400, errcode, field + ": "
                )
        self.assertEqual(dump_store(self, self.store), before)
        self.assertEqual(self.notified, notified)

    def test_one_time_keys(self) -> None:
        counts = self.successResultOf(
            self.handler.upload_one_time_keys(
                ALICE,
                "D1",
                {
                    "signed_curve25519:AAA": {"key": "k1", "signatures": {}},
                    "signed_curve25519:AAB": {"key": "k2", "signatures": {}},
                    "curve25519:AAC": "k3",
                },
            )
        )
        self.assertEqual(counts, {"signed_curve25519": 2, "curve25519": 1})
        # one-time keys are not federated: no stream id, no notification
        self.assertEqual(self.notified, [])
        self.assertEqual(self.successResultOf(self.store.get_max_stream_id(ALICE)), 1)
        # the same key again is ignored
        counts = self.successResultOf(
            self.handler.upload_one_time_keys(
                ALICE, "D1", {"signed_curve25519:AAA": {"key": "k1", "signatures": {}}}
            )
        )
        self.assertEqual(counts, {"signed_curve25519": 2, "curve25519": 1})

    def test_one_time_key_conflict_changes_nothing(self) -> None:
        self.successResultOf(self.handler.upload_one_time_keys(ALICE, "D1", {"a:AAA": "k1"}))
        before = dump_store(self, self.store)
        self.assertMatrixError(
            self.handler.upload_one_time_keys(ALICE, "D1", {"a:NEW": "n", "a:AAA": "other"}),
            400,
            M_INVALID_PARAM,
            'one_time_keys["a:AAA"]: already uploaded',
        )
        self.assertMatrixError(
            self.handler.upload_one_time_keys(ALICE, "D1", {"a:NEW": "n", "bad": "k"}),
            400,
            M_BAD_JSON,
            'one_time_keys["bad"]',
        )
        self.assertEqual(dump_store(self, self.store), before)

    def test_fallback_keys(self) -> None:
        unused = self.successResultOf(
            self.handler.upload_fallback_keys(
                ALICE, "D1", {"signed_curve25519:F1": {"key": "f", "fallback": True, "signatures": {}}}
            )
        )
        self.assertEqual(unused, ["signed_curve25519"])
        before = dump_store(self, self.store)
        self.assertMatrixError(
            self.handler.upload_fallback_keys(ALICE, "D1", {"a:F1": "x", "a:F2": "y"}),
            400,
            M_INVALID_PARAM,
            'fallback_keys["a:F2"]',
        )
        self.assertEqual(dump_store(self, self.store), before)
        self.assertEqual(self.successResultOf(self.handler.upload_fallback_keys(ALICE, "D1", {})), unused)

    def test_upload_keys_all_or_nothing(self) -> None:
        body = {
            "device_keys": self.device.device_keys(),
            "one_time_keys": {"signed_curve25519:AAA": {"key": "k", "signatures": {}}},
            "fallback_keys": {"signed_curve25519:F": {"key": "f", "fallback": True}},
        }
        before = dump_store(self, self.store)
        for part, bad, field in (
            ("device_keys", {**self.device.device_keys(), "user_id": BOB}, "device_keys.user_id"),
            ("one_time_keys", {"x": "y"}, 'one_time_keys["x"]'),
            ("fallback_keys", {"a:1": "x", "a:2": "y"}, 'fallback_keys["a:2"]'),
        ):
            with self.subTest(part):
                error = self.matrix_error(self.handler.upload_keys(ALICE, "D1", {**body, part: bad}))
                self.assertEqual(error.code, 400)
                self.assertTrue(error.msg.startswith(field + ": "), error.msg)
        self.assertMatrixError(self.handler.upload_keys(ALICE, "D1", []), 400, M_BAD_JSON)
        self.assertEqual(dump_store(self, self.store), before)
        self.assertEqual(self.notified, [])

        result = self.successResultOf(self.handler.upload_keys(ALICE, "D1", body))
        self.assertEqual(result, {"one_time_key_counts": {"signed_curve25519": 1}})
        self.assertEqual(self.notified, [(ALICE, 2, ("D1",))])
        self.assertEqual(
            self.successResultOf(self.handler.upload_keys(ALICE, "D1", {})),
            {"one_time_key_counts": {"signed_curve25519": 1}},
        )
        self.assertEqual(
            self.successResultOf(self.store.get_unused_fallback_key_algorithms(ALICE, "D1")),
            ["signed_curve25519"],
        )


class CrossSigningTests(HandlerCase):
    def setUp(self) -> None:
        super().setUp()
        share_room(self.membership, ALICE, "a.example")
        self.cs = CrossSigning(ALICE)

    def test_upload_all_three(self) -> None:
        stream_id = self.successResultOf(
            self.handler.upload_cross_signing_keys(ALICE, self.cs.upload_body())
        )
        self.assertEqual(stream_id, 1)
        self.assertEqual(self.notified, [(ALICE, 1, ())])
        stored = self.successResultOf(self.store.get_cross_signing_keys(ALICE))
        self.assertEqual(
            stored,
            {
                "master": self.cs.master_json,
                "self_signing": self.cs.self_signing_json,
                "user_signing": self.cs.user_signing_json,
            },
        )
        self.assertEqual(
            self.successResultOf(self.store.get_pending("a.example", 10)),
            [PendingRow(ALICE, None, 1)],
        )
        # the same keys again: nothing changes
        self.assertIsNone(
            self.successResultOf(self.handler.upload_cross_signing_keys(ALICE, self.cs.upload_body()))
        )
        self.assertEqual(len(self.notified), 1)

    def test_user_signing_key_alone_is_not_federated(self) -> None:
        self.successResultOf(
            self.handler.upload_cross_signing_keys(ALICE, {"master_key": self.cs.master_json})
        )
        self.successResultOf(self.store.ack_sent("a.example", [(ALICE, None, 1)], {ALICE: {1}}))
        stream_id = self.successResultOf(
            self.handler.upload_cross_signing_keys(
                ALICE, {"user_signing_key": self.cs.user_signing_json}
            )
        )
        self.assertEqual(stream_id, 2)
        self.assertEqual(self.successResultOf(self.store.get_pending("a.example", 10)), [])
        self.assertEqual(self.notified, [(ALICE, 1, ()), (ALICE, 2, ())])

    def test_bad_uploads_change_nothing(self) -> None:
        self.successResultOf(
            self.handler.upload_cross_signing_keys(ALICE, {"master_key": self.cs.master_json})
        )
        before = dump_store(self, self.store)
        forged = CrossSigning(ALICE)
        cases: list[tuple[object, str, str]] = [
            ({"self_signing_key": forged.self_signing_json}, M_INVALID_PARAM, "self_signing_key.signatures"),
            (
                {"master_key": forged.master_json, "self_signing_key": self.cs.self_signing_json},
                M_INVALID_PARAM,
                "self_signing_key.signatures",
            ),
            (
                {"master_key": {**self.cs.master_json, "user_id": BOB}},
                M_INVALID_PARAM,
                "master_key.user_id",
            ),
            (
                {"master_key": {**self.cs.master_json, "usage": ["user_signing"]}},
                M_INVALID_PARAM,
                "master_key.usage",
            ),
            (
                {"user_signing_key": {**self.cs.user_signing_json, "keys": {}}},
                M_INVALID_PARAM,
                "user_signing_key.keys",
            ),
            ({"master_key": 3}, M_BAD_JSON, "master_key"),
            ([], M_BAD_JSON, "<body>"),
        ]
        for body, errcode, field in cases:
            with self.subTest(field):
                self.assertMatrixError(
                    self.handler.upload_cross_signing_keys(ALICE, body), 400, errcode, field
                )
        self.assertEqual(dump_store(self, self.store), before)
        self.assertEqual(len(self.notified), 1)

    def test_self_signing_without_master(self) -> None:
        self.assertMatrixError(
            self.handler.upload_cross_signing_keys(
                ALICE, {"self_signing_key": self.cs.self_signing_json}
            ),
            400,
            M_INVALID_PARAM,
            "master_key: required",
        )


class SignatureUploadTests(HandlerCase):
    def setUp(self) -> None:
        super().setUp()
        share_room(self.membership, ALICE, "a.example")
        self.cs = CrossSigning(ALICE)
        self.bob_cs = CrossSigning(BOB)
        self.d1 = ClientDevice(ALICE, "D1")
        self.d2 = ClientDevice(ALICE, "D2")
        for device in (self.d1, self.d2):
            self.successResultOf(self.handler.create_device(ALICE, device.device_id))
            self.successResultOf(
                self.handler.upload_device_keys(ALICE, device.device_id, device.device_keys())
            )
        self.successResultOf(self.handler.upload_cross_signing_keys(ALICE, self.cs.upload_body()))
        self.successResultOf(
            self.handler.upload_cross_signing_keys(BOB, {"master_key": self.bob_cs.master_json})
        )
        self.notified.clear()

    def served_keys(self, user_id: str = ALICE, requester: str = ALICE) -> JsonDict:
        result: JsonDict = self.successResultOf(
            self.handler.query_keys({user_id: []}, requesting_user_id=requester)
        )
        return result

    def test_device_signed_by_self_signing_key(self) -> None:
        served = self.served_keys()["device_keys"][ALICE]["D1"]
        signed = self.cs.sign_with("self_signing", served)
        result = self.successResultOf(self.handler.upload_signatures(ALICE, {ALICE: {"D1": signed}}))
        self.assertEqual(result, {"failures": {}})
        self.assertEqual(self.notified, [(ALICE, 6, ("D1",))])
        self.assertIn(PendingRow(ALICE, "D1", 6), self.successResultOf(self.store.get_pending("a.example", 10)))
        key_id = f"ed25519:{self.cs.self_signing_public}"
        served = self.served_keys()["device_keys"][ALICE]["D1"]
        self.assertEqual(served["signatures"][ALICE][key_id], signed["signatures"][ALICE][key_id])
        # the device's own signature is kept
        self.assertIn("ed25519:D1", served["signatures"][ALICE])

    def test_master_signed_by_devices(self) -> None:
        signed = self.d2.sign(self.d1.sign(self.cs.master_json))
        result = self.successResultOf(
            self.handler.upload_signatures(ALICE, {ALICE: {self.cs.master_public: signed}})
        )
        self.assertEqual(result, {"failures": {}})
        self.assertEqual(self.notified, [(ALICE, 6, ())])
        master = self.served_keys()["master_keys"][ALICE]
        self.assertEqual(
            set(master["signatures"][ALICE]), {"ed25519:D1", "ed25519:D2"}
        )

    def test_other_users_master_visible_to_signer_only(self) -> None:
        signed = self.cs.sign_with("user_signing", self.bob_cs.master_json)
        result = self.successResultOf(
            self.handler.upload_signatures(ALICE, {BOB: {self.bob_cs.master_public: signed}})
        )
        self.assertEqual(result, {"failures": {}})
        # a signature of another user's key is no change of ours
        self.assertEqual(self.notified, [])
        key_id = f"ed25519:{self.cs.user_signing_public}"
        seen_by_alice = self.served_keys(BOB, ALICE)["master_keys"][BOB]
        self.assertEqual(seen_by_alice["signatures"][ALICE], {key_id: signed["signatures"][ALICE][key_id]})
        seen_by_bob = self.served_keys(BOB, BOB)["master_keys"][BOB]
        self.assertEqual(seen_by_bob, self.bob_cs.master_json)
        over_federation = self.successResultOf(
            self.handler.query_keys({BOB: []}, over_federation=True)
        )
        self.assertEqual(over_federation["master_keys"][BOB], self.bob_cs.master_json)

    def test_remote_users_master_from_the_cache(self) -> None:
        carol = CrossSigning(REMOTE)
        signed = self.cs.sign_with("user_signing", carol.master_json)
        body = {REMOTE: {carol.master_public: signed}}
        result = self.successResultOf(self.handler.upload_signatures(ALICE, body))
        self.assertEqual(result["failures"][REMOTE][carol.master_public]["errcode"], M_NOT_FOUND)
        self.successResultOf(
            self.store.set_remote_cross_signing_key(
                REMOTE, "master", parse_cross_signing_key(carol.master_json, "m")
            )
        )
        result = self.successResultOf(self.handler.upload_signatures(ALICE, body))
        self.assertEqual(result, {"failures": {}})
        stored = self.successResultOf(self.store.get_signatures(REMOTE))
        self.assertEqual([(s.signer_user_id, s.target_id) for s in stored], [(ALICE, carol.master_public)])

    def test_failures_store_nothing_of_the_failed(self) -> None:
        served = self.served_keys()["device_keys"][ALICE]
        good = self.cs.sign_with("self_signing", served["D2"])
        bad = self.cs.sign_with("self_signing", served["D1"])
        bad["signatures"][ALICE][f"ed25519:{self.cs.self_signing_public}"] = "A" * 86
        result = self.successResultOf(
            self.handler.upload_signatures(ALICE, {ALICE: {"D1": bad, "D2": good, "D9": good}})
        )
        self.assertEqual(set(result["failures"][ALICE]), {"D1", "D9"})
        self.assertEqual(result["failures"][ALICE]["D1"]["status"], 400)
        self.assertEqual(result["failures"][ALICE]["D9"]["status"], 404)
        self.assertEqual(self.notified, [(ALICE, 6, ("D2",))])
        stored = self.successResultOf(self.store.get_signatures(ALICE))
        self.assertEqual([s.target_id for s in stored], ["D2"])

    def test_bad_shape_changes_nothing(self) -> None:
        before = dump_store(self, self.store)
        bodies: list[object] = [[], {ALICE: []}, {"nobody": {}}, {ALICE: {"D1": 3}}]
        for body in bodies:
            self.assertEqual(self.matrix_error(self.handler.upload_signatures(ALICE, body)).code, 400)
        result = self.successResultOf(self.handler.upload_signatures(ALICE, {ALICE: {"D1": {"x": 1}}}))
        self.assertEqual(result["failures"][ALICE]["D1"]["errcode"], M_INVALID_PARAM)
        self.assertEqual(dump_store(self, self.store), before)
        self.assertEqual(self.notified, [])


class QueryClaimTests(HandlerCase):
    def setUp(self) -> None:
        super().setUp()
        self.cs = CrossSigning(ALICE)
        self.d1 = ClientDevice(ALICE, "D1")
        self.successResultOf(self.handler.create_device(ALICE, "D1", "phone"))
        self.successResultOf(self.handler.create_device(ALICE, "D2", "no keys"))
        self.successResultOf(self.handler.create_device(ALICE, "D3"))
        self.successResultOf(self.handler.upload_device_keys(ALICE, "D1", self.d1.device_keys()))
        self.successResultOf(
            self.handler.upload_device_keys(ALICE, "D3", ClientDevice(ALICE, "D3").device_keys())
        )
        self.successResultOf(self.handler.upload_cross_signing_keys(ALICE, self.cs.upload_body()))

    def test_query_for_the_hosts_clients(self) -> None:
        result = self.successResultOf(
            self.handler.query_keys({ALICE: [], BOB: []}, requesting_user_id=ALICE)
        )
        self.assertEqual(set(result), {"device_keys", "master_keys", "self_signing_keys", "user_signing_keys"})
        self.assertEqual(set(result["device_keys"]), {ALICE, BOB})
        self.assertEqual(result["device_keys"][BOB], {})
        self.assertEqual(set(result["device_keys"][ALICE]), {"D1", "D3"})
        d1 = result["device_keys"][ALICE]["D1"]
        self.assertEqual(d1["unsigned"], {"device_display_name": "phone"})
        self.assertEqual({k: v for k, v in d1.items() if k != "unsigned"}, self.d1.device_keys())
        self.assertEqual(result["device_keys"][ALICE]["D3"]["unsigned"], {})
        self.assertEqual(result["master_keys"], {ALICE: self.cs.master_json})
        self.assertEqual(result["self_signing_keys"], {ALICE: self.cs.self_signing_json})
        self.assertEqual(result["user_signing_keys"], {ALICE: self.cs.user_signing_json})
        # another requester never sees the user-signing key
        result = self.successResultOf(self.handler.query_keys({ALICE: ["D3", "D2", "D9"]}, requesting_user_id=BOB))
        self.assertEqual(result["user_signing_keys"], {})
        self.assertEqual(set(result["device_keys"][ALICE]), {"D3"})

    def test_query_over_federation(self) -> None:
        result = self.successResultOf(self.handler.query_keys({ALICE: ["D1"]}, over_federation=True))
        self.assertEqual(set(result), {"device_keys", "master_keys", "self_signing_keys"})
        self.assertEqual(result["device_keys"][ALICE]["D1"]["unsigned"], {})
        self.handler.allow_device_name_lookup_over_federation = True
        result = self.successResultOf(self.handler.query_keys({ALICE: ["D1"]}, over_federation=True))
        self.assertEqual(result["device_keys"][ALICE]["D1"]["unsigned"], {"device_display_name": "phone"})

    def test_query_refuses_non_local_users_as_a_whole(self) -> None:
        error = self.assertMatrixError(
            self.handler.query_keys({ALICE: [], REMOTE: []}, over_federation=True), 400, M_INVALID_PARAM
        )
        self.assertIn(REMOTE, error.msg)

    def test_claim_oldest_first_then_fallback(self) -> None:
        self.successResultOf(
            self.handler.upload_one_time_keys(
                ALICE, "D1", {f"signed_curve25519:K{i}": {"key": f"k{i}"} for i in (3, 1, 2)}
            )
        )
        self.successResultOf(
            self.handler.upload_fallback_keys(ALICE, "D1", {"signed_curve25519:FB": {"key": "fb"}})
        )
        claimed = []
        for _ in range(5):
            result = self.successResultOf(
                self.handler.claim_keys({ALICE: {"D1": "signed_curve25519", "D3": "signed_curve25519"}})
            )
            (entry,) = result["one_time_keys"][ALICE]["D1"].items()
            claimed.append(entry)
            # D3 has neither one-time nor fallback keys: left out
            self.assertNotIn("D3", result["one_time_keys"][ALICE])
        self.assertEqual(
            claimed,
            [
                ("signed_curve25519:K3", {"key": "k3"}),
                ("signed_curve25519:K1", {"key": "k1"}),
                ("signed_curve25519:K2", {"key": "k2"}),
                ("signed_curve25519:FB", {"key": "fb"}),
                ("signed_curve25519:FB", {"key": "fb"}),
            ],
        )
        self.assertEqual(self.successResultOf(self.handler.claim_keys({})), {"one_time_keys": {}})
        self.assertEqual(
            self.successResultOf(self.handler.claim_keys({ALICE: {"D1": "other_alg"}})),
            {"one_time_keys": {}},
        )
        error = self.assertMatrixError(
            self.handler.claim_keys({ALICE: {"D1": "a"}, REMOTE: {"X": "a"}}), 400, M_INVALID_PARAM
        )
        self.assertIn(REMOTE, error.msg)

    def test_snapshot(self) -> None:
        share_room(self.membership, ALICE, "a.example")
        self.successResultOf(self.handler.rename_device(ALICE, "D1", "renamed"))
        body = self.successResultOf(self.handler.user_devices_snapshot(ALICE, "a.example"))
        self.assertEqual(body["user_id"], ALICE)
        self.assertEqual(body["stream_id"], 7)
        self.assertEqual([d["device_id"] for d in body["devices"]], ["D1", "D3"])
        self.assertEqual(body["devices"][0], {"device_id": "D1", "keys": self.d1.device_keys()})
        self.assertEqual(body["master_key"], self.cs.master_json)
        self.assertEqual(body["self_signing_key"], self.cs.self_signing_json)
        self.assertNotIn("user_signing_key", body)
        # the snapshot covers the pending rename: dropped, and {7} is what
        # the next EDU names
        self.assertEqual(self.successResultOf(self.store.get_pending("a.example", 10)), [])
        self.assertEqual(
            self.successResultOf(self.store.get_unreferenced("a.example", [ALICE])),
            {ALICE: frozenset({7})},
        )
        self.handler.allow_device_name_lookup_over_federation = True
        body = self.successResultOf(self.handler.user_devices_snapshot(ALICE))
        self.assertEqual(
            [d.get("device_display_name") for d in body["devices"]], ["renamed", None]
        )
        self.assertNotIn("device_display_name", body["devices"][1])

    def test_snapshot_of_a_user_without_anything(self) -> None:
        body = self.successResultOf(self.handler.user_devices_snapshot(BOB, "a.example"))
        self.assertEqual(body, {"user_id": BOB, "stream_id": 0, "devices": []})
        self.assertEqual(
            self.successResultOf(self.store.get_unreferenced("a.example", [BOB])),
            {BOB: frozenset()},
        )

    def test_snapshot_for_ourselves_records_nothing(self) -> None:
        self.successResultOf(self.handler.user_devices_snapshot(ALICE, "b.example"))
        self.assertEqual(
            self.successResultOf(self.store.get_unreferenced("b.example", [ALICE])),
            {ALICE: frozenset()},
        )

    def test_federation_device_states(self) -> None:
        states = self.successResultOf(self.handler.federation_device_states(ALICE, ["D1", "D2", "GONE"]))
        self.assertEqual(states, {"D1": {"keys": self.d1.device_keys()}, "D2": {}})
        self.handler.allow_device_name_lookup_over_federation = True
        states = self.successResultOf(self.handler.federation_device_states(ALICE, ["D1", "D2"]))
        self.assertEqual(states["D2"], {"device_display_name": "no keys"})
        self.assertEqual(states["D1"]["device_display_name"], "phone")


class ListenerTests(HandlerCase):
    def test_failing_listeners_never_fail_the_change(self) -> None:
        def raises(user_id: str, stream_id: int, device_ids: tuple[str, ...]) -> None:
            raise RuntimeError("listener bug")

        def fails(user_id: str, stream_id: int, device_ids: tuple[str, ...]) -> Deferred[None]:
            return fail(ValueError("async listener bug"))

        async def coroutine(user_id: str, stream_id: int, device_ids: tuple[str, ...]) -> None:
            raise KeyError("coroutine listener bug")

        for listener in (raises, fails, coroutine):
            self.handler.add_change_listener(listener)
        seen: list[int] = []

        def last(user_id: str, stream_id: int, device_ids: tuple[str, ...]) -> Deferred[None]:
            seen.append(stream_id)
            return succeed(None)

        self.handler.add_change_listener(last)
        self.assertEqual(self.successResultOf(self.handler.create_device(ALICE, "D1")), 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError, ValueError, KeyError)), 3)
        self.assertEqual(seen, [1])
        self.assertEqual(self.notified, [(ALICE, 1, ("D1",))])
        self.handler.remove_change_listener(last)
        self.successResultOf(self.handler.create_device(ALICE, "D2"))
        self.assertEqual(seen, [1])
        self.flushLoggedErrors(RuntimeError, ValueError, KeyError)

    def test_listener_sees_committed_state(self) -> None:
        observed: list[Any] = []

        def listener(user_id: str, stream_id: int, device_ids: tuple[str, ...]) -> None:
            observed.append(self.successResultOf(self.store.get_max_stream_id(user_id)))

        self.handler.add_change_listener(listener)
        self.successResultOf(self.handler.create_device(ALICE, "D1"))
        self.assertEqual(observed, [1])


class QueuedListenerTests(HandlerCase):
    """What the sender hears after a commit: the servers a change was queued
    for, before anything else is read or written."""

    def setUp(self) -> None:
        super().setUp()
        share_room(self.membership, ALICE, "a.example")
        share_room(self.membership, ALICE, "c.example")
        self.calls: list[tuple[Any, ...]] = []
        self.handler.add_queued_listener(lambda u, dests: self.calls.append(("queued", u, dests)))
        self.handler.add_change_listener(lambda u, s, d: self.calls.append(("change", u, s, d)))

    def test_destinations_then_change(self) -> None:
        self.successResultOf(self.handler.create_device(ALICE, "D1"))
        self.assertEqual(
            self.calls,
            [
                ("queued", ALICE, frozenset({"a.example", "c.example"})),
                ("change", ALICE, 1, ("D1",)),
            ],
        )

    def test_nobody_to_send_to_is_not_a_queued_call(self) -> None:
        self.successResultOf(self.handler.create_device(BOB, "D1"))
        self.assertEqual(self.calls, [("change", BOB, 1, ("D1",))])

    def test_heard_before_the_store_is_read_again(self) -> None:
        reads: list[str] = []
        original = self.membership.servers_sharing_room

        def counting(user_id: str) -> Any:
            reads.append(user_id)
            return original(user_id)

        self.patch(self.membership, "servers_sharing_room", counting)
        self.handler.add_queued_listener(lambda u, dests: self.calls.append(("reads", len(reads))))
        self.successResultOf(self.handler.create_device(ALICE, "D1"))
        # one read chose the destinations; the re-check for servers that
        # came meanwhile comes after the listeners
        self.assertIn(("reads", 1), self.calls)
        self.assertEqual(len(reads), 2)

    def test_a_server_that_came_meanwhile_is_queued_and_heard_again(self) -> None:
        original = self.membership.servers_sharing_room
        reads: list[str] = []

        def joins_during_the_change(user_id: str) -> Any:
            # the first read (destinations of the change) misses d.example,
            # which joins before the change commits
            reads.append(user_id)
            if len(reads) == 1:
                d = original(user_id)
                share_room(self.membership, ALICE, "d.example")
                return d
            return original(user_id)

        self.patch(self.membership, "servers_sharing_room", joins_during_the_change)
        self.successResultOf(self.handler.create_device(ALICE, "D1"))
        self.assertEqual(
            self.calls,
            [
                ("queued", ALICE, frozenset({"a.example", "c.example"})),
                ("change", ALICE, 1, ("D1",)),
                ("queued", ALICE, frozenset({"d.example"})),
                ("change", ALICE, 1, ("D1",)),
            ],
        )
        self.assertEqual(
            self.successResultOf(self.store.get_pending("d.example", 10)),
            [PendingRow(ALICE, "D1", 1)],
        )

    def test_failing_queued_listener_never_fails_the_change(self) -> None:
        def raises(user_id: str, destinations: frozenset[str]) -> None:
            raise RuntimeError("listener bug")

        self.handler.add_queued_listener(raises)
        self.assertEqual(self.successResultOf(self.handler.create_device(ALICE, "D1")), 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.handler.remove_queued_listener(raises)
        self.successResultOf(self.handler.create_device(ALICE, "D2"))
        self.assertEqual(self.flushLoggedErrors(RuntimeError), [])


class KeysAloneUploadTests(HandlerCase):
    def test_no_one_time_key_write_without_one_time_keys(self) -> None:
        self.successResultOf(self.handler.create_device(ALICE, "D1"))
        writes: list[object] = []
        original = self.store.add_one_time_keys

        def counting(*args: Any) -> Any:
            writes.append(args)
            return original(*args)

        self.patch(self.store, "add_one_time_keys", counting)
        body = {"device_keys": ClientDevice(ALICE, "D1").device_keys()}
        result = self.successResultOf(self.handler.upload_keys(ALICE, "D1", body))
        self.assertEqual(result, {"one_time_key_counts": {}})
        self.assertEqual(writes, [])
        self.successResultOf(
            self.handler.upload_keys(ALICE, "D1", {"one_time_keys": {"a:A": "k"}})
        )
        self.assertEqual(len(writes), 1)


class AnswerCacheTests(HandlerCase):
    """Encoded /user/devices answers of big users are reused while the
    user's stream id does not move."""

    def setUp(self) -> None:
        super().setUp()
        # "big" from 3 devices on, so that the tests stay small
        self.patch(handler_module, "INLINE_ENCODE_MAX_DEVICES", 3)
        for i in range(3):
            device = ClientDevice(ALICE, f"D{i}")
            self.successResultOf(self.handler.create_device(ALICE, device.device_id, f"n{i}"))
            self.successResultOf(
                self.handler.upload_device_keys(ALICE, device.device_id, device.device_keys())
            )
        self.reads: list[str] = []
        original = self.store.get_user_devices_snapshot

        def counting(user_id: str, destination: str | None = None) -> Any:
            self.reads.append(user_id)
            return original(user_id, destination)

        self.patch(self.store, "get_user_devices_snapshot", counting)
        original_since = self.store.get_user_devices_snapshot_since

        def counting_since(user_id: str, destination: str | None, known: int) -> Any:
            def read(snapshot: Any) -> Any:
                if snapshot is not None:  # the devices were read
                    self.reads.append(user_id)
                return snapshot

            return original_since(user_id, destination, known).addCallback(read)

        self.patch(self.store, "get_user_devices_snapshot_since", counting_since)

    def serve(self, destination: str = "a.example") -> JsonDict:
        body: JsonDict = json.loads(
            self.successResultOf(self.handler.encoded_user_devices_snapshot(ALICE, destination))
        )
        return body

    def test_reused_until_the_stream_moves(self) -> None:
        share_room(self.membership, ALICE, "c.example")
        first = self.serve("a.example")
        self.assertEqual(first, self.successResultOf(self.handler.user_devices_snapshot(ALICE)))
        self.successResultOf(self.handler.rename_device(ALICE, "D0", "renamed"))  # 7, pending for c
        reads = len(self.reads)
        second = self.serve("c.example")
        self.assertEqual(second["stream_id"], 7)
        self.assertEqual(len(self.reads), reads + 1)
        # the same answer again, without reading the devices; still recorded
        # as served to the new destination
        self.successResultOf(self.handler.rename_device(ALICE, "D1", None))  # 8, pending for c
        self.successResultOf(self.store.ack_sent("c.example", [(ALICE, "D1", 8)], {ALICE: {8}}))
        third = self.serve("c.example")
        self.assertEqual(third["stream_id"], 8)
        self.assertEqual(len(self.reads), reads + 2)
        self.assertEqual(self.serve("d.example"), third)
        self.assertEqual(len(self.reads), reads + 2)
        self.assertEqual(
            self.successResultOf(self.store.get_unreferenced("d.example", [ALICE])),
            {ALICE: frozenset({8})},
        )
        self.assertEqual(self.successResultOf(self.store.get_pending("c.example", 10)), [])
        # the setting is part of the answer
        self.handler.allow_device_name_lookup_over_federation = True
        named = self.serve()
        self.assertEqual(len(self.reads), reads + 3)
        self.assertEqual(named["devices"][0]["device_display_name"], "renamed")

    def test_disabled(self) -> None:
        handler = LocalDeviceHandler(
            "b.example", self.store, self.membership, self.clock, answer_cache_bytes=0
        )
        for _ in range(2):
            self.successResultOf(handler.encoded_user_devices_snapshot(ALICE, "a.example"))
        self.assertEqual(self.reads, [ALICE, ALICE])

    def test_small_users_too(self) -> None:
        self.successResultOf(self.handler.create_device(BOB, "B1"))
        self.successResultOf(
            self.handler.upload_device_keys(BOB, "B1", ClientDevice(BOB, "B1").device_keys())
        )
        answers = [
            self.successResultOf(self.handler.encoded_user_devices_snapshot(BOB, "a.example"))
            for _ in range(2)
        ]
        self.assertEqual(self.reads, [BOB])
        self.assertEqual(answers[0], answers[1])
        self.successResultOf(self.handler.delete_device(BOB, "B1"))
        after: JsonDict = json.loads(
            self.successResultOf(self.handler.encoded_user_devices_snapshot(BOB, "a.example"))
        )
        self.assertEqual((after["stream_id"], after["devices"]), (3, []))
        self.assertEqual(self.reads, [BOB, BOB])
        # the server that asks for its own users' lists records nothing
        self.successResultOf(self.handler.encoded_user_devices_snapshot(BOB, "b.example"))
        self.assertEqual(
            self.successResultOf(self.store.get_unreferenced("b.example", [BOB])), {BOB: frozenset()}
        )

    def test_cache_bounds(self) -> None:
        cache: handler_module._AnswerCache[bytes] = handler_module._AnswerCache(10, len)
        cache.put("@a:x", False, 1, b"aaaa")
        cache.put("@b:x", False, 1, b"bbbb")
        self.assertEqual(cache.get("@a:x", False), (1, b"aaaa"))  # now the most recent
        cache.put("@c:x", False, 1, b"cccc")
        self.assertIsNone(cache.get("@b:x", False))
        self.assertEqual(cache.get("@a:x", False), (1, b"aaaa"))
        self.assertIsNone(cache.get("@a:x", True))
        cache.put("@a:x", False, 0, b"old")  # an older answer never replaces a newer one
        self.assertEqual(cache.get("@a:x", False), (1, b"aaaa"))
        cache.put("@d:x", False, 1, b"d" * 11)  # bigger than the whole cache
        self.assertIsNone(cache.get("@d:x", False))


class JoinDuringChangeTests(HandlerCase):
    """A server that comes to share a room while a change is being written
    is queued the user's current devices, the change included."""

    def test_server_joining_mid_change_gets_the_change(self) -> None:
        self.successResultOf(self.handler.create_device(ALICE, "D1", "phone"))
        real_rename = self.store.rename_device

        def rename_while_t_joins(*args: Any) -> Any:
            # the write reads its destinations first; t.example joins before it commits
            share_room(self.membership, ALICE, "t.example")
            return real_rename(*args)

        self.store.rename_device = rename_while_t_joins  # type: ignore[method-assign, assignment]
        stream_id = self.successResultOf(self.handler.rename_device(ALICE, "D1", "tablet"))
        pending = self.successResultOf(self.store.get_pending("t.example", 10))
        self.assertEqual(
            [(p.user_id, p.device_id, p.stream_id) for p in pending], [(ALICE, "D1", stream_id)]
        )
