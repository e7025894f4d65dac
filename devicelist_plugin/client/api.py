"""The client-server API of the standalone server (v3, and the same paths
under r0 for older clients).

:class:`ClientApi` builds one
:class:`~devicelist_plugin.federation.resource.JsonResource` serving:

``GET /_matrix/client/versions``
    the spec versions whose device and key endpoints these follow.
``GET|POST /login``
    ``m.login.password`` with ``identifier`` ``{"type": "m.id.user", "user"}``
    (or the legacy ``user``), optional ``device_id`` and
    ``initial_device_display_name``; creates the device unless it exists;
    answers ``user_id``, ``access_token``, ``device_id``, ``home_server``.
    A wrong user or password: 403 ``M_FORBIDDEN``.
``POST /logout``, ``POST /logout/all``
    delete the requester's device (or all the user's devices) through the
    device handler, and with them their access tokens.
``GET /account/whoami``
    ``user_id``, ``device_id``, ``is_guest``.
``GET /devices``, ``GET|PUT|DELETE /devices/{deviceId}``, ``POST /delete_devices``
    list, read, rename and delete devices; deleting needs user-interactive
    auth with the password (:mod:`.uia`).  Deleting a device that does not
    exist succeeds, as in Synapse.
``/keys/*``
    see :mod:`.keys`.
``GET|POST /_synapse/admin/v1/register``
    Synapse's shared-secret registration (:mod:`.registration`).

Every endpoint but ``versions``, ``GET /login`` and registration needs an
access token (:mod:`.auth`).  Errors are JSON ``{"errcode", "error"}``;
unknown paths 404 and wrong methods 405 ``M_UNRECOGNIZED``.
"""

from __future__ import annotations

from typing import Optional

from twisted.internet.interfaces import IReactorTime

from devicelist_plugin.client.accounts import Accounts
from devicelist_plugin.client.auth import AccessTokenAuth, Requester
from devicelist_plugin.client.keys import KeysEndpoints, RemoteKeysClient, RemoteKeysQuery
from devicelist_plugin.client.passwords import PasswordHasher
from devicelist_plugin.client.registration import SharedSecretRegistration
from devicelist_plugin.client.uia import LOGIN_TYPE_PASSWORD, UserInteractiveAuth, login_user_of
from devicelist_plugin.core.models import JsonDict
from devicelist_plugin.federation.errors import (
    M_BAD_JSON,
    M_FORBIDDEN,
    M_INVALID_PARAM,
    M_NOT_FOUND,
    M_UNKNOWN,
    MatrixError,
)
from devicelist_plugin.federation.resource import DEFAULT_MAX_BODY_SIZE, JsonRequest, JsonResource
from devicelist_plugin.local.handler import LocalDeviceHandler
from devicelist_plugin.storage.accounts import AccountStore
from devicelist_plugin.storage.types import LocalDevice

__all__ = ["CLIENT_PREFIXES", "ClientApi", "SPEC_VERSIONS", "VERSIONS_PATH"]

#: Where every endpoint is served (v3, and r0 for older clients).
CLIENT_PREFIXES = ("/_matrix/client/v3", "/_matrix/client/r0")
VERSIONS_PATH = "/_matrix/client/versions"
SPEC_VERSIONS = ("r0.6.1", "v1.1", "v1.2", "v1.3", "v1.4", "v1.5", "v1.6", "v1.7", "v1.8")


def _optional_string(body: JsonDict, name: str) -> Optional[str]:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise MatrixError(400, M_BAD_JSON, f"{name}: expected a string")
    return value


def _device_json(device: LocalDevice) -> JsonDict:
    return {
        "device_id": device.device_id,
        "display_name": device.display_name,
        "last_seen_ip": None,
        "last_seen_ts": device.last_seen_ts,
    }


