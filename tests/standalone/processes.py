"""Standalone servers as real processes on loopback, for end-to-end tests.

:class:`ServerProcess` makes a data directory with ``python -m
devicelist_plugin generate-config --test-network`` (self-signed TLS,
certificate verification off, loopback allowed) in a fresh temporary
directory, tunes it for tests (cheap bcrypt, short federation backoff) and
runs ``twistd -n devicelist`` on it.  Ports come from the OS and everything
binds 127.0.0.1.  The process is stopped by its pid (SIGTERM, then SIGKILL
after a bound) and the directory removed by the test's cleanups, in that
order.  It speaks the client-server, registration and admin APIs over the
plain-HTTP loopback listener with treq.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Iterable, Optional
from urllib.parse import quote

import treq
import yaml
from zope.interface import implementer
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import URI, Agent, HTTPConnectionPool
from twisted.web.iweb import IAgentEndpointFactory
from twisted.web.http_headers import Headers

from devicelist_plugin.client.registration import registration_mac
from interop.common import free_port
from tests.local.keys import ClientDevice

__all__ = [
    "ADMIN",
    "PASSWORD",
    "REGISTER",
    "V3",
    "ServerProcess",
    "free_port",
    "http_client",
    "logs_of",
    "sleep",
]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ADMIN = "/_devicelist/admin/v1"
V3 = "/_matrix/client/v3"
REGISTER = "/_synapse/admin/v1/register"
METRICS = "/_devicelist/metrics"
PASSWORD = "pw"
# bound of one HTTP request to a server, and of a process's exit after a signal
REQUEST_TIMEOUT_S = 20
EXIT_TIMEOUT_S = 10


@implementer(IAgentEndpointFactory)
class _Loopback:
    """Straight TCP connections: no name resolution in a thread first, so a
    request is on the wire as soon as it is made."""

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        return TCP4ClientEndpoint(reactor, uri.host.decode("ascii"), uri.port)


def http_client() -> HTTPClient:
    """Plain HTTP to 127.0.0.1; no persistent connections: nothing is left in
    the reactor."""
    pool = HTTPConnectionPool(reactor, persistent=False)
    return HTTPClient(Agent.usingEndpointFactory(reactor, _Loopback(), pool=pool))


def sleep(seconds: float) -> "Deferred[None]":
    return deferLater(reactor, seconds, lambda: None)


def logs_of(servers: Iterable["ServerProcess"]) -> str:
    """The end of every server's log, for failure messages."""
    return "\n".join(f"--- {s.server_name}:\n{s.log_tail()}" for s in servers)


