"""Fuzzing the standalone server's client-server API: ``POST /keys/upload``
(``device_keys``, ``one_time_keys`` and ``fallback_keys`` with one field
mutated, arbitrary JSON, non-JSON bytes) and ``POST /login`` (near-valid
password logins with one field mutated, arbitrary JSON).

For every example: no 5xx, nothing logged as an error, a JSON answer with an
``errcode`` when refused, and a refused request leaves the store as it was
(accounts, tokens, devices, keys, and the pending updates that would go to
the server sharing a room with the user).  Run long with
``FUZZ_EXAMPLES=5000``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import treq
from hypothesis import strategies as st
from twisted.web.http_headers import Headers

from tests.client.harness import V3, ClientApiCase
from tests.fuzz.common import (
    assert_no_logged_errors,
    check_answer,
    encode,
    fuzz,
    is_json_object,
    json_values,
    mutated,
    raw_bodies,
    scalars,
)
from tests.helpers.membership import share_room
from tests.helpers.store import dump_store
from tests.local.keys import ClientDevice

USER = "@alice:hs.test"
DEVICE = "FUZZDEV"
_device = ClientDevice(USER, DEVICE)

UPLOAD = {
    "device_keys": _device.device_keys(),
    "one_time_keys": {
        "signed_curve25519:AAAAAQ": _device.sign({"key": "otk1"}),
        "curve25519:AAAAAg": "otk2",
    },
    "fallback_keys": {
        "signed_curve25519:AAAAAw": _device.sign({"key": "fb1", "fallback": True}),
    },
}
LOGIN = {
    "type": "m.login.password",
    "identifier": {"type": "m.id.user", "user": "alice"},
    "password": "pw",
    "device_id": "NEWDEV",
    "initial_device_display_name": "fuzz",
}

wrong = st.one_of(
    scalars,
    st.sampled_from([[], {}, [1], {"a": 1}, USER, "@alice:other.test", DEVICE, "x" * 5000]),
)


def _bodies(valid: dict[str, Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        mutated(valid, wrong),
        mutated(valid, json_values()),
        st.dictionaries(st.sampled_from(list(valid)), json_values(), max_size=3),
        json_values(),
    )


class ClientFuzz(ClientApiCase):
    def setUp(self) -> None:
        super().setUp()
        self.register("alice")
        self.token = self.login("alice", device_id=DEVICE)["access_token"]
        share_room(self.membership, USER, "remote.test")
        assert_no_logged_errors(self)

    def post(self, path: str, body: bytes, token: Optional[str]) -> tuple[int, dict[bytes, list[bytes]], bytes]:
        headers = Headers({b"Content-Type": [b"application/json"]})
        if token is not None:
            headers.addRawHeader(b"Authorization", b"Bearer " + token.encode("ascii"))
        d = self.http.request("POST", "https://hs.test" + path, data=body, headers=headers)
        self.agent.flush()
        response = self.successResultOf(d)
        content: bytes = self.successResultOf(treq.content(response))
        raw = {k.lower(): v for k, v in response.headers.getAllRawHeaders()}
        return response.code, raw, content

    def check(self, send: Callable[[], tuple[int, dict[bytes, list[bytes]], bytes]]) -> int:
        before = dump_store(self, self.store)
        try:
            code, headers, body = send()
            check_answer(self, code, headers, body)
        finally:
            assert_no_logged_errors(self)
        if code >= 400:
            self.assertEqual(dump_store(self, self.store), before, f"a refused request ({code}) changed the store")
        return code

    @fuzz("POST /keys/upload", body=_bodies(UPLOAD))
    def test_keys_upload(self, body: Any) -> None:
        self.check(lambda: self.post(f"{V3}/keys/upload", encode(body), self.token))

    @fuzz("POST /login", body=_bodies(LOGIN))
    def test_login(self, body: Any) -> None:
        self.check(lambda: self.post(f"{V3}/login", encode(body), None))

    @fuzz("POST /keys/upload, /login (not JSON)", scale=0.3, raw=raw_bodies, login=st.booleans())
    def test_not_json(self, raw: bytes, login: bool) -> None:
        path = f"{V3}/login" if login else f"{V3}/keys/upload"
        code = self.check(lambda: self.post(path, raw, None if login else self.token))
        if not is_json_object(raw):
            self.assertGreaterEqual(code, 400)
