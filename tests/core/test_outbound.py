"""Tests for devicelist_plugin.core.outbound: examples, then hypothesis properties."""

from __future__ import annotations

from typing import Optional, Sequence

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from devicelist_plugin.core.models import DeviceKeys, DeviceListUpdate
from devicelist_plugin.core.outbound import (
    EDU_LIMIT,
    OutboundBatch,
    PendingChange,
    build_device_list_edus,
    next_stream_id,
)

ALICE = "@alice:a.example"
BOB = "@bob:a.example"


def change(
    stream_id: int,
    device: str = "D1",
    user: str = ALICE,
    *,
    deleted: bool = False,
    name: Optional[str] = None,
    keys: Optional[DeviceKeys] = None,
) -> PendingChange:
    return PendingChange(
        user_id=user,
        device_id=device,
        stream_id=stream_id,
        deleted=deleted,
        display_name=name,
        keys=keys,
    )


def chain(batch: OutboundBatch) -> list[tuple[str, str, int, tuple[int, ...]]]:
    return [(e.user_id, e.device_id, e.stream_id, e.prev_ids) for e in batch.edus]


def device_keys(device: str) -> DeviceKeys:
    raw = {
        "user_id": ALICE,
        "device_id": device,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2"],
        "keys": {f"ed25519:{device}": "key"},
        "signatures": {ALICE: {f"ed25519:{device}": "sig"}},
    }
    return DeviceKeys(
        user_id=ALICE,
        device_id=device,
        algorithms=("m.olm.v1.curve25519-aes-sha2",),
        keys={f"ed25519:{device}": "key"},
        signatures={ALICE: {f"ed25519:{device}": "sig"}},
        raw=raw,
    )


class NextStreamIdTests(SynchronousTestCase):
    def test_first_is_one(self) -> None:
        self.assertEqual(next_stream_id(None), 1)

    def test_increments(self) -> None:
        self.assertEqual(next_stream_id(1), 2)
        self.assertEqual(next_stream_id(41), 42)

    def test_negative_rejected(self) -> None:
        with self.assertRaises(ValueError):
            next_stream_id(-1)