class ServerProcess:
    """One standalone server process and its data directory.

    :param config: keys set in the generated configuration (over the test
        defaults).
    """

    def __init__(self, case: TestCase, config: Optional[dict[str, Any]] = None) -> None:
        self.case = case
        self.port = free_port()
        self.client_port = free_port()
        self.server_name = f"localhost:{self.port}"
        self.dir = tempfile.mkdtemp(prefix="devicelist-process-")
        # cleanups run last-in first-out: the process stops before its directory goes
        case.addCleanup(shutil.rmtree, self.dir, True)
        case.addCleanup(self.stop)
        self.process: Optional[subprocess.Popen[bytes]] = None
        self.paused = False
        # when each request not yet answered (nor failed) was sent
        self._in_flight: dict[int, float] = {}
        self._requests = 0
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
            generated = yaml.safe_load(f)
        # the generated test-network config already allows loopback and does not
        # verify certificates: check it
        assert generated["federation_verify_certificates"] is False
        assert "127.0.0.0/8" in generated["ip_range_allowlist"]
        generated["bcrypt_rounds"] = 4  # fast logins
        generated["federation"] = {
            "destination_min_retry_interval": "1s",
            "destination_max_retry_interval": "5s",
        }
        generated.update(config or {})
        with open(self.config_path, "w") as f:
            yaml.safe_dump(generated, f)
        self.secret: str = generated["registration_shared_secret"]

    # -- the process --------------------------------------------------------------

    def start(self) -> None:
        """Start ``twistd -n devicelist`` (again, after a stop, on the same data)."""
        assert self.process is None, "already running"
        log = open(os.path.join(self.dir, "server.log"), "ab")
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

    def stop(self) -> None:
        """SIGTERM (SIGKILL if it does not exit in time) and reap it."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        self.resume()
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=EXIT_TIMEOUT_S)

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind in the server, then reap it."""
        process, self.process = self.process, None
        assert process is not None and process.poll() is None, "not running"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=EXIT_TIMEOUT_S)
        self.paused = False

    def pause(self) -> None:
        """SIGSTOP: the server stops answering (connections still queue)."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        if self.paused and self.process is not None:
            os.kill(self.process.pid, signal.SIGCONT)
        self.paused = False

    def log_tail(self, size: int = 4000) -> str:
        try:
            with open(os.path.join(self.dir, "server.log"), "rb") as f:
                return f.read()[-size:].decode("utf-8", "replace")
        except OSError as e:
            return f"(no log: {e})"

    async def wait_ready(self, deadline: float) -> None:
        """Until the client API answers; fail if the process exits or at ``deadline``."""
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

    # -- HTTP -----------------------------------------------------------------------

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.client_port}{path}"

    async def call(
        self, method: str, path: str, body: Any = None, token: Optional[str] = None
    ) -> tuple[int, Any]:
        """One request on the plain-HTTP listener: (status, decoded JSON body)."""
        headers = Headers({b"Content-Type": [b"application/json"]})
        if token is not None:
            headers.addRawHeader(b"Authorization", b"Bearer " + token.encode("ascii"))
        data = None if body is None else json.dumps(body).encode("utf-8")
        self._requests += 1
        request = self._requests
        self._in_flight[request] = time.monotonic()
        try:
            response = await self.http.request(
                method, self.url(path), data=data, headers=headers, timeout=REQUEST_TIMEOUT_S
            )
            content = await treq.content(response)
        finally:
            del self._in_flight[request]
        return response.code, json.loads(content)

    def in_flight(self, for_at_least: float = 0.0) -> int:
        """How many requests are sent and not answered, for at least ``for_at_least`` s."""
        since = time.monotonic() - for_at_least
        return sum(1 for sent in self._in_flight.values() if sent <= since)

    async def ok(self, method: str, path: str, body: Any = None, token: Optional[str] = None) -> Any:
        code, answer = await self.call(method, path, body, token)
        self.case.assertEqual(code, 200, (self.server_name, method, path, answer))
        return answer

    async def metrics(self) -> str:
        response = await self.http.get(self.url(METRICS), timeout=REQUEST_TIMEOUT_S)
        text: str = (await treq.content(response)).decode("utf-8")
        return text

    async def metric_samples(self, name: str) -> dict[str, float]:
        """The samples of the metric ``name``: ``{'{label="value",...}': value}``
        (``''`` for a metric without labels)."""
        samples = {}
        for line in (await self.metrics()).splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                labels, value = line[len(name):].rsplit(" ", 1)
                samples[labels.strip()] = float(value)
        return samples

    async def metric_total(self, name: str) -> float:
        """The sum of every sample of the metric ``name`` (all label values)."""
        return sum((await self.metric_samples(name)).values())

    # -- accounts, keys, rooms --------------------------------------------------------

    async def register(
        self, username: str, admin: bool = False, inhibit_login: bool = False
    ) -> str:
        """Shared-secret registration; unless ``inhibit_login`` it also logs
        the user in on a new device, as Synapse does."""
        nonce = (await self.ok("GET", REGISTER))["nonce"]
        body = {
            "nonce": nonce, "username": username, "password": PASSWORD, "admin": admin,
            "mac": registration_mac(self.secret, nonce, username, PASSWORD, admin),
            "inhibit_login": inhibit_login,
        }
        user_id: str = (await self.ok("POST", REGISTER, body))["user_id"]
        return user_id

    @staticmethod
    def login_body(username: str, device_id: str, display_name: Optional[str] = None) -> Any:
        body: dict[str, Any] = {
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": username},
            "password": PASSWORD,
            "device_id": device_id,
        }
        if display_name is not None:
            body["initial_device_display_name"] = display_name
        return body

    async def login(self, username: str, device_id: str) -> str:
        answer = await self.ok("POST", f"{V3}/login", self.login_body(username, device_id))
        token: str = answer["access_token"]
        return token

    async def upload_keys(self, user_id: str, device_id: str, token: str) -> Any:
        """Upload a new device's keys; the uploaded DeviceKeys object."""
        keys = ClientDevice(user_id, device_id).device_keys()
        await self.ok("POST", f"{V3}/keys/upload", {"device_keys": keys}, token)
        return keys

    async def set_membership(
        self, admin_token: str, room_id: str, user_id: str, membership: str = "join"
    ) -> None:
        path = f"{ADMIN}/rooms/{quote(room_id)}/members/{quote(user_id)}"
        await self.ok("PUT", path, {"membership": membership}, admin_token)

    async def admin_user_devices(self, admin_token: str, user_id: str) -> Any:
        return await self.ok("GET", f"{ADMIN}/users/{quote(user_id)}/devices", token=admin_token)
