"""Convergence of the inbound decision over a faulty network (hypothesis).

A simulated sender keeps one user's true device list and produces EDUs the
way the outbound builder does (``build_device_list_edus``): in series, or from
two concurrent "writers" that start from the same unreferenced set, which
makes the next EDU carry several ``prev_id`` s.  Its stream ids are positions
in a global stream that other users also advance, so its ``/user/devices``
``stream_id`` is usually not the id of the user's last EDU (as Synapse's).
The sender may also "prune" (forget what it sent, so its next EDU has an
empty ``prev_id``, as Synapse after pruning).

The network drops, duplicates, delays and reorders EDUs.  The receiver
follows ``decide``: APPLY updates its cache (unless ``supersedes`` says the
cache holds a newer state of the device), HOLD keeps the update for the next
batch, RESYNC fetches the sender's true snapshot and re-runs the deferred
updates against ``apply_snapshot``.

Properties:

* once the faults stop (the sender makes one more change, sends everything,
  and every EDU still in flight arrives, processed with ``allow_hold=False``),
  the receiver's cache equals the true device list; no resync ever needs a
  second fetch for the updates it deferred;
* without drops (duplicates and reorders within one delivery), nothing is ever
  held and the first contact is the only resync.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Optional, Sequence

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from devicelist_plugin.core.inbound import (
    BatchDecision,
    Reason,
    RemoteUserState,
    apply_snapshot,
    decide,
    supersedes,
)
from devicelist_plugin.core.models import DeviceListUpdate
from devicelist_plugin.core.outbound import (
    EDU_LIMIT,
    PendingChange,
    build_device_list_edus,
)

USER = "@u:sender.example"
DEVICES = ("D1", "D2", "D3")
NAMES = (None, "phone", "laptop")


@dataclass
class Sender:
    """One user of the remote server, and its outbound queue to us."""

    # global device-stream position (other users advance it too)
    position: int = 0
    # the true device list: device id -> display name
    devices: dict[str, Optional[str]] = field(default_factory=dict)
    pending: list[PendingChange] = field(default_factory=list)
    # ids delivered to us that no EDU has referenced yet
    unreferenced: frozenset[int] = frozenset()
    # EDUs sent and not yet delivered, in emission order
    network: list[DeviceListUpdate] = field(default_factory=list)

    def change(self, device: str, deleted: bool, name: Optional[str], gap: int) -> None:
        self.position += gap
        if deleted:
            self.devices.pop(device, None)
        else:
            self.devices[device] = name
        self.pending.append(
            PendingChange(
                user_id=USER,
                device_id=device,
                stream_id=self.position,
                deleted=deleted,
                display_name=None if deleted else name,
            )
        )

    def bump(self, n: int) -> None:
        """Other users' changes advance the global stream."""
        self.position += n

    def prune(self) -> None:
        """Forget what was sent: the next EDU has ``prev_id: []``."""
        self.unreferenced = frozenset()

    def _drain(
        self, rows: Sequence[PendingChange], start: frozenset[int], limit: int
    ) -> tuple[list[DeviceListUpdate], Optional[frozenset[int]]]:
        """One writer sends ``rows`` in batches; the transport acks each."""
        remaining = list(rows)
        unreferenced: dict[str, frozenset[int]] = {USER: start}
        sent: list[DeviceListUpdate] = []
        last: Optional[frozenset[int]] = None
        while remaining:
            batch = build_device_list_edus(remaining, unreferenced, limit=limit)
            for row in batch.covered:
                remaining.remove(row)
            unreferenced.update(batch.unreferenced_after_ack)
            last = batch.unreferenced_after_ack[USER]
            sent.extend(batch.edus)
        return sent, last

    def send(self, limit: int) -> None:
        """A single writer sends one transaction."""
        batch = build_device_list_edus(
            self.pending, {USER: self.unreferenced}, limit=limit
        )
        for row in batch.covered:
            self.pending.remove(row)
        self.unreferenced = batch.unreferenced_after_ack.get(USER, self.unreferenced)
        self.network.extend(batch.edus)

    def send_concurrently(self, split: Sequence[bool], limit: int) -> None:
        """Two writers send disjoint parts of the queue from the same start."""
        first = [row for row, mine in zip(self.pending, split) if mine]
        second = [row for row, mine in zip(self.pending, split) if not mine]
        sent1, last1 = self._drain(first, self.unreferenced, limit)
        sent2, last2 = self._drain(second, self.unreferenced, limit)
        if last1 is not None or last2 is not None:
            self.unreferenced = (last1 or frozenset()) | (last2 or frozenset())
        self.pending = []
        self.network.extend(sent1)
        self.network.extend(sent2)

    def send_all(self) -> None:
        while self.pending:
            self.send(EDU_LIMIT)

    def snapshot(self) -> tuple[int, dict[str, Optional[str]]]:
        """``GET /user/devices``: the true list at the current position."""
        return self.position, dict(self.devices)


