"""The inbound decision: what to do with a batch of a remote user's device-list EDUs.

This module is pure: given what we know about one remote user's device-list
stream and a batch of ``m.device_list_update`` EDUs for that user, :func:`decide`
says, for each EDU, whether to apply it to the cache, skip it, hold it back
for a little while, or throw the cache away and resync from
``GET /_matrix/federation/v1/user/devices/{userId}``.  The caller (the
replication layer) does the I/O: it persists the stale mark, applies the EDUs,
schedules the fetch and the hold timeout.

What we remember per remote user (:class:`RemoteUserState`)
-----------------------------------------------------------

* ``snapshot_stream_id``: the ``stream_id`` of the last ``/user/devices``
  answer applied.  Everything the sender did up to that position is in the
  cache.
* ``known_ids``: the stream ids of the EDUs applied since, limited to the
  ``window`` highest (so the state of a chatty user stays bounded).  Once the
  window is full, ids below its lowest member have been forgotten: we can no
  longer tell "applied long ago" from "never received".  (A window that is
  not full has forgotten nothing since the snapshot, so use one ``window``
  per deployment; shrinking it is safe, it only costs resyncs.)
* ``stale``: a resync is pending; the cache may miss an update.

``None`` instead of a state means we have no cache at all for the user.

Policy
------

Each row says what happens to one EDU of the batch, checked top to bottom.
The batch is processed in ``stream_id`` order, except that an update comes
after any update of the batch its ``prev_id`` names (a topological order: a
clustered sender's writers may allocate ids in one order and emit them in
another).  An id seen twice in the batch is decided once.

=========================================  ======  ==========================  =================================
condition                                  action  reason                      why
=========================================  ======  ==========================  =================================
the user shares no room with us            SKIP    ``not_tracked``             we don't cache lists we are not
(not tracked)                                                                  told about (Synapse #13651)
same ``stream_id`` earlier in this batch   SKIP    ``duplicate``               stream ids are unique per user
``stream_id`` in ``known_ids``             SKIP    ``duplicate``               already applied (replay, retry)
``stream_id <= snapshot_stream_id``        SKIP    ``covered_by_snapshot``     the snapshot holds this change or
                                                                               a later one (see below)
no cache (state is ``None``)               RESYNC  ``first_contact``           nothing to apply an increment to
a resync is pending (``stale``)            RESYNC  ``resync_pending``          the cache may miss an update; the
                                                                               EDU is re-run on the snapshot
a RESYNC was decided earlier in the batch  RESYNC  ``after_resync_trigger``    re-run on the snapshot
unknown ``stream_id`` below a full         RESYNC  ``stream_id_below_window``  an old replay or a real gap: we
window's lowest id, above the snapshot                                         can't tell, so never guess
empty ``prev_id`` (``deleted`` or not)     RESYNC  ``empty_prev_id``           no continuity claimed (see below)
a ``prev_id`` below a full window's        RESYNC  ``prev_id_below_window``    can't be proven applied
lowest id, above the snapshot
a ``prev_id`` not recognised that may      HOLD    ``unknown_prev_id``         with ``allow_hold`` (reordering);
still arrive                               RESYNC  ``unknown_prev_id``         without: a lost update
a ``prev_id`` names an update HELD         HOLD    ``prev_held``               waits for its predecessor
earlier in this batch
every ``prev_id`` recognised               APPLY   ``prev_known``              the chain is complete
=========================================  ======  ==========================  =================================

A ``prev_id`` is *recognised* when it is in ``known_ids``, is ``<=
snapshot_stream_id``, or is the ``stream_id`` of an update APPLIED earlier in
the same batch (Synapse processes a user's pending EDUs as one batch and a
``prev_id`` may name an earlier EDU of it).  *All* ``prev_id`` s must be
recognised: several of them mean a clustered sender whose writers emitted
concurrently, and the update depends on every branch.

Why ``<=`` against the snapshot.  Deployed servers' stream ids only grow.
Synapse's ``/user/devices`` ``stream_id`` is its *global* device-stream
position, not the id of the user's last EDU, so the next EDU's ``prev_id``
rarely equals it (snapshot 100, next EDU 104 with ``prev_id [98]``).  An EDU or
a ``prev_id`` at or below the snapshot position is a change the snapshot
already reflects, so comparing with ``<=`` avoids a resync after every
snapshot without ever accepting a gap: every change after the snapshot
position has a larger id and must chain to something we recognise.

Why an empty ``prev_id`` resyncs, even for ``deleted: true``.  The sender does
not claim continuity with anything we hold: Synapse sends ``[]`` as the first
EDU to a destination and after pruning old pokes and expects the receiver to
resync (Synapse #7173); the Conduit family sends a placeholder with ``[]`` only
to force one.  A gap cannot be excluded, so we resync; a deletion is no
exception (Dendrite accepts it, but the EDUs before it may still be lost).  An
empty ``prev_id`` that is a duplicate or covered by the snapshot is skipped
like any other: it carries nothing new.

Why HOLD.  Transactions can be retried and reordered across destinations'
queues and worker processes, so an EDU may arrive before its predecessor.
Holding it briefly (the caller re-submits held EDUs with the next batch and,
after a timeout, decides once more with ``allow_hold=False``) avoids a full
fetch for mere reordering.  An update is held only when the missing id *may
still arrive*: an unknown id above everything the state has forgotten.

Once a RESYNC is decided, every later non-duplicate update of the batch is
RESYNC ``after_resync_trigger``, and updates HELD before the trigger become
RESYNC too (keeping their own reason): all of them are returned in
``deferred`` to be re-run by the caller against
:func:`apply_snapshot` ``(snapshot.stream_id)`` once the snapshot is in.  The
trigger itself is deferred as well; normally the snapshot covers it and the
re-run skips it.  APPLY decisions made before the trigger stand.

The returned state has the applied ids added to ``known_ids`` (trimmed to the
``window`` highest) and ``stale`` set when a resync is needed, so the caller
can persist the stale mark before doing anything else.

Applying an update.  An APPLY replaces the cached entry of that one device,
unless the cache holds the device at a higher stream id (see
:func:`supersedes`).  With a single writer that never happens; with clustered
senders two writers may change the same device concurrently and the EDUs
may arrive in either order.  Devices taken from a snapshot count as being at
the snapshot's stream id; a deletion must be remembered with its stream id
until the next snapshot.
"""

