"""Two complete servers for the federation fuzz tests.

``a.test`` is under test: a :class:`DeviceListModule` served by its real
Site (body size limit included).  ``s.test`` is another complete module, the
peer whose signing key authenticates the fuzzed requests (so the body parser
behind the X-Matrix check is really reached) and whose user ``@u:s.test``
has a true device list for the convergence checks.  Both run on one
:class:`FakeNetwork` and one simulated clock; nothing opens a socket.

A's local user ``@alice:a.test`` has devices with keys, one-time and
fallback keys and cross-signing keys, and shares a room with ``@u:s.test``,
so each server tracks the other's user.  A already knows S's key when a test
starts, so a signed request from S costs A no key fetch.
"""

from __future__ import annotations

import base64
import json
import os
import random
from typing import Any, Callable, Optional
from urllib.parse import quote

import treq
from signedjson.key import decode_signing_key_base64
from signedjson.types import SigningKey
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from devicelist_plugin.core.backoff import BackoffPolicy
from devicelist_plugin.federation.client import BytesProducer
from devicelist_plugin.federation.xmatrix import build_authorization_header
from devicelist_plugin.membership import InMemoryMembership
from devicelist_plugin.module import DeviceListModule, ModuleConfig
from devicelist_plugin.storage import Store, open_sqlite_store
from tests.fuzz.common import assert_no_logged_errors, check_answer
from tests.helpers import FakeNetwork
from tests.helpers.store import dump_store
from tests.local.keys import ClientDevice, CrossSigning

NOW = 1_700_000_000
A = "a.test"
S = "s.test"
ALICE = "@alice:a.test"
U = "@u:s.test"
ROOM = "!fuzz:a.test"
POLICY = BackoffPolicy(min_interval=1, multiplier=2, max_interval=60)
DEVICES_PATH = "/_matrix/federation/v1/user/devices/"
KEY_PATH_PREFIX = "/_matrix/key/"


def _key(seed: int, version: str) -> SigningKey:
    raw = base64.b64encode(random.Random(seed).randbytes(32)).decode()
    return decode_signing_key_base64("ed25519", version, raw)


def devices_path(user_id: str) -> str:
    return DEVICES_PATH + quote(user_id, safe="")


class Answer:
    """A response as the requester saw it."""

    def __init__(self, code: int, headers: dict[bytes, list[bytes]], body: bytes) -> None:
        self.code = code
        self.headers = headers
        self.body = body


