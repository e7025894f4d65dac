"""Persistent state: one store interface over SQLite (embedded default) and PostgreSQL.

Open a store with :func:`open_sqlite_store` or :func:`open_postgres_store`;
program against :class:`IDeviceListStore`.
"""

from devicelist_plugin.storage.errors import (
    DeviceExistsError,
    KeyConflictError,
    SchemaError,
    SchemaTooNewError,
    StoreError,
    UnknownDeviceError,
    UnsupportedDatabaseError,
)
from devicelist_plugin.storage.factory import open_postgres_store, open_sqlite_store, prepare_store
from devicelist_plugin.storage.interface import IDeviceListStore
from devicelist_plugin.storage.store import Store

__all__ = [
    "DeviceExistsError",
    "IDeviceListStore",
    "KeyConflictError",
    "SchemaError",
    "SchemaTooNewError",
    "Store",
    "StoreError",
    "UnknownDeviceError",
    "UnsupportedDatabaseError",
    "open_postgres_store",
    "open_sqlite_store",
    "prepare_store",
]