from __future__ import annotations

import enum
import heapq
from dataclasses import dataclass
from typing import Optional, Sequence

from devicelist_plugin.core.models import DeviceListUpdate

DEFAULT_WINDOW = 500


@dataclass(frozen=True)
class RemoteUserState:
    """What we know about one remote user's device-list stream."""

    # the stream_id of the last /user/devices snapshot applied; None if never
    snapshot_stream_id: Optional[int]
    # stream ids applied since the snapshot (the window highest)
    known_ids: frozenset[int]
    # a resync is pending
    stale: bool


class Action(enum.Enum):
    APPLY = "apply"
    SKIP = "skip"
    HOLD = "hold"
    RESYNC = "resync"


class Reason(str, enum.Enum):
    """Why an update got its action.  The values are stable (logs, metrics)."""

    PREV_KNOWN = "prev_known"
    DUPLICATE = "duplicate"
    COVERED_BY_SNAPSHOT = "covered_by_snapshot"
    NOT_TRACKED = "not_tracked"
    FIRST_CONTACT = "first_contact"
    RESYNC_PENDING = "resync_pending"
    AFTER_RESYNC_TRIGGER = "after_resync_trigger"
    EMPTY_PREV_ID = "empty_prev_id"
    UNKNOWN_PREV_ID = "unknown_prev_id"
    PREV_ID_BELOW_WINDOW = "prev_id_below_window"
    STREAM_ID_BELOW_WINDOW = "stream_id_below_window"
    PREV_HELD = "prev_held"