@dataclass
class CacheEntry:
    stream_id: int
    present: bool
    name: Optional[str]


@dataclass
class Receiver:
    sender: Sender
    window: int
    state: Optional[RemoteUserState] = None
    cache: dict[str, CacheEntry] = field(default_factory=dict)
    held: list[DeviceListUpdate] = field(default_factory=list)
    resyncs: list[Reason] = field(default_factory=list)
    ever_held: bool = False

    def _apply(self, result: BatchDecision) -> None:
        for update in result.applied:
            entry = self.cache.get(update.device_id)
            if supersedes(update, entry.stream_id if entry else None):
                self.cache[update.device_id] = CacheEntry(
                    update.stream_id, not update.deleted, update.display_name
                )

    def receive(self, updates: Sequence[DeviceListUpdate], allow_hold: bool) -> None:
        result = decide(
            self.state,
            [*self.held, *updates],
            tracked=True,
            allow_hold=allow_hold,
            window=self.window,
        )
        fetches = 0
        while True:
            self._apply(result)
            self.state = result.state
            self.held = list(result.held)
            self.ever_held = self.ever_held or bool(result.held)
            if result.resync is None:
                break
            # the stale mark is set before the fetch
            assert self.state is None or self.state.stale
            fetches += 1
            # the updates deferred by a resync never need a second fetch
            assert fetches <= 1, f"second fetch for {result.resync}"
            self.resyncs.append(result.resync)
            position, devices = self.sender.snapshot()
            self.cache = {
                device: CacheEntry(position, True, name)
                for device, name in devices.items()
            }
            self.state = apply_snapshot(position)
            result = decide(
                self.state,
                result.deferred,
                tracked=True,
                allow_hold=allow_hold,
                window=self.window,
            )

    def devices(self) -> dict[str, Optional[str]]:
        return {d: e.name for d, e in self.cache.items() if e.present}


# -- scenarios -----------------------------------------------------------------

# (device, deleted, display name, stream id gap)
Change = tuple[str, bool, Optional[str], int]


@dataclass(frozen=True)
class Round:
    """What happens in one step of a simulated run."""

    # the user's device changes
    changes: tuple[Change, ...]
    # other users' changes advancing the global stream
    bump: int
    # how the queue goes out: not at all, by one writer, by two concurrently
    send: str
    # EDUs per transaction
    limit: int
    # the sender forgets what it sent (next EDU has prev_id [])
    prune: bool
    # how many in-flight EDUs the network delivers (faulty run)
    deliver: int
    # False: the receiver's hold timeout fired
    allow_hold: bool


change_st = st.tuples(
    st.sampled_from(DEVICES), st.booleans(), st.sampled_from(NAMES), st.integers(1, 3)
)


def rounds(*, prune: bool) -> st.SearchStrategy[list[Round]]:
    return st.lists(
        st.builds(
            Round,
            changes=st.lists(change_st, max_size=3).map(tuple),
            bump=st.integers(0, 3),
            send=st.sampled_from(["none", "single", "single", "concurrent"]),
            limit=st.integers(1, 4),
            prune=st.sampled_from([False] * 9 + [True]) if prune else st.just(False),
            deliver=st.integers(0, 5),
            allow_hold=st.sampled_from([True, True, True, False]),
        ),
        min_size=1,
        max_size=40,
    )


def run_sender(sender: Sender, step: Round, rnd: random.Random) -> None:
    for device, deleted, name, gap in step.changes:
        sender.change(device, deleted, name, gap)
    sender.bump(step.bump)
    if step.send == "single":
        sender.send(step.limit)
    elif step.send == "concurrent":
        split = [rnd.random() < 0.5 for _ in sender.pending]
        sender.send_concurrently(split, step.limit)
    if step.prune:
        sender.prune()


class ConvergenceTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(
        steps=rounds(prune=True),
        drop_rate=st.sampled_from([0.0, 0.0, 0.05, 0.2, 0.5]),
        dup_rate=st.sampled_from([0.0, 0.1, 0.3]),
        window=st.sampled_from([2, 3, 5, 500]),
        rnd=st.randoms(use_true_random=False),
    )
    def test_converges_after_faults_stop(
        self,
        steps: list[Round],
        drop_rate: float,
        dup_rate: float,
        window: int,
        rnd: random.Random,
    ) -> None:
        sender = Sender()
        receiver = Receiver(sender, window)

        for step in steps:
            run_sender(sender, step, rnd)
            # any in-flight EDUs arrive (delay and reordering across batches)
            count = min(step.deliver, len(sender.network))
            picked = sorted(rnd.sample(range(len(sender.network)), count), reverse=True)
            batch: list[DeviceListUpdate] = []
            for index in picked:
                edu = sender.network.pop(index)
                if rnd.random() < drop_rate:
                    continue
                batch.append(edu)
                if rnd.random() < dup_rate:
                    # a copy now, or one still in flight for later
                    if rnd.random() < 0.5:
                        batch.append(edu)
                    else:
                        sender.network.append(edu)
            rnd.shuffle(batch)
            receiver.receive(batch, step.allow_hold)

        # the faults stop: one more change, everything sent and delivered,
        # and the hold timeout flushes whatever is held
        sender.change("FINAL", False, "final", 1)
        sender.send_all()
        final = list(sender.network)
        sender.network.clear()
        rnd.shuffle(final)
        receiver.receive(final, allow_hold=False)

        self.assertEqual(receiver.held, [])
        assert receiver.state is not None
        self.assertFalse(receiver.state.stale)
        self.assertEqual(receiver.devices(), sender.devices)
        self.assertLessEqual(receiver.resyncs.count(Reason.FIRST_CONTACT), 1)

    @settings(max_examples=300, deadline=None)
    @given(
        steps=rounds(prune=False),
        dup_rate=st.sampled_from([0.0, 0.2, 0.5]),
        rnd=st.randoms(use_true_random=False),
    )
    def test_no_resync_without_drops(
        self,
        steps: list[Round],
        dup_rate: float,
        rnd: random.Random,
    ) -> None:
        sender = Sender()
        receiver = Receiver(sender, window=500)
        previous: list[DeviceListUpdate] = []

        def deliver() -> None:
            nonlocal previous
            # everything in flight arrives in one batch, in any order, with
            # duplicates from this batch and the one before
            batch = list(sender.network)
            sender.network.clear()
            extra = [edu for edu in batch + previous if rnd.random() < dup_rate]
            previous = batch
            batch.extend(extra)
            rnd.shuffle(batch)
            receiver.receive(batch, allow_hold=True)
            self.assertEqual(receiver.held, [])

        for step in steps:
            run_sender(sender, step, rnd)
            if step.deliver:
                deliver()
        sender.send_all()
        deliver()

        self.assertFalse(receiver.ever_held)
        self.assertIn(receiver.resyncs, ([], [Reason.FIRST_CONTACT]))
        if receiver.state is None:
            # nothing was ever sent: no contact, no cache
            self.assertEqual(receiver.cache, {})
        else:
            self.assertEqual(receiver.devices(), sender.devices)


