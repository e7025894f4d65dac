"""Room memberships: destinations of local users, tracked remote users, transitions."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from devicelist_plugin.membership import (
    BatchMembershipSource,
    InMemoryMembership,
    MembershipListener,
    tracked_among,
)

ALICE = "@alice:ours.test"
BOB = "@bob:ours.test"
REMOTE = "@r:s.test"
REMOTE2 = "@r2:s.test"
OTHER = "@o:t.test"


class Recorder:
    def __init__(self) -> None:
        self.newly: list[tuple[str, frozenset[str]]] = []
        self.untracked: list[str] = []

    def servers_newly_sharing(self, local_user_id: str, servers: frozenset[str]) -> None:
        self.newly.append((local_user_id, servers))

    def remote_user_untracked(self, remote_user_id: str) -> None:
        self.untracked.append(remote_user_id)


class MembershipTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.m = InMemoryMembership("ours.test")
        self.events = Recorder()
        self.m.add_listener(self.events)

    def servers(self, user: str) -> frozenset[str]:
        return self.successResultOf(self.m.servers_sharing_room(user))

    def tracked(self, user: str) -> bool:
        return self.successResultOf(self.m.is_tracked(user))

    def test_destinations_exclude_ourselves(self) -> None:
        self.m.join("!a", ALICE)
        self.m.join("!a", BOB)
        self.m.join("!a", REMOTE)
        self.assertEqual(self.servers(ALICE), frozenset({"s.test"}))

    def test_remote_join_newly_shares_with_every_local_member(self) -> None:
        self.m.join("!a", ALICE)
        self.m.join("!a", BOB)
        self.m.join("!a", REMOTE)
        self.assertEqual(
            sorted(self.events.newly),
            [(ALICE, frozenset({"s.test"})), (BOB, frozenset({"s.test"}))],
        )
        # a second user of the same server brings nothing new
        self.m.join("!a", REMOTE2)
        self.assertEqual(len(self.events.newly), 2)

    def test_local_join_into_a_room_with_servers(self) -> None:
        self.m.join("!a", REMOTE)
        self.m.join("!a", OTHER)
        self.m.join("!a", ALICE)
        self.assertEqual(self.events.newly, [(ALICE, frozenset({"s.test", "t.test"}))])

    def test_already_shared_server_is_not_new(self) -> None:
        self.m.join("!a", ALICE)
        self.m.join("!a", REMOTE)
        self.m.join("!b", REMOTE)
        self.m.join("!b", ALICE)
        self.assertEqual(self.events.newly, [(ALICE, frozenset({"s.test"}))])

    def test_tracking_follows_the_last_shared_room(self) -> None:
        self.assertFalse(self.tracked(REMOTE))
        self.m.join("!a", ALICE)
        self.m.join("!a", REMOTE)
        self.m.join("!b", BOB)
        self.m.join("!b", REMOTE)
        self.assertTrue(self.tracked(REMOTE))
        self.m.leave("!a", REMOTE)
        self.assertTrue(self.tracked(REMOTE))
        self.assertEqual(self.events.untracked, [])
        # the last local user of the last shared room leaves
        self.m.leave("!b", BOB)
        self.assertFalse(self.tracked(REMOTE))
        self.assertEqual(self.events.untracked, [REMOTE])

    def test_remote_only_room_does_not_track(self) -> None:
        self.m.join("!x", REMOTE)
        self.m.join("!x", OTHER)
        self.assertFalse(self.tracked(REMOTE))
        self.m.leave("!x", REMOTE)
        self.assertEqual(self.events.untracked, [])

    def test_leave_unknown_is_a_no_op(self) -> None:
        self.m.leave("!nothing", ALICE)
        self.assertEqual(self.servers(ALICE), frozenset())

    def test_a_failing_listener_does_not_stop_others(self) -> None:
        class Broken:
            def servers_newly_sharing(self, local_user_id: str, servers: frozenset[str]) -> None:
                raise RuntimeError("boom")

            def remote_user_untracked(self, remote_user_id: str) -> None:
                raise RuntimeError("boom")

        m = InMemoryMembership("ours.test")
        events = Recorder()
        m.add_listener(Broken())
        m.add_listener(events)
        m.join("!a", ALICE)
        m.join("!a", REMOTE)
        self.assertEqual(events.newly, [(ALICE, frozenset({"s.test"}))])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class OnlyIsTracked:
    """A host's membership source without ``tracked_among``."""

    def __init__(self, inner: InMemoryMembership) -> None:
        self.inner = inner
        self.asked: list[str] = []

    def servers_sharing_room(self, user_id: str) -> "Deferred[frozenset[str]]":
        return self.inner.servers_sharing_room(user_id)

    def is_tracked(self, remote_user_id: str) -> "Deferred[bool]":
        self.asked.append(remote_user_id)
        return self.inner.is_tracked(remote_user_id)

    def add_listener(self, listener: MembershipListener) -> None:
        self.inner.add_listener(listener)


class TrackedAmongTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.m = InMemoryMembership("ours.test")
        self.m.join("!r", ALICE)
        self.m.join("!r", REMOTE)
        self.m.join("!x", REMOTE2)  # a room without local users

    def test_a_batch_source_answers_in_one_call(self) -> None:
        self.assertIsInstance(self.m, BatchMembershipSource)
        found = self.successResultOf(tracked_among(self.m, [REMOTE, REMOTE2, OTHER]))
        self.assertEqual(found, frozenset({REMOTE}))

    def test_a_source_with_only_is_tracked_is_asked_per_user(self) -> None:
        source = OnlyIsTracked(self.m)
        self.assertNotIsInstance(source, BatchMembershipSource)
        found = self.successResultOf(tracked_among(source, [REMOTE2, REMOTE, REMOTE]))
        self.assertEqual(found, frozenset({REMOTE}))
        self.assertEqual(sorted(source.asked), sorted({REMOTE, REMOTE2}))  # once each
