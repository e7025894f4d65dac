"""Room memberships: destinations of local users, tracked remote users, transitions."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from devicelist_plugin.membership import InMemoryMembership

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
