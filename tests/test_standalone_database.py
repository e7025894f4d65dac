"""The standalone ``database`` service opens, migrates and closes the store."""

from __future__ import annotations

import os

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from devicelist_plugin.standalone.config import Config, DatabaseConfig
from devicelist_plugin.standalone.database import DatabaseService
from devicelist_plugin.storage.migrations import load_migrations


class DatabaseServiceTests(TestCase):
    async def test_sqlite_created_in_missing_directory_and_migrated(self) -> None:
        path = os.path.join(os.path.abspath(self.mktemp()), "sub", "devicelist.db")
        config = Config(server_name="a.test", database=DatabaseConfig("sqlite3", {"database": path}))
        service = DatabaseService(reactor, config)
        service.startService()
        store = await service.ready
        assert store is not None
        self.assertTrue(os.path.exists(path))
        version = await store.get_schema_version()
        self.assertEqual(version, load_migrations()[-1].version)
        await service.stopService()
        self.assertIsNone(service.store)

    async def test_unopenable_database_reports_none(self) -> None:
        # a directory where the database file should be: SQLite cannot open it
        path = os.path.abspath(self.mktemp())
        os.makedirs(path)
        config = Config(server_name="a.test", database=DatabaseConfig("sqlite3", {"database": path}))
        service = DatabaseService(reactor, config)
        service.startService()
        store = await service.ready
        self.assertIsNone(store)
        self.assertTrue(self.flushLoggedErrors())
        await service.stopService()
