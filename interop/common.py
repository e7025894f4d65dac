"""What both servers of the interop harness share: free ports, blocking JSON
over HTTP(S), bounded polling, a server process stopped by its own pid, and
the client-server calls both servers answer alike (shared-secret
registration, password login).

Everything here is blocking (``urllib``/``http.client``, ``subprocess``):
the harness drives real processes and needs no reactor.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Mapping, Optional, Sequence, TypeVar
from urllib.parse import quote

from signedjson.key import read_signing_keys
from signedjson.types import SigningKey

from devicelist_plugin.client.registration import REGISTER_PATH, registration_mac

__all__ = [
    "HarnessError",
    "MatrixServerProcess",
    "deep_merge",
    "free_port",
    "http_json",
    "insecure_tls_context",
    "read_tail",
    "wait_until",
]

T = TypeVar("T")

V3 = "/_matrix/client/v3"


#: first-start attempts, each with new ports if a port was taken meanwhile
PORT_ATTEMPTS = 3


class HarnessError(Exception):
    """A server of the harness did not start, answered wrongly or timed out."""


class _PortTaken(Exception):
    """The server exited at start because one of its ports was in use."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that the OS says is free now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def insecure_tls_context() -> ssl.SSLContext:
    """TLS without certificate verification: the harness's servers use
    self-signed certificates."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def http_json(
    method: str,
    url: str,
    body: Any = None,
    headers: Optional[Mapping[str, str]] = None,
    timeout: float = 30,
) -> tuple[int, Any]:
    """One request; the answer's status and decoded JSON (``None`` when the
    body is not JSON).  HTTP errors are answers, not exceptions."""
    data = None if body is None else json.dumps(body).encode("utf-8")
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    context = insecure_tls_context() if url.startswith("https:") else None
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, None


def wait_until(
    probe: Callable[[], Optional[T]], timeout: float, what: str, interval: float = 0.25
) -> T:
    """Call ``probe`` until it returns something other than ``None`` (or
    ``False``), at most ``timeout`` seconds; exceptions count as not yet.

    :raise HarnessError: naming ``what`` (and the last exception) on timeout.
    """
    deadline = time.monotonic() + timeout
    last: Optional[BaseException] = None
    while True:
        try:
            result = probe()
            if result is not None and result is not False:
                return result
        except Exception as e:  # noqa: BLE001 - any failure means "not yet"
            last = e
        if time.monotonic() >= deadline:
            detail = f" (last error: {last!r})" if last is not None else ""
            raise HarnessError(f"timed out after {timeout:g}s waiting for {what}{detail}")
        time.sleep(interval)


def read_tail(path: str, chars: int) -> str:
    """The last ``chars`` bytes of a file, decoded ("" if it cannot be read)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - chars))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``extra``, mappings merged key by key."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class MatrixServerProcess:
    """A homeserver process on loopback with a plain-HTTP client listener.

    Subclasses set :attr:`server_name`, :attr:`client_port`,
    :attr:`federation_port`, :attr:`registration_secret` and implement
    :meth:`command`.  The process is stopped by its own pid only.
    """

    server_name: str
    client_port: int
    federation_port: int
    registration_secret: str
    #: the server's signing key file (Synapse's format, ours too)
    signing_key_path: str

    def __init__(self, workdir: str) -> None:
        self.workdir = os.path.abspath(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.process: Optional[subprocess.Popen[bytes]] = None
        self.output_path = os.path.join(self.workdir, "process.out")
        self._started = False

    @property
    def signing_key(self) -> SigningKey:
        """The key the server signs with (the first of its key file)."""
        with open(self.signing_key_path) as f:
            key: SigningKey = read_signing_keys(f)[0]
        return key

    # -- process ---------------------------------------------------------

    def command(self) -> tuple[Sequence[str], Mapping[str, str]]:
        """The argv and environment that start the server."""
        raise NotImplementedError

    @property
    def pid(self) -> Optional[int]:
        return None if self.process is None else self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def choose_ports(self) -> None:
        """Take new free ports (and with them a new server name) and rewrite
        the configuration: called when a port was taken between choosing it
        and the first start."""
        raise NotImplementedError

    def start(self, timeout: float = 60) -> None:
        """Start the process and wait (at most ``timeout`` seconds) until both
        listeners answer.

        A port is only free when chosen: if another process took one before
        the first start, the server exits at once, and it is started again
        with new ports (:meth:`choose_ports`; so read :attr:`server_name`
        and the ports after the first ``start``).  Later starts (restarts)
        keep their ports.
        """
        if self.running():
            raise HarnessError(f"{self.server_name} is already running")
        attempts = 1 if self._started else PORT_ATTEMPTS
        for attempt in range(1, attempts + 1):
            try:
                self._start_once(timeout)
            except _PortTaken as e:
                if attempt == attempts:
                    raise HarnessError(f"{self.server_name}: a port is taken:\n{e}") from None
                self.choose_ports()
                continue
            self._started = True
            return

    def _start_once(self, timeout: float) -> None:
        argv, env = self.command()
        with open(self.output_path, "ab") as out:
            self.process = subprocess.Popen(
                list(argv), env=dict(env), cwd=self.workdir,
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while True:
            if not self.running():
                output = self.output_tail()
                self.stop()
                if "Address already in use" in output:
                    raise _PortTaken(output)
                raise HarnessError(f"{self.server_name} exited:\n{output}")
            try:
                client, _ = http_json("GET", self.client_url("/_matrix/client/versions"), timeout=5)
                key, _ = http_json("GET", self.federation_url("/_matrix/key/v2/server"), timeout=5)
                if client == 200 and key == 200:
                    return
            except OSError:
                pass  # not listening yet
            if time.monotonic() >= deadline:
                self.stop()
                raise HarnessError(
                    f"{self.server_name} did not start in {timeout:g}s:\n{self.output_tail()}")
            time.sleep(0.25)

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; exact pid only."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(timeout=timeout)

    def output_tail(self, chars: int = 6000) -> str:
        """The end of the process's stdout/stderr (and log, if separate)."""
        return read_tail(self.output_path, chars)

    # -- HTTP ------------------------------------------------------------

    def client_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.client_port}{path}"

    def federation_url(self, path: str) -> str:
        return f"https://127.0.0.1:{self.federation_port}{path}"

    def client(
        self, method: str, path: str, token: Optional[str] = None, body: Any = None
    ) -> tuple[int, Any]:
        """A client-server request on the plain-HTTP listener; ``path`` is
        absolute (``/_matrix/client/v3/...``)."""
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        return http_json(method, self.client_url(path), body, headers)

    def client_ok(
        self, method: str, path: str, token: Optional[str] = None, body: Any = None
    ) -> Any:
        """:meth:`client`, raising :class:`HarnessError` unless the answer is 200."""
        status, answer = self.client(method, path, token, body)
        if status != 200:
            raise HarnessError(f"{self.server_name}: {method} {path} -> {status} {answer}")
        return answer

    # -- accounts ------------------------------------------------------------

    def user_id(self, localpart: str) -> str:
        return f"@{localpart}:{self.server_name}"

    def register(self, localpart: str, password: str, admin: bool = False) -> tuple[str, str]:
        """Shared-secret registration: ``(user_id, access_token)``."""
        nonce = self.client_ok("GET", REGISTER_PATH)["nonce"]
        answer = self.client_ok("POST", REGISTER_PATH, body={
            "nonce": nonce, "username": localpart, "password": password, "admin": admin,
            "mac": registration_mac(self.registration_secret, nonce, localpart, password, admin),
        })
        return answer["user_id"], answer["access_token"]

    def login(
        self, user_id: str, password: str, device_id: Optional[str] = None
    ) -> tuple[str, str]:
        """Password login (a new device unless ``device_id`` exists):
        ``(access_token, device_id)``."""
        body: dict[str, Any] = {
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": user_id},
            "password": password,
        }
        if device_id is not None:
            body["device_id"] = device_id
        answer = self.client_ok("POST", f"{V3}/login", body=body)
        return answer["access_token"], answer["device_id"]

    def logout(self, token: str) -> None:
        self.client_ok("POST", f"{V3}/logout", token, {})

    def rename_device(self, token: str, device_id: str, display_name: str) -> None:
        self.client_ok("PUT", f"{V3}/devices/{quote(device_id, safe='')}", token,
                       {"display_name": display_name})

    def delete_device(self, token: str, user_id: str, password: str, device_id: str) -> None:
        """``DELETE /devices/{id}`` with the password step of user-interactive auth."""
        path = f"{V3}/devices/{quote(device_id, safe='')}"
        status, answer = self.client("DELETE", path, token, {})
        if status == 200:
            return
        if status != 401 or not isinstance(answer, dict) or "session" not in answer:
            raise HarnessError(f"{self.server_name}: DELETE {path} -> {status} {answer}")
        self.client_ok("DELETE", path, token, {"auth": {
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": user_id},
            "password": password,
            "session": answer["session"],
        }})

    def query_keys(self, token: str, user_ids: Sequence[str], timeout_ms: int = 10000) -> Any:
        """``POST /keys/query`` for every device of ``user_ids``."""
        return self.client_ok("POST", f"{V3}/keys/query", token, {
            "device_keys": {u: [] for u in user_ids}, "timeout": timeout_ms,
        })
