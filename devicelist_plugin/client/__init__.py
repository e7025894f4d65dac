"""The client-server API of the standalone server: accounts, access tokens,
Synapse-compatible shared-secret registration, login, devices and keys.

:class:`~.api.ClientApi` builds the resource; remote users' keys go through
the :class:`~.keys.RemoteKeysQuery` and :class:`~.keys.RemoteKeysClient`
injection points.
"""

from devicelist_plugin.client.api import ClientApi
from devicelist_plugin.client.auth import AccessTokenAuth, Requester
from devicelist_plugin.client.keys import RemoteKeysClient, RemoteKeysQuery
from devicelist_plugin.client.passwords import PasswordHasher

__all__ = [
    "AccessTokenAuth",
    "ClientApi",
    "PasswordHasher",
    "RemoteKeysClient",
    "RemoteKeysQuery",
    "Requester",
]
