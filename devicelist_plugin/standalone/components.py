"""The objects of one standalone server, built once its database is open.

:func:`build_components` wires them from the configuration, the start-up
files, the open store, a clock/reactor and an outbound ``IAgent``:

- the :class:`~devicelist_plugin.local.handler.LocalDeviceHandler` (local
  users' devices and keys);
- the federation transport (key server, key ring, signed client,
  authenticator) with the local-device federation endpoints registered;
- a key-server-only resource for listeners that serve ``keys`` without
  ``federation``;
- the :class:`~devicelist_plugin.client.api.ClientApi` over an
  :class:`~devicelist_plugin.storage.accounts.AccountStore` on the same
  database.

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
from devicelist_plugin.federation.local_endpoints import LocalDeviceEndpoints
from devicelist_plugin.federation.resource import JsonResource
from devicelist_plugin.federation.transport import (
    FederationTransport,
    FederationTransportConfig,
    build_federation_transport,
)
from devicelist_plugin.local.handler import CpuRunner, LocalDeviceHandler
from devicelist_plugin.membership import MembershipSource
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
    handler = LocalDeviceHandler(
        config.server_name,
        store,
        membership,
        reactor,
        allow_device_name_lookup_over_federation=config.allow_device_name_lookup_over_federation,
        cpu_runner=cpu_runner,
    )
    transport = build_federation_transport(
        config.server_name,
        files.signing_keys,
        store,
        reactor,
        agent,
        old_verify_keys=config.old_signing_keys,
        config=FederationTransportConfig(
            key_refresh_interval_ms=config.key_refresh_interval_ms,
            trusted_key_servers=config.trusted_key_servers,
        ),
    )
    LocalDeviceEndpoints(handler).register(transport.resource)
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
    )
