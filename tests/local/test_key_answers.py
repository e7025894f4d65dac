"""Federation key query answers, encoded and kept per user's stream id:
the same bytes as the answer built and encoded afresh, changed right after
every kind of change, reused only while nothing changed."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from canonicaljson import encode_canonical_json
from twisted.internet.defer import Deferred

from devicelist_plugin.local import handler as handler_module
from devicelist_plugin.local.handler import LocalDeviceHandler
from tests.helpers.membership import share_room
from tests.local.harness import HandlerCase
from tests.local.keys import ClientDevice, CrossSigning

ALICE = "@alice:b.example"
BOB = "@bob:b.example"
NOBODY = "@nobody:b.example"


class KeyAnswerTests(HandlerCase):
    def setUp(self) -> None:
        super().setUp()
        share_room(self.membership, ALICE, "a.example")
        self.devices = {d: ClientDevice(ALICE, d) for d in ("D1", "D2")}
        for device_id, device in self.devices.items():
            self.successResultOf(self.handler.create_device(ALICE, device_id, f"name {device_id}"))
            self.successResultOf(
                self.handler.upload_device_keys(ALICE, device_id, device.device_keys())
            )
        self.cs = CrossSigning(ALICE)
        self.encoded: list[str] = []
        original = handler_module.encode_user_keys

        def counting(user_keys: Any, **kwargs: Any) -> Any:
            self.encoded.append(user_keys.user_id)
            return original(user_keys, **kwargs)

        self.patch(handler_module, "encode_user_keys", counting)

    def answer(
        self, query: Mapping[str, Sequence[str]], handler: LocalDeviceHandler | None = None
    ) -> bytes:
        """The encoded answer, checked against the answer built afresh."""
        handler = handler or self.handler
        encoded: bytes = self.successResultOf(handler.encoded_federation_query_keys(query))
        built = self.successResultOf(handler.query_keys(query, over_federation=True))
        self.assertEqual(encoded, encode_canonical_json(built))
        return encoded

    def test_same_as_built_for_every_kind_of_user_and_query(self) -> None:
        self.successResultOf(self.handler.upload_cross_signing_keys(ALICE, self.cs.upload_body()))
        served = self.successResultOf(self.handler.query_keys({ALICE: []}, requesting_user_id=ALICE))
        signed = self.cs.sign_with("self_signing", served["device_keys"][ALICE]["D1"])
        self.successResultOf(self.handler.upload_signatures(ALICE, {ALICE: {"D1": signed}}))
        self.successResultOf(self.handler.create_device(BOB, "B1"))  # no keys
        for names in (False, True):
            self.handler.allow_device_name_lookup_over_federation = names
            queries: list[dict[str, list[str]]] = [
                {ALICE: []},
                {ALICE: ["D2"]},
                {ALICE: ["D1", "D9"]},
                {ALICE: [], BOB: [], NOBODY: []},
                {},
            ]
            for query in queries:
                with self.subTest(names=names, query=query):
                    self.answer(query)
                    self.answer(query)  # from the cache where it applies

    def test_changes_show_right_away(self) -> None:
        first = self.answer({ALICE: []})
        self.assertEqual(self.encoded, [ALICE])
        self.assertEqual(self.answer({ALICE: []}), first)
        self.assertEqual(self.encoded, [ALICE])  # served again, not encoded again

        steps: dict[str, Callable[[], Deferred[Any]]] = {
            "new device keys": lambda: self.handler.upload_device_keys(
                ALICE, "D1", self.devices["D1"].device_keys(extra="x")
            ),
            "cross-signing keys": lambda: self.handler.upload_cross_signing_keys(
                ALICE, self.cs.upload_body()
            ),
            "signature": lambda: self.handler.upload_signatures(
                ALICE, {ALICE: {"D2": self.cs.sign_with("self_signing", self.devices["D2"].device_keys())}}
            ),
            "new device": lambda: self.handler.create_device(ALICE, "D3"),
            "deleted device": lambda: self.handler.delete_device(ALICE, "D2"),
        }
        previous = first
        for step, change in steps.items():
            with self.subTest(step=step):
                self.successResultOf(change())
                now = self.answer({ALICE: []})
                if step != "new device":  # a device without keys is not served
                    self.assertNotEqual(now, previous)
                previous = now

    def test_renames_show_when_names_are_served(self) -> None:
        self.handler.allow_device_name_lookup_over_federation = True
        self.assertIn(b"name D1", self.answer({ALICE: []}))
        self.successResultOf(self.handler.rename_device(ALICE, "D1", "renamed"))
        answer = self.answer({ALICE: []})
        self.assertIn(b"renamed", answer)
        self.assertNotIn(b"name D1", answer)
        # the setting is part of what is kept
        self.handler.allow_device_name_lookup_over_federation = False
        self.assertNotIn(b"renamed", self.answer({ALICE: []}))

    def test_only_whole_users_are_kept(self) -> None:
        self.answer({ALICE: ["D1"]})
        self.answer({ALICE: ["D1"]})
        self.answer({NOBODY: []})
        self.answer({NOBODY: []})
        self.assertEqual(self.encoded, [ALICE, ALICE, NOBODY, NOBODY])

    def test_change_made_through_another_handler(self) -> None:
        """Another process on the same database (PostgreSQL) changes the
        user: the stream id read with the keys tells, not a notification."""
        other = LocalDeviceHandler("b.example", self.store, self.membership, self.clock)
        before = self.answer({ALICE: []})
        self.successResultOf(other.delete_device(ALICE, "D1"))
        after = self.answer({ALICE: []})
        self.assertNotEqual(after, before)
        self.assertNotIn(b'"D1"', after)
        self.assertEqual(self.encoded, [ALICE, ALICE])

    def test_disabled(self) -> None:
        handler = LocalDeviceHandler(
            "b.example", self.store, self.membership, self.clock, answer_cache_bytes=0
        )
        self.answer({ALICE: []}, handler)
        self.answer({ALICE: []}, handler)
        self.assertEqual(self.encoded, [ALICE, ALICE])
