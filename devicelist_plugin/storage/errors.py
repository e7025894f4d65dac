"""The storage layer's exceptions.

Every error the store raises on purpose is a :class:`StoreError`; anything
else (a driver's ``OperationalError``, a lost connection) is a fault of the
database or the deployment and propagates unchanged.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base class of the errors raised deliberately by the store."""


class SchemaError(StoreError):
    """The migration files shipped with the plugin are inconsistent."""


class SchemaTooNewError(StoreError):
    """The database was migrated by a newer devicelist-plugin.

    Refusing to start is the only safe answer: an older plugin does not know
    what the newer tables mean and could corrupt them.
    """

    def __init__(self, database_version: int, code_version: int) -> None:
        self.database_version = database_version
        self.code_version = code_version
        super().__init__(
            f"database schema version {database_version} is newer than this "
            f"devicelist-plugin understands ({code_version}); upgrade the plugin"
        )


class UnsupportedDatabaseError(StoreError):
    """The database engine is too old for the SQL the store relies on."""


class UnknownDeviceError(StoreError):
    """The named local device does not exist."""

    def __init__(self, user_id: str, device_id: str) -> None:
        self.user_id = user_id
        self.device_id = device_id
        super().__init__(f"unknown device {device_id!r} of {user_id!r}")


class DeviceExistsError(StoreError):
    """A local device with that id already exists."""

    def __init__(self, user_id: str, device_id: str) -> None:
        self.user_id = user_id
        self.device_id = device_id
        super().__init__(f"device {device_id!r} of {user_id!r} already exists")


class KeyConflictError(StoreError):
    """A one-time key id was uploaded again with different content."""

    def __init__(self, user_id: str, device_id: str, algorithm: str, key_id: str) -> None:
        self.user_id = user_id
        self.device_id = device_id
        self.algorithm = algorithm
        self.key_id = key_id
        super().__init__(
            f"one-time key {algorithm}:{key_id} of device {device_id!r} of "
            f"{user_id!r} was already uploaded with different content"
        )
