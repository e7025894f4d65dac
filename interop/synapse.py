"""A real Synapse as a test peer: its own cached virtualenv, a loopback
configuration, and the process started and stopped by pid.

The virtualenv lives outside the repository, in
``$DEVICELIST_SYNAPSE_VENV`` or else
``${XDG_CACHE_HOME:-~/.cache}/devicelist-plugin/synapse-<version>``, and is
reused once complete (a marker file is written last; installs are serialised
with a lock file, so concurrent test runs share one install).

:class:`SynapseServer` writes everything into its work directory: a
configuration with a plain-HTTP client listener and a TLS federation
listener on 127.0.0.1 (server name ``localhost:<federation port>``, a
self-signed certificate), SQLite, a signing key, a log file at INFO, loopback
federation allowed, certificates not verified, device names shown over
federation, rate limits raised and retry intervals short.
"""

from __future__ import annotations

import fcntl
import os
import re
import secrets
import subprocess
import sys
from typing import Any, Mapping, Optional, Sequence
from urllib.parse import urlsplit

import yaml
from signedjson.key import generate_signing_key, write_signing_keys

from devicelist_plugin.standalone.generate import self_signed_certificate
from interop.common import (
    HarnessError,
    MatrixServerProcess,
    deep_merge,
    free_port,
    read_tail,
)

__all__ = ["SYNAPSE_REQUIREMENT", "SynapseServer", "synapse_python", "synapse_venv_dir"]

#: what the cached virtualenv installs (override with $DEVICELIST_SYNAPSE_REQUIREMENT)
SYNAPSE_REQUIREMENT = "matrix-synapse==1.163.*"
VENV_ENV = "DEVICELIST_SYNAPSE_VENV"
REQUIREMENT_ENV = "DEVICELIST_SYNAPSE_REQUIREMENT"
COMPLETE_MARKER = ".devicelist-complete"
INSTALL_TIMEOUT_S = 900

#: a high limit for every rate limiter a test could hit
_UNLIMITED = {"per_second": 10000, "burst_count": 100000}


def _requirement() -> str:
    return os.environ.get(REQUIREMENT_ENV, SYNAPSE_REQUIREMENT)


def synapse_venv_dir() -> str:
    """Where the cached Synapse virtualenv is (or will be)."""
    explicit = os.environ.get(VENV_ENV)
    if explicit:
        return os.path.abspath(explicit)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    tag = re.sub(r"[^A-Za-z0-9.]+", "-", _requirement()).strip("-.")
    return os.path.join(cache, "devicelist-plugin", tag)


def _venv_python(venv: str) -> str:
    return os.path.join(venv, "bin", "python")