class BuildExamplesTests(SynchronousTestCase):
    def test_empty(self) -> None:
        batch = build_device_list_edus([], {})
        self.assertEqual(batch, OutboundBatch(edus=(), covered=(), unreferenced_after_ack={}))

    def test_first_edu_to_destination_has_empty_prev(self) -> None:
        """Scenario 13: first EDU prev_id [], the next names the previous one."""
        keys = device_keys("D1")
        batch = build_device_list_edus(
            [change(1, "D1", name="phone", keys=keys), change(2, "D2")], {}
        )
        self.assertEqual(
            chain(batch), [(ALICE, "D1", 1, ()), (ALICE, "D2", 2, (1,))]
        )
        self.assertEqual(batch.edus[0].display_name, "phone")
        self.assertIs(batch.edus[0].keys, keys)
        self.assertFalse(batch.edus[0].deleted)
        self.assertEqual(batch.unreferenced_after_ack, {ALICE: frozenset({2})})
        self.assertEqual(batch.covered, (change(1, "D1", name="phone", keys=keys), change(2, "D2")))

    def test_chains_from_unreferenced(self) -> None:
        batch = build_device_list_edus([change(8)], {ALICE: frozenset({7})})
        self.assertEqual(chain(batch), [(ALICE, "D1", 8, (7,))])

    def test_several_unreferenced_ids_sorted(self) -> None:
        batch = build_device_list_edus(
            [change(9, "D1"), change(10, "D2")], {ALICE: frozenset({8, 3, 5})}
        )
        self.assertEqual(
            chain(batch), [(ALICE, "D1", 9, (3, 5, 8)), (ALICE, "D2", 10, (9,))]
        )
        self.assertEqual(batch.unreferenced_after_ack, {ALICE: frozenset({10})})

    def test_empty_unreferenced_set_means_empty_prev(self) -> None:
        batch = build_device_list_edus([change(3)], {ALICE: frozenset()})
        self.assertEqual(chain(batch), [(ALICE, "D1", 3, ())])

    def test_collapse_changes_of_one_device(self) -> None:
        """Scenario 15: several changes of one device go out as its latest state."""
        rows = [
            change(1, "D1", name="a"),
            change(2, "D2", name="x"),
            change(3, "D1", name="b"),
            change(4, "D1", name="c"),
        ]
        batch = build_device_list_edus(rows, {ALICE: frozenset({0})})
        self.assertEqual(
            chain(batch), [(ALICE, "D2", 2, (0,)), (ALICE, "D1", 4, (2,))]
        )
        self.assertEqual(batch.edus[1].display_name, "c")
        self.assertEqual(list(batch.covered), rows)
        self.assertEqual(batch.unreferenced_after_ack, {ALICE: frozenset({4})})

    def test_collapse_to_deletion(self) -> None:
        rows = [change(1, "D1", name="a"), change(2, "D1", deleted=True)]
        batch = build_device_list_edus(rows, {})
        self.assertEqual(chain(batch), [(ALICE, "D1", 2, ())])
        self.assertTrue(batch.edus[0].deleted)

    def test_delete_three_devices(self) -> None:
        """Scenario 14: three deletions, three EDUs, chained; nothing else sent."""
        rows = [
            change(5, "D1", deleted=True, name="stale name", keys=device_keys("D1")),
            change(6, "D2", deleted=True),
            change(7, "D3", deleted=True),
        ]
        batch = build_device_list_edus(rows, {ALICE: frozenset({4})})
        self.assertEqual(
            chain(batch),
            [(ALICE, "D1", 5, (4,)), (ALICE, "D2", 6, (5,)), (ALICE, "D3", 7, (6,))],
        )
        for edu in batch.edus:
            self.assertTrue(edu.deleted)
            self.assertIsNone(edu.display_name)
            self.assertIsNone(edu.keys)

    def test_two_users_chain_independently(self) -> None:
        rows = [
            change(1, "A1", ALICE),
            change(1, "B1", BOB),
            change(2, "A2", ALICE),
            change(3, "B1", BOB),
            change(2, "B2", BOB),
        ]
        batch = build_device_list_edus(rows, {BOB: frozenset({0})})
        self.assertEqual(
            chain(batch),
            [
                (ALICE, "A1", 1, ()),
                (ALICE, "A2", 2, (1,)),
                (BOB, "B2", 2, (0,)),
                # B1's change at 1 collapsed into its change at 3
                (BOB, "B1", 3, (2,)),
            ],
        )
        self.assertEqual(
            batch.unreferenced_after_ack,
            {ALICE: frozenset({2}), BOB: frozenset({3})},
        )

    def test_limit_cuts_chain_and_next_batch_continues(self) -> None:
        """Scenario 20 / Synapse #11727: beyond the limit goes in the next batch."""
        rows = [change(i, f"D{i}") for i in range(1, 6)]
        first = build_device_list_edus(rows, {}, limit=3)
        self.assertEqual(
            chain(first),
            [(ALICE, "D1", 1, ()), (ALICE, "D2", 2, (1,)), (ALICE, "D3", 3, (2,))],
        )
        self.assertEqual(list(first.covered), rows[:3])
        self.assertEqual(first.unreferenced_after_ack, {ALICE: frozenset({3})})
        rest = [r for r in rows if r not in first.covered]
        second = build_device_list_edus(rest, first.unreferenced_after_ack, limit=3)
        self.assertEqual(
            chain(second), [(ALICE, "D4", 4, (3,)), (ALICE, "D5", 5, (4,))]
        )

    def test_limit_keeps_uncovered_rows_of_unsent_devices(self) -> None:
        rows = [change(1, "D1"), change(2, "D2"), change(3, "D2"), change(4, "D1")]
        batch = build_device_list_edus(rows, {}, limit=1)
        # D2 (latest 3) goes before D1 (latest 4)
        self.assertEqual(chain(batch), [(ALICE, "D2", 3, ())])
        self.assertEqual(list(batch.covered), [change(2, "D2"), change(3, "D2")])

    def test_limit_users_not_in_batch_keep_their_unreferenced(self) -> None:
        rows = [change(1, "A1", ALICE), change(5, "B1", BOB)]
        batch = build_device_list_edus(
            rows, {ALICE: frozenset({0}), BOB: frozenset({4})}, limit=1
        )
        self.assertEqual(chain(batch), [(ALICE, "A1", 1, (0,))])
        self.assertEqual(batch.unreferenced_after_ack, {ALICE: frozenset({1})})

    def test_default_limit(self) -> None:
        rows = [change(i, f"D{i}") for i in range(1, 151)]
        batch = build_device_list_edus(rows, {})
        self.assertEqual(len(batch.edus), EDU_LIMIT)
        self.assertEqual(EDU_LIMIT, 100)

    def test_limit_must_be_positive(self) -> None:
        with self.assertRaises(ValueError):
            build_device_list_edus([change(1)], {}, limit=0)

    def test_two_devices_sharing_a_stream_id_rejected(self) -> None:
        with self.assertRaises(ValueError):
            build_device_list_edus([change(1, "D1"), change(1, "D2")], {})

    def test_same_stream_id_for_two_users_allowed(self) -> None:
        batch = build_device_list_edus([change(1, "D", BOB), change(1, "D", ALICE)], {})
        self.assertEqual(chain(batch), [(ALICE, "D", 1, ()), (BOB, "D", 1, ())])


