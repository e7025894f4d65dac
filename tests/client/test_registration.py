"""Shared-secret registration, as Synapse's /_synapse/admin/v1/register."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from devicelist_plugin.client.registration import NONCE_TIMEOUT_S, registration_mac
from tests.client.harness import REGISTER, SECRET, SERVER, V3, ClientApiCase, synapse_mac


class MacTests(ClientApiCase):
    def test_known_vectors(self) -> None:
        # computed independently with hmac, and as fixed values
        self.assertEqual(
            registration_mac("secret", "abc", "alice", "pw", False),
            hmac.new(b"secret", b"abc\x00alice\x00pw\x00notadmin", hashlib.sha1).hexdigest(),
        )
        self.assertEqual(
            registration_mac("secret", "abc", "alice", "pw", False),
            "42e32623fe124933c326f9d2d67ff7c617915a10",
        )
        self.assertEqual(
            registration_mac("secret", "abc", "bob", "pw", True, "bot"),
            "9baececd4cdbee8584dc7dff560b3a1b4f84cda4",
        )
        self.assertEqual(
            registration_mac(SECRET, "n", "ü", "pässword", True),
            synapse_mac(SECRET, "n", "ü", "pässword", True),
        )


class RegistrationTests(ClientApiCase):
    def nonce(self) -> str:
        nonce: str = self.ok("GET", REGISTER)["nonce"]
        return nonce

    def body(self, nonce: str, username: str = "alice", password: str = "pw", **extra: Any) -> Any:
        admin = bool(extra.get("admin"))
        mac = synapse_mac(SECRET, nonce, username, password, admin, extra.get("user_type"))
        return {"nonce": nonce, "username": username, "password": password, "mac": mac, **extra}

    def test_nonce(self) -> None:
        first, second = self.nonce(), self.nonce()
        self.assertEqual(len(first), 128)
        int(first, 16)
        self.assertNotEqual(first, second)

    def test_register_logs_in_on_a_new_device(self) -> None:
        answer = self.ok("POST", REGISTER, self.body(self.nonce(), device_id="DEV", initial_device_display_name="laptop"))
        self.assertEqual(answer["user_id"], f"@alice:{SERVER}")
        self.assertEqual(answer["home_server"], SERVER)
        self.assertEqual(answer["device_id"], "DEV")
        whoami = self.ok("GET", f"{V3}/account/whoami", token=answer["access_token"])
        self.assertEqual(whoami, {"user_id": f"@alice:{SERVER}", "device_id": "DEV", "is_guest": False})
        devices = self.ok("GET", f"{V3}/devices", token=answer["access_token"])["devices"]
        self.assertEqual([(d["device_id"], d["display_name"]) for d in devices], [("DEV", "laptop")])
        account = self.successResultOf(self.account_store.get_user(f"@alice:{SERVER}"))
        assert account is not None
        self.assertFalse(account.admin)
        self.assertTrue(account.password_hash and account.password_hash.startswith("$2b$04$"))

    def test_admin_user_type_and_lower_case(self) -> None:
        answer = self.ok("POST", REGISTER, self.body(self.nonce(), "Bob", admin=True, user_type="bot"))
        self.assertEqual(answer["user_id"], f"@bob:{SERVER}")
        account = self.successResultOf(self.account_store.get_user(f"@bob:{SERVER}"))
        assert account is not None
        self.assertEqual((account.admin, account.user_type), (True, "bot"))

    def test_inhibit_login(self) -> None:
        answer = self.ok("POST", REGISTER, self.body(self.nonce(), inhibit_login=True))
        self.assertEqual(answer, {"user_id": f"@alice:{SERVER}", "home_server": SERVER})
        self.assertEqual(self.successResultOf(self.handler.get_devices(f"@alice:{SERVER}")), [])

    def test_nonce_is_single_use_even_after_a_failure(self) -> None:
        nonce = self.nonce()
        bad = self.body(nonce)
        bad["mac"] = "0" * 40
        answer = self.error("POST", REGISTER, bad, code=403, errcode="M_UNKNOWN")
        self.assertEqual(answer["error"], "HMAC incorrect")
        answer = self.error("POST", REGISTER, self.body(nonce), code=400, errcode="M_UNKNOWN")
        self.assertEqual(answer["error"], "unrecognised nonce")
        nonce = self.nonce()
        self.ok("POST", REGISTER, self.body(nonce))
        self.error("POST", REGISTER, self.body(nonce, "other"), code=400, errcode="M_UNKNOWN")

    def test_nonce_expires(self) -> None:
        nonce = self.nonce()
        self.clock.advance(NONCE_TIMEOUT_S + 1)  # past the nonce's lifetime
        answer = self.error("POST", REGISTER, self.body(nonce), code=400, errcode="M_UNKNOWN")
        self.assertEqual(answer["error"], "unrecognised nonce")
        nonce = self.nonce()
        self.clock.advance(NONCE_TIMEOUT_S - 1)  # still valid
        self.ok("POST", REGISTER, self.body(nonce))

    def test_mac_covers_admin_and_user_type(self) -> None:
        body = self.body(self.nonce())
        body["admin"] = True  # the MAC said notadmin
        self.error("POST", REGISTER, body, code=403, errcode="M_UNKNOWN")
        body = self.body(self.nonce(), user_type="bot")
        body["user_type"] = "support"
        self.error("POST", REGISTER, body, code=403, errcode="M_UNKNOWN")

    def test_errors_as_synapse(self) -> None:
        cases: list[tuple[str, Any, int, str, str]] = [
            ("no nonce", {"username": "a"}, 400, "M_BAD_JSON", "nonce must be specified"),
            ("unknown nonce", {"nonce": "x"}, 400, "M_UNKNOWN", "unrecognised nonce"),
            ("no username", {}, 400, "M_BAD_JSON", "username must be specified"),
            ("username not a string", {"username": 5}, 400, "M_UNKNOWN", "Invalid username"),
            ("username too long", {"username": "a" * 513}, 400, "M_UNKNOWN", "Invalid username"),
            ("username with NUL", {"username": "a\x00b"}, 400, "M_UNKNOWN", "Invalid username"),
            ("no password", {"username": "a"}, 400, "M_BAD_JSON", "password must be specified"),
            ("password NUL", {"username": "a", "password": "\x00"}, 400, "M_UNKNOWN", "Invalid password"),
            ("bad user type", {"username": "a", "password": "p", "user_type": "x"}, 400, "M_UNKNOWN", "Invalid user type"),
            ("no mac", {"username": "a", "password": "p"}, 400, "M_BAD_JSON", "mac must be specified"),
        ]
        for name, fields, code, errcode, message in cases:
            with self.subTest(name):
                body = dict(fields)
                if "nonce" not in body and name != "no nonce":
                    body["nonce"] = self.nonce()
                answer = self.error("POST", REGISTER, body, code=code, errcode=errcode)
                self.assertEqual(answer["error"], message)

    def test_bad_usernames(self) -> None:
        cases = [
            ("", "M_INVALID_USERNAME"),
            ("al ice", "M_INVALID_USERNAME"),
            ("_alice", "M_INVALID_USERNAME"),
            ("12345", "M_INVALID_USERNAME"),
            ("a" * 250, "M_INVALID_USERNAME"),
        ]
        for username, errcode in cases:
            with self.subTest(username):
                self.error("POST", REGISTER, self.body(self.nonce(), username), code=400, errcode=errcode)
        self.ok("POST", REGISTER, self.body(self.nonce(), "a.b=c-d/e+f_1"))

    def test_taken_user_id(self) -> None:
        self.ok("POST", REGISTER, self.body(self.nonce(), "alice"))
        answer = self.error(
            "POST", REGISTER, self.body(self.nonce(), "ALICE"), code=400, errcode="M_USER_IN_USE"
        )
        self.assertEqual(answer["error"], "User ID already taken.")

    def test_no_body_is_not_json(self) -> None:
        self.error("POST", REGISTER, code=400, errcode="M_NOT_JSON")


class RegistrationDisabledTests(ClientApiCase):
    secret = None

    def test_post_refused(self) -> None:
        nonce = self.ok("GET", REGISTER)["nonce"]
        answer = self.error(
            "POST",
            REGISTER,
            {"nonce": nonce, "username": "a", "password": "p", "mac": "x"},
            code=400,
            errcode="M_UNKNOWN",
        )
        self.assertEqual(answer["error"], "Shared secret registration is not enabled")