def synapse_python() -> str:
    """The Python of a virtualenv with Synapse installed, installing it (from
    PyPI, about a minute) unless a complete one is already cached."""
    venv = synapse_venv_dir()
    marker = os.path.join(venv, COMPLETE_MARKER)
    requirement = _requirement()
    if _complete(marker, requirement):
        return _venv_python(venv)
    os.makedirs(os.path.dirname(venv), exist_ok=True)
    with open(venv + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _complete(marker, requirement):
            _install(venv, requirement)
            with open(marker, "w") as f:
                f.write(requirement + "\n")
    return _venv_python(venv)


def _complete(marker: str, requirement: str) -> bool:
    try:
        with open(marker) as f:
            return f.read().strip() == requirement
    except OSError:
        return False


def _install(venv: str, requirement: str) -> None:
    base = getattr(sys, "_base_executable", None) or sys.executable
    steps: list[Sequence[str]] = [
        [base, "-m", "venv", "--clear", venv],
        [_venv_python(venv), "-m", "pip", "install", "--quiet", "--upgrade", "pip"],
        [_venv_python(venv), "-m", "pip", "install", "--quiet", requirement],
    ]
    for argv in steps:
        done = subprocess.run(
            list(argv), capture_output=True, timeout=INSTALL_TIMEOUT_S, stdin=subprocess.DEVNULL
        )
        if done.returncode != 0:
            output = (done.stdout + done.stderr).decode("utf-8", "replace")[-4000:]
            raise HarnessError(f"installing Synapse failed: {' '.join(argv)}\n{output}")


def _request_path(uri: str) -> str:
    """``matrix-federation://host:port/path?q`` (as Synapse logs it) -> ``/path?q``."""
    if "://" not in uri:
        return uri
    parts = urlsplit(uri)
    return parts.path + ("?" + parts.query if parts.query else "")


def _log_config(log_path: str) -> dict[str, Any]:
    return {
        "version": 1,
        "formatters": {"precise": {
            "format": "%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - "
                      "%(request)s - %(message)s",
        }},
        "handlers": {"file": {
            "class": "logging.FileHandler", "formatter": "precise",
            "filename": log_path, "encoding": "utf8",
        }},
        "loggers": {"synapse.storage.SQL": {"level": "WARNING"}},
        "root": {"level": "INFO", "handlers": ["file"]},
        "disable_existing_loggers": False,
    }


class SynapseServer(MatrixServerProcess):
    """One Synapse on loopback (see the module docstring).

    :param workdir: holds the configuration, database, keys and logs
        (created if missing; the caller removes it).
    :param extra_config: merged into the generated ``homeserver.yaml``
        (mappings key by key).
    """

    def __init__(self, workdir: str, *, extra_config: Optional[Mapping[str, Any]] = None) -> None:
        super().__init__(workdir)
        self.registration_secret = secrets.token_urlsafe(24)
        self.config_path = os.path.join(self.workdir, "homeserver.yaml")
        self.log_path = os.path.join(self.workdir, "homeserver.log")
        self.signing_key_path = os.path.join(self.workdir, "signing.key")
        self._extra = dict(extra_config or {})
        self._write_files()
        self.choose_ports()

    def choose_ports(self) -> None:
        self.federation_port = free_port()
        self.client_port = free_port()
        self.server_name = f"localhost:{self.federation_port}"
        # a database made under another server name is not reused
        database = os.path.join(self.workdir, "homeserver.db")
        if os.path.exists(database):
            os.remove(database)
        self._write_config()

    def _write_files(self) -> None:
        """The signing key, TLS certificate and logging configuration."""
        with open(self.signing_key_path, "w") as f:
            write_signing_keys(f, [generate_signing_key("a_" + secrets.token_hex(2))])
        certificate, key = self_signed_certificate("localhost")
        with open(os.path.join(self.workdir, "tls.crt"), "wb") as f:
            f.write(certificate)
        with open(os.path.join(self.workdir, "tls.key"), "wb") as f:
            f.write(key)
        with open(os.path.join(self.workdir, "log.config"), "w") as f:
            yaml.safe_dump(_log_config(self.log_path), f)

    def _write_config(self) -> None:
        d = self.workdir
        cert_path, key_path = os.path.join(d, "tls.crt"), os.path.join(d, "tls.key")
        log_config_path = os.path.join(d, "log.config")
        config: dict[str, Any] = {
            "server_name": self.server_name,
            "pid_file": os.path.join(d, "homeserver.pid"),
            "report_stats": False,
            "listeners": [
                {"port": self.federation_port, "bind_addresses": ["127.0.0.1"], "type": "http",
                 "tls": True, "x_forwarded": False,
                 "resources": [{"names": ["federation", "keys"], "compress": False}]},
                {"port": self.client_port, "bind_addresses": ["127.0.0.1"], "type": "http",
                 "tls": False, "x_forwarded": False,
                 "resources": [{"names": ["client"], "compress": False}]},
            ],
            "database": {"name": "sqlite3", "args": {"database": os.path.join(d, "homeserver.db")}},
            "log_config": log_config_path,
            "media_store_path": os.path.join(d, "media_store"),
            "signing_key_path": self.signing_key_path,
            "trusted_key_servers": [],
            "suppress_key_server_warning": True,
            "tls_certificate_path": cert_path,
            "tls_private_key_path": key_path,
            "federation_verify_certificates": False,
            # Synapse 1.163 reads only these spellings
            "ip_range_blacklist": [],
            "ip_range_whitelist": ["127.0.0.0/8", "::1/128"],
            "federation_ip_range_blacklist": [],
            "registration_shared_secret": self.registration_secret,
            "enable_registration": False,
            "enable_registration_without_verification": True,
            "macaroon_secret_key": secrets.token_urlsafe(24),
            "form_secret": secrets.token_urlsafe(24),
            "allow_device_name_lookup_over_federation": True,
            "default_room_version": "10",
            "presence": {"enabled": False},
            "enable_metrics": False,
            "url_preview_enabled": False,
            "bcrypt_rounds": 4,
            "federation": {
                "destination_min_retry_interval": "1s",
                "destination_retry_multiplier": 2,
                "destination_max_retry_interval": "10s",
            },
            "rc_message": _UNLIMITED,
            "rc_registration": _UNLIMITED,
            "rc_login": {"address": _UNLIMITED, "account": _UNLIMITED,
                         "failed_attempts": _UNLIMITED},
            "rc_joins": {"local": _UNLIMITED, "remote": _UNLIMITED},
            "rc_joins_per_room": _UNLIMITED,
            "rc_invites": {"per_room": _UNLIMITED, "per_user": _UNLIMITED,
                           "per_issuer": _UNLIMITED},
            "rc_key_requests": _UNLIMITED,
            "rc_admin_redaction": _UNLIMITED,
            "rc_3pid_validation": _UNLIMITED,
            "rc_federation": {"window_size": 1000, "sleep_limit": 10000, "sleep_delay": 0,
                              "reject_limit": 10000, "concurrent": 100},
        }
        with open(self.config_path, "w") as f:
            yaml.safe_dump(deep_merge(config, self._extra), f)

    def command(self) -> tuple[Sequence[str], Mapping[str, str]]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        return [synapse_python(), "-m", "synapse.app.homeserver", "-c", self.config_path], env

    def output_tail(self, chars: int = 6000) -> str:
        return super().output_tail(chars // 2) + "\n--- homeserver.log ---\n" + self.log_tail(chars)

    def log_tail(self, chars: int = 6000) -> str:
        return read_tail(self.log_path, chars)

    def outbound_requests(self, method: str, path_prefix: str) -> list[str]:
        """Synapse's completed outbound federation requests (its INFO log
        line ``Completed request: <code> ... - <METHOD> <uri>``) whose URI
        path starts with ``path_prefix``: one line each."""
        pattern = re.compile(
            r"Completed request: \d+ .* - " + re.escape(method) + r" (\S+)$"
        )
        return self._log_lines(pattern, path_prefix)

    def _log_lines(self, pattern: re.Pattern[str], path_prefix: str) -> list[str]:
        """Log lines matching ``pattern`` whose first group, a request URI,
        has a path starting with ``path_prefix``."""
        found = []
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    m = pattern.search(line.rstrip("\n"))
                    if m and _request_path(m.group(1)).startswith(path_prefix):
                        found.append(line.rstrip("\n"))
        except OSError:
            pass
        return found

    def inbound_requests(self, method: str, path_prefix: str) -> list[str]:
        """Requests Synapse answered (its access log: ``Processed request:
        ... "<METHOD> <path> HTTP/1.1"``) whose path starts with
        ``path_prefix``: one line each."""
        pattern = re.compile(r'Processed request: .* "' + re.escape(method) + r' (\S+) HTTP/[\d.]+"')
        return self._log_lines(pattern, path_prefix)

    def outbound_failures(self, destination: str) -> list[str]:
        """Synapse's failed attempts to send a transaction to ``destination``
        (its ``[dest] Request failed: PUT .../send/`` lines, one per attempt;
        it retries a transaction several times before giving it up)."""
        markers = (f"[{destination}] Request failed: PUT matrix-federation://{destination}"
                   "/_matrix/federation/v1/send/",)
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return [line.rstrip("\n") for line in f if any(m in line for m in markers)]
        except OSError:
            return []

    def create_room(self, token: str, **options: Any) -> str:
        """A public room of version 10 (``options`` added to ``createRoom``)."""
        body: dict[str, Any] = {"preset": "public_chat", "room_version": "10"}
        body.update(options)
        answer = self.client_ok("POST", "/_matrix/client/v3/createRoom", token, body)
        room_id: str = answer["room_id"]
        return room_id
