"""The admin API, under ``/_devicelist/admin/v1/`` (listener resource ``admin``).

Every endpoint needs an admin user's access token (the client API's
:class:`~devicelist_plugin.client.auth.AccessTokenAuth`); anyone else gets
403 ``M_FORBIDDEN``.

=======================================  ==================================================
``PUT rooms/{roomId}/members/{userId}``  ``{"membership": "join"|"leave"}``: the standalone
                                         membership source (local and remote users)
``GET rooms/{roomId}/members``           ``{"members": [user_id, ...]}``
``GET users/{userId}/devices``           remote: cached devices, known stream ids, stale
                                         flag, last resync time and reason; local: devices
                                         and stream position
``POST users/{userId}/resync``           resync a remote user now
``GET destinations``                     every destination's status
``GET destinations/{serverName}``        one destination's status: pending count, oldest
                                         pending age, retry interval, next retry time,
                                         last success, last error
=======================================  ==================================================

Times are milliseconds since the epoch (``*_ts``) or milliseconds (``*_ms``).
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.defer import maybeDeferred

from devicelist_plugin.client.auth import AccessTokenAuth, Requester
from devicelist_plugin.core.models import JsonDict
from devicelist_plugin.core.parse import ParseError, split_user_id
from devicelist_plugin.federation.errors import (
    M_BAD_JSON,
    M_FORBIDDEN,
    M_INVALID_PARAM,
    M_NOT_FOUND,
    MatrixError,
)
from devicelist_plugin.federation.resource import JsonRequest, JsonResource
from devicelist_plugin.module import DeviceListModule
from devicelist_plugin.storage.types import DestinationStatus

__all__ = ["ADMIN_PREFIX", "AdminApi"]

ADMIN_PREFIX = "/_devicelist/admin/v1"


class AdminApi:
    """See the module docstring.

    :param module: the server's device-list module (store, handler,
        membership, updater, sender).
    :param auth: the client API's access-token authentication.
    """

    def __init__(self, module: DeviceListModule, auth: AccessTokenAuth) -> None:
        self._module = module
        self._auth = auth
        self.resource = JsonResource()
        self.register(self.resource)

    def register(self, resource: JsonResource) -> None:
        p = ADMIN_PREFIX
        resource.register(
            "PUT", f"{p}/rooms/{{roomId}}/members/{{userId}}", self._admin(self.on_put_member),
            json_body=True,
        )
        resource.register("GET", f"{p}/rooms/{{roomId}}/members", self._admin(self.on_get_members))
        resource.register(
            "GET", f"{p}/users/{{userId}}/devices", self._admin(self.on_get_user_devices)
        )
        resource.register("POST", f"{p}/users/{{userId}}/resync", self._admin(self.on_resync))
        resource.register("GET", f"{p}/destinations", self._admin(self.on_get_destinations))
        resource.register(
            "GET", f"{p}/destinations/{{serverName}}", self._admin(self.on_get_destination)
        )

    def _admin(self, handler: Any) -> Any:
        async def checked(request: JsonRequest, requester: Requester) -> tuple[int, JsonDict]:
            if not requester.admin:
                raise MatrixError(403, M_FORBIDDEN, "You are not a server admin")
            result: tuple[int, JsonDict] = await handler(request)
            return result

        return self._auth.wrap(checked)

    # -- rooms ------------------------------------------------------------------

    async def on_put_member(self, request: JsonRequest) -> tuple[int, JsonDict]:
        room_id = request.path_params["roomId"]
        user_id = _user_id(request.path_params["userId"])
        membership = request.require_content().get("membership")
        if membership not in ("join", "leave"):
            raise MatrixError(400, M_BAD_JSON, 'membership: expected "join" or "leave"')
        source: Any = self._module.membership
        method = getattr(source, membership, None)
        if method is None:
            raise MatrixError(400, M_INVALID_PARAM, "This server's memberships are the host's")
        try:
            await maybeDeferred(method, room_id, user_id)
        except ValueError as e:
            raise MatrixError(400, M_INVALID_PARAM, str(e)) from None
        return 200, {}

    async def on_get_members(self, request: JsonRequest) -> tuple[int, JsonDict]:
        source: Any = self._module.membership
        if not hasattr(source, "room_members"):
            raise MatrixError(400, M_INVALID_PARAM, "This server's memberships are the host's")
        members = await maybeDeferred(source.room_members, request.path_params["roomId"])
        return 200, {"members": sorted(members)}

    # -- users ------------------------------------------------------------------

    async def on_get_user_devices(self, request: JsonRequest) -> tuple[int, JsonDict]:
        user_id = _user_id(request.path_params["userId"])
        store = self._module.store
        if self._module.local.is_local_user(user_id):
            devices = await self._module.local.get_devices(user_id)
            stream_id = await store.get_max_stream_id(user_id)
            return 200, {
                "user_id": user_id,
                "local": True,
                "stream_id": stream_id,
                "devices": [
                    {
                        "device_id": d.device_id,
                        "display_name": d.display_name,
                        "keys": d.keys_json,
                        "created_ts": d.created_ts,
                        "last_seen_ts": d.last_seen_ts,
                    }
                    for d in devices
                ],
            }
        cache = await store.get_remote_cache(user_id)
        state = cache.state
        body: JsonDict = {
            "user_id": user_id,
            "local": False,
            "tracked": bool(await self._module.membership.is_tracked(user_id)),
            "cached": state is not None and state.cached,
            "stale": state is not None and state.stale,
            "stale_reason": None if state is None else state.stale_reason,
            "stale_since_ts": None if state is None else state.stale_since_ts,
            "last_resync_ts": None if state is None else state.last_resync_ts,
            "resync_attempts": 0 if state is None else state.resync_attempts,
            "resync_retry_ts": None if state is None else state.resync_retry_ts,
            "resync_pending": self._module.inbound.updater.is_resync_pending(user_id),
            "snapshot_stream_id": None if state is None else state.snapshot_stream_id,
            "known_stream_ids": [] if state is None else sorted(state.known_ids),
            "devices": [
                {
                    "device_id": d.device_id,
                    "display_name": d.display_name,
                    "keys": None if d.keys is None else d.keys.raw,
                }
                for d in cache.devices
            ],
            "cross_signing_keys": {
                usage: key.raw for usage, key in sorted(cache.cross_signing_keys.items())
            },
        }
        return 200, body

    async def on_resync(self, request: JsonRequest) -> tuple[int, JsonDict]:
        user_id = _user_id(request.path_params["userId"])
        if self._module.local.is_local_user(user_id):
            raise MatrixError(400, M_INVALID_PARAM, f"{user_id} is a local user")
        failure = await self._module.request_resync(user_id)
        if failure is None:
            return 200, {"resynced": True}
        return 200, {"resynced": False, "failure": failure.to_json()}

    # -- destinations -----------------------------------------------------------

    async def on_get_destinations(self, request: JsonRequest) -> tuple[int, JsonDict]:
        statuses = await self._module.store.get_destination_statuses()
        return 200, {"destinations": [self._status_json(s) for s in statuses]}

    async def on_get_destination(self, request: JsonRequest) -> tuple[int, JsonDict]:
        name = request.path_params["serverName"]
        statuses = await self._module.store.get_destination_statuses(name)
        sender = self._module.sender
        if not statuses and name not in sender.last_success and name not in sender.last_error:
            raise MatrixError(404, M_NOT_FOUND, f"Nothing is known of {name}")
        status = statuses[0] if statuses else DestinationStatus(name, 0, None, None, None)
        return 200, self._status_json(status)

    def _status_json(self, status: DestinationStatus) -> JsonDict:
        now_ms = int(self._module.clock.seconds() * 1000)
        retry = status.retry
        next_retry_ts: Optional[int] = None
        if retry is not None and retry.retry_last_ts is not None:
            next_retry_ts = retry.retry_last_ts + retry.retry_interval_ms
        sender = self._module.sender
        success = sender.last_success.get(status.destination)
        error = sender.last_error.get(status.destination)
        return {
            "destination": status.destination,
            "pending": status.pending,
            "oldest_pending_age_ms": (
                None if status.oldest_pending_ts is None else now_ms - status.oldest_pending_ts
            ),
            "inflight_txn_id": status.inflight_txn_id,
            "failing_since_ts": None if retry is None else retry.failure_ts,
            "retry_attempts": 0 if retry is None else retry.attempts,
            "retry_interval_ms": 0 if retry is None else retry.retry_interval_ms,
            "next_retry_ts": next_retry_ts,
            "last_success_ts": None if success is None else int(success * 1000),
            "last_error": None if error is None else {"ts": int(error[0] * 1000), "reason": error[1]},
        }


def _user_id(raw: str) -> str:
    try:
        split_user_id(raw)
    except ParseError as e:
        raise MatrixError(400, M_INVALID_PARAM, f"invalid user id: {e}") from None
    return raw
