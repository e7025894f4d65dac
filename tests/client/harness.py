"""A client API on an inline SQLite store and a simulated clock, and a JSON
client reaching it in memory (treq's RequestTraversalAgent)."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any, Optional

import treq
from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from devicelist_plugin.client.api import ClientApi
from devicelist_plugin.client.keys import RemoteKeysClient, RemoteKeysQuery
from devicelist_plugin.client.passwords import PasswordHasher
from devicelist_plugin.federation.client import BytesProducer
from devicelist_plugin.local.handler import LocalDeviceHandler
from devicelist_plugin.membership import InMemoryMembership
from devicelist_plugin.storage.accounts import AccountStore
from tests.helpers.store import open_inline_store

SERVER = "hs.test"
SECRET = "shared secret ü"
NOW_S = 1_700_000_000
V3 = "/_matrix/client/v3"
REGISTER = "/_synapse/admin/v1/register"


def synapse_mac(
    secret: str, nonce: str, user: str, password: str, admin: bool, user_type: Optional[str] = None
) -> str:
    """The MAC exactly as Synapse's register_new_matrix_user computes it."""
    mac = hmac.new(key=secret.encode("utf8"), digestmod=hashlib.sha1)
    mac.update(nonce.encode("utf8"))
    mac.update(b"\x00")
    mac.update(user.encode("utf8"))
    mac.update(b"\x00")
    mac.update(password.encode("utf8"))
    mac.update(b"\x00")
    mac.update(b"admin" if admin else b"notadmin")
    if user_type:
        mac.update(b"\x00")
        mac.update(user_type.encode("utf8"))
    return mac.hexdigest()


class ClientApiCase(SynchronousTestCase):
    """A ClientApi for ``hs.test`` with shared-secret registration on."""

    secret: Optional[str] = SECRET
    remote_query: Optional[RemoteKeysQuery] = None
    remote_client: Optional[RemoteKeysClient] = None

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(NOW_S)  # an arbitrary "now"
        self.store = open_inline_store(self)
        self.membership = InMemoryMembership(SERVER)
        self.handler = LocalDeviceHandler(SERVER, self.store, self.membership, self.clock)
        self.account_store = AccountStore(self.store.database)
        self.api = ClientApi(
            SERVER,
            self.handler,
            self.account_store,
            self.clock,
            password_hasher=PasswordHasher(rounds=4),
            registration_shared_secret=self.secret,
            remote_query=self.remote_query,
            remote_client=self.remote_client,
        )
        self.agent = RequestTraversalAgent(self.api.resource)
        self.http = HTTPClient(self.agent, data_to_body_producer=BytesProducer)

    # ------------------------------------------------------------------
    # requests

    def start(
        self,
        method: str,
        path: str,
        body: Any = None,
        token: Optional[str] = None,
        raw: Optional[bytes] = None,
        headers: Optional[dict[bytes, list[bytes]]] = None,
    ) -> Any:
        all_headers = dict(headers or {})
        if token is not None:
            all_headers[b"Authorization"] = [b"Bearer " + token.encode("ascii")]
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        d = self.http.request(
            method, "https://hs.test" + path, data=data, headers=Headers(all_headers)
        )
        self.agent.flush()
        return d

    def finish(self, d: Any) -> tuple[int, Any]:
        response: IResponse = self.successResultOf(d)
        content: bytes = self.successResultOf(treq.content(response))
        self.assertEqual(response.headers.getRawHeaders(b"Content-Type"), [b"application/json"])
        return response.code, json.loads(content)

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        token: Optional[str] = None,
        raw: Optional[bytes] = None,
        headers: Optional[dict[bytes, list[bytes]]] = None,
    ) -> tuple[int, Any]:
        return self.finish(self.start(method, path, body, token, raw, headers))

    def ok(self, method: str, path: str, body: Any = None, token: Optional[str] = None) -> Any:
        code, answer = self.call(method, path, body, token)
        self.assertEqual(code, 200, answer)
        return answer

    def error(
        self,
        method: str,
        path: str,
        body: Any = None,
        token: Optional[str] = None,
        *,
        code: int,
        errcode: str,
    ) -> Any:
        got_code, answer = self.call(method, path, body, token)
        self.assertEqual((got_code, answer.get("errcode")), (code, errcode), answer)
        return answer

    # ------------------------------------------------------------------
    # users

    def register(
        self, username: str, password: str = "pw", admin: bool = False, **extra: Any
    ) -> Any:
        nonce = self.ok("GET", REGISTER)["nonce"]
        body = {
            "nonce": nonce,
            "username": username,
            "password": password,
            "admin": admin,
            "mac": synapse_mac(SECRET, nonce, username, password, admin),
            **extra,
        }
        return self.ok("POST", REGISTER, body)

    def login(self, user: str, password: str = "pw", **extra: Any) -> Any:
        return self.ok(
            "POST",
            f"{V3}/login",
            {
                "type": "m.login.password",
                "identifier": {"type": "m.id.user", "user": user},
                "password": password,
                **extra,
            },
        )