@dataclass(frozen=True)
class Decision:
    update: DeviceListUpdate
    action: Action
    reason: Reason


@dataclass(frozen=True)
class BatchDecision:
    # one per input update, in processing order (see _processing_order)
    decisions: tuple[Decision, ...]
    # why a resync is needed, None if this batch needs none
    resync: Optional[Reason]
    # the state after the APPLY decisions (stale set if resync); None if no cache
    state: Optional[RemoteUserState]
    # updates to re-submit with the next batch
    held: tuple[DeviceListUpdate, ...]
    # updates to re-run against apply_snapshot(...) once the resync is done
    deferred: tuple[DeviceListUpdate, ...]

    @property
    def applied(self) -> tuple[DeviceListUpdate, ...]:
        """The updates to apply to the cache, in order."""
        return tuple(d.update for d in self.decisions if d.action is Action.APPLY)


def apply_snapshot(snapshot_stream_id: int) -> RemoteUserState:
    """The state right after a ``/user/devices`` answer has been stored."""
    return RemoteUserState(
        snapshot_stream_id=snapshot_stream_id, known_ids=frozenset(), stale=False
    )


def supersedes(update: DeviceListUpdate, cached_stream_id: Optional[int]) -> bool:
    """Whether an APPLY-ed update replaces the cached entry of its device.

    ``cached_stream_id`` is the stream id at which the cache last changed that
    device (the update's id, or the snapshot's for a device from a snapshot),
    or ``None`` if the cache knows nothing of it.
    """
    return cached_stream_id is None or update.stream_id > cached_stream_id


def _trim(ids: frozenset[int], window: int) -> frozenset[int]:
    if len(ids) <= window:
        return ids
    return frozenset(sorted(ids)[-window:])


def _processing_order(updates: Sequence[DeviceListUpdate]) -> list[DeviceListUpdate]:
    """The batch in stream order, each update after the ones it names.

    A topological order of the batch's ``prev_id`` edges, smallest
    ``stream_id`` first among the ready ones; copies of one ``stream_id``
    stay together (first copy first).  A cycle (malformed) is broken at its
    smallest ``stream_id``.
    """
    copies: dict[int, list[DeviceListUpdate]] = {}
    for u in sorted(updates, key=lambda u: u.stream_id):
        copies.setdefault(u.stream_id, []).append(u)
    ids = sorted(copies)
    waiting_on = {
        sid: {p for p in copies[sid][0].prev_ids if p in copies and p != sid}
        for sid in ids
    }
    dependents: dict[int, list[int]] = {}
    for sid in ids:
        for prev in waiting_on[sid]:
            dependents.setdefault(prev, []).append(sid)
    ready = [sid for sid in ids if not waiting_on[sid]]
    heapq.heapify(ready)
    done: set[int] = set()
    order: list[int] = []
    while len(order) < len(ids):
        if ready:
            sid = heapq.heappop(ready)
            if sid in done:
                continue
        else:
            sid = min(s for s in ids if s not in done)
        done.add(sid)
        order.append(sid)
        for dependent in dependents.get(sid, ()):
            waiting_on[dependent].discard(sid)
            if not waiting_on[dependent] and dependent not in done:
                heapq.heappush(ready, dependent)
    return [u for sid in order for u in copies[sid]]