class SimulationSanityTests(SynchronousTestCase):
    """The simulation itself does what the properties rely on."""

    def test_concurrent_writers_produce_multiple_prev_ids(self) -> None:
        sender = Sender()
        sender.change("D1", False, "a", 1)
        sender.send(EDU_LIMIT)
        sender.change("D1", False, "b", 1)
        sender.change("D2", False, "c", 1)
        sender.send_concurrently([True, False], EDU_LIMIT)
        sender.change("D3", False, "d", 1)
        sender.send(EDU_LIMIT)
        self.assertEqual(
            [(e.device_id, e.stream_id, e.prev_ids) for e in sender.network],
            [("D1", 1, ()), ("D1", 2, (1,)), ("D2", 3, (1,)), ("D3", 4, (2, 3))],
        )

    def test_snapshot_is_global_position(self) -> None:
        sender = Sender()
        sender.change("D1", False, "a", 2)
        sender.bump(5)
        self.assertEqual(sender.snapshot(), (7, {"D1": "a"}))

    def test_lost_edu_detected_by_next_one(self) -> None:
        sender = Sender()
        receiver = Receiver(sender, window=500)
        sender.change("D1", False, "a", 1)
        sender.send(EDU_LIMIT)
        receiver.receive(sender.network, allow_hold=True)
        sender.network.clear()
        self.assertEqual(receiver.resyncs, [Reason.FIRST_CONTACT])
        sender.change("D2", False, "b", 2)
        sender.send(EDU_LIMIT)
        sender.network.clear()  # lost
        sender.change("D2", False, "c", 2)
        sender.send(EDU_LIMIT)
        receiver.receive(sender.network, allow_hold=True)
        self.assertEqual(len(receiver.held), 1)
        receiver.receive([], allow_hold=False)
        self.assertEqual(
            receiver.resyncs, [Reason.FIRST_CONTACT, Reason.UNKNOWN_PREV_ID]
        )
        self.assertEqual(receiver.devices(), {"D1": "a", "D2": "c"})

    def test_concurrent_changes_of_one_device_arrive_reversed(self) -> None:
        """The older state of a device, applied late, does not replace the newer."""
        sender = Sender()
        receiver = Receiver(sender, window=500)
        sender.change("D1", False, "a", 1)
        sender.send(EDU_LIMIT)
        receiver.receive(sender.network, allow_hold=True)
        sender.network.clear()
        sender.change("D1", False, "b", 1)
        sender.change("D1", False, "c", 1)
        sender.send_concurrently([True, False], EDU_LIMIT)
        older, newer = sender.network
        self.assertEqual((older.stream_id, older.prev_ids), (2, (1,)))
        self.assertEqual((newer.stream_id, newer.prev_ids), (3, (1,)))
        receiver.receive([newer], allow_hold=True)
        receiver.receive([older], allow_hold=True)
        self.assertEqual(receiver.resyncs, [Reason.FIRST_CONTACT])
        self.assertEqual(receiver.devices(), {"D1": "c"})
        self.assertEqual(sender.devices, {"D1": "c"})

    def test_lost_branch_below_full_window_resyncs(self) -> None:
        """A prev_id the window can no longer vouch for is never accepted."""
        for window, reasons in [
            (2, [Reason.PREV_ID_BELOW_WINDOW]),
            # the window still remembers everything since the snapshot: the
            # missing EDU may still come, so it is held, then the hold times out
            (500, [Reason.UNKNOWN_PREV_ID]),
        ]:
            sender = Sender()
            receiver = Receiver(sender, window=window)
            sender.change("D1", False, "a", 1)
            sender.send(EDU_LIMIT)
            receiver.receive(sender.network, allow_hold=True)
            sender.network.clear()
            sender.change("D2", False, "x", 1)
            sender.change("D3", False, "y", 1)
            sender.change("D1", False, "z", 1)
            # writer 1 sends D2@2, writer 2 sends D3@3 then D1@4
            sender.send_concurrently([True, False, False], EDU_LIMIT)
            lost, *branch = sender.network
            self.assertEqual((lost.device_id, lost.stream_id), ("D2", 2))
            sender.network.clear()
            sender.change("D1", False, "w", 1)
            sender.send(EDU_LIMIT)
            (last,) = sender.network
            self.assertEqual(last.prev_ids, (2, 4))
            receiver.receive(branch, allow_hold=True)
            receiver.receive([last], allow_hold=True)
            receiver.receive([], allow_hold=False)
            self.assertEqual(receiver.resyncs, [Reason.FIRST_CONTACT, *reasons])
            self.assertEqual(receiver.devices(), {"D1": "w", "D2": "x", "D3": "y"})

    def test_writer_emitting_an_older_id_after_a_newer_one(self) -> None:
        """prev_id may name a higher stream_id; the batch is ordered by prev."""
        sender = Sender()
        receiver = Receiver(sender, window=500)
        sender.change("D1", False, "a", 1)
        sender.send(1)
        receiver.receive(sender.network, allow_hold=True)
        sender.network.clear()
        sender.change("D1", False, "b", 1)
        sender.change("D2", False, "x", 1)
        sender.change("D1", False, "c", 1)
        # D2@3 goes first (D1's latest change is 4)
        sender.send(1)
        # the rest of the queue, D1@2 and D1@4, split between two writers
        sender.send_concurrently([True, False], EDU_LIMIT)
        self.assertEqual(
            [(e.device_id, e.stream_id, e.prev_ids) for e in sender.network],
            [("D2", 3, (1,)), ("D1", 2, (3,)), ("D1", 4, (3,))],
        )
        receiver.receive(list(reversed(sender.network)), allow_hold=True)
        self.assertEqual(receiver.held, [])
        self.assertEqual(receiver.resyncs, [Reason.FIRST_CONTACT])
        self.assertEqual(receiver.devices(), {"D1": "c", "D2": "x"})
