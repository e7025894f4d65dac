"""Building the ``m.device_list_update`` EDUs for one destination.

Pure: the sender passes the changes still pending for a destination and what
that destination has acknowledged, and gets back the EDUs of the next
transaction plus what to store once the destination acknowledges it.

Stream ids.  Each local user has a stream of changes numbered by
:func:`next_stream_id`: 1, 2, 3, ...  A ``prev_id`` only ever names the
``stream_id`` of an EDU actually sent to (and acknowledged by) the
destination, never a change that was collapsed away or that produced no EDU,
so consuming an id without an EDU (a cross-signing upload, Synapse #7142)
cannot break a receiver's chain.

Collapsing.  Several pending changes of one (user, device) go out as one EDU:
the change with the highest stream id, which carries the device's latest
state.  The older rows are reported as ``covered`` so the caller deletes them
together with the sent one once the destination acknowledges the
transaction.

Chaining.  Per user and destination the sender keeps the set of acknowledged
ids that no acknowledged EDU has referenced yet (``unreferenced``; one id for a
server that emits in series, as this one does).  The first EDU of a user in a
batch names all of them (sorted) as ``prev_id``, or ``[]`` if nothing was ever
sent, which makes the receiver resync; every next EDU of the user names the
previous EDU's ``stream_id``.  Once acknowledged, the user's unreferenced set
is the id of its last EDU in the batch.

Limit.  A batch holds at most ``limit`` EDUs (a transaction carries at most
100).  EDUs go out in stream order across users; when the limit cuts a user's
chain, the rest of it goes out in a later batch chained from the last id sent,
so nothing beyond the limit is skipped (Synapse #11727) and ``prev_id`` stays
correct across batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from devicelist_plugin.core.models import DeviceKeys, DeviceListUpdate

EDU_LIMIT = 100


@dataclass(frozen=True)
class PendingChange:
    """A change of a local device not yet acknowledged by a destination.

    ``display_name`` and ``keys`` are the device's state as of this change;
    they are not sent for a deleted device.
    """

    user_id: str
    device_id: str
    stream_id: int
    deleted: bool = False
    display_name: Optional[str] = None
    keys: Optional[DeviceKeys] = None


@dataclass(frozen=True)
class OutboundBatch:
    # the EDUs of the next transaction, in stream order
    edus: tuple[DeviceListUpdate, ...]
    # every pending row this batch makes obsolete (delete them on ack)
    covered: tuple[PendingChange, ...]
    # the new unreferenced set of each user in the batch (store on ack)
    unreferenced_after_ack: dict[str, frozenset[int]]


def next_stream_id(last: Optional[int]) -> int:
    """The stream id of a local user's next change: 1 first, then ``last + 1``.

    Ids are strictly increasing per local user; the caller persists ``last``.
    """
    if last is None:
        return 1
    if last < 0:
        raise ValueError("last stream id must not be negative")
    return last + 1


def build_device_list_edus(
    pending: Sequence[PendingChange],
    unreferenced: Mapping[str, frozenset[int]],
    *,
    limit: int = EDU_LIMIT,
) -> OutboundBatch:
    """The next batch of EDUs for one destination; see the module docstring.

    ``unreferenced[user_id]``: the acknowledged ids no acknowledged EDU has
    referenced yet (missing or empty if nothing was ever sent for the user).
    Raises ``ValueError`` if ``limit < 1`` or if two devices of one user
    have pending changes with the same stream id.
    """
    if limit < 1:
        raise ValueError("limit must be at least 1")

    rows: dict[tuple[str, str], list[PendingChange]] = {}
    for change in pending:
        rows.setdefault((change.user_id, change.device_id), []).append(change)

    latest = [max(group, key=lambda c: c.stream_id) for group in rows.values()]

    owners: dict[tuple[str, int], str] = {}
    for change in latest:
        other = owners.setdefault((change.user_id, change.stream_id), change.device_id)
        if other != change.device_id:
            raise ValueError(
                f"devices {other!r} and {change.device_id!r} of {change.user_id!r} "
                f"share stream id {change.stream_id}"
            )

    latest.sort(key=lambda c: (c.stream_id, c.user_id, c.device_id))
    chosen = latest[:limit]

    last_sent: dict[str, int] = {}
    edus: list[DeviceListUpdate] = []
    for change in chosen:
        user = change.user_id
        if user in last_sent:
            prev_ids: tuple[int, ...] = (last_sent[user],)
        else:
            prev_ids = tuple(sorted(unreferenced.get(user, frozenset())))
        edus.append(
            DeviceListUpdate(
                user_id=user,
                device_id=change.device_id,
                stream_id=change.stream_id,
                prev_ids=prev_ids,
                deleted=change.deleted,
                display_name=None if change.deleted else change.display_name,
                keys=None if change.deleted else change.keys,
            )
        )
        last_sent[user] = change.stream_id

    covered = sorted(
        (
            row
            for change in chosen
            for row in rows[(change.user_id, change.device_id)]
        ),
        key=lambda c: (c.stream_id, c.user_id, c.device_id),
    )

    return OutboundBatch(
        edus=tuple(edus),
        covered=tuple(covered),
        unreferenced_after_ack={
            user: frozenset({stream_id}) for user, stream_id in last_sent.items()
        },
    )
