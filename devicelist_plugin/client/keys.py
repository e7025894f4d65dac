"""The client-server ``/keys/*`` endpoints.

Local users are served by the
:class:`~devicelist_plugin.local.handler.LocalDeviceHandler`.  Remote users
go through two injection points, set by whoever assembles the server (the
standalone service tree, or a host):

- :class:`RemoteKeysQuery` answers ``/keys/query`` for remote users (the
  inbound replication's query API: cached device lists, fetched when
  needed);
- :class:`RemoteKeysClient` claims one-time keys of remote users
  (``/user/keys/claim`` over federation).

Without them, remote users are reported in ``failures`` under their server
name with ``{"status": 503, "message": ...}``: the request still succeeds for
the local users.  Remote calls get the request's ``timeout`` (milliseconds,
default 10 s, at most 60 s); an implementation should answer with what it has
by then.  As a backstop the call is cancelled :data:`REMOTE_GRACE_S` after
the timeout, and every server of the call is then reported as failed.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Protocol, Sequence

from twisted.internet.defer import Deferred, TimeoutError, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from devicelist_plugin.client.auth import AccessTokenAuth, Requester
from devicelist_plugin.client.uia import UserInteractiveAuth
from devicelist_plugin.core.models import JsonDict
from devicelist_plugin.core.parse import ParseError, server_name_of
from devicelist_plugin.federation.errors import M_BAD_JSON, MatrixError
from devicelist_plugin.federation.resource import JsonRequest, JsonResource
from devicelist_plugin.local.handler import LocalDeviceHandler
from devicelist_plugin.local.requests import (
    parse_device_keys_request,
    parse_one_time_keys_request,
)

__all__ = [
    "DEFAULT_TIMEOUT_MS",
    "KeysEndpoints",
    "MAX_TIMEOUT_MS",
    "REMOTE_GRACE_S",
    "RemoteKeysClient",
    "RemoteKeysQuery",
]

DEFAULT_TIMEOUT_MS = 10_000
MAX_TIMEOUT_MS = 60_000
REMOTE_GRACE_S = 1.0

CROSS_SIGNING_FIELDS = ("master_key", "self_signing_key", "user_signing_key")


class RemoteKeysQuery(Protocol):
    """Answers ``/keys/query`` for remote users."""

    def query(
        self, device_keys: Mapping[str, Sequence[str]], timeout_ms: int
    ) -> "Deferred[JsonDict]":
        """``device_keys``: ``{user_id: [device_id, ...]}`` (empty: every
        device), remote users only.  Fires with ``{"device_keys",
        "master_keys", "self_signing_keys", "failures"}`` as the client API
        answers them (``failures``: ``{server_name: {"status", "message"}}``),
        within ``timeout_ms``."""
        ...


class RemoteKeysClient(Protocol):
    """Claims one-time keys of remote users."""

    def claim(
        self, one_time_keys: Mapping[str, Mapping[str, str]], timeout_ms: int
    ) -> "Deferred[JsonDict]":
        """``one_time_keys``: ``{user_id: {device_id: algorithm}}``, remote
        users only.  Fires with ``{"one_time_keys": {user_id: {device_id:
        {key_id: key}}}, "failures": {server_name: {"status", "message"}}}``
        within ``timeout_ms``."""
        ...


def _timeout_ms(body: JsonDict) -> int:
    value = body.get("timeout", DEFAULT_TIMEOUT_MS)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise MatrixError(400, M_BAD_JSON, "timeout: expected a number of milliseconds")
    return min(value, MAX_TIMEOUT_MS)


def _server_of(user_id: str) -> str:
    try:
        return server_name_of(user_id)
    except ParseError:
        return ""


def _failures(servers: Sequence[str], message: str) -> dict[str, JsonDict]:
    return {server: {"status": 503, "message": message} for server in servers}


class KeysEndpoints:
    """``/keys/upload``, ``/keys/query``, ``/keys/claim``,
    ``/keys/device_signing/upload`` and ``/keys/signatures/upload``."""

    log = Logger()

    def __init__(
        self,
        handler: LocalDeviceHandler,
        auth: AccessTokenAuth,
        uia: UserInteractiveAuth,
        clock: IReactorTime,
        *,
        remote_query: Optional[RemoteKeysQuery] = None,
        remote_client: Optional[RemoteKeysClient] = None,
    ) -> None:
        self._handler = handler
        self._auth = auth
        self._uia = uia
        self._clock = clock
        self.remote_query = remote_query
        self.remote_client = remote_client

    def register(self, resource: JsonResource, prefix: str) -> None:
        """Mount the endpoints under ``prefix`` (``/_matrix/client/v3``)."""
        wrap = self._auth.wrap
        resource.register("POST", f"{prefix}/keys/upload", wrap(self.on_upload), json_body=True)
        resource.register("POST", f"{prefix}/keys/query", wrap(self.on_query), json_body=True)
        resource.register("POST", f"{prefix}/keys/claim", wrap(self.on_claim), json_body=True)
        resource.register(
            "POST",
            f"{prefix}/keys/device_signing/upload",
            wrap(self.on_device_signing_upload),
            json_body=True,
        )
        resource.register(
            "POST",
            f"{prefix}/keys/signatures/upload",
            wrap(self.on_signatures_upload),
            json_body=True,
        )

    async def on_upload(self, request: JsonRequest, requester: Requester) -> tuple[int, JsonDict]:
        result = await self._handler.upload_keys(
            requester.user_id, requester.device_id, request.require_content()
        )
        counts = dict(result.get("one_time_key_counts", {}))
        # clients expect the count of signed_curve25519 keys even when 0
        counts.setdefault("signed_curve25519", 0)
        return 200, {"one_time_key_counts": counts}

    async def on_query(self, request: JsonRequest, requester: Requester) -> tuple[int, JsonDict]:
        body = request.require_content()
        device_keys = parse_device_keys_request(body)
        timeout_ms = _timeout_ms(body)
        local = {u: d for u, d in device_keys.items() if self._handler.is_local_user(u)}
        remote = {u: d for u, d in device_keys.items() if u not in local}
        result: JsonDict = {
            "device_keys": {},
            "master_keys": {},
            "self_signing_keys": {},
            "user_signing_keys": {},
            "failures": {},
        }
        # the remote query runs while the local one reads the database
        remote_answer = self._remote_query(remote, timeout_ms) if remote else None
        if local:
            answer = await self._handler.query_keys(local, requesting_user_id=requester.user_id)
            for field, values in answer.items():
                result.setdefault(field, {}).update(values)
        if remote_answer is not None:
            answer = await remote_answer
            for field in ("device_keys", "master_keys", "self_signing_keys", "failures"):
                values = answer.get(field)
                if isinstance(values, dict):
                    result[field].update(values)
        return 200, result

    async def on_claim(self, request: JsonRequest, requester: Requester) -> tuple[int, JsonDict]:
        body = request.require_content()
        one_time_keys = parse_one_time_keys_request(body)
        timeout_ms = _timeout_ms(body)
        local = {u: d for u, d in one_time_keys.items() if self._handler.is_local_user(u)}
        remote = {u: d for u, d in one_time_keys.items() if u not in local}
        result: JsonDict = {"one_time_keys": {}, "failures": {}}
        remote_answer = self._remote_claim(remote, timeout_ms) if remote else None
        if local:
            answer = await self._handler.claim_keys(local)
            result["one_time_keys"].update(answer["one_time_keys"])
        if remote_answer is not None:
            answer = await remote_answer
            for field in ("one_time_keys", "failures"):
                values = answer.get(field)
                if isinstance(values, dict):
                    result[field].update(values)
        return 200, result

    def _remote_query(self, remote: dict[str, list[str]], timeout_ms: int) -> "Deferred[JsonDict]":
        servers = sorted({_server_of(u) for u in remote})
        if self.remote_query is None:
            return succeed(
                {"failures": _failures(servers, "Remote key queries are not available on this server")}
            )
        return self._bounded(
            maybeDeferred(self.remote_query.query, remote, timeout_ms), servers, timeout_ms
        )

    def _remote_claim(
        self, remote: dict[str, dict[str, str]], timeout_ms: int
    ) -> "Deferred[JsonDict]":
        servers = sorted({_server_of(u) for u in remote})
        if self.remote_client is None:
            return succeed(
                {"failures": _failures(servers, "Claiming remote keys is not available on this server")}
            )
        return self._bounded(
            maybeDeferred(self.remote_client.claim, remote, timeout_ms), servers, timeout_ms
        )

    def _bounded(
        self, d: "Deferred[JsonDict]", servers: Sequence[str], timeout_ms: int
    ) -> "Deferred[JsonDict]":
        d.addTimeout(timeout_ms / 1000 + REMOTE_GRACE_S, self._clock)

        def failed(failure: Any) -> JsonDict:
            if failure.check(TimeoutError):
                message = "Timed out waiting for the remote server"
            else:
                self.log.failure("Remote key request to {servers} failed", failure, servers=servers)
                message = "Remote key request failed"
            return {"failures": _failures(servers, message)}

        def answered(answer: object) -> JsonDict:
            if not isinstance(answer, dict):
                self.log.error("Remote key request answered {answer!r}", answer=answer)
                return {"failures": _failures(servers, "Remote key request failed")}
            return answer

        return d.addCallbacks(answered, failed)

    async def on_device_signing_upload(
        self, request: JsonRequest, requester: Requester
    ) -> tuple[int, JsonDict]:
        body = request.require_content()
        upload = {k: v for k, v in body.items() if k != "auth"}
        if await self._replaces_cross_signing_keys(requester.user_id, upload):
            await self._uia.validate(requester, body, f"POST {request.raw.path.decode('latin-1')}")
        await self._handler.upload_cross_signing_keys(requester.user_id, upload)
        return 200, {}

    async def _replaces_cross_signing_keys(self, user_id: str, upload: JsonDict) -> bool:
        """Whether the upload needs the password: not for the first master
        key, nor when it repeats the public keys already stored (the spec's
        and Synapse's rule)."""
        stored = await self._handler.query_keys({user_id: []}, requesting_user_id=user_id)
        existing = {
            "master_key": stored["master_keys"].get(user_id),
            "self_signing_key": stored["self_signing_keys"].get(user_id),
            "user_signing_key": stored.get("user_signing_keys", {}).get(user_id),
        }
        if existing["master_key"] is None:
            return False
        for field in CROSS_SIGNING_FIELDS:
            uploaded = upload.get(field)
            if uploaded is None:
                continue
            current = existing[field]
            if (
                current is None
                or not isinstance(uploaded, dict)
                or uploaded.get("keys") != current.get("keys")
            ):
                return True
        return False

    async def on_signatures_upload(
        self, request: JsonRequest, requester: Requester
    ) -> tuple[int, JsonDict]:
        result = await self._handler.upload_signatures(requester.user_id, request.require_content())
        return 200, result

