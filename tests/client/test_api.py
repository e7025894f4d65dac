"""Login, access tokens, logout, whoami and devices (with user-interactive auth)."""

from __future__ import annotations

from typing import Any

from devicelist_plugin.client import uia
from devicelist_plugin.client.auth import hash_token
from devicelist_plugin.client.uia import MAX_SESSIONS, SESSION_LIFETIME_S
from tests.client.harness import SERVER, V3, ClientApiCase

ALICE = f"@alice:{SERVER}"


class LoginTests(ClientApiCase):
    def setUp(self) -> None:
        super().setUp()
        self.register("alice", "secret pw", inhibit_login=True)

    def test_flows(self) -> None:
        self.assertEqual(
            self.ok("GET", f"{V3}/login"), {"flows": [{"type": "m.login.password"}]}
        )

    def test_login_creates_the_device_and_a_token(self) -> None:
        answer = self.login("alice", "secret pw", device_id="PHONE", initial_device_display_name="my phone")
        self.assertEqual(
            {k: answer[k] for k in ("user_id", "device_id", "home_server")},
            {"user_id": ALICE, "device_id": "PHONE", "home_server": SERVER},
        )
        token = answer["access_token"]
        self.assertTrue(token.startswith("dlt_"))
        devices = self.successResultOf(self.handler.get_devices(ALICE))
        self.assertEqual([(d.device_id, d.display_name) for d in devices], [("PHONE", "my phone")])
        # the token is stored hashed, never in clear
        owner = self.successResultOf(self.account_store.get_token_owner(hash_token(token)))
        assert owner is not None
        self.assertEqual((owner.user_id, owner.device_id), (ALICE, "PHONE"))
        self.assertIsNone(self.successResultOf(self.account_store.get_token_owner(token)))

    def test_login_again_on_an_existing_device_keeps_it(self) -> None:
        first = self.login("alice", "secret pw", device_id="PHONE", initial_device_display_name="a")
        second = self.login("@alice:hs.test", "secret pw", device_id="PHONE", initial_device_display_name="b")
        self.assertNotEqual(first["access_token"], second["access_token"])
        devices = self.successResultOf(self.handler.get_devices(ALICE))
        self.assertEqual([(d.device_id, d.display_name) for d in devices], [("PHONE", "a")])
        for token in (first["access_token"], second["access_token"]):
            self.ok("GET", f"{V3}/account/whoami", token=token)

    def test_generated_device_id_and_legacy_user_field(self) -> None:
        answer = self.ok(
            "POST", f"{V3}/login", {"type": "m.login.password", "user": "ALICE", "password": "secret pw"}
        )
        self.assertEqual(answer["user_id"], ALICE)
        self.assertRegex(answer["device_id"], r"^[A-Z]{10}$")

    def test_r0_paths_work_too(self) -> None:
        answer = self.ok(
            "POST",
            "/_matrix/client/r0/login",
            {"type": "m.login.password", "user": "alice", "password": "secret pw"},
        )
        self.ok("GET", "/_matrix/client/r0/account/whoami", token=answer["access_token"])

    def test_refused_logins(self) -> None:
        cases: list[tuple[str, Any, int, str]] = [
            ("wrong password", {"type": "m.login.password", "user": "alice", "password": "x"}, 403, "M_FORBIDDEN"),
            ("unknown user", {"type": "m.login.password", "user": "bob", "password": "x"}, 403, "M_FORBIDDEN"),
            ("other server", {"type": "m.login.password", "user": "@alice:other.test", "password": "secret pw"}, 403, "M_FORBIDDEN"),
            ("unknown type", {"type": "m.login.token", "token": "t"}, 400, "M_UNKNOWN"),
            ("no identifier", {"type": "m.login.password", "password": "x"}, 400, "M_MISSING_PARAM"),
            ("email identifier", {"type": "m.login.password", "identifier": {"type": "m.id.thirdparty"}, "password": "x"}, 400, "M_UNKNOWN"),
            ("password not a string", {"type": "m.login.password", "user": "alice", "password": 5}, 400, "M_INVALID_PARAM"),
            ("device id not a string", {"type": "m.login.password", "user": "alice", "password": "secret pw", "device_id": 5}, 400, "M_BAD_JSON"),
        ]
        for name, body, code, errcode in cases:
            with self.subTest(name):
                self.error("POST", f"{V3}/login", body, code=code, errcode=errcode)
        self.assertEqual(self.successResultOf(self.handler.get_devices(ALICE)), [])