# -- properties ---------------------------------------------------------------

USERS = ("@a:a.example", "@b:a.example", "@c:a.example")
DEVICES = ("D1", "D2", "D3", "D4")

# one change: (user index, device index, deleted, display name, stream id gap)
change_specs = st.tuples(
    st.integers(0, len(USERS) - 1),
    st.integers(0, len(DEVICES) - 1),
    st.booleans(),
    st.one_of(st.none(), st.sampled_from(["phone", "laptop", "tablet"])),
    st.integers(1, 3),
)


class _Source:
    """Allocates per-user stream ids with gaps (as Synapse's step by 2)."""

    def __init__(self, start: dict[str, int]) -> None:
        self.last = dict(start)

    def make(self, spec: tuple[int, int, bool, Optional[str], int]) -> PendingChange:
        user_index, device_index, deleted, name, gap = spec
        user = USERS[user_index]
        stream_id = self.last[user] + gap
        self.last[user] = stream_id
        return PendingChange(
            user_id=user,
            device_id=DEVICES[device_index],
            stream_id=stream_id,
            deleted=deleted,
            display_name=None if deleted else name,
        )


def _remove(rows: list[PendingChange], covered: Sequence[PendingChange]) -> list[PendingChange]:
    out = list(rows)
    for row in covered:
        out.remove(row)
    return out


def _expected_edu_fields(row: PendingChange) -> tuple[str, str, int, bool, Optional[str]]:
    return (row.user_id, row.device_id, row.stream_id, row.deleted, row.display_name)


def _edu_fields(edu: DeviceListUpdate) -> tuple[str, str, int, bool, Optional[str]]:
    return (edu.user_id, edu.device_id, edu.stream_id, edu.deleted, edu.display_name)


