"""The objects of one standalone server, built once its database is open.

:func:`build_components` wires them from the configuration, the start-up
files, the open store, a clock/reactor and an outbound ``IAgent``:

- the :class:`~devicelist_plugin.module.DeviceListModule`: the
  :class:`~devicelist_plugin.local.handler.LocalDeviceHandler` (local users'
  devices and keys), the federation transport (key server, key ring, signed
  client, authenticator) with the local-device endpoints and ``/send``
  registered, the remote device-list updater, the key querier and the
  outbound sender (started by the service tree's ``replication`` child);
- a key-server-only resource for listeners that serve ``keys`` without
  ``federation``;
- the :class:`~devicelist_plugin.client.api.ClientApi` over an
  :class:`~devicelist_plugin.storage.accounts.AccountStore` on the same
  database, whose ``/keys/query`` and ``/keys/claim`` for remote users go
  through the module;
- the :class:`~devicelist_plugin.standalone.admin.AdminApi` (admin users'
  tokens of the client API) and the module's Prometheus metrics.

Everything else the server runs (replication, admin API, metrics) hangs off
:class:`ServerComponents`: add the object here and its resource to
:data:`devicelist_plugin.standalone.site.RESOURCE_MOUNTS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.web.iweb import IAgent

from devicelist_plugin.client.api import ClientApi
from devicelist_plugin.client.passwords import PasswordHasher
from devicelist_plugin.federation.resource import JsonResource
from devicelist_plugin.federation.transport import FederationTransport, FederationTransportConfig
from devicelist_plugin.local.handler import CpuRunner, LocalDeviceHandler
from devicelist_plugin.membership import MembershipSource
from devicelist_plugin.module import DeviceListModule, ModuleConfig
from devicelist_plugin.standalone.admin import AdminApi
from devicelist_plugin.standalone.config import Config
from devicelist_plugin.standalone.startup import StartupFiles
from devicelist_plugin.storage.accounts import AccountStore
from devicelist_plugin.storage.store import Store

__all__ = ["ServerComponents", "build_components"]


@dataclass
class ServerComponents:
    """Everything one standalone server serves from (see the module docstring)."""

    config: Config
    reactor: Any
    store: Store
    account_store: AccountStore
    membership: MembershipSource
    handler: LocalDeviceHandler
    transport: FederationTransport
    key_resource: JsonResource
    client_api: ClientApi
    module: DeviceListModule
    admin_api: AdminApi


def module_config(config: Config) -> ModuleConfig:
    """The module's tunables from the server configuration."""
    return ModuleConfig(
        retry_policy=config.retry_policy,
        allow_device_name_lookup_over_federation=config.allow_device_name_lookup_over_federation,
        hold_grace=config.device_list_resync_grace_ms / 1000,
        resync_timeout=config.device_list_resync_timeout_ms / 1000,
        max_devices_per_user=config.max_remote_devices_per_user,
        transport=FederationTransportConfig(
            key_refresh_interval_ms=config.key_refresh_interval_ms,
            trusted_key_servers=config.trusted_key_servers,
        ),
        old_verify_keys=tuple(config.old_signing_keys),
    )


def build_components(
    config: Config,
    files: StartupFiles,
    store: Store,
    reactor: Any,
    agent: IAgent,
    membership: MembershipSource,
    cpu_runner: CpuRunner,
) -> ServerComponents:
    """Wire one server (see the module docstring).

    :param reactor: the clock of every component (``IReactorTime``).
    :param agent: outbound federation requests go through it.
    :param cpu_runner: runs bcrypt and the encoding of big answers
        (``thread_pool_runner`` on a real reactor).
    """
    module = DeviceListModule(
        config.server_name,
        files.signing_keys,
        store,
        reactor,
        agent,
        membership,
        module_config(config),
        cpu_runner=cpu_runner,
    )
    handler = module.local
    transport = module.transport
    key_resource = JsonResource()
    transport.key_server.register(key_resource)
    account_store = AccountStore(store.database)
    client_api = ClientApi(
        config.server_name,
        handler,
        account_store,
        reactor,
        password_hasher=PasswordHasher(config.bcrypt_rounds, cpu_runner),
        registration_shared_secret=files.registration_shared_secret,
        remote_query=module.remote_keys_query,
        remote_client=module.remote_key_claimer,
    )
    return ServerComponents(
        config=config,
        reactor=reactor,
        store=store,
        account_store=account_store,
        membership=membership,
        handler=handler,
        transport=transport,
        key_resource=key_resource,
        client_api=client_api,
        module=module,
        admin_api=AdminApi(module, client_api.auth),
    )
