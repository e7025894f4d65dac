"""The client-server /keys endpoints, local users and the remote injection points."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from twisted.internet.defer import Deferred, fail, succeed

from devicelist_plugin.client.keys import DEFAULT_TIMEOUT_MS, MAX_TIMEOUT_MS, REMOTE_GRACE_S
from devicelist_plugin.core.models import JsonDict
from tests.client.harness import SERVER, V3, ClientApiCase
from tests.local.keys import ClientDevice, CrossSigning

ALICE = f"@alice:{SERVER}"
BOB = f"@bob:{SERVER}"
REMOTE = "@carol:remote.test"


class FakeRemote:
    """Both injection points; answers are Deferreds the test controls."""

    def __init__(self) -> None:
        self.queries: list[tuple[dict[str, list[str]], int]] = []
        self.claims: list[tuple[dict[str, dict[str, str]], int]] = []
        self.answers: list[Deferred[JsonDict]] = []

    def query(self, device_keys: Mapping[str, Sequence[str]], timeout_ms: int) -> "Deferred[JsonDict]":
        self.queries.append(({u: list(d) for u, d in device_keys.items()}, timeout_ms))
        return self.answers.pop(0)

    def claim(self, one_time_keys: Mapping[str, Mapping[str, str]], timeout_ms: int) -> "Deferred[JsonDict]":
        self.claims.append(({u: dict(d) for u, d in one_time_keys.items()}, timeout_ms))
        return self.answers.pop(0)


class KeysCase(ClientApiCase):
    def setUp(self) -> None:
        super().setUp()
        self.register("alice", "pw", inhibit_login=True)
        self.register("bob", "pw", inhibit_login=True)
        self.alice = self.login("alice", device_id="ADEV")["access_token"]
        self.bob = self.login("bob", device_id="BDEV")["access_token"]
        self.alice_device = ClientDevice(ALICE, "ADEV")
        self.bob_device = ClientDevice(BOB, "BDEV")

    def upload(self, token: str, body: Any) -> Any:
        return self.ok("POST", f"{V3}/keys/upload", body, token)


class UploadQueryClaimTests(KeysCase):
    def test_upload_then_query(self) -> None:
        counts = self.upload(self.alice, {"device_keys": self.alice_device.device_keys()})
        self.assertEqual(counts, {"one_time_key_counts": {"signed_curve25519": 0}})
        answer = self.ok("POST", f"{V3}/keys/query", {"device_keys": {ALICE: []}}, self.bob)
        self.assertEqual(list(answer["device_keys"][ALICE]), ["ADEV"])
        keys = answer["device_keys"][ALICE]["ADEV"]
        self.assertEqual(keys["keys"], self.alice_device.device_keys()["keys"])
        self.assertEqual(answer["failures"], {})
        # a device without keys is not listed
        self.assertEqual(
            self.ok("POST", f"{V3}/keys/query", {"device_keys": {BOB: []}}, self.alice)["device_keys"],
            {BOB: {}},
        )

    def test_upload_for_another_device_refused(self) -> None:
        other = ClientDevice(ALICE, "OTHER")
        self.error("POST", f"{V3}/keys/upload", {"device_keys": other.device_keys()}, self.alice, code=400, errcode="M_INVALID_PARAM")

    def test_one_time_keys_claimed_once(self) -> None:
        otks = {
            f"signed_curve25519:AAAA{i}": self.alice_device.sign({"key": f"k{i}"}) for i in range(2)
        }
        counts = self.upload(self.alice, {"one_time_keys": otks})
        self.assertEqual(counts, {"one_time_key_counts": {"signed_curve25519": 2}})
        claim = {"one_time_keys": {ALICE: {"ADEV": "signed_curve25519"}}}
        first = self.ok("POST", f"{V3}/keys/claim", claim, self.bob)
        second = self.ok("POST", f"{V3}/keys/claim", claim, self.bob)
        third = self.ok("POST", f"{V3}/keys/claim", claim, self.bob)
        self.assertEqual(list(first["one_time_keys"][ALICE]["ADEV"]), ["signed_curve25519:AAAA0"])
        self.assertEqual(list(second["one_time_keys"][ALICE]["ADEV"]), ["signed_curve25519:AAAA1"])
        self.assertEqual(third, {"one_time_keys": {}, "failures": {}})

    def test_bad_bodies(self) -> None:
        self.error("POST", f"{V3}/keys/query", {"device_keys": []}, self.alice, code=400, errcode="M_BAD_JSON")
        self.error("POST", f"{V3}/keys/query", {"device_keys": {"nope": []}}, self.alice, code=400, errcode="M_INVALID_PARAM")
        self.error("POST", f"{V3}/keys/query", {"device_keys": {}, "timeout": -1}, self.alice, code=400, errcode="M_BAD_JSON")
        self.error("POST", f"{V3}/keys/claim", {"one_time_keys": {ALICE: []}}, self.alice, code=400, errcode="M_BAD_JSON")
        self.error("POST", f"{V3}/keys/query", {"device_keys": {}}, code=401, errcode="M_MISSING_TOKEN")

    def test_remote_users_without_a_remote_client(self) -> None:
        self.upload(self.alice, {"device_keys": self.alice_device.device_keys()})
        answer = self.ok(
            "POST", f"{V3}/keys/query", {"device_keys": {ALICE: [], REMOTE: [], "@dan:other.test": ["X"]}}, self.bob
        )
        self.assertEqual(list(answer["device_keys"]), [ALICE])
        self.assertEqual(sorted(answer["failures"]), ["other.test", "remote.test"])
        self.assertEqual(answer["failures"]["remote.test"]["status"], 503)
        answer = self.ok("POST", f"{V3}/keys/claim", {"one_time_keys": {REMOTE: {"D": "signed_curve25519"}}}, self.bob)
        self.assertEqual(answer["one_time_keys"], {})
        self.assertEqual(answer["failures"]["remote.test"]["status"], 503)


class RemoteKeysTests(KeysCase):
    def setUp(self) -> None:
        self.remote = FakeRemote()
        self.remote_query = self.remote
        self.remote_client = self.remote
        super().setUp()

    def test_query_merges_remote_answers(self) -> None:
        self.upload(self.alice, {"device_keys": self.alice_device.device_keys()})
        answer: Deferred[JsonDict] = Deferred()
        self.remote.answers.append(answer)
        d = self.start("POST", f"{V3}/keys/query", {"device_keys": {ALICE: [], REMOTE: ["D1"]}, "timeout": 2500}, self.bob)
        self.assertNoResult(d)
        self.assertEqual(self.remote.queries, [({REMOTE: ["D1"]}, 2500)])
        answer.callback(
            {
                "device_keys": {REMOTE: {"D1": {"device_id": "D1"}}},
                "master_keys": {REMOTE: {"usage": ["master"]}},
                "self_signing_keys": {},
                "failures": {"third.test": {"status": 502, "message": "x"}},
            }
        )
        self.agent.flush()
        code, body = self.finish(d)
        self.assertEqual(code, 200)
        self.assertEqual(sorted(body["device_keys"]), [ALICE, REMOTE])
        self.assertEqual(body["master_keys"], {REMOTE: {"usage": ["master"]}})
        self.assertEqual(body["failures"], {"third.test": {"status": 502, "message": "x"}})

    def test_default_and_capped_timeout(self) -> None:
        self.remote.answers += [succeed({}), succeed({})]
        self.ok("POST", f"{V3}/keys/query", {"device_keys": {REMOTE: []}}, self.bob)
        self.ok("POST", f"{V3}/keys/query", {"device_keys": {REMOTE: []}, "timeout": 10**9}, self.bob)
        self.assertEqual([t for _, t in self.remote.queries], [DEFAULT_TIMEOUT_MS, MAX_TIMEOUT_MS])

    def test_remote_that_does_not_answer_in_time(self) -> None:
        never: Deferred[JsonDict] = Deferred()
        self.remote.answers.append(never)
        d = self.start("POST", f"{V3}/keys/query", {"device_keys": {REMOTE: []}, "timeout": 1000}, self.bob)
        self.clock.advance(1.0)  # the timeout: the remote implementation's to honour
        self.agent.flush()
        self.assertNoResult(d)
        self.clock.advance(REMOTE_GRACE_S)  # the backstop cancels the call
        self.agent.flush()
        code, body = self.finish(d)
        self.assertEqual(code, 200)
        self.assertEqual(body["failures"]["remote.test"]["status"], 503)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_remote_that_fails(self) -> None:
        self.remote.answers.append(fail(RuntimeError("boom")))
        body = self.ok("POST", f"{V3}/keys/query", {"device_keys": {REMOTE: []}}, self.bob)
        self.assertEqual(body["failures"], {"remote.test": {"status": 503, "message": "Remote key request failed"}})
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_claim_merges_remote_answers(self) -> None:
        self.upload(self.alice, {"one_time_keys": {"signed_curve25519:A": self.alice_device.sign({"key": "k"})}})
        self.remote.answers.append(
            succeed({"one_time_keys": {REMOTE: {"D1": {"signed_curve25519:R": {"key": "r"}}}}, "failures": {}})
        )
        body = self.ok(
            "POST",
            f"{V3}/keys/claim",
            {"one_time_keys": {ALICE: {"ADEV": "signed_curve25519"}, REMOTE: {"D1": "signed_curve25519"}}, "timeout": 500},
            self.bob,
        )
        self.assertEqual(sorted(body["one_time_keys"]), [ALICE, REMOTE])
        self.assertEqual(self.remote.claims, [({REMOTE: {"D1": "signed_curve25519"}}, 500)])


class CrossSigningTests(KeysCase):
    def setUp(self) -> None:
        super().setUp()
        self.cross = CrossSigning(ALICE)
        self.path = f"{V3}/keys/device_signing/upload"

    def test_first_upload_needs_no_password(self) -> None:
        self.assertEqual(self.ok("POST", self.path, self.cross.upload_body(), self.alice), {})
        answer = self.ok("POST", f"{V3}/keys/query", {"device_keys": {ALICE: []}}, self.alice)
        self.assertIn(ALICE, answer["master_keys"])
        self.assertIn(ALICE, answer["self_signing_keys"])
        self.assertIn(ALICE, answer["user_signing_keys"])
        # the same keys again: no password either
        self.ok("POST", self.path, self.cross.upload_body(), self.alice)

    def test_replacing_keys_needs_the_password(self) -> None:
        self.ok("POST", self.path, self.cross.upload_body(), self.alice)
        new = CrossSigning(ALICE)
        code, challenge = self.call("POST", self.path, new.upload_body(), self.alice)
        self.assertEqual(code, 401)
        self.assertEqual(challenge["flows"], [{"stages": ["m.login.password"]}])
        unchanged = self.ok("POST", f"{V3}/keys/query", {"device_keys": {ALICE: []}}, self.bob)
        self.assertEqual(unchanged["master_keys"][ALICE]["keys"], self.cross.master_json["keys"])
        auth = {"type": "m.login.password", "user": "alice", "password": "pw", "session": challenge["session"]}
        self.ok("POST", self.path, {**new.upload_body(), "auth": auth}, self.alice)
        answer = self.ok("POST", f"{V3}/keys/query", {"device_keys": {ALICE: []}}, self.bob)
        self.assertEqual(
            answer["master_keys"][ALICE]["keys"], new.master_json["keys"]
        )

    def test_signatures_upload(self) -> None:
        self.upload(self.alice, {"device_keys": self.alice_device.device_keys()})
        self.ok("POST", self.path, self.cross.upload_body(), self.alice)
        device_keys = self.alice_device.device_keys()
        signed = self.cross.sign_with("self_signing", device_keys)
        body = {ALICE: {"ADEV": signed}}
        self.assertEqual(self.ok("POST", f"{V3}/keys/signatures/upload", body, self.alice), {"failures": {}})
        answer = self.ok("POST", f"{V3}/keys/query", {"device_keys": {ALICE: ["ADEV"]}}, self.bob)
        signatures = answer["device_keys"][ALICE]["ADEV"]["signatures"][ALICE]
        self.assertIn(f"ed25519:{self.cross.self_signing_public}", signatures)
