"""End to end: two standalone servers as real processes on loopback.

Each server's data directory is made by ``python -m devicelist_plugin
generate-config --test-network`` (self-signed TLS, certificate verification
off, loopback allowed) and the server runs under ``twistd -n devicelist``.
The test registers users with the Synapse-compatible shared-secret API,
logs in, uploads keys, puts the users in one room through both servers'
admin API, adds a device on one server and polls the other's
``/keys/query`` until it shows it.  Everything is bounded in time and the
processes are stopped by pid.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Optional
from urllib.parse import quote

import treq
import yaml
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from tests.local.keys import ClientDevice

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROOM = "!e2e:localhost"
ADMIN = "/_devicelist/admin/v1"
V3 = "/_matrix/client/v3"
REGISTER = "/_synapse/admin/v1/register"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def synapse_mac(secret: str, nonce: str, user: str, password: str, admin: bool) -> str:
    mac = hmac.new(key=secret.encode("utf8"), digestmod=hashlib.sha1)
    for part in (nonce, user, password):
        mac.update(part.encode("utf8"))
        mac.update(b"\x00")
    mac.update(b"admin" if admin else b"notadmin")
    return mac.hexdigest()


def http_client() -> HTTPClient:
    """No persistent connections: nothing is left in the reactor."""
    pool = HTTPConnectionPool(reactor, persistent=False)
    return HTTPClient(Agent(reactor, pool=pool))


def sleep(seconds: float) -> "Deferred[None]":
    return deferLater(reactor, seconds, lambda: None)


class Server:
    """One standalone server process."""

    def __init__(self, case: "TwoServersTest", name: str) -> None:
        self.case = case
        self.port = free_port()
        self.client_port = free_port()
        self.server_name = f"localhost:{self.port}"
        self.dir = os.path.abspath(case.mktemp())
        self.process: Optional[subprocess.Popen[bytes]] = None
        self.env = dict(os.environ, PYTHONPATH=ROOT)
        self.http = http_client()
        subprocess.run(
            [
                sys.executable, "-m", "devicelist_plugin", "generate-config",
                "--server-name", self.server_name, "--data-dir", self.dir,
                "--port", str(self.port), "--client-port", str(self.client_port),
                "--test-network",
            ],
            check=True, env=self.env, cwd=ROOT, capture_output=True, timeout=30,
        )
        self.config_path = os.path.join(self.dir, "devicelist.yaml")
        with open(self.config_path) as f:
            config = yaml.safe_load(f)
        config["bcrypt_rounds"] = 4  # fast logins
        # the generated test-network config already allows loopback and does not
        # verify certificates: check it
        assert config["federation_verify_certificates"] is False
        assert "127.0.0.0/8" in config["ip_range_allowlist"]
        config["federation"] = {
            "destination_min_retry_interval": "1s",
            "destination_max_retry_interval": "5s",
        }
        with open(self.config_path, "w") as f:
            yaml.safe_dump(config, f)
        self.secret: str = config["registration_shared_secret"]

    def start(self) -> None:
        log = open(os.path.join(self.dir, "server.log"), "wb")
        self.process = subprocess.Popen(
            [
                sys.executable, "-c",
                "import sys; from twisted.scripts.twistd import run; "
                "sys.argv[0] = 'twistd'; run()",
                "-n", "--pidfile=", "devicelist", "--config", self.config_path,
            ],
            env=self.env, cwd=self.dir, stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        self.case.addCleanup(self.stop)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=10)

    def log_tail(self) -> str:
        with open(os.path.join(self.dir, "server.log"), "rb") as f:
            return f.read()[-4000:].decode("utf-8", "replace")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.client_port}{path}"

    async def call(
        self, method: str, path: str, body: Any = None, token: Optional[str] = None
    ) -> tuple[int, Any]:
        headers = Headers({b"Content-Type": [b"application/json"]})
        if token is not None:
            headers.addRawHeader(b"Authorization", b"Bearer " + token.encode("ascii"))
        data = None if body is None else json.dumps(body).encode("utf-8")
        response = await self.http.request(
            method, self.url(path), data=data, headers=headers, timeout=20
        )
        content = await treq.content(response)
        return response.code, json.loads(content)

    async def ok(self, method: str, path: str, body: Any = None, token: Optional[str] = None) -> Any:
        code, answer = await self.call(method, path, body, token)
        self.case.assertEqual(code, 200, (method, path, answer))
        return answer

    async def wait_ready(self, deadline: float) -> None:
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                self.case.fail(f"{self.server_name} exited:\n{self.log_tail()}")
            try:
                await self.ok("GET", "/_matrix/client/versions")
                return
            except Exception:
                if time.monotonic() > deadline:
                    self.case.fail(f"{self.server_name} did not start:\n{self.log_tail()}")
                await sleep(0.2)

    async def register(self, username: str, admin: bool = False) -> str:
        nonce = (await self.ok("GET", REGISTER))["nonce"]
        body = {
            "nonce": nonce, "username": username, "password": "pw", "admin": admin,
            "mac": synapse_mac(self.secret, nonce, username, "pw", admin),
        }
        user_id: str = (await self.ok("POST", REGISTER, body))["user_id"]
        return user_id

    async def login(self, username: str, device_id: str) -> str:
        answer = await self.ok("POST", f"{V3}/login", {
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": username},
            "password": "pw",
            "device_id": device_id,
        })
        token: str = answer["access_token"]
        return token

    async def upload_keys(self, user_id: str, device_id: str, token: str) -> None:
        keys = ClientDevice(user_id, device_id).device_keys()
        await self.ok("POST", f"{V3}/keys/upload", {"device_keys": keys}, token)

    async def join(self, admin_token: str, user_id: str) -> None:
        path = f"{ADMIN}/rooms/{quote(ROOM)}/members/{quote(user_id)}"
        await self.ok("PUT", path, {"membership": "join"}, admin_token)


class TwoServersTest(TestCase):
    timeout = 90

    def test_device_change_reaches_the_other_server(self) -> "Deferred[None]":
        return ensureDeferred(self.run_scenario())

    async def run_scenario(self) -> None:
        deadline = time.monotonic() + 75
        a = Server(self, "a")
        b = Server(self, "b")
        a.start()
        b.start()
        await a.wait_ready(deadline)
        await b.wait_ready(deadline)

        await a.register("root", admin=True)
        a_admin = await a.login("root", "ADMIN")
        await b.register("root", admin=True)
        b_admin = await b.login("root", "ADMIN")
        alice = await a.register("alice")
        alice_token = await a.login("alice", "ALICE1")
        await a.upload_keys(alice, "ALICE1", alice_token)
        bob = await b.register("bob")
        bob_token = await b.login("bob", "BOB1")
        await b.upload_keys(bob, "BOB1", bob_token)

        # one room, on both servers (the receiving side first: it then tracks alice)
        for server, token in ((b, b_admin), (a, a_admin)):
            await server.join(token, alice)
            await server.join(token, bob)
        members = await a.ok("GET", f"{ADMIN}/rooms/{quote(ROOM)}/members", token=a_admin)
        self.assertEqual(members["members"], sorted([alice, bob]))

        async def bobs_view() -> dict[str, Any]:
            answer = await b.ok(
                "POST", f"{V3}/keys/query", {"device_keys": {alice: []}, "timeout": 5000},
                bob_token,
            )
            devices: dict[str, Any] = answer.get("device_keys", {}).get(alice, {})
            return devices

        async def poll(want: set[str]) -> None:
            while True:
                if set(await bobs_view()) == want:
                    return
                if time.monotonic() > deadline:
                    self.fail(
                        f"B never saw {sorted(want)}\nA:\n{a.log_tail()}\nB:\n{b.log_tail()}"
                    )
                await sleep(0.3)

        await poll({"ALICE1"})
        # a device change on A reaches B (pushed as an EDU)
        alice_token2 = await a.login("alice", "ALICE2")
        await a.upload_keys(alice, "ALICE2", alice_token2)
        await poll({"ALICE1", "ALICE2"})
        cached = await b.ok("GET", f"{ADMIN}/users/{quote(alice)}/devices", token=b_admin)
        self.assertFalse(cached["stale"])
        self.assertEqual(
            sorted(d["device_id"] for d in cached["devices"]), ["ALICE1", "ALICE2"]
        )
        # and a deletion (logout deletes the device)
        await a.ok("POST", f"{V3}/logout", {}, alice_token2)
        await poll({"ALICE1"})
        # B's metrics saw the EDUs
        response = await b.http.get(b.url("/_devicelist/metrics"), timeout=10)
        text = (await treq.content(response)).decode("utf-8")
        self.assertIn(
            'devicelist_edus_received_total{edu_type="m.device_list_update",outcome="accepted"}',
            text,
        )