class TokenTests(ClientApiCase):
    def setUp(self) -> None:
        super().setUp()
        self.token = self.register("alice")["access_token"]

    def test_bearer_header_and_query_parameter(self) -> None:
        self.ok("GET", f"{V3}/account/whoami", token=self.token)
        self.ok("GET", f"{V3}/account/whoami?access_token={self.token}")

    def test_missing_and_unknown_tokens(self) -> None:
        whoami = f"{V3}/account/whoami"
        cases: list[tuple[str, str, dict[bytes, list[bytes]], str]] = [
            ("none", whoami, {}, "M_MISSING_TOKEN"),
            ("empty query", whoami + "?access_token=", {}, "M_MISSING_TOKEN"),
            ("other scheme", whoami, {b"Authorization": [b"Basic abc"]}, "M_MISSING_TOKEN"),
            ("two headers", whoami, {b"Authorization": [b"Bearer a", b"Bearer b"]}, "M_MISSING_TOKEN"),
            ("both forms", whoami + "?access_token=x", {b"Authorization": [b"Bearer " + self.token.encode()]}, "M_MISSING_TOKEN"),
            ("unknown", whoami, {b"Authorization": [b"Bearer dlt_nope"]}, "M_UNKNOWN_TOKEN"),
            ("unknown in query", whoami + "?access_token=nope", {}, "M_UNKNOWN_TOKEN"),
        ]
        for name, path, headers, errcode in cases:
            with self.subTest(name):
                code, answer = self.call("GET", path, headers=headers)
                self.assertEqual((code, answer["errcode"]), (401, errcode), answer)
        code, answer = self.call("GET", whoami, headers={b"Authorization": [b"Bearer dlt_nope"]})
        self.assertIs(answer["soft_logout"], False)

    def test_unknown_endpoint_and_wrong_method(self) -> None:
        self.error("GET", f"{V3}/sync", token=self.token, code=404, errcode="M_UNRECOGNIZED")
        self.error("GET", "/", code=404, errcode="M_UNRECOGNIZED")
        self.error("DELETE", f"{V3}/login", code=405, errcode="M_UNRECOGNIZED")
        self.error("POST", f"{V3}/devices", {}, token=self.token, code=405, errcode="M_UNRECOGNIZED")

    def test_versions(self) -> None:
        versions = self.ok("GET", "/_matrix/client/versions")["versions"]
        self.assertIn("v1.1", versions)


class LogoutTests(ClientApiCase):
    def setUp(self) -> None:
        super().setUp()
        self.register("alice", inhibit_login=True)
        self.phone = self.login("alice", device_id="PHONE")["access_token"]
        self.laptop = self.login("alice", device_id="LAPTOP")["access_token"]
        self.notified: list[tuple[str, int, tuple[str, ...]]] = []
        self.handler.add_change_listener(lambda *args: self.notified.append(args))

    def test_logout_deletes_the_device_and_its_tokens(self) -> None:
        phone_again = self.login("alice", device_id="PHONE")["access_token"]
        self.assertEqual(self.ok("POST", f"{V3}/logout", token=self.phone), {})
        for token in (self.phone, phone_again):
            self.error("GET", f"{V3}/account/whoami", token=token, code=401, errcode="M_UNKNOWN_TOKEN")
        self.ok("GET", f"{V3}/account/whoami", token=self.laptop)
        devices = self.successResultOf(self.handler.get_devices(ALICE))
        self.assertEqual([d.device_id for d in devices], ["LAPTOP"])
        # other servers hear of it, through the handler
        self.assertEqual([n[2] for n in self.notified], [("PHONE",)])

    def test_logout_all(self) -> None:
        self.assertEqual(self.ok("POST", f"{V3}/logout/all", token=self.phone), {})
        for token in (self.phone, self.laptop):
            self.error("GET", f"{V3}/account/whoami", token=token, code=401, errcode="M_UNKNOWN_TOKEN")
        self.assertEqual(self.successResultOf(self.handler.get_devices(ALICE)), [])
        self.assertEqual(sorted(n[2] for n in self.notified), [("LAPTOP",), ("PHONE",)])