def decide(
    state: Optional[RemoteUserState],
    updates: Sequence[DeviceListUpdate],
    *,
    tracked: bool,
    allow_hold: bool,
    window: int = DEFAULT_WINDOW,
) -> BatchDecision:
    """Decide what to do with a batch of one remote user's EDUs.

    See the module docstring for the policy.  ``updates`` may hold updates
    held from an earlier batch together with new ones, in any order.  Raises
    ``ValueError`` if the updates name more than one user or ``window < 1``.
    """
    if window < 1:
        raise ValueError("window must be at least 1")
    if len({u.user_id for u in updates}) > 1:
        raise ValueError("updates must all be for one user")

    ordered = _processing_order(updates)

    if not tracked:
        return BatchDecision(
            decisions=tuple(
                Decision(u, Action.SKIP, Reason.NOT_TRACKED) for u in ordered
            ),
            resync=None,
            state=state,
            held=(),
            deferred=(),
        )

    known: frozenset[int] = state.known_ids if state is not None else frozenset()
    snapshot = state.snapshot_stream_id if state is not None else None
    # Below this id the state has forgotten what it applied.  Until the window
    # is full nothing was forgotten since the snapshot.
    floor: Optional[int] = min(known) if len(known) >= window else None

    def covered(stream_id: int) -> bool:
        return snapshot is not None and stream_id <= snapshot

    def below_floor(stream_id: int) -> bool:
        return floor is not None and stream_id < floor and not covered(stream_id)

    # a state-wide reason to resync every fresh update
    blanket: Optional[Reason] = None
    if state is None:
        blanket = Reason.FIRST_CONTACT
    elif state.stale:
        blanket = Reason.RESYNC_PENDING
    # why this batch needs a resync; set by the first update that needs one
    resync: Optional[Reason] = None

    seen: set[int] = set()
    applied: set[int] = set()
    held_ids: set[int] = set()
    decisions: list[Decision] = []

    for u in ordered:
        sid = u.stream_id
        if sid in seen or sid in known:
            decisions.append(Decision(u, Action.SKIP, Reason.DUPLICATE))
            continue
        seen.add(sid)
        if covered(sid):
            decisions.append(Decision(u, Action.SKIP, Reason.COVERED_BY_SNAPSHOT))
            continue
        if blanket is not None:
            resync = blanket
            decisions.append(Decision(u, Action.RESYNC, blanket))
            continue
        if resync is not None:
            decisions.append(Decision(u, Action.RESYNC, Reason.AFTER_RESYNC_TRIGGER))
            continue

        reason: Reason
        action: Action
        if below_floor(sid):
            action, reason = Action.RESYNC, Reason.STREAM_ID_BELOW_WINDOW
        elif not u.prev_ids:
            action, reason = Action.RESYNC, Reason.EMPTY_PREV_ID
        else:
            below = unknown = waiting = False
            for prev in u.prev_ids:
                if prev in known or prev in applied or covered(prev):
                    continue
                if prev in held_ids:
                    waiting = True
                elif below_floor(prev):
                    below = True
                else:
                    unknown = True
            if below:
                action, reason = Action.RESYNC, Reason.PREV_ID_BELOW_WINDOW
            elif unknown:
                action = Action.HOLD if allow_hold else Action.RESYNC
                reason = Reason.UNKNOWN_PREV_ID
            elif waiting:
                # only reachable with allow_hold: without it the first
                # unknown prev_id triggered a resync and nothing is held
                action, reason = Action.HOLD, Reason.PREV_HELD
            else:
                action, reason = Action.APPLY, Reason.PREV_KNOWN

        if action is Action.APPLY:
            applied.add(sid)
        elif action is Action.HOLD:
            held_ids.add(sid)
        else:
            resync = reason
        decisions.append(Decision(u, action, reason))

    if resync is not None:
        # whatever was held waits for the snapshot instead
        decisions = [
            Decision(d.update, Action.RESYNC, d.reason)
            if d.action is Action.HOLD
            else d
            for d in decisions
        ]

    held = tuple(d.update for d in decisions if d.action is Action.HOLD)
    deferred = tuple(d.update for d in decisions if d.action is Action.RESYNC)

    new_state: Optional[RemoteUserState]
    if state is None:
        new_state = None
    else:
        new_state = RemoteUserState(
            snapshot_stream_id=snapshot,
            known_ids=_trim(known | applied, window),
            stale=state.stale or resync is not None,
        )
        if new_state == state:
            new_state = state

    return BatchDecision(
        decisions=tuple(decisions),
        resync=resync,
        state=new_state,
        held=held,
        deferred=deferred,
    )
