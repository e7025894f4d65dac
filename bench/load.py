"""Signed federation load for the side-by-side benchmarks.

:class:`SignedSender` sends signed requests one after the other over one
persistent TLS connection (``http.client``), so that the sender costs
little next to the server it measures.  :func:`run_wrk` drives ``wrk`` (a C
load generator) with one precomputed X-Matrix header: X-Matrix has no nonce,
so one signature is valid for every repetition of the same request.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Any, Optional

from signedjson.types import SigningKey

from devicelist_plugin.federation.xmatrix import build_authorization_header
from interop.common import insecure_tls_context


def signed_headers(
    key: SigningKey, origin: str, destination: str, method: str, uri: str, content: Any
) -> dict[str, str]:
    header = build_authorization_header(key, origin, destination, method, uri, content)
    return {"Authorization": header.decode("ascii"), "Content-Type": "application/json"}


class SignedSender:
    """Signed requests from ``origin`` to the server at ``127.0.0.1:port``."""

    def __init__(self, key: SigningKey, origin: str, destination: str, port: int) -> None:
        self.key = key
        self.origin = origin
        self.destination = destination
        self.port = port
        self._conn: Optional[http.client.HTTPSConnection] = None

    def prepare(self, method: str, uri: str, content: Any) -> tuple[bytes, dict[str, str]]:
        """The body and headers of one request, to send later with :meth:`send`."""
        body = b"" if content is None else json.dumps(content).encode("utf-8")
        return body, signed_headers(self.key, self.origin, self.destination, method, uri, content)

    def send(
        self, method: str, uri: str, body: bytes, headers: dict[str, str], timeout: float = 120,
        decode: bool = True,
    ) -> tuple[int, Any]:
        """One request; the status and the decoded answer (its raw bytes
        unless ``decode``)."""
        for attempt in (0, 1):
            if self._conn is None:
                self._conn = http.client.HTTPSConnection(
                    "127.0.0.1", self.port, timeout=timeout, context=insecure_tls_context()
                )
            try:
                self._conn.request(method, uri, body=body or None, headers=headers)
                response = self._conn.getresponse()
                raw = response.read()
                if not decode:
                    return response.status, raw
                return response.status, json.loads(raw) if raw else None
            except (http.client.HTTPException, ConnectionError):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def request(self, method: str, uri: str, content: Any = None) -> tuple[int, Any]:
        body, headers = self.prepare(method, uri, content)
        return self.send(method, uri, body, headers)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: int

    def as_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


_LUA = """
wrk.method = [==[{method}]==]
wrk.body = [==[{body}]==]
wrk.headers["Authorization"] = [==[{auth}]==]
wrk.headers["Content-Type"] = "application/json"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRKRESULT %d %d %d %d %d %d\\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), e.status,
    e.connect + e.read + e.write + e.timeout))
end
"""


def run_wrk(
    url: str, method: str, body: bytes, headers: dict[str, str],
    connections: int, seconds: int, threads: int,
) -> WrkResult:
    """``wrk -c connections -d seconds`` of one signed request."""
    script = _LUA.format(method=method, body=body.decode("utf-8"), auth=headers["Authorization"])
    fd, path = tempfile.mkstemp(suffix=".lua")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(script)
        out = subprocess.run(
            ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s",
             "--timeout", "30s", "-s", path, url],
            capture_output=True, text=True, timeout=seconds + 60, check=True,
        ).stdout
    finally:
        os.unlink(path)
    match = re.search(r"WRKRESULT (\d+) (\d+) (\d+) (\d+) (\d+) (\d+)", out)
    if match is None:
        raise RuntimeError(f"wrk printed no result:\n{out}")
    requests, duration_us, p50, p99, non_2xx, errors = (int(g) for g in match.groups())
    secs = duration_us / 1e6
    return WrkResult(requests, secs, requests / secs, p50 / 1000, p99 / 1000, non_2xx, errors)
