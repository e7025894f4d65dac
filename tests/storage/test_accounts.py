"""The account store, run identically against SQLite and PostgreSQL."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.trial.unittest import TestCase

from devicelist_plugin.storage import Store, UnknownDeviceError, open_postgres_store, open_sqlite_store
from devicelist_plugin.storage.accounts import Account, AccountStore, TokenOwner, UserExistsError
from tests.storage.pgcluster import get_server

if TYPE_CHECKING:
    _Base = TestCase
else:
    _Base = object

ALICE = "@alice:local.test"
BOB = "@bob:local.test"


class AccountStoreTestsMixin(_Base):
    def open_store(self) -> "Deferred[Store]":
        raise AssertionError("subclasses provide open_store")

    async def accounts(self) -> tuple[Store, AccountStore]:
        store = await self.open_store()
        self.addCleanup(store.close)
        return store, AccountStore(store.database)

    async def test_users(self) -> None:
        _, accounts = await self.accounts()
        self.assertIsNone(await accounts.get_user(ALICE))
        await accounts.create_user(ALICE, "$2b$hash", 1000)
        await accounts.create_user(BOB, None, 2000, admin=True, user_type="bot")
        self.assertEqual(await accounts.get_user(ALICE), Account(ALICE, "$2b$hash", False, None, 1000))
        self.assertEqual(await accounts.get_user(BOB), Account(BOB, None, True, "bot", 2000))
        with self.assertRaises(UserExistsError):
            await accounts.create_user(ALICE, "other", 3000)
        # the first registration is kept
        self.assertEqual((await accounts.get_user(ALICE)).password_hash, "$2b$hash")  # type: ignore[union-attr]
        self.assertTrue(await accounts.set_admin(ALICE, True))
        self.assertTrue((await accounts.get_user(ALICE)).admin)  # type: ignore[union-attr]
        self.assertFalse(await accounts.set_admin("@nobody:local.test", True))

    async def test_concurrent_registrations_of_one_name(self) -> None:
        _, accounts = await self.accounts()
        results = await gatherResults(
            [
                Deferred.fromCoroutine(self._try_create(accounts, ALICE, f"h{i}"))
                for i in range(5)
            ]
        )
        self.assertEqual(sorted(results), [False, False, False, False, True])

    async def _try_create(self, accounts: AccountStore, user_id: str, password_hash: str) -> bool:
        try:
            await accounts.create_user(user_id, password_hash, 1)
        except UserExistsError:
            return False
        return True

    async def test_tokens_belong_to_devices(self) -> None:
        store, accounts = await self.accounts()
        await accounts.create_user(ALICE, "h", 1)
        await accounts.create_user(BOB, "h", 1, admin=True)
        with self.assertRaises(UnknownDeviceError):
            await accounts.add_access_token("t0", ALICE, "NODEVICE", 5)
        self.assertFalse(await accounts.has_device(ALICE, "D1"))
        await store.create_device(ALICE, "D1", None, 10, [])
        await store.create_device(ALICE, "D2", None, 10, [])
        await store.create_device(BOB, "B1", None, 10, [])
        self.assertTrue(await accounts.has_device(ALICE, "D1"))
        await accounts.add_access_token("t1", ALICE, "D1", 11)
        await accounts.add_access_token("t2", ALICE, "D1", 12)
        await accounts.add_access_token("t3", ALICE, "D2", 13)
        await accounts.add_access_token("t4", BOB, "B1", 14)
        self.assertEqual(await accounts.get_token_owner("t1"), TokenOwner(ALICE, "D1", False))
        self.assertEqual(await accounts.get_token_owner("t4"), TokenOwner(BOB, "B1", True))
        self.assertIsNone(await accounts.get_token_owner("nope"))
        self.assertEqual(await accounts.count_device_tokens(ALICE, "D1"), 2)

        # deleting a device deletes its tokens in the same transaction
        await store.delete_device(ALICE, "D1", 20, [])
        self.assertIsNone(await accounts.get_token_owner("t1"))
        self.assertIsNone(await accounts.get_token_owner("t2"))
        self.assertEqual(await accounts.count_device_tokens(ALICE, "D1"), 0)
        self.assertIsNotNone(await accounts.get_token_owner("t3"))

        self.assertTrue(await accounts.delete_access_token("t3"))
        self.assertFalse(await accounts.delete_access_token("t3"))
        await accounts.add_access_token("t5", ALICE, "D2", 15)
        await accounts.add_access_token("t6", ALICE, "D2", 16)
        self.assertEqual(await accounts.delete_user_tokens(ALICE), 2)
        self.assertEqual(await accounts.get_token_owner("t4"), TokenOwner(BOB, "B1", True))


class SQLiteAccountStoreTests(AccountStoreTestsMixin, TestCase):
    def open_store(self) -> "Deferred[Store]":
        directory = self.mktemp()
        os.makedirs(directory)
        return open_sqlite_store(os.path.join(directory, "devicelist.db"), reactor)


class PostgresAccountStoreTests(AccountStoreTestsMixin, TestCase):
    def setUp(self) -> None:
        server = get_server()
        name, self.dsn = server.create_database()
        self.addCleanup(server.drop_database, name)

    def open_store(self, **kwargs: Any) -> "Deferred[Store]":
        return open_postgres_store(self.dsn, reactor, min_connections=1, max_connections=5)