class ClientApi:
    """The client-server endpoints (see the module docstring).

    :param registration_shared_secret: enables shared-secret registration.
    :param remote_query: answers ``/keys/query`` for remote users
        (:class:`~.keys.RemoteKeysQuery`); settable later as
        :attr:`keys`\\ ``.remote_query``.
    :param remote_client: claims remote users' one-time keys
        (:class:`~.keys.RemoteKeysClient`); settable later as
        :attr:`keys`\\ ``.remote_client``.
    """

    def __init__(
        self,
        server_name: str,
        handler: LocalDeviceHandler,
        account_store: AccountStore,
        clock: IReactorTime,
        *,
        password_hasher: PasswordHasher,
        registration_shared_secret: Optional[str] = None,
        remote_query: Optional[RemoteKeysQuery] = None,
        remote_client: Optional[RemoteKeysClient] = None,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
    ) -> None:
        self.server_name = server_name
        self._handler = handler
        self.accounts = Accounts(server_name, account_store, handler, password_hasher, clock)
        self.auth = AccessTokenAuth(account_store)
        self.uia = UserInteractiveAuth(clock, self.accounts.check_password, self.accounts.qualify)
        self.keys = KeysEndpoints(
            handler,
            self.auth,
            self.uia,
            clock,
            remote_query=remote_query,
            remote_client=remote_client,
        )
        self.registration = SharedSecretRegistration(
            self.accounts, clock, registration_shared_secret
        )
        self.resource = JsonResource(max_body_size=max_body_size)
        self._register(self.resource)

    def _register(self, resource: JsonResource) -> None:
        wrap = self.auth.wrap
        resource.register("GET", VERSIONS_PATH, self.on_versions)
        self.registration.register(resource)
        for prefix in CLIENT_PREFIXES:
            resource.register("GET", f"{prefix}/login", self.on_login_flows)
            resource.register("POST", f"{prefix}/login", self.on_login, json_body=True)
            resource.register("POST", f"{prefix}/logout", wrap(self.on_logout))
            resource.register("POST", f"{prefix}/logout/all", wrap(self.on_logout_all))
            resource.register("GET", f"{prefix}/account/whoami", wrap(self.on_whoami))
            resource.register("GET", f"{prefix}/devices", wrap(self.on_get_devices))
            resource.register("GET", f"{prefix}/devices/{{deviceId}}", wrap(self.on_get_device))
            resource.register("PUT", f"{prefix}/devices/{{deviceId}}", wrap(self.on_put_device))
            resource.register(
                "DELETE", f"{prefix}/devices/{{deviceId}}", wrap(self.on_delete_device)
            )
            resource.register(
                "POST", f"{prefix}/delete_devices", wrap(self.on_delete_devices), json_body=True
            )
            self.keys.register(resource, prefix)

    # ------------------------------------------------------------------
    # session

    async def on_versions(self, request: JsonRequest) -> tuple[int, JsonDict]:
        return 200, {"versions": list(SPEC_VERSIONS), "unstable_features": {}}

    async def on_login_flows(self, request: JsonRequest) -> tuple[int, JsonDict]:
        return 200, {"flows": [{"type": LOGIN_TYPE_PASSWORD}]}

    async def on_login(self, request: JsonRequest) -> tuple[int, JsonDict]:
        body = request.require_content()
        login_type = body.get("type")
        if login_type != LOGIN_TYPE_PASSWORD:
            raise MatrixError(400, M_UNKNOWN, f"Unknown login type {login_type}")
        user = login_user_of(body)
        password = body.get("password")
        if not isinstance(password, str):
            raise MatrixError(400, M_INVALID_PARAM, "Bad parameter: password")
        device_id = _optional_string(body, "device_id")
        display_name = _optional_string(body, "initial_device_display_name")
        user_id = self.accounts.qualify(user)
        if user_id is None or not await self.accounts.check_password(user_id, password):
            raise MatrixError(403, M_FORBIDDEN, "Invalid username or password")
        login = await self.accounts.login(user_id, device_id, display_name)
        return 200, {
            "user_id": login.user_id,
            "access_token": login.access_token,
            "device_id": login.device_id,
            "home_server": self.server_name,
        }

    async def on_logout(self, request: JsonRequest, requester: Requester) -> tuple[int, JsonDict]:
        await self.accounts.logout(requester.user_id, requester.device_id, requester.token_hash)
        return 200, {}

    async def on_logout_all(
        self, request: JsonRequest, requester: Requester
    ) -> tuple[int, JsonDict]:
        await self.accounts.logout_all(requester.user_id)
        return 200, {}

    async def on_whoami(self, request: JsonRequest, requester: Requester) -> tuple[int, JsonDict]:
        return 200, {
            "user_id": requester.user_id,
            "device_id": requester.device_id,
            "is_guest": False,
        }

    # ------------------------------------------------------------------
    # devices

    async def on_get_devices(
        self, request: JsonRequest, requester: Requester
    ) -> tuple[int, JsonDict]:
        devices = await self._handler.get_devices(requester.user_id)
        return 200, {"devices": [_device_json(d) for d in devices]}

    async def _device(self, user_id: str, device_id: str) -> LocalDevice:
        for device in await self._handler.get_devices(user_id):
            if device.device_id == device_id:
                return device
        raise MatrixError(404, M_NOT_FOUND, "Device not found")

    async def on_get_device(
        self, request: JsonRequest, requester: Requester
    ) -> tuple[int, JsonDict]:
        device = await self._device(requester.user_id, request.path_params["deviceId"])
        return 200, _device_json(device)

    async def on_put_device(
        self, request: JsonRequest, requester: Requester
    ) -> tuple[int, JsonDict]:
        device_id = request.path_params["deviceId"]
        body = request.content or {}
        if "display_name" in body:
            name = _optional_string(body, "display_name")
            await self._handler.rename_device(requester.user_id, device_id, name)
        else:
            await self._device(requester.user_id, device_id)
        return 200, {}

    def _operation(self, request: JsonRequest) -> str:
        return f"{request.method} {request.raw.path.decode('latin-1')}"

    async def on_delete_device(
        self, request: JsonRequest, requester: Requester
    ) -> tuple[int, JsonDict]:
        await self.uia.validate(requester, request.content, self._operation(request))
        await self.accounts.delete_devices(requester.user_id, [request.path_params["deviceId"]])
        return 200, {}

    async def on_delete_devices(
        self, request: JsonRequest, requester: Requester
    ) -> tuple[int, JsonDict]:
        body = request.require_content()
        devices = body.get("devices")
        if not isinstance(devices, list) or not all(
            isinstance(d, str) and d for d in devices
        ):
            raise MatrixError(400, M_BAD_JSON, "devices: required, a list of device ids")
        await self.uia.validate(requester, body, self._operation(request))
        await self.accounts.delete_devices(requester.user_id, devices)
        return 200, {}