class DeviceTests(ClientApiCase):
    def setUp(self) -> None:
        super().setUp()
        self.register("alice", "pw", inhibit_login=True)
        self.register("bob", "bobpw", inhibit_login=True)
        self.token = self.login("alice", device_id="PHONE", initial_device_display_name="phone")["access_token"]
        self.login("alice", device_id="LAPTOP")
        self.login("alice", device_id="TABLET")
        self.bob = self.login("bob", "bobpw", device_id="BOBDEV")["access_token"]

    def device_ids(self) -> list[str]:
        return [d.device_id for d in self.successResultOf(self.handler.get_devices(ALICE))]

    def test_list_and_get(self) -> None:
        devices = self.ok("GET", f"{V3}/devices", token=self.token)["devices"]
        self.assertEqual([d["device_id"] for d in devices], ["LAPTOP", "PHONE", "TABLET"])
        self.assertEqual(
            self.ok("GET", f"{V3}/devices/PHONE", token=self.token),
            {"device_id": "PHONE", "display_name": "phone", "last_seen_ip": None, "last_seen_ts": None},
        )
        self.error("GET", f"{V3}/devices/BOBDEV", token=self.token, code=404, errcode="M_NOT_FOUND")

    def test_rename(self) -> None:
        self.assertEqual(self.ok("PUT", f"{V3}/devices/LAPTOP", {"display_name": "work"}, self.token), {})
        self.assertEqual(self.ok("GET", f"{V3}/devices/LAPTOP", token=self.token)["display_name"], "work")
        self.ok("PUT", f"{V3}/devices/LAPTOP", {}, self.token)
        self.assertEqual(self.ok("GET", f"{V3}/devices/LAPTOP", token=self.token)["display_name"], "work")
        self.error("PUT", f"{V3}/devices/NOPE", {"display_name": "x"}, self.token, code=404, errcode="M_NOT_FOUND")
        self.error("PUT", f"{V3}/devices/NOPE", {}, self.token, code=404, errcode="M_NOT_FOUND")
        self.error("PUT", f"{V3}/devices/LAPTOP", {"display_name": 5}, self.token, code=400, errcode="M_BAD_JSON")

    def test_delete_devices_with_user_interactive_auth(self) -> None:
        path = f"{V3}/delete_devices"
        code, challenge = self.call("POST", path, {"devices": ["LAPTOP", "NOPE"]}, self.token)
        self.assertEqual(code, 401)
        self.assertEqual(challenge["flows"], [{"stages": ["m.login.password"]}])
        self.assertEqual(challenge["params"], {})
        self.assertNotIn("errcode", challenge)
        session = challenge["session"]
        self.assertEqual(self.device_ids(), ["LAPTOP", "PHONE", "TABLET"])

        # a wrong password: the same session, completed [], M_FORBIDDEN
        auth = {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"}, "password": "bad", "session": session}
        code, answer = self.call("POST", path, {"devices": ["LAPTOP"], "auth": auth}, self.token)
        self.assertEqual(code, 401)
        self.assertEqual((answer["session"], answer["completed"], answer["errcode"]), (session, [], "M_FORBIDDEN"))
        self.assertEqual(self.device_ids(), ["LAPTOP", "PHONE", "TABLET"])

        auth["password"] = "pw"
        self.assertEqual(self.ok("POST", path, {"devices": ["LAPTOP", "NOPE"], "auth": auth}, self.token), {})
        self.assertEqual(self.device_ids(), ["PHONE", "TABLET"])
        # the session is spent
        self.error("POST", path, {"devices": ["TABLET"], "auth": auth}, self.token, code=400, errcode="M_UNKNOWN")

    def test_delete_one_device(self) -> None:
        path = f"{V3}/devices/TABLET"
        code, challenge = self.call("DELETE", path, token=self.token)
        self.assertEqual(code, 401)
        auth = {"type": "m.login.password", "user": "@alice:hs.test", "password": "pw", "session": challenge["session"]}
        self.assertEqual(self.ok("DELETE", path, {"auth": auth}, self.token), {})
        self.assertEqual(self.device_ids(), ["LAPTOP", "PHONE"])
        # an unknown device: nothing to delete, as Synapse
        code, challenge = self.call("DELETE", f"{V3}/devices/NOPE", token=self.token)
        auth["session"] = challenge["session"]
        self.ok("DELETE", f"{V3}/devices/NOPE", {"auth": auth}, self.token)

    def test_auth_without_session_and_session_misuse(self) -> None:
        path = f"{V3}/delete_devices"
        auth: dict[str, Any] = {"type": "m.login.password", "user": "alice", "password": "pw"}
        # no session: one is made and completed at once
        self.ok("POST", path, {"devices": ["LAPTOP"], "auth": auth}, self.token)
        self.assertEqual(self.device_ids(), ["PHONE", "TABLET"])

        _, challenge = self.call("POST", path, {"devices": ["TABLET"]}, self.token)
        session = challenge["session"]
        # another operation with it
        self.error(
            "DELETE", f"{V3}/devices/TABLET", {"auth": {**auth, "session": session}}, self.token,
            code=403, errcode="M_FORBIDDEN",
        )
        # another user with it
        self.error(
            "POST", path, {"devices": ["BOBDEV"], "auth": {**auth, "user": "bob", "password": "bobpw", "session": session}},
            self.bob, code=403, errcode="M_FORBIDDEN",
        )
        # the right password of another user
        _, challenge = self.call("POST", path, {"devices": ["TABLET"]}, self.token)
        self.error(
            "POST", path, {"devices": ["TABLET"], "auth": {**auth, "user": "bob", "password": "bobpw", "session": challenge["session"]}},
            self.token, code=403, errcode="M_FORBIDDEN",
        )
        # an auth without type asks for the flows of the session
        code, answer = self.call("POST", path, {"devices": ["TABLET"], "auth": {"session": session}}, self.token)
        self.assertEqual((code, answer["session"]), (401, session))
        self.error("POST", path, {"devices": ["TABLET"], "auth": {"type": "m.login.sso", "session": session}}, self.token, code=400, errcode="M_UNRECOGNIZED")
        self.assertEqual(self.device_ids(), ["PHONE", "TABLET"])

    def test_sessions_expire(self) -> None:
        path = f"{V3}/delete_devices"
        _, challenge = self.call("POST", path, {"devices": ["TABLET"]}, self.token)
        self.clock.advance(SESSION_LIFETIME_S + 1)  # past the session's lifetime
        auth = {"type": "m.login.password", "user": "alice", "password": "pw", "session": challenge["session"]}
        self.error("POST", path, {"devices": ["TABLET"], "auth": auth}, self.token, code=400, errcode="M_UNKNOWN")
        self.assertEqual(self.api.uia.session_count, 0)

    def test_session_count_is_bounded(self) -> None:
        self.assertEqual(MAX_SESSIONS, 10_000)
        self.patch(uia, "MAX_SESSIONS", 3)
        path = f"{V3}/delete_devices"
        sessions = [self.call("POST", path, {"devices": ["TABLET"]}, self.token)[1]["session"] for _ in range(5)]
        self.assertEqual(self.api.uia.session_count, 3)
        # the oldest went first
        auth = {"type": "m.login.password", "user": "alice", "password": "pw", "session": sessions[1]}
        self.error("POST", path, {"devices": ["TABLET"], "auth": auth}, self.token, code=400, errcode="M_UNKNOWN")
        auth["session"] = sessions[2]
        self.ok("POST", path, {"devices": ["TABLET"], "auth": auth}, self.token)

    def test_bad_delete_devices_bodies(self) -> None:
        path = f"{V3}/delete_devices"
        for body in ({}, {"devices": "PHONE"}, {"devices": [5]}):
            with self.subTest(body):
                self.error("POST", path, body, self.token, code=400, errcode="M_BAD_JSON")
        self.error("POST", path, {"devices": [], "auth": "x"}, self.token, code=400, errcode="M_BAD_JSON")
