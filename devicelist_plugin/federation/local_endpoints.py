"""The federation endpoints serving local users' device lists and keys.

All three require a signed request (``Authorization: X-Matrix``; 401
``M_UNAUTHORIZED`` otherwise) and are served from a
:class:`~devicelist_plugin.local.handler.LocalDeviceHandler`:

``GET /_matrix/federation/v1/user/devices/{userId}``
    ``user_id``, ``stream_id``, ``devices`` (every device that has keys:
    ``device_id``, ``keys`` with the stored cross-signing signatures merged
    in, and ``device_display_name`` only when
    ``allow_device_name_lookup_over_federation`` is on), ``master_key`` and
    ``self_signing_key`` when set (never ``null``).

``POST /_matrix/federation/v1/user/keys/query``
    ``{"device_keys": {userId: [deviceId, ...]}}`` (empty list: every
    device) -> ``device_keys`` (every requested user; ``unsigned`` carries
    ``device_display_name`` under the same rule), ``master_keys``,
    ``self_signing_keys``.

``POST /_matrix/federation/v1/user/keys/claim``
    ``{"one_time_keys": {userId: {deviceId: algorithm}}}`` ->
    ``{"one_time_keys": {userId: {deviceId: {"<algorithm>:<keyId>": key}}}}``:
    the device's oldest one-time key, never handed out twice, else its
    fallback key; devices with neither are left out.

Errors (JSON ``{"errcode", "error"}``):

- a ``userId`` (in the path or the body) that is malformed or not of this
  server: **400 ``M_INVALID_PARAM``**, the message naming the user.  Synapse
  answers a non-local ``/user/devices`` with 400 ``M_UNKNOWN`` and Conduit
  with ``M_INVALID_PARAM``; both are 400s, and the specific code tells the
  caller what is wrong.  A query or claim naming one non-local user is
  refused as a whole: no other server has a reason to ask us about users
  that are not ours.
- a body of the wrong shape: 400 ``M_BAD_JSON``, the message starting with
  the path of the offending field (``device_keys["@u:b"]: expected a list of
  device ids``); no body or a non-object body: 400 ``M_NOT_JSON``.

Big users
---------
A user with 10,000 devices costs a fixed number of SQL statements (none per
device) in one short transaction; the answer is then assembled from the
stored keys' canonical JSON text, decoding only the keys that have
signatures to merge, by the handler's ``cpu_runner`` (a worker thread when
the host provides one), so the reactor keeps serving other requests.  See
``bench/README.md`` for measurements.

Correlating ``stream_id`` with the next EDU
------------------------------------------
``stream_id`` is the user's last stream id S (0 for a user that never had
a device), and the devices are exactly the state after change S: the
snapshot is read in one store transaction holding the user's stream
position, so no change can slip in between.  In that same transaction the
snapshot is recorded as served to the requesting server D (the
authenticated origin): D's pending updates of the user with a stream id <= S
are dropped (the snapshot carries their state) and D's unreferenced ids for
the user become {S}, so the next ``m.device_list_update`` we send D for the
user names exactly ``prev_id: [S]``.  That is what receivers that keep only
the snapshot's id (Synapse requires ``prev_id`` to equal it) need to apply
the next EDU without another resync.  A transaction to D that was in flight
while the snapshot was served carries older ids; its acknowledgement does
not replace {S} (``ack_sent`` never goes below a served snapshot's id until
an acknowledged EDU reaches it).  If D never receives the answer, the next
EDU names an id D does not know and D resyncs: a lost answer costs a
resync, never an update.
"""

from __future__ import annotations

from devicelist_plugin.core.models import JsonDict
from devicelist_plugin.federation.resource import EncodedJson, JsonRequest, JsonResource
from devicelist_plugin.local.handler import LocalDeviceHandler
from devicelist_plugin.local.requests import (
    parse_device_keys_request,
    parse_one_time_keys_request,
)

__all__ = [
    "KEYS_CLAIM_PATH",
    "KEYS_QUERY_PATH",
    "LocalDeviceEndpoints",
    "USER_DEVICES_PATH",
]

USER_DEVICES_PATH = "/_matrix/federation/v1/user/devices/{userId}"
KEYS_QUERY_PATH = "/_matrix/federation/v1/user/keys/query"
KEYS_CLAIM_PATH = "/_matrix/federation/v1/user/keys/claim"


class LocalDeviceEndpoints:
    """The handlers of the three endpoints; :meth:`register` mounts them."""

    def __init__(self, handler: LocalDeviceHandler) -> None:
        self._handler = handler

    def register(self, resource: JsonResource) -> None:
        """Serve the endpoints on ``resource`` (which needs an authenticator)."""
        resource.register("GET", USER_DEVICES_PATH, self.on_user_devices, requires_auth=True)
        resource.register(
            "POST", KEYS_QUERY_PATH, self.on_keys_query, requires_auth=True, json_body=True
        )
        resource.register(
            "POST", KEYS_CLAIM_PATH, self.on_keys_claim, requires_auth=True, json_body=True
        )

    async def on_user_devices(self, request: JsonRequest) -> tuple[int, EncodedJson]:
        user_id = request.path_params["userId"]
        body = await self._handler.encoded_user_devices_snapshot(
            user_id, request.require_origin()
        )
        return 200, EncodedJson(body)

    async def on_keys_query(self, request: JsonRequest) -> tuple[int, EncodedJson]:
        device_keys = parse_device_keys_request(request.require_content())
        body = await self._handler.encoded_federation_query_keys(device_keys)
        return 200, EncodedJson(body)

    async def on_keys_claim(self, request: JsonRequest) -> tuple[int, JsonDict]:
        one_time_keys = parse_one_time_keys_request(request.require_content())
        body = await self._handler.claim_keys(one_time_keys)
        return 200, body
