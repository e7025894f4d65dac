"""The ``database`` service: opens (and migrates) the configured store."""

from __future__ import annotations

import os
from typing import Any, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorCore
from twisted.logger import Logger
from twisted.python.failure import Failure

from devicelist_plugin.standalone.config import Config, DatabaseConfig
from devicelist_plugin.storage.factory import open_postgres_store, open_sqlite_store
from devicelist_plugin.storage.store import Store

# Pool sizing keys Synapse accepts inside ``database.args``.
_POOL_KEYS = ("cp_min", "cp_max")


def open_configured_store(reactor: IReactorCore, config: DatabaseConfig) -> "Deferred[Store]":
    """Open the store a ``database`` section describes (SQLite or PostgreSQL)."""
    args: dict[str, Any] = dict(config.args)
    if config.name == "sqlite3":
        path = args["database"]
        if path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return open_sqlite_store(path, reactor)
    pool = {k: int(args.pop(k)) for k in _POOL_KEYS if k in args}
    if "database" in args and "dbname" not in args:
        args["dbname"] = args.pop("database")
    return open_postgres_store(
        "",
        reactor,
        min_connections=pool.get("cp_min", 1),
        max_connections=pool.get("cp_max", 5),
        **args,
    )


class DatabaseService(Service):
    """Owns the store for the life of the process.

    A database that cannot be opened (unreachable, or written by a newer
    version of the plugin) stops the process with the reason logged.
    """

    log = Logger()

    def __init__(self, reactor: IReactorCore, config: Config) -> None:
        self._reactor = reactor
        self._config = config
        self.store: Optional[Store] = None
        # fires with the store once open, or with None if it could not be opened
        self.ready: "Deferred[Optional[Store]]" = Deferred()

    def startService(self) -> None:
        super().startService()
        for warning in self._config.warnings:
            self.log.warn("configuration: {warning}", warning=warning)
        d = open_configured_store(self._reactor, self._config.database)
        d.addCallbacks(self._opened, self._failed)

    def _opened(self, store: Store) -> None:
        if not self.running:
            # stopped while opening
            store.close()
            self.ready.callback(None)
            return
        self.store = store
        self.log.info(
            "devicelist: {engine} database ready for {server_name}",
            engine=self._config.database.name,
            server_name=self._config.server_name,
        )
        self.ready.callback(store)

    def _failed(self, failure: Failure) -> None:
        self.log.failure("devicelist: cannot open the database", failure)
        self.ready.callback(None)
        if self._reactor.running:
            self._reactor.stop()

    def stopService(self) -> "Deferred[None]":
        super().stopService()
        store, self.store = self.store, None
        if store is not None:
            return store.close()
        return succeed(None)
