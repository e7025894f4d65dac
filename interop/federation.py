"""Blocking, X-Matrix-signed federation requests, for the harness to act as a
server (joining rooms, asking Synapse or us directly).

The ``Authorization`` header is built by the plugin's own
:func:`~devicelist_plugin.federation.xmatrix.build_authorization_header`;
TLS is not verified (the harness's servers use self-signed certificates).
"""

from __future__ import annotations

import http.client
import json
from typing import Any, Optional
from urllib.parse import urlsplit

from signedjson.types import SigningKey

from devicelist_plugin.federation.xmatrix import build_authorization_header
from interop.common import insecure_tls_context

__all__ = ["signed_request", "split_target"]


def split_target(url_or_host_port: str) -> tuple[str, int]:
    """``https://host:port[/...]`` or ``host:port`` -> ``(connect host, port)``;
    ``localhost`` is connected to as ``127.0.0.1`` (the servers bind IPv4
    loopback only)."""
    target = url_or_host_port if "://" in url_or_host_port else "https://" + url_or_host_port
    parts = urlsplit(target)
    host = parts.hostname or "127.0.0.1"
    if host == "localhost":
        host = "127.0.0.1"
    return host, parts.port or 8448


def signed_request(
    method: str,
    url_or_host_port: str,
    path: str,
    origin: str,
    destination: str,
    signing_key: SigningKey,
    body: Any = None,
    timeout: float = 30,
) -> tuple[int, Any]:
    """Send one federation request signed as ``origin`` for ``destination``.

    :param path: the path and query exactly as sent (and signed), e.g.
        ``/_matrix/federation/v1/user/devices/%40a%3Ahs``.
    :return: the status and the decoded JSON answer (``None`` if not JSON).
    """
    host, port = split_target(url_or_host_port)
    data: Optional[bytes] = None if body is None else json.dumps(body).encode("utf-8")
    headers = {
        "Authorization": build_authorization_header(
            signing_key, origin, destination, method, path, body
        ).decode("utf-8"),
        "Host": destination,
    }
    if data is not None:
        headers["Content-Type"] = "application/json"
    connection = http.client.HTTPSConnection(
        host, port, timeout=timeout, context=insecure_tls_context()
    )
    try:
        connection.request(method, path, body=data, headers=headers)
        response = connection.getresponse()
        status, raw = response.status, response.read()
    finally:
        connection.close()
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, None