class BuildPropertyTests(SynchronousTestCase):
    def assert_chains(
        self,
        edus: Sequence[DeviceListUpdate],
        initial: dict[str, frozenset[int]],
    ) -> None:
        """Every EDU of a user names the previous one; the first the acked set."""
        previous: dict[str, int] = {}
        for edu in edus:
            if edu.user_id in previous:
                self.assertEqual(edu.prev_ids, (previous[edu.user_id],))
                self.assertGreater(edu.stream_id, previous[edu.user_id])
            else:
                self.assertEqual(
                    edu.prev_ids, tuple(sorted(initial.get(edu.user_id, frozenset())))
                )
            previous[edu.user_id] = edu.stream_id

    @settings(max_examples=300, deadline=None)
    @given(
        specs=st.lists(change_specs, max_size=60),
        limit=st.integers(1, 12),
        acked=st.lists(st.booleans(), min_size=len(USERS), max_size=len(USERS)),
    )
    def test_consecutive_batches_send_latest_state_once(
        self,
        specs: list[tuple[int, int, bool, Optional[str], int]],
        limit: int,
        acked: list[bool],
    ) -> None:
        # a user with acked=True already delivered stream id 10 to the destination
        start = {user: 10 if flag else 0 for user, flag in zip(USERS, acked)}
        initial = {user: frozenset({10}) for user, flag in zip(USERS, acked) if flag}
        source = _Source(start)
        pending = [source.make(spec) for spec in specs]

        latest: dict[tuple[str, str], PendingChange] = {}
        for row in pending:
            latest[(row.user_id, row.device_id)] = row

        remaining = list(pending)
        unreferenced = dict(initial)
        sent: list[DeviceListUpdate] = []
        covered: list[PendingChange] = []
        batches = 0
        while remaining:
            batch = build_device_list_edus(remaining, unreferenced, limit=limit)
            batches += 1
            self.assertGreaterEqual(len(batch.edus), 1)
            self.assertLessEqual(len(batch.edus), limit)
            self.assertEqual(
                [e.stream_id for e in batch.edus],
                sorted(e.stream_id for e in batch.edus),
            )
            self.assertEqual(
                set(batch.unreferenced_after_ack), {e.user_id for e in batch.edus}
            )
            remaining = _remove(remaining, batch.covered)
            covered.extend(batch.covered)
            # the destination acks
            unreferenced.update(batch.unreferenced_after_ack)
            sent.extend(batch.edus)

        # every pending row covered exactly once
        self.assertEqual(sorted(covered, key=repr), sorted(pending, key=repr))
        # every device's latest state sent exactly once, nothing else
        self.assertEqual(
            sorted(_edu_fields(e) for e in sent),
            sorted(_expected_edu_fields(r) for r in latest.values()),
        )
        self.assertEqual(batches, -(-len(latest) // limit))
        self.assert_chains(sent, initial)

    @settings(max_examples=300, deadline=None)
    @given(
        steps=st.lists(
            st.one_of(
                st.tuples(st.just("change"), change_specs),
                st.tuples(st.just("send"), st.integers(1, 6)),
            ),
            max_size=80,
        )
    )
    def test_changes_between_batches(
        self,
        steps: list[tuple[str, object]],
    ) -> None:
        """Changes keep arriving between transactions; after a final drain the
        last EDU of each device is its latest state and chains never break."""
        source = _Source({user: 0 for user in USERS})
        remaining: list[PendingChange] = []
        latest: dict[tuple[str, str], PendingChange] = {}
        unreferenced: dict[str, frozenset[int]] = {}
        sent: list[DeviceListUpdate] = []

        def send(limit: int) -> None:
            nonlocal remaining
            batch = build_device_list_edus(remaining, unreferenced, limit=limit)
            self.assertLessEqual(len(batch.edus), limit)
            remaining = _remove(remaining, batch.covered)
            unreferenced.update(batch.unreferenced_after_ack)
            sent.extend(batch.edus)

        for kind, arg in steps:
            if kind == "change":
                assert isinstance(arg, tuple)
                row = source.make(arg)
                remaining.append(row)
                latest[(row.user_id, row.device_id)] = row
            else:
                assert isinstance(arg, int)
                send(arg)
        while remaining:
            send(EDU_LIMIT)

        last_sent: dict[tuple[str, str], DeviceListUpdate] = {}
        for edu in sent:
            last_sent[(edu.user_id, edu.device_id)] = edu
        self.assertEqual(
            {key: _edu_fields(edu) for key, edu in last_sent.items()},
            {key: _expected_edu_fields(row) for key, row in latest.items()},
        )
        self.assert_chains(sent, {})
