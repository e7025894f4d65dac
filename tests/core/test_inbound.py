"""Tests for devicelist_plugin.core.inbound.

Table-driven: each row of ``CASES`` is one call of ``decide`` with the
expected outcome; every row becomes its own test method (``test_case_<name>``)
so a failure names the row.  Multi-batch sequences (hold then release,
resync then re-run) have their own tests below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from twisted.trial.unittest import SynchronousTestCase

from devicelist_plugin.core.inbound import (
    Action,
    BatchDecision,
    Decision,
    Reason,
    RemoteUserState,
    apply_snapshot,
    decide,
    supersedes,
)
from devicelist_plugin.core.models import DeviceListUpdate

USER = "@u:remote.example"

APPLY, SKIP, HOLD, RESYNC = Action.APPLY, Action.SKIP, Action.HOLD, Action.RESYNC


def upd(
    stream_id: int,
    *prev_ids: int,
    deleted: bool = False,
    device: str = "DEV",
    name: Optional[str] = None,
) -> DeviceListUpdate:
    return DeviceListUpdate(
        user_id=USER,
        device_id=device,
        stream_id=stream_id,
        prev_ids=tuple(prev_ids),
        deleted=deleted,
        display_name=name,
    )


def state(
    snapshot: Optional[int], *known: int, stale: bool = False
) -> RemoteUserState:
    return RemoteUserState(
        snapshot_stream_id=snapshot, known_ids=frozenset(known), stale=stale
    )


_SAME = object()


@dataclass(frozen=True)
class Case:
    name: str
    state: Optional[RemoteUserState]
    updates: Sequence[DeviceListUpdate]
    # (stream_id, action, reason) in processing order
    expected: Sequence[tuple[int, Action, Reason]]
    resync: Optional[Reason] = None
    # the expected state after; _SAME: the input state object itself
    after: object = _SAME
    held: Sequence[int] = ()
    deferred: Sequence[int] = ()
    tracked: bool = True
    allow_hold: bool = True
    window: int = 500


CASES: list[Case] = [
    # -- scope -------------------------------------------------------------
    Case(
        "untracked_skips_everything",
        state(1, 2),
        [upd(3, 2), upd(5, 4)],
        [(3, SKIP, Reason.NOT_TRACKED), (5, SKIP, Reason.NOT_TRACKED)],
        tracked=False,
    ),
    Case(
        "untracked_without_cache",
        None,
        [upd(1)],
        [(1, SKIP, Reason.NOT_TRACKED)],
        tracked=False,
    ),
    # -- first contact ---------------------------------------------------
    Case(
        "first_contact",
        None,
        [upd(1)],
        [(1, RESYNC, Reason.FIRST_CONTACT)],
        resync=Reason.FIRST_CONTACT,
        after=None,
        deferred=[1],
    ),
    Case(
        "first_contact_batch_sorted_and_deduplicated",
        None,
        [upd(3, 2), upd(2, 1), upd(3, 2)],
        [
            (2, RESYNC, Reason.FIRST_CONTACT),
            (3, RESYNC, Reason.FIRST_CONTACT),
            (3, SKIP, Reason.DUPLICATE),
        ],
        resync=Reason.FIRST_CONTACT,
        after=None,
        deferred=[2, 3],
    ),
    Case("first_contact_empty_batch", None, [], [], after=None),
    # -- chains ----------------------------------------------------------
    Case(
        "chain_from_snapshot",
        state(1),
        [upd(2, 1)],
        [(2, APPLY, Reason.PREV_KNOWN)],
        after=state(1, 2),
    ),
    Case(
        "chain_from_known_id",
        state(1, 2),
        [upd(3, 2)],
        [(3, APPLY, Reason.PREV_KNOWN)],
        after=state(1, 2, 3),
    ),
    Case(
        "chain_without_snapshot",
        state(None, 1),
        [upd(2, 1)],
        [(2, APPLY, Reason.PREV_KNOWN)],
        after=state(None, 1, 2),
    ),
    Case(
        "earlier_update_of_batch_named_as_prev",
        state(1),
        [upd(2, 1), upd(3, 2), upd(4, 3)],
        [
            (2, APPLY, Reason.PREV_KNOWN),
            (3, APPLY, Reason.PREV_KNOWN),
            (4, APPLY, Reason.PREV_KNOWN),
        ],
        after=state(1, 2, 3, 4),
    ),
    Case(
        "out_of_order_batch_is_sorted",
        state(1),
        [upd(4, 3), upd(2, 1), upd(3, 2)],
        [
            (2, APPLY, Reason.PREV_KNOWN),
            (3, APPLY, Reason.PREV_KNOWN),
            (4, APPLY, Reason.PREV_KNOWN),
        ],
        after=state(1, 2, 3, 4),
    ),
    Case(
        "prev_id_names_a_later_update_of_the_batch",
        state(1),
        [upd(3, 4), upd(4, 1)],
        [(4, APPLY, Reason.PREV_KNOWN), (3, APPLY, Reason.PREV_KNOWN)],
        after=state(1, 3, 4),
    ),
    Case(
        "prev_id_names_a_later_update_already_applied",
        state(1, 4),
        [upd(3, 4)],
        [(3, APPLY, Reason.PREV_KNOWN)],
        after=state(1, 3, 4),
    ),
    Case(
        "prev_cycle_broken_at_smallest_id",
        state(1),
        [upd(4, 3), upd(3, 4)],
        [(3, HOLD, Reason.UNKNOWN_PREV_ID), (4, HOLD, Reason.PREV_HELD)],
        held=[3, 4],
    ),
    Case(
        "deleted_with_known_prev",
        state(1, 2),
        [upd(3, 2, deleted=True)],
        [(3, APPLY, Reason.PREV_KNOWN)],
        after=state(1, 2, 3),
    ),
    # -- clustered senders (several prev_ids) ------------------------------
    Case(
        "multiple_prev_ids_all_known",
        state(1, 3, 4),
        [upd(5, 3, 4)],
        [(5, APPLY, Reason.PREV_KNOWN)],
        after=state(1, 3, 4, 5),
    ),
    Case(
        "multiple_prev_ids_known_via_snapshot_and_batch",
        state(2),
        [upd(3, 2), upd(4, 2), upd(5, 3, 4)],
        [
            (3, APPLY, Reason.PREV_KNOWN),
            (4, APPLY, Reason.PREV_KNOWN),
            (5, APPLY, Reason.PREV_KNOWN),
        ],
        after=state(2, 3, 4, 5),
    ),
    Case(
        "multiple_prev_ids_one_unknown_held",
        state(1, 3),
        [upd(5, 3, 4)],
        [(5, HOLD, Reason.UNKNOWN_PREV_ID)],
        held=[5],
    ),
    Case(
        "multiple_prev_ids_one_unknown_no_hold",
        state(1, 3),
        [upd(5, 3, 4)],
        [(5, RESYNC, Reason.UNKNOWN_PREV_ID)],
        resync=Reason.UNKNOWN_PREV_ID,
        after=state(1, 3, stale=True),
        deferred=[5],
        allow_hold=False,
    ),
    Case(
        "concurrent_branch_applies_while_other_is_held",
        state(1, 3),
        [upd(5, 4), upd(6, 3)],
        [(5, HOLD, Reason.UNKNOWN_PREV_ID), (6, APPLY, Reason.PREV_KNOWN)],
        after=state(1, 3, 6),
        held=[5],
    ),
    Case(
        "late_branch_of_clustered_sender_applies",
        state(0, 3, 5),
        [upd(4, 3)],
        [(4, APPLY, Reason.PREV_KNOWN)],
        after=state(0, 3, 4, 5),
    ),
    # -- lost updates ----------------------------------------------------
    Case(
        "lost_update_held",
        state(1),
        [upd(3, 2)],
        [(3, HOLD, Reason.UNKNOWN_PREV_ID)],
        held=[3],
    ),
    Case(
        "lost_update_resync_without_hold",
        state(1),
        [upd(3, 2)],
        [(3, RESYNC, Reason.UNKNOWN_PREV_ID)],
        resync=Reason.UNKNOWN_PREV_ID,
        after=state(1, stale=True),
        deferred=[3],
        allow_hold=False,
    ),
    Case(
        "held_update_makes_its_successor_held",
        state(1),
        [upd(4, 3), upd(5, 4)],
        [(4, HOLD, Reason.UNKNOWN_PREV_ID), (5, HOLD, Reason.PREV_HELD)],
        held=[4, 5],
    ),
    Case(
        "applies_before_trigger_stand_later_ones_deferred",
        state(1),
        [upd(5, 4), upd(2, 1), upd(4, 3)],
        [
            (2, APPLY, Reason.PREV_KNOWN),
            (4, RESYNC, Reason.UNKNOWN_PREV_ID),
            (5, RESYNC, Reason.AFTER_RESYNC_TRIGGER),
        ],
        resync=Reason.UNKNOWN_PREV_ID,
        after=state(1, 2, stale=True),
        deferred=[4, 5],
        allow_hold=False,
    ),
    Case(
        "after_trigger_duplicates_still_skipped",
        state(1, 2),
        [upd(4, 3), upd(2, 1), upd(6, 5), upd(6, 5)],
        [
            (2, SKIP, Reason.DUPLICATE),
            (4, RESYNC, Reason.UNKNOWN_PREV_ID),
            (6, RESYNC, Reason.AFTER_RESYNC_TRIGGER),
            (6, SKIP, Reason.DUPLICATE),
        ],
        resync=Reason.UNKNOWN_PREV_ID,
        after=state(1, 2, stale=True),
        deferred=[4, 6],
        allow_hold=False,
    ),
    Case(
        "held_update_deferred_when_batch_resyncs",
        state(1),
        [upd(6), upd(4, 3)],
        [
            (4, RESYNC, Reason.UNKNOWN_PREV_ID),
            (6, RESYNC, Reason.EMPTY_PREV_ID),
        ],
        resync=Reason.EMPTY_PREV_ID,
        after=state(1, stale=True),
        deferred=[4, 6],
    ),
    # -- duplicates --------------------------------------------------------
    Case(
        "same_edu_twice_in_batch",
        state(1, 2),
        [upd(3, 2), upd(3, 2)],
        [(3, APPLY, Reason.PREV_KNOWN), (3, SKIP, Reason.DUPLICATE)],
        after=state(1, 2, 3),
    ),
    Case(
        "same_edu_across_batches",
        state(1, 2, 3),
        [upd(3, 2)],
        [(3, SKIP, Reason.DUPLICATE)],
    ),
    Case(
        "replay_covered_by_snapshot",
        state(10),
        [upd(8, 6), upd(10, 8)],
        [(8, SKIP, Reason.COVERED_BY_SNAPSHOT), (10, SKIP, Reason.COVERED_BY_SNAPSHOT)],
    ),
    # -- empty prev_id -----------------------------------------------------
    Case(
        "empty_prev_id_tracked",
        state(1, 2),
        [upd(3)],
        [(3, RESYNC, Reason.EMPTY_PREV_ID)],
        resync=Reason.EMPTY_PREV_ID,
        after=state(1, 2, stale=True),
        deferred=[3],
    ),
    Case(
        "empty_prev_id_deleted_still_resyncs",
        state(1, 2),
        [upd(3, deleted=True)],
        [(3, RESYNC, Reason.EMPTY_PREV_ID)],
        resync=Reason.EMPTY_PREV_ID,
        after=state(1, 2, stale=True),
        deferred=[3],
    ),
    Case(
        "empty_prev_id_untracked",
        state(1, 2),
        [upd(3)],
        [(3, SKIP, Reason.NOT_TRACKED)],
        tracked=False,
    ),
    Case(
        "empty_prev_id_duplicate",
        state(1, 3),
        [upd(3)],
        [(3, SKIP, Reason.DUPLICATE)],
    ),
    Case(
        "empty_prev_id_covered_by_snapshot",
        state(5),
        [upd(5)],
        [(5, SKIP, Reason.COVERED_BY_SNAPSHOT)],
    ),
    # -- Synapse: snapshot stream_id is the global stream position ---------
    Case(
        "synapse_after_snapshot",
        state(100),
        [upd(104, 98)],
        [(104, APPLY, Reason.PREV_KNOWN)],
        after=state(100, 104),
    ),
    Case(
        "synapse_after_snapshot_chain_continues",
        state(100, 104),
        [upd(106, 104)],
        [(106, APPLY, Reason.PREV_KNOWN)],
        after=state(100, 104, 106),
    ),
    Case(
        "synapse_edu_sent_before_snapshot_arrives_after",
        state(100),
        [upd(98, 96), upd(104, 98)],
        [(98, SKIP, Reason.COVERED_BY_SNAPSHOT), (104, APPLY, Reason.PREV_KNOWN)],
        after=state(100, 104),
    ),
    Case(
        "synapse_gap_after_snapshot_still_detected",
        state(100),
        [upd(106, 104)],
        [(106, RESYNC, Reason.UNKNOWN_PREV_ID)],
        resync=Reason.UNKNOWN_PREV_ID,
        after=state(100, stale=True),
        deferred=[106],
        allow_hold=False,
    ),
    # -- resync pending ----------------------------------------------------
    Case(
        "stale_resyncs_every_fresh_update",
        state(1, 2, stale=True),
        [upd(2, 1), upd(3, 2), upd(4, 3)],
        [
            (2, SKIP, Reason.DUPLICATE),
            (3, RESYNC, Reason.RESYNC_PENDING),
            (4, RESYNC, Reason.RESYNC_PENDING),
        ],
        resync=Reason.RESYNC_PENDING,
        deferred=[3, 4],
    ),
    Case(
        "stale_only_duplicates",
        state(5, 6, stale=True),
        [upd(6, 5), upd(4, 3)],
        [(4, SKIP, Reason.COVERED_BY_SNAPSHOT), (6, SKIP, Reason.DUPLICATE)],
    ),
    # -- window ------------------------------------------------------------
    Case(
        "window_trimmed_to_highest_ids",
        state(0, 1, 2, 3),
        [upd(4, 3)],
        [(4, APPLY, Reason.PREV_KNOWN)],
        after=state(0, 2, 3, 4),
        window=3,
    ),
    Case(
        "window_trimmed_over_a_long_batch",
        state(0),
        [upd(1, 0), upd(2, 1), upd(3, 2), upd(4, 3), upd(5, 4)],
        [(i, APPLY, Reason.PREV_KNOWN) for i in range(1, 6)],
        after=state(0, 4, 5),
        window=2,
    ),
    Case(
        "prev_id_below_full_window",
        state(0, 5, 6, 7),
        [upd(8, 4)],
        [(8, RESYNC, Reason.PREV_ID_BELOW_WINDOW)],
        resync=Reason.PREV_ID_BELOW_WINDOW,
        after=state(0, 5, 6, 7, stale=True),
        deferred=[8],
        window=3,
    ),
    Case(
        "prev_id_below_full_window_but_covered_by_snapshot",
        state(4, 5, 6, 7),
        [upd(8, 4)],
        [(8, APPLY, Reason.PREV_KNOWN)],
        after=state(4, 6, 7, 8),
        window=3,
    ),
    Case(
        "prev_id_below_window_that_is_not_full_may_still_arrive",
        state(0, 5, 6),
        [upd(8, 4)],
        [(8, HOLD, Reason.UNKNOWN_PREV_ID)],
        held=[8],
        window=3,
    ),
    Case(
        "stream_id_below_full_window",
        state(0, 5, 6, 7),
        [upd(4, 3)],
        [(4, RESYNC, Reason.STREAM_ID_BELOW_WINDOW)],
        resync=Reason.STREAM_ID_BELOW_WINDOW,
        after=state(0, 5, 6, 7, stale=True),
        deferred=[4],
        window=3,
    ),
    Case(
        "stream_id_below_full_window_covered_by_snapshot",
        state(4, 5, 6, 7),
        [upd(4, 3)],
        [(4, SKIP, Reason.COVERED_BY_SNAPSHOT)],
        window=3,
    ),
]


def _describe(decisions: Sequence[Decision]) -> list[tuple[int, Action, Reason]]:
    return [(d.update.stream_id, d.action, d.reason) for d in decisions]


def _ids(updates: Sequence[DeviceListUpdate]) -> list[int]:
    return [u.stream_id for u in updates]


class DecideTableTests(SynchronousTestCase):
    """One test per row of ``CASES``."""

    def check(self, case: Case) -> None:
        result = decide(
            case.state,
            case.updates,
            tracked=case.tracked,
            allow_hold=case.allow_hold,
            window=case.window,
        )
        self.assertEqual(_describe(result.decisions), list(case.expected))
        self.assertEqual(result.resync, case.resync)
        if case.after is _SAME:
            self.assertIs(result.state, case.state)
        else:
            self.assertEqual(result.state, case.after)
        self.assertEqual(_ids(result.held), list(case.held))
        self.assertEqual(_ids(result.deferred), list(case.deferred))
        # every input update gets exactly one decision
        self.assertEqual(
            sorted(_ids([d.update for d in result.decisions])),
            sorted(_ids(case.updates)),
        )
        self.assertEqual(
            _ids(result.applied),
            [sid for sid, action, _ in case.expected if action is APPLY],
        )


def _make_test(case: Case) -> Callable[[DecideTableTests], None]:
    def test(self: DecideTableTests) -> None:
        self.check(case)

    test.__name__ = f"test_case_{case.name}"
    return test


for _case in CASES:
    assert not hasattr(DecideTableTests, f"test_case_{_case.name}"), _case.name
    setattr(DecideTableTests, f"test_case_{_case.name}", _make_test(_case))


class SequenceTests(SynchronousTestCase):
    """Several batches in a row, as the replication layer runs them."""

    def test_hold_then_release(self) -> None:
        """A held update is applied when its missing prev arrives next batch."""
        s = state(1)
        first = decide(s, [upd(3, 2)], tracked=True, allow_hold=True)
        self.assertEqual(_describe(first.decisions), [(3, HOLD, Reason.UNKNOWN_PREV_ID)])
        self.assertIsNone(first.resync)
        second = decide(
            first.state, [*first.held, upd(2, 1)], tracked=True, allow_hold=True
        )
        self.assertEqual(
            _describe(second.decisions),
            [(2, APPLY, Reason.PREV_KNOWN), (3, APPLY, Reason.PREV_KNOWN)],
        )
        self.assertIsNone(second.resync)
        self.assertEqual(second.held, ())
        self.assertEqual(second.state, state(1, 2, 3))

    def test_hold_then_timeout_resyncs(self) -> None:
        """A held update whose prev never comes: the flush without hold resyncs."""
        s = state(1)
        first = decide(s, [upd(4, 3), upd(5, 4)], tracked=True, allow_hold=True)
        self.assertEqual(_ids(first.held), [4, 5])
        flush = decide(first.state, first.held, tracked=True, allow_hold=False)
        self.assertEqual(
            _describe(flush.decisions),
            [
                (4, RESYNC, Reason.UNKNOWN_PREV_ID),
                (5, RESYNC, Reason.AFTER_RESYNC_TRIGGER),
            ],
        )
        self.assertEqual(flush.resync, Reason.UNKNOWN_PREV_ID)
        self.assertEqual(flush.state, state(1, stale=True))
        self.assertEqual(_ids(flush.deferred), [4, 5])

    def test_first_contact_then_chain(self) -> None:
        """Scenario 1: first EDU resyncs, the next one chains on the snapshot."""
        first = decide(None, [upd(1)], tracked=True, allow_hold=True)
        self.assertEqual(first.resync, Reason.FIRST_CONTACT)
        fresh = apply_snapshot(1)
        rerun = decide(fresh, first.deferred, tracked=True, allow_hold=True)
        self.assertEqual(
            _describe(rerun.decisions), [(1, SKIP, Reason.COVERED_BY_SNAPSHOT)]
        )
        self.assertIsNone(rerun.resync)
        nxt = decide(rerun.state, [upd(2, 1, name="new")], tracked=True, allow_hold=True)
        self.assertEqual(_describe(nxt.decisions), [(2, APPLY, Reason.PREV_KNOWN)])
        self.assertEqual(nxt.state, state(1, 2))

    def test_deferred_rerun_against_snapshot(self) -> None:
        """Scenario 7: EDUs deferred by a resync are covered by the snapshot."""
        s = state(1)
        batch = decide(
            s, [upd(2, 1), upd(4, 3), upd(5, 4)], tracked=True, allow_hold=False
        )
        self.assertEqual(batch.resync, Reason.UNKNOWN_PREV_ID)
        self.assertTrue(batch.state is not None and batch.state.stale)
        # arriving while the fetch is under way
        during = decide(batch.state, [upd(6, 5)], tracked=True, allow_hold=True)
        self.assertEqual(
            _describe(during.decisions), [(6, RESYNC, Reason.RESYNC_PENDING)]
        )
        # the snapshot was taken at position 5; 6 was produced after it
        rerun = decide(
            apply_snapshot(5),
            [*batch.deferred, *during.deferred],
            tracked=True,
            allow_hold=True,
        )
        self.assertEqual(
            _describe(rerun.decisions),
            [
                (4, SKIP, Reason.COVERED_BY_SNAPSHOT),
                (5, SKIP, Reason.COVERED_BY_SNAPSHOT),
                (6, APPLY, Reason.PREV_KNOWN),
            ],
        )
        self.assertIsNone(rerun.resync)
        self.assertEqual(rerun.state, state(5, 6))

    def test_gap_during_resync_keeps_stale(self) -> None:
        """Synapse #9866: a gap newer than the snapshot keeps the user stale."""
        batch = decide(state(1), [upd(3, 2)], tracked=True, allow_hold=False)
        assert batch.state is not None
        during = decide(batch.state, [upd(9, 8)], tracked=True, allow_hold=True)
        rerun = decide(
            apply_snapshot(3),
            [*batch.deferred, *during.deferred],
            tracked=True,
            allow_hold=False,
        )
        self.assertEqual(
            _describe(rerun.decisions),
            [
                (3, SKIP, Reason.COVERED_BY_SNAPSHOT),
                (9, RESYNC, Reason.UNKNOWN_PREV_ID),
            ],
        )
        self.assertEqual(rerun.resync, Reason.UNKNOWN_PREV_ID)
        self.assertEqual(rerun.state, state(3, stale=True))

    def test_duplicate_across_batches_changes_nothing(self) -> None:
        s = state(1)
        first = decide(s, [upd(2, 1)], tracked=True, allow_hold=True)
        again = decide(first.state, [upd(2, 1)], tracked=True, allow_hold=True)
        self.assertEqual(_describe(again.decisions), [(2, SKIP, Reason.DUPLICATE)])
        self.assertIs(again.state, first.state)


