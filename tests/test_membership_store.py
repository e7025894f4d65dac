"""Room memberships: the pure transitions, and the same listener semantics
from the in-memory and the store-backed source (persisted, with a durable
join fan-out)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, fail, gatherResults
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from devicelist_plugin.core.membership import (
    join_concerns,
    leave_concerns,
    server_of,
    servers_newly_sharing_on_join,
    untracked_on_leave,
)
from devicelist_plugin.membership import InMemoryMembership
from devicelist_plugin.membership_store import StoreMembership
from devicelist_plugin.storage import Store, open_sqlite_store
from tests.helpers.store import SQLiteStoreCase, PostgresStoreCase

if TYPE_CHECKING:
    _Sync = SynchronousTestCase
    _Async = TestCase
else:
    _Sync = object
    _Async = object

OURS = "ours.test"
ALICE = "@alice:ours.test"
BOB = "@bob:ours.test"
REMOTE = "@r:s.test"
REMOTE2 = "@r2:s.test"
OTHER = "@o:t.test"
BAD = "not-a-user-id"


class PureTransitionTests(SynchronousTestCase):
    def test_server_of(self) -> None:
        self.assertEqual(server_of(REMOTE), "s.test")
        self.assertEqual(server_of("@x:host:8448"), "host:8448")
        self.assertEqual(server_of(BAD), "")

    def test_join_concerns(self) -> None:
        room = {BOB, REMOTE}
        self.assertEqual(join_concerns(OURS, ALICE, room), {ALICE})
        self.assertEqual(join_concerns(OURS, OTHER, room), {BOB})
        self.assertEqual(join_concerns(OURS, REMOTE, room), frozenset())  # already a member
        self.assertEqual(join_concerns(OURS, BAD, room), frozenset())

    def test_newly_sharing_on_join(self) -> None:
        table: list[tuple[str, set[str], dict[str, set[str]], dict[str, frozenset[str]]]] = [
            # a local user joins: the room's servers it did not share with
            (ALICE, {REMOTE, OTHER, BOB}, {ALICE: {"s.test"}}, {ALICE: frozenset({"t.test"})}),
            (ALICE, {REMOTE, OTHER}, {ALICE: {"s.test", "t.test"}}, {}),
            (ALICE, {BOB}, {}, {}),
            (ALICE, {BAD, REMOTE}, {}, {ALICE: frozenset({"s.test"})}),
            # a remote user joins: every local member not sharing with its server
            (REMOTE, {ALICE, BOB, OTHER}, {ALICE: {"s.test"}}, {BOB: frozenset({"s.test"})}),
            (REMOTE, {OTHER}, {}, {}),
            # already a member, or malformed: nothing
            (REMOTE, {REMOTE, ALICE}, {}, {}),
            (BAD, {ALICE}, {}, {}),
        ]
        for user, members, before, expected in table:
            self.assertEqual(
                servers_newly_sharing_on_join(OURS, user, members, before),
                expected,
                (user, members, before),
            )

    def test_leave(self) -> None:
        # a remote user leaving a room with a local member concerns itself
        self.assertEqual(leave_concerns(OURS, REMOTE, {ALICE, REMOTE}), {REMOTE})
        # ... a room without one concerns nobody
        self.assertEqual(leave_concerns(OURS, REMOTE, {OTHER, REMOTE}), frozenset())
        # the last local member leaving concerns every remote member
        self.assertEqual(leave_concerns(OURS, ALICE, {ALICE, REMOTE, OTHER}), {REMOTE, OTHER})
        # not the last: nobody
        self.assertEqual(leave_concerns(OURS, ALICE, {ALICE, BOB, REMOTE}), frozenset())
        # not a member: nobody
        self.assertEqual(leave_concerns(OURS, ALICE, {REMOTE}), frozenset())
        self.assertEqual(
            untracked_on_leave(OURS, ALICE, {ALICE, REMOTE, OTHER}, {OTHER: True}), [REMOTE]
        )


class Recorder:
    def __init__(self) -> None:
        self.newly: list[tuple[str, frozenset[str]]] = []
        self.untracked: list[str] = []

    def servers_newly_sharing(self, local_user_id: str, servers: frozenset[str]) -> None:
        self.newly.append((local_user_id, servers))

    def remote_user_untracked(self, remote_user_id: str) -> None:
        self.untracked.append(remote_user_id)


class BehaviourMixin(_Sync):
    """What both sources must do; subclasses say how to join and leave."""

    def setUp(self) -> None:
        self.events = Recorder()
        self.setup_source()

    def setup_source(self) -> None:
        raise AssertionError("subclasses provide a source")

    def join(self, room: str, user: str) -> None:
        raise AssertionError("subclasses provide join")

    def leave(self, room: str, user: str) -> None:
        raise AssertionError("subclasses provide leave")

    def servers(self, user: str) -> frozenset[str]:
        raise AssertionError("subclasses provide servers")

    def tracked(self, user: str) -> bool:
        raise AssertionError("subclasses provide tracked")

    def test_destinations_exclude_ourselves(self) -> None:
        for user in (ALICE, BOB, REMOTE, BAD):
            self.join("!a", user)
        self.assertEqual(self.servers(ALICE), frozenset({"s.test"}))

    def test_remote_join_newly_shares_with_every_local_member(self) -> None:
        self.join("!a", ALICE)
        self.join("!a", BOB)
        self.join("!a", REMOTE)
        self.assertEqual(
            sorted(self.events.newly),
            [(ALICE, frozenset({"s.test"})), (BOB, frozenset({"s.test"}))],
        )
        self.join("!a", REMOTE2)
        self.join("!a", REMOTE)  # again: nothing
        self.assertEqual(len(self.events.newly), 2)

    def test_local_join_into_a_room_with_servers(self) -> None:
        self.join("!a", REMOTE)
        self.join("!a", OTHER)
        self.join("!a", ALICE)
        self.assertEqual(self.events.newly, [(ALICE, frozenset({"s.test", "t.test"}))])

    def test_already_shared_server_is_not_new(self) -> None:
        self.join("!a", ALICE)
        self.join("!a", REMOTE)
        self.join("!b", REMOTE)
        self.join("!b", ALICE)
        self.join("!c", ALICE)
        self.join("!c", REMOTE2)
        self.assertEqual(self.events.newly, [(ALICE, frozenset({"s.test"}))])

    def test_rejoin_after_leaving_is_new_again(self) -> None:
        self.join("!a", ALICE)
        self.join("!a", REMOTE)
        self.leave("!a", REMOTE)
        self.join("!a", REMOTE)
        self.assertEqual(self.events.newly, [(ALICE, frozenset({"s.test"}))] * 2)

    def test_tracking_follows_the_last_shared_room(self) -> None:
        self.assertFalse(self.tracked(REMOTE))
        self.join("!a", ALICE)
        self.join("!a", REMOTE)
        self.join("!b", BOB)
        self.join("!b", REMOTE)
        self.assertTrue(self.tracked(REMOTE))
        self.leave("!a", REMOTE)
        self.assertTrue(self.tracked(REMOTE))
        self.assertEqual(self.events.untracked, [])
        self.leave("!b", BOB)
        self.assertFalse(self.tracked(REMOTE))
        self.assertEqual(self.events.untracked, [REMOTE])

    def test_last_local_leaving_untracks_the_room(self) -> None:
        self.join("!a", ALICE)
        self.join("!a", REMOTE)
        self.join("!a", OTHER)
        self.join("!b", BOB)
        self.join("!b", OTHER)
        self.leave("!a", ALICE)
        self.assertEqual(self.events.untracked, [REMOTE])
        self.assertTrue(self.tracked(OTHER))

    def test_remote_only_room_does_not_track(self) -> None:
        self.join("!x", REMOTE)
        self.join("!x", OTHER)
        self.assertFalse(self.tracked(REMOTE))
        self.leave("!x", REMOTE)
        self.assertEqual(self.events.untracked, [])

    def test_leave_unknown_is_a_no_op(self) -> None:
        self.leave("!nothing", ALICE)
        self.assertEqual(self.servers(ALICE), frozenset())


class InMemoryBehaviourTests(BehaviourMixin, SynchronousTestCase):
    def setup_source(self) -> None:
        self.m = InMemoryMembership(OURS)
        self.m.add_listener(self.events)

    def join(self, room: str, user: str) -> None:
        self.m.join(room, user)

    def leave(self, room: str, user: str) -> None:
        self.m.leave(room, user)

    def servers(self, user: str) -> frozenset[str]:
        return self.successResultOf(self.m.servers_sharing_room(user))

    def tracked(self, user: str) -> bool:
        return self.successResultOf(self.m.is_tracked(user))


def open_file_store(case: SynchronousTestCase, path: str) -> Store:
    store: Store = case.successResultOf(
        open_sqlite_store(path, MemoryReactorClock(), synchronous=True)
    )
    case.addCleanup(store.close)
    return store


class StoreBehaviourTests(BehaviourMixin, SynchronousTestCase):
    def setup_source(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        self.path = os.path.join(directory, "devicelist.db")
        self.store = open_file_store(self, self.path)
        self.m = StoreMembership(OURS, self.store)
        self.m.add_listener(self.events)

    def join(self, room: str, user: str) -> None:
        if user == BAD:
            return  # refused by the store-backed source (below)
        self.successResultOf(self.m.join(room, user))

    def leave(self, room: str, user: str) -> None:
        self.successResultOf(self.m.leave(room, user))

    def servers(self, user: str) -> frozenset[str]:
        return self.successResultOf(self.m.servers_sharing_room(user))

    def tracked(self, user: str) -> bool:
        return self.successResultOf(self.m.is_tracked(user))

    def test_persisted(self) -> None:
        self.join("!a", ALICE)
        self.join("!a", REMOTE)
        self.store.close()
        reopened = StoreMembership(OURS, open_file_store(self, self.path))
        self.assertEqual(self.successResultOf(reopened.servers_sharing_room(ALICE)), {"s.test"})
        self.assertTrue(self.successResultOf(reopened.is_tracked(REMOTE)))
        self.assertEqual(self.successResultOf(reopened.room_members("!a")), [ALICE, REMOTE])
        # what was shared before the restart is not new after it
        events = Recorder()
        reopened.add_listener(events)
        self.successResultOf(reopened.join("!b", ALICE))
        self.successResultOf(reopened.join("!b", REMOTE2))
        self.assertEqual(events.newly, [])

    def test_join_records_a_chain_reset_per_newly_sharing_server(self) -> None:
        self.join("!a", ALICE)
        self.join("!a", BOB)
        self.join("!a", REMOTE)
        self.join("!b", ALICE)
        self.join("!b", OTHER)
        self.assertEqual(
            self.successResultOf(self.store.destinations_to_send()), ["s.test", "t.test"]
        )
        for server, users in (("s.test", 2), ("t.test", 1)):
            counts = self.successResultOf(self.store.count_outbound_rows(server))
            self.assertEqual(counts.chain_resets, users)

    def test_malformed_ids_are_refused(self) -> None:
        self.failureResultOf(self.m.join("!a", BAD), ValueError)
        self.failureResultOf(self.m.join("", ALICE), ValueError)
        self.assertEqual(self.successResultOf(self.m.room_members("!a")), [])

    def test_listener_deferreds_are_awaited_and_failures_logged(self) -> None:
        waiting: Deferred[None] = Deferred()

        class Slow(Recorder):
            def servers_newly_sharing(self, local_user_id: str, servers: frozenset[str]) -> Any:
                super().servers_newly_sharing(local_user_id, servers)
                return waiting

        class Broken(Recorder):
            def servers_newly_sharing(self, local_user_id: str, servers: frozenset[str]) -> Any:
                raise RuntimeError("boom")

            def remote_user_untracked(self, remote_user_id: str) -> Any:
                return fail(RuntimeError("boom"))

        self.m.add_listener(Broken())
        slow = Slow()
        self.m.add_listener(slow)
        self.join("!a", ALICE)
        d = self.m.join("!a", REMOTE)
        self.assertNoResult(d)
        self.assertEqual(slow.newly, [(ALICE, frozenset({"s.test"}))])
        self.assertEqual(self.events.newly, [(ALICE, frozenset({"s.test"}))])
        waiting.callback(None)
        self.successResultOf(d)
        self.successResultOf(self.m.leave("!a", REMOTE))
        self.assertEqual(self.events.untracked, [REMOTE])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)


class ConcurrentJoinMixin(_Async):
    """A local and a remote user joining one room at the same time, on two
    connections: the sharing they create is reported, never lost."""

    def open_store(self) -> "Deferred[Store]":
        raise AssertionError("subclasses provide open_store")

    async def test_concurrent_joins_report_the_new_sharing(self) -> None:
        stores = [await self.open_store(), await self.open_store()]
        for store in stores:
            self.addCleanup(store.close)
        for attempt in range(5):
            room = f"!r{attempt}"
            results = await gatherResults(
                [
                    stores[0].join_room(room, ALICE, OURS),
                    stores[1].join_room(room, f"@r{attempt}:s{attempt}.test", OURS),
                ]
            )
            newly = [n for n in results if n]
            self.assertEqual(newly, [{ALICE: frozenset({f"s{attempt}.test"})}], results)


class SQLiteConcurrentJoinTests(SQLiteStoreCase, ConcurrentJoinMixin):
    pass


class PostgresConcurrentJoinTests(PostgresStoreCase, ConcurrentJoinMixin):
    pass
