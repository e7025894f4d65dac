"""Our standalone server as a process of the interop harness.

:class:`DevicelistServer` writes its data directory with ``python -m
devicelist_plugin generate-config --test-network`` (TLS with a self-signed
certificate on the federation port, plain HTTP client/admin/metrics on
another, loopback federation allowed), shortens retries, and runs ``twistd
-n --pidfile= devicelist --config ...`` with the current interpreter, the
repository first on ``PYTHONPATH``.  Admin-API helpers use an admin account
registered on first use.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.request
from typing import Any, Mapping, Optional, Sequence
from urllib.parse import quote

import yaml

from interop.common import HarnessError, MatrixServerProcess, deep_merge, free_port

__all__ = ["ADMIN", "DevicelistServer", "REPOSITORY"]

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ADMIN = "/_devicelist/admin/v1"
_ADMIN_LOCALPART = "interop-admin"
_ADMIN_PASSWORD = "interop-admin-password"
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


class DevicelistServer(MatrixServerProcess):
    """Our standalone server on loopback.

    :param workdir: the data directory (configuration, SQLite database, keys,
        output); created if missing, removed by the caller.
    :param extra_config: merged into the generated ``devicelist.yaml``.
    """

    def __init__(self, workdir: str, *, extra_config: Optional[Mapping[str, Any]] = None) -> None:
        super().__init__(workdir)
        self.config_path = os.path.join(self.workdir, "devicelist.yaml")
        self._admin_token: Optional[str] = None
        self._extra = dict(extra_config or {})
        self.choose_ports()

    def choose_ports(self) -> None:
        # everything generate-config wrote (and a database made under the old
        # name) goes: it is all named after the server
        for name in os.listdir(self.workdir):
            if name != os.path.basename(self.output_path):
                os.remove(os.path.join(self.workdir, name))
        self.federation_port = free_port()
        self.client_port = free_port()
        self.server_name = f"localhost:{self.federation_port}"
        self.signing_key_path = os.path.join(self.workdir, f"{self.server_name}.signing.key")
        self._generate(self._extra)

    def _env(self) -> dict[str, str]:
        path = os.environ.get("PYTHONPATH")
        return dict(os.environ, PYTHONPATH=REPOSITORY + (os.pathsep + path if path else ""))

    def _generate(self, extra: Mapping[str, Any]) -> None:
        done = subprocess.run(
            [
                sys.executable, "-m", "devicelist_plugin", "generate-config",
                "--server-name", self.server_name, "--data-dir", self.workdir,
                "--port", str(self.federation_port), "--client-port", str(self.client_port),
                "--test-network",
            ],
            env=self._env(), cwd=REPOSITORY, capture_output=True, timeout=60,
            stdin=subprocess.DEVNULL,
        )
        if done.returncode != 0:
            raise HarnessError(
                "generate-config failed:\n" + (done.stdout + done.stderr).decode("utf-8", "replace")
            )
        with open(self.config_path) as f:
            config: dict[str, Any] = yaml.safe_load(f)
        config.update({
            "bcrypt_rounds": 4,
            "allow_device_name_lookup_over_federation": True,
            "federation": {
                "destination_min_retry_interval": "1s",
                "destination_retry_multiplier": 2,
                "destination_max_retry_interval": "10s",
            },
        })
        self.registration_secret = config["registration_shared_secret"]
        with open(self.config_path, "w") as f:
            yaml.safe_dump(deep_merge(config, extra), f)

    def command(self) -> tuple[Sequence[str], Mapping[str, str]]:
        argv = [
            sys.executable, "-c",
            "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
            "-n", "--pidfile=", "devicelist", "--config", self.config_path,
        ]
        return argv, self._env()

    # -- admin API -------------------------------------------------------

    @property
    def admin_token(self) -> str:
        """An admin user's access token (the account is made on first use)."""
        if self._admin_token is None:
            user_id, token = self.register(_ADMIN_LOCALPART, _ADMIN_PASSWORD, admin=True)
            self._admin_token = token
        return self._admin_token

    def admin(self, method: str, path: str, body: Any = None) -> Any:
        """An admin-API call (``path`` below ``/_devicelist/admin/v1``); 200 or
        :class:`HarnessError`."""
        return self.client_ok(method, ADMIN + path, self.admin_token, body)

    def add_member(self, room_id: str, user_id: str, membership: str = "join") -> None:
        """Record a (local or remote) user's membership of a room."""
        self.admin("PUT", f"/rooms/{quote(room_id, safe='')}/members/{quote(user_id, safe='')}",
                   {"membership": membership})

    def members(self, room_id: str) -> list[str]:
        members: list[str] = self.admin("GET", f"/rooms/{quote(room_id, safe='')}/members")[
            "members"]
        return members

    def cached_devices(self, user_id: str) -> Any:
        """``GET users/{userId}/devices``: a remote user's cache (or a local
        user's devices)."""
        return self.admin("GET", f"/users/{quote(user_id, safe='')}/devices")

    def resync(self, user_id: str) -> Any:
        return self.admin("POST", f"/users/{quote(user_id, safe='')}/resync", {})

    def destination(self, server_name: str) -> Any:
        return self.admin("GET", f"/destinations/{quote(server_name, safe='')}")

    # -- metrics ---------------------------------------------------------

    def metrics_text(self) -> str:
        """The Prometheus exposition of ``/_devicelist/metrics``."""
        with urllib.request.urlopen(self.client_url("/_devicelist/metrics"), timeout=30) as r:
            text: str = r.read().decode("utf-8")
            return text

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples named ``name`` whose labels include
        ``labels`` (0 when there is none)."""
        total = 0.0
        for line in self.metrics_text().splitlines():
            m = _SAMPLE.match(line)
            if not m or m.group(1) != name:
                continue
            found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
            if all(found.get(k) == v for k, v in labels.items()):
                total += float(m.group(3))
        return total

    def user_devices_fetches(self) -> int:
        """Our outbound ``GET /user/devices`` resyncs so far (each attempt)."""
        return int(self.metric("devicelist_resync_results_total", result="attempt"))