class ApiTests(SynchronousTestCase):
    def test_apply_snapshot(self) -> None:
        self.assertEqual(
            apply_snapshot(42),
            RemoteUserState(snapshot_stream_id=42, known_ids=frozenset(), stale=False),
        )

    def test_reason_values_are_stable(self) -> None:
        self.assertEqual(
            {r.value for r in Reason},
            {
                "prev_known",
                "duplicate",
                "covered_by_snapshot",
                "not_tracked",
                "first_contact",
                "resync_pending",
                "after_resync_trigger",
                "empty_prev_id",
                "unknown_prev_id",
                "prev_id_below_window",
                "stream_id_below_window",
                "prev_held",
            },
        )
        self.assertEqual(Reason.DUPLICATE, "duplicate")

    def test_supersedes(self) -> None:
        self.assertTrue(supersedes(upd(5, 4), None))
        self.assertTrue(supersedes(upd(5, 4), 4))
        self.assertFalse(supersedes(upd(5, 4), 5))
        self.assertFalse(supersedes(upd(5, 4), 6))

    def test_mixed_users_rejected(self) -> None:
        other = DeviceListUpdate(user_id="@v:remote.example", device_id="D", stream_id=2)
        with self.assertRaises(ValueError):
            decide(state(1), [upd(2, 1), other], tracked=True, allow_hold=True)

    def test_window_must_be_positive(self) -> None:
        with self.assertRaises(ValueError):
            decide(state(1), [upd(2, 1)], tracked=True, allow_hold=True, window=0)

    def test_result_is_frozen(self) -> None:
        result: BatchDecision = decide(state(1), [], tracked=True, allow_hold=True)
        self.assertEqual(result.decisions, ())
        self.assertIsNone(result.resync)
        with self.assertRaises(AttributeError):
            result.resync = Reason.DUPLICATE  # type: ignore[misc]
