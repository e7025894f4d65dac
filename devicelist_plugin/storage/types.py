"""Rows and results exchanged with the store: frozen, typed, JSON already decoded."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional, Union

from devicelist_plugin.core.models import CrossSigningKey, DeviceListUpdate, RemoteDevice

JsonDict = dict[str, Any]
# A one-time or fallback key as uploaded: a bare base64 string for
# ``curve25519``, an object with ``key`` and ``signatures`` for
# ``signed_curve25519``.
KeyJson = Any

StreamKind = Literal["device", "signing_key"]
KIND_DEVICE: StreamKind = "device"
KIND_SIGNING_KEY: StreamKind = "signing_key"

# Cross-signing key usages.
CrossSigningUsage = Literal["master", "self_signing", "user_signing"]
CROSS_SIGNING_USAGES: tuple[CrossSigningUsage, ...] = ("master", "self_signing", "user_signing")
# The usages that are federated (``m.signing_key_update``, ``/user/devices``).
FEDERATED_CROSS_SIGNING_USAGES: tuple[CrossSigningUsage, ...] = ("master", "self_signing")


@dataclass(frozen=True)
class LocalDevice:
    """A device of a local user."""

    user_id: str
    device_id: str
    display_name: Optional[str]
    # the DeviceKeys object the client uploaded, or None before any upload
    keys_json: Optional[JsonDict]
    created_ts: int
    last_seen_ts: Optional[int] = None


@dataclass(frozen=True)
class KeyedDevice:
    """A local device that has uploaded device keys, as other servers see it."""

    device_id: str
    display_name: Optional[str]
    # the DeviceKeys object as stored: canonical JSON text (compact, sorted
    # keys, UTF-8), so that big answers can be spliced without decoding it
    keys_text: str

    @property
    def keys_json(self) -> JsonDict:
        """The DeviceKeys object, freshly decoded."""
        value: JsonDict = json.loads(self.keys_text)
        return value


@dataclass(frozen=True)
class LocalUserKeys:
    """What other servers see of a local user's devices and keys, read at once.

    ``stream_id`` is the user's last stream id when this was read (0 if the
    user never had a change): the state below includes every change up to it
    and none after it.
    """

    user_id: str
    stream_id: int
    # the devices that have uploaded device keys, ordered by device id
    devices: tuple[KeyedDevice, ...]
    # the user's cross-signing keys by usage, as uploaded
    cross_signing_keys: Mapping[str, JsonDict]
    # stored signatures of the user's devices and cross-signing keys made by
    # the user (and, when asked for, by one other local user)
    signatures: tuple["CrossSigningSignature", ...]


@dataclass(frozen=True)
class StreamChange:
    """One entry of a local user's device-list stream."""

    user_id: str
    stream_id: int
    # the device that changed; None for a change of the cross-signing keys
    device_id: Optional[str]
    kind: StreamKind
    ts: int


@dataclass(frozen=True)
class PendingRow:
    """An outbound update still to be sent to a destination.

    Several changes of one device are collapsed into one row carrying the
    latest stream id.  ``device_id`` is None for a pending
    ``m.signing_key_update`` of the user.
    """

    user_id: str
    device_id: Optional[str]
    stream_id: int

    @property
    def kind(self) -> StreamKind:
        return KIND_SIGNING_KEY if self.device_id is None else KIND_DEVICE


@dataclass(frozen=True)
class CrossSigningSignature:
    """A signature uploaded by ``signer_user_id`` with ``signer_key_id``.

    ``target_id`` is a device id, or the key id (the public key) of a
    cross-signing key of ``target_user_id``.
    """

    signer_user_id: str
    signer_key_id: str
    target_user_id: str
    target_id: str
    signature: str


@dataclass(frozen=True)
class InflightTransaction:
    """The transaction being sent to a destination, retried until a 200."""

    txn_id: str
    payload: JsonDict


@dataclass(frozen=True)
class PendingBatch:
    """What the sender reads to build a destination's next transaction."""

    # up to ``limit`` pending updates in stream order (a prefix of each
    # user's, as :meth:`get_pending`)
    rows: tuple[PendingRow, ...]
    # the unreferenced ids of every user in ``rows`` (empty when none)
    unreferenced: Mapping[str, frozenset[int]]
    # the users whose chain to the destination must restart (every user with
    # a chain reset, whether or not in ``rows``), each with the stream id an
    # EDU must reach to end the restart (None until prepared)
    resets: Mapping[str, Optional[int]]
    # read with ``with_devices``: for each user of the device rows, its keys
    # as other servers see them (only devices of the rows; see
    # LocalUserKeys) ...
    device_keys: Mapping[str, LocalUserKeys] = field(default_factory=dict)
    # ... and the display name of each of those devices that still exists
    device_names: Mapping[str, Mapping[str, Optional[str]]] = field(default_factory=dict)


@dataclass(frozen=True)
class OutboundRowCounts:
    """How many outbound rows are kept for one destination."""

    pending: int
    unreferenced: int
    chain_resets: int


@dataclass(frozen=True)
class DestinationStatus:
    """What the admin API reports of one destination (times in ms)."""

    destination: str
    # pending (collapsed) device and signing-key updates
    pending: int
    # queued_ts of the oldest pending update, None when nothing is pending
    oldest_pending_ts: Optional[int]
    # the persisted backoff; None when the destination is healthy
    retry: Optional["RetryState"]
    # the txnId of the transaction being sent, if any
    inflight_txn_id: Optional[str]