class TwoServersCase(SynchronousTestCase):
    """A (under test) and S (its peer) on one FakeNetwork; see the module docstring."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(NOW)
        self.network = FakeNetwork(self.clock)
        # cleanups run last-in first-out: this one after both modules stopped
        self.addCleanup(lambda: self.assertEqual(self.clock.getDelayedCalls(), []))
        self.s_key = _key(2, "s1")
        directory = self.mktemp()
        os.makedirs(directory)
        self.memberships: dict[str, InMemoryMembership] = {}
        self.a = self._module(A, _key(1, "a1"), os.path.join(directory, "a.db"))
        self.s = self._module(S, self.s_key, os.path.join(directory, "s.db"))
        for membership in self.memberships.values():
            membership.join(ROOM, ALICE)
            membership.join(ROOM, U)
        local = self.a.local
        self.cross_signing = CrossSigning(ALICE)
        for device_id in ("PHONE", "LAPTOP"):
            device = ClientDevice(ALICE, device_id)
            self.settle(local.create_device(ALICE, device_id, device_id.lower()))
            self.settle(local.upload_device_keys(ALICE, device_id, device.device_keys()))
            self.settle(
                local.upload_one_time_keys(
                    ALICE,
                    device_id,
                    {
                        f"signed_curve25519:{device_id}{i}": device.sign({"key": f"otk{i}"})
                        for i in range(3)
                    },
                )
            )
        self.settle(local.upload_cross_signing_keys(ALICE, self.cross_signing.upload_body()))
        self.true_devices: dict[str, ClientDevice] = {}
        for device_id in ("D1", "D2"):
            self.s_change(device_id)
        # A learns S's key (and both learn each other's lists) before any example
        self.network.advance(60)
        self.assertEqual(self.signed("GET", devices_path(ALICE)).code, 200)
        assert_no_logged_errors(self)

    def _module(self, name: str, key: SigningKey, path: str) -> DeviceListModule:
        store: Store = self.successResultOf(
            open_sqlite_store(path, MemoryReactorClock(), synchronous=True)
        )
        self.addCleanup(store.close)
        membership = InMemoryMembership(name)
        self.memberships[name] = membership
        module = DeviceListModule(
            name,
            [key],
            store,
            self.clock,
            self.network.agent_for(name),
            membership,
            ModuleConfig(retry_policy=POLICY, allow_device_name_lookup_over_federation=True),
            jitter=lambda low, high: 1.0,
        )
        self.network.add_server(name, module.transport.make_site(self.clock))
        self.successResultOf(module.start())

        self.addCleanup(lambda: self.settle(module.stop()))
        return module

    # -- helpers ----------------------------------------------------------------

    def settle(self, d: Any) -> Any:
        self.network.flush()
        return self.successResultOf(d)

    def s_change(self, device_id: str) -> None:
        """A real change of ``@u:s.test``'s devices on S: a new device with
        keys (or new keys for an existing one)."""
        device = ClientDevice(U, device_id)
        self.true_devices[device_id] = device
        self.settle(self.s.local.create_device(U, device_id, None))
        self.settle(self.s.local.upload_device_keys(U, device_id, device.device_keys()))

    def request(
        self,
        method: str,
        path: str,
        body: Optional[bytes],
        authorization: list[bytes],
        origin: str = S,
    ) -> Answer:
        headers = Headers()
        for value in authorization:
            headers.addRawHeader(b"Authorization", value)
        if body is not None:
            headers.addRawHeader(b"Content-Type", b"application/json")
        # the agent itself, not treq: the path goes out exactly as signed
        d = self.network.agent_for(origin).request(
            method.encode("ascii"),
            f"https://{A}{path}".encode("ascii"),
            headers,
            None if body is None else BytesProducer(body),
        )
        self.network.flush()
        response = self.successResultOf(d)
        content: bytes = self.successResultOf(treq.content(response))
        raw = {k.lower(): v for k, v in response.headers.getAllRawHeaders()}
        return Answer(response.code, raw, content)

    def sign(self, method: str, path: str, content: Any) -> Optional[bytes]:
        """S's X-Matrix header for this request, or None if ``content``
        cannot be signed (it has no canonical JSON form)."""
        try:
            return build_authorization_header(self.s_key, S, A, method, path, content)
        except Exception:
            return None

    def signed(self, method: str, path: str, content: Any = None, raw: Optional[bytes] = None) -> Answer:
        """A request signed by S (``content`` is signed; ``raw``, when given,
        is sent instead of its JSON)."""
        header = self.sign(method, path, content)
        body = raw if raw is not None else (None if content is None else json.dumps(content).encode())
        return self.request(method, path, body, [header] if header is not None else [])

    # -- the properties ------------------------------------------------------------

    def dump(self) -> dict[str, list[tuple[Any, ...]]]:
        return dump_store(self, self.a.store)

    def outbound(self) -> list[str]:
        return [f"{r.method} {r.destination}{r.path}" for r in self.network.requests(origin=A)]

    def check(
        self,
        send: Callable[[], Answer],
        *,
        ignore_tables: tuple[str, ...] = (),
        ignore_outbound: Optional[str] = None,
    ) -> tuple[Answer, Any]:
        """Run ``send``; check the answer (no 5xx, JSON, errcode) and no
        logged error; when it is an error, check that A's store is unchanged
        and that A made no request (except the ones ignored: a key fetch for
        a request that names an unknown server's key is A's right)."""
        before = self.dump()
        sent_before = len(self.outbound())
        try:
            answer = send()
            parsed = check_answer(self, answer.code, answer.headers, answer.body)
        finally:
            # even when the answer is wrong: the next example starts clean
            assert_no_logged_errors(self)
        if answer.code >= 400:
            after = self.dump()
            for table in ignore_tables:
                before.pop(table, None)
                after.pop(table, None)
            self.assertEqual(after, before, f"a rejected request ({answer.code}) changed the store")
            made = [
                r
                for r in self.outbound()[sent_before:]
                if ignore_outbound is None or ignore_outbound not in r
            ]
            self.assertEqual(made, [], f"a rejected request ({answer.code}) made requests")
        return answer, parsed