@dataclass(frozen=True)
class RetryState:
    """Backoff bookkeeping for one destination (all times in ms)."""

    # when the destination started failing; None when it is healthy
    failure_ts: Optional[int]
    # when the last attempt was made
    retry_last_ts: Optional[int]
    # the current backoff interval; 0 when healthy
    retry_interval_ms: int
    # consecutive failed attempts (the backoff policy's attempt number)
    attempts: int = 0


@dataclass(frozen=True)
class RemoteSyncState:
    """What is known of one remote user's device list.

    The user is stale (a lost update was noticed and a resync is due) iff
    ``stale_generation > cleared_generation``.  Each stale mark bumps
    ``stale_generation``; a finished resync clears only the generation it
    started from, so a mark made while it ran survives (Synapse #9866).
    """

    user_id: str
    # ``stream_id`` of the last ``/user/devices`` snapshot, None before one
    snapshot_stream_id: Optional[int]
    # stream ids of EDUs applied since the snapshot (a trimmed window)
    known_ids: frozenset[int]
    stale_generation: int
    cleared_generation: int
    stale_reason: Optional[str]
    stale_since_ts: Optional[int]
    last_resync_ts: Optional[int]
    # consecutive resyncs that failed for a reason of this user's own (the
    # remote answered 4xx for it, a malformed or oversized list)
    resync_attempts: int = 0
    # no resync before this time (ms) after such a failure; None: any time
    resync_retry_ts: Optional[int] = None

    @property
    def stale(self) -> bool:
        return self.stale_generation > self.cleared_generation

    @property
    def cached(self) -> bool:
        """Whether a snapshot was ever stored: only then do the cached
        devices mean anything (a row may exist for a stale mark or a
        cross-signing key alone)."""
        return self.snapshot_stream_id is not None


@dataclass(frozen=True)
class StaleRemoteUser:
    """A remote user whose device list must be resynced."""

    user_id: str
    # pass this to ``replace_remote_snapshot`` once the resync finished
    generation: int
    reason: Optional[str]
    since_ts: Optional[int]
    # no resync before this time (ms); None: any time (see RemoteSyncState)
    retry_ts: Optional[int] = None


@dataclass(frozen=True)
class InboxEntry:
    """An ``m.device_list_update`` EDU taken from a transaction, not yet
    decided on (or held, or waiting for a resync to finish)."""

    user_id: str
    stream_id: int
    # the EDU's content as received (validated before it was queued)
    content: JsonDict
    received_ts: int


@dataclass(frozen=True)
class QueuedUpdate:
    """An inbox row as stored: like :class:`InboxEntry`, but its content is
    still JSON text, so a reader holding its own parse of the EDU (the
    updater keeps the ones it queued) need not decode it again."""

    user_id: str
    stream_id: int
    # the EDU's content as received, JSON-encoded
    content_json: str
    received_ts: int


@dataclass(frozen=True)
class RemoteInbox:
    """A remote user's sync state and queued EDUs, read in one transaction."""

    # None for an untracked user (see ``get_remote_sync_state``)
    state: Optional[RemoteSyncState]
    # in stream id order
    entries: tuple[QueuedUpdate, ...]


@dataclass(frozen=True)
class RemoteBatch:
    """One decision on a remote user's queued EDUs (see ``apply_remote_batch``)."""

    user_id: str
    # applied in order, each unless the cache holds its device at a higher id
    applied: tuple[DeviceListUpdate, ...]
    # the new known stream ids, or None to keep them
    known_ids: Optional[frozenset[int]]
    # the inbox rows to delete
    processed_stream_ids: frozenset[int]
    # a stale mark to make, with its reason, or None
    stale_reason: Optional[str]
    # EDUs to queue (as ``queue_remote_updates``; a copy already queued is kept)
    queue: tuple["InboxEntry", ...] = ()


@dataclass(frozen=True)
class RemoteBatchResult:
    """What :meth:`apply_remote_batch` did."""

    # devices whose cached entry changed (updated, added or deleted), sorted
    changed_device_ids: tuple[str, ...]
    # the new stale generation when a stale mark was made, else None
    stale_generation: Optional[int]
    # the user's sync state as the batch left it (read in its transaction)
    state: Optional[RemoteSyncState]


@dataclass(frozen=True)
class RemoteUserCache:
    """A remote user's cached list, read in one transaction."""

    state: Optional[RemoteSyncState]
    # ordered by device id
    devices: tuple[RemoteDevice, ...]
    # by usage
    cross_signing_keys: Mapping[str, CrossSigningKey]


@dataclass(frozen=True)
class ServerKeyRow:
    """A verify key of a remote server."""

    server_name: str
    # "ed25519:<version>"
    key_id: str
    # unpadded base64 public key
    verify_key: str
    valid_until_ts: int
    # set for keys from ``old_verify_keys``
    expired_ts: Optional[int]
    fetched_ts: int
    # the whole key response the key came from, kept for notary answers
    key_json: JsonDict


@dataclass(frozen=True)
class ServerKeyFailure:
    """A recent failure to fetch a server's keys (negative cache entry)."""

    server_name: str
    failed_ts: int
    error: str


# An item of ``ack_sent``: a row from ``get_pending`` or (user_id, device_id, stream_id).
SentItem = Union[PendingRow, tuple[str, Optional[str], int]]
# ``claim_keys``: user id -> device id -> "<algorithm>:<key id>" -> key
ClaimResult = dict[str, dict[str, dict[str, KeyJson]]]
