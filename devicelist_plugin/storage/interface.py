"""The store interface the rest of the plugin programs against.

Conventions for every method:

* it returns a Deferred and never blocks the reactor;
* a method that writes is exactly one database transaction: it happens
  entirely or not at all;
* timestamps are milliseconds passed in by the caller (``now_ms``); the store
  never reads the clock;
* every method that changes a local user's device list takes the
  ``destinations`` that share a room with the user and, in the same
  transaction, records the change in the user's stream and queues it for
  each of them (collapsed per destination, user and device);
* errors raised on purpose are :class:`~devicelist_plugin.storage.errors.StoreError`
  subclasses; a call with inconsistent arguments fails with ``ValueError``.
"""

from __future__ import annotations

from typing import Collection, Iterable, Mapping, Optional, Protocol, Sequence

from twisted.internet.defer import Deferred

from devicelist_plugin.core.models import (
    CrossSigningKey,
    DeviceListUpdate,
    RemoteDevice,
    UserDevicesResponse,
)
from devicelist_plugin.storage.types import (
    ClaimResult,
    CrossSigningSignature,
    InboxEntry,
    InflightTransaction,
    JsonDict,
    KeyJson,
    LocalDevice,
    LocalUserKeys,
    PendingRow,
    RemoteBatch,
    RemoteBatchResult,
    RemoteInbox,
    RemoteSyncState,
    RemoteUserCache,
    RetryState,
    SentItem,
    ServerKeyFailure,
    ServerKeyRow,
    StaleRemoteUser,
    StreamChange,
)

from devicelist_plugin.storage.types import DestinationStatus, OutboundRowCounts, PendingBatch


class IDeviceListStore(Protocol):
    """Persistent state of the device-list plugin."""

    def close(self) -> "Deferred[None]":
        """Close the connections and stop the pool's threads."""

    def get_schema_version(self) -> "Deferred[int]":
        """The schema version of the database."""

    # -- local devices and the device-list stream ------------------------------

    def create_device(
        self,
        user_id: str,
        device_id: str,
        display_name: Optional[str],
        now_ms: int,
        destinations: Collection[str],
    ) -> "Deferred[int]":
        """Create a device; return its stream id.  Fails with ``DeviceExistsError``."""

    def rename_device(
        self,
        user_id: str,
        device_id: str,
        display_name: Optional[str],
        now_ms: int,
        destinations: Collection[str],
    ) -> "Deferred[int]":
        """Set (or with None remove) a device's display name; return the stream id.

        Fails with ``UnknownDeviceError``.
        """

    def delete_device(
        self, user_id: str, device_id: str, now_ms: int, destinations: Collection[str]
    ) -> "Deferred[int]":
        """Delete a device with its device, one-time and fallback keys and the
        signatures made of it; return the stream id of the deletion.

        Fails with ``UnknownDeviceError``.
        """

    def set_device_keys(
        self,
        user_id: str,
        device_id: str,
        keys_json: JsonDict,
        now_ms: int,
        destinations: Collection[str],
    ) -> "Deferred[int]":
        """Store the DeviceKeys object of a device; return the stream id.

        Fails with ``UnknownDeviceError``.
        """

    def set_device_keys_if_changed(
        self,
        user_id: str,
        device_id: str,
        keys_json: JsonDict,
        now_ms: int,
        destinations: Collection[str],
    ) -> "Deferred[Optional[int]]":
        """As :meth:`set_device_keys`, but ``None`` (nothing written, no
        stream id taken) when the device has these keys already: the check
        and the write in one transaction."""

    def update_device_last_seen(
        self, user_id: str, device_id: str, now_ms: int
    ) -> "Deferred[bool]":
        """Record activity of a device (no stream change); False if unknown."""

    def get_devices(self, user_id: str) -> "Deferred[list[LocalDevice]]":
        """A local user's devices, ordered by device id."""

    def get_devices_for_users(
        self, user_ids: Collection[str]
    ) -> "Deferred[dict[str, list[LocalDevice]]]":
        """Several users' devices (every requested user is a key)."""

    def get_device(self, user_id: str, device_id: str) -> "Deferred[Optional[LocalDevice]]":
        """One device, or None."""

    def get_max_stream_id(self, user_id: str) -> "Deferred[Optional[int]]":
        """The last stream id allocated to the user, None if there was none."""

    def get_stream_since(
        self, user_id: str, after: int, limit: Optional[int] = None
    ) -> "Deferred[list[StreamChange]]":
        """The user's changes with stream id > ``after``, in stream order."""

    # -- keys ------------------------------------------------------------------

    def add_one_time_keys(
        self, user_id: str, device_id: str, keys: Sequence[tuple[str, str, KeyJson]]
    ) -> "Deferred[None]":
        """Add ``(algorithm, key_id, key)`` one-time keys, claimed in this order.

        ``key_id`` is the part after the algorithm (``AAAAHQ`` of
        ``signed_curve25519:AAAAHQ``).  A key id uploaded again with the same
        content is ignored; with different content the whole upload fails
        with ``KeyConflictError``.  Fails with ``UnknownDeviceError``.
        """

    def count_one_time_keys(self, user_id: str, device_id: str) -> "Deferred[dict[str, int]]":
        """Unclaimed one-time keys per algorithm (algorithms with none are absent)."""

    def set_fallback_key(
        self, user_id: str, device_id: str, algorithm: str, key_id: str, key_json: KeyJson
    ) -> "Deferred[None]":
        """Replace the device's fallback key for ``algorithm``.

        Uploading the current key again keeps its used mark; a new key is unused.
        """

    def get_unused_fallback_key_algorithms(
        self, user_id: str, device_id: str
    ) -> "Deferred[list[str]]":
        """Algorithms whose fallback key was never handed out."""

    def claim_keys(self, requests: Collection[tuple[str, str, str]]) -> "Deferred[ClaimResult]":
        """Claim a key per ``(user_id, device_id, algorithm)``.

        The device's oldest one-time key of that algorithm is removed and
        returned; no key is ever handed out twice, whatever the concurrency.
        When none is left the fallback key is returned and marked used (not
        removed).  Devices with neither are absent from the result, which maps
        user id -> device id -> ``"<algorithm>:<key_id>"`` -> key.
        """

    def set_cross_signing_key(
        self,
        user_id: str,
        usage: str,
        key_json: JsonDict,
        now_ms: int,
        destinations: Collection[str],
    ) -> "Deferred[int]":
        """Store a cross-signing key (``master``, ``self_signing``, ``user_signing``).

        Logs a ``signing_key`` change in the user's stream and returns its id;
        only master and self-signing keys are queued for the destinations
        (user-signing keys are never federated).
        """

    def set_cross_signing_keys(
        self,
        user_id: str,
        keys: Mapping[str, JsonDict],
        now_ms: int,
        destinations: Collection[str],
    ) -> "Deferred[int]":
        """Store several cross-signing keys of the user (by usage) at once.

        One transaction and one ``signing_key`` change in the user's stream,
        whose id is returned; it is queued for the destinations only if a
        master or self-signing key is among ``keys``.  An empty ``keys`` or an
        unknown usage is a ``ValueError``.
        """

    def get_cross_signing_keys(self, user_id: str) -> "Deferred[dict[str, JsonDict]]":
        """The user's cross-signing keys by usage."""

    def store_signatures(
        self,
        signer_user_id: str,
        signatures: Sequence[CrossSigningSignature],
        now_ms: int,
        destinations: Collection[str],
    ) -> "Deferred[list[StreamChange]]":
        """Store signatures uploaded by a local user (a newer one replaces an older).

        A signature of one of the signer's own devices is a change of that
        device; a signature of another of the signer's own targets (a
        cross-signing key) is one ``signing_key`` change.  Signatures of other
        users' keys change nothing that is federated.  Returns the changes.
        """

    def get_signatures(
        self, target_user_id: str, target_ids: Optional[Collection[str]] = None
    ) -> "Deferred[list[CrossSigningSignature]]":
        """Signatures stored for a user's devices or keys."""

    # -- what other servers see of local users ------------------------------------

    def get_local_user_keys(
        self,
        wanted: Mapping[str, Optional[Collection[str]]],
        *,
        from_user_id: Optional[str] = None,
    ) -> "Deferred[dict[str, LocalUserKeys]]":
        """Local users' devices with keys (all, or the device ids given),
        cross-signing keys and signatures, read in one transaction.

        Every requested user is a key of the result.  Signatures are those
        the target user made of their own devices and keys, plus those made
        by ``from_user_id`` (a user-signing key's signatures of other users'
        master keys, visible only to their signer).
        """

    def get_local_user_keys_since(
        self,
        wanted: Mapping[str, Optional[Collection[str]]],
        known_stream_ids: Mapping[str, int],
    ) -> "Deferred[dict[str, Optional[LocalUserKeys]]]":
        """:meth:`get_local_user_keys` (without ``from_user_id``), except that
        a user whose last stream id is still the one in ``known_stream_ids``
        is not read: ``None``.  For a caller that keeps answers by the
        stream id they were read at."""

    def get_user_devices_snapshot(
        self, user_id: str, destination: Optional[str] = None
    ) -> "Deferred[LocalUserKeys]":
        """A consistent snapshot of a local user's devices with keys for
        ``GET /user/devices``: ``stream_id`` is the user's last stream id and
        the devices are exactly the state after it.

        With ``destination`` (the requesting server), in the same
        transaction and while no change of the user can commit, the snapshot
        is recorded as served to it (:meth:`record_snapshot_served`), so that
        the next EDU sent there names ``stream_id`` as its ``prev_id``.
        Nothing is recorded for a user that never had a change.
        """

    def get_user_devices_snapshot_since(
        self, user_id: str, destination: Optional[str], known_stream_id: int
    ) -> "Deferred[Optional[LocalUserKeys]]":
        """:meth:`get_user_devices_snapshot`, or ``None`` when the user's
        last stream id is still ``known_stream_id`` (the devices are then
        not read; the snapshot at ``known_stream_id`` is still recorded as
        served to ``destination``).  For a caller that keeps the answer of
        the snapshot at ``known_stream_id``."""

    def record_snapshot_served(
        self, destination: str, user_id: str, stream_id: int
    ) -> "Deferred[None]":
        """Record that ``destination`` was served the user's list as of
        ``stream_id``.

        Deletes the destination's pending rows of the user with a stream id
        <= ``stream_id`` (the snapshot carried their state) and makes
        ``{stream_id}`` the user's unreferenced ids for the destination,
        unless an acknowledged EDU with a later id is already there.  Until
        an acknowledgement reaches ``stream_id``, :meth:`ack_sent` never
        replaces it by older ids.  A ``stream_id`` below 1 or never
        allocated to the user is a ``ValueError``.
        """

    # -- outbound ----------------------------------------------------------------

    def get_pending(self, destination: str, limit: int) -> "Deferred[list[PendingRow]]":
        """Up to ``limit`` pending updates for the destination in stream order.

        A limited answer is a prefix of each user's pending updates, and what
        the limit left out stays pending (Synapse #11727).
        """

    def get_unreferenced(
        self, destination: str, user_ids: Collection[str]
    ) -> "Deferred[dict[str, frozenset[int]]]":
        """The stream ids last sent to the destination that nothing referenced
        yet, per user (empty for users with none)."""

    def ack_sent(
        self,
        destination: str,
        sent: Iterable[SentItem],
        unreferenced_after: Mapping[str, Collection[int]],
        *,
        completed_txn_id: Optional[str] = None,
    ) -> "Deferred[None]":
        """Record that updates were delivered, atomically.

        Deletes each ``(user_id, device_id, stream_id)`` pending row whose
        stream id is <= the one sent (a newer change of the device survives),
        stores the users' unreferenced ids (empty deletes), and when
        ``completed_txn_id`` is given clears that in-flight transaction.

        A user's ids are not stored when they are all below the stream id of
        a ``/user/devices`` snapshot served to the destination since its last
        acknowledgement that reached one (:meth:`record_snapshot_served`):
        they come from a transaction that was in flight while the snapshot
        was served, and the destination correlates the next EDU with the
        snapshot's id.
        """

    def destinations_with_pending(self) -> "Deferred[list[str]]":
        """Destinations that have pending updates, sorted."""

    def enqueue_current_devices(
        self, destination: str, user_id: str, now_ms: int
    ) -> "Deferred[list[PendingRow]]":
        """Queue all the user's current devices (and federated cross-signing
        keys) for a destination that newly shares a room with the user
        (Synapse #11374), each at its latest stream id.  Returns the rows."""

    def get_inflight_txn(self, destination: str) -> "Deferred[Optional[InflightTransaction]]":
        """The transaction being sent to the destination, if any."""

    def set_inflight_txn(
        self, destination: str, txn_id: str, payload: JsonDict
    ) -> "Deferred[None]":
        """Persist the transaction about to be sent (retried until a 200)."""

    def clear_inflight_txn(
        self, destination: str, txn_id: Optional[str] = None
    ) -> "Deferred[bool]":
        """Forget the in-flight transaction (only if it is ``txn_id`` when given)."""

    def get_retry_state(self, destination: str) -> "Deferred[Optional[RetryState]]":
        """The destination's backoff state; None when it is healthy."""

    def set_retry_state(self, destination: str, state: Optional[RetryState]) -> "Deferred[None]":
        """Store (or with None reset) the destination's backoff state."""

    # -- outbound: the sender's reads, chain resets, dead destinations ---------

    def get_outbound_batch(
        self, destination: str, limit: int, *, with_devices: bool = False
    ) -> "Deferred[PendingBatch]":
        """The destination's next pending updates (as :meth:`get_pending`),
        the unreferenced ids of their users and the destination's chain
        resets, read in one transaction; ``with_devices``: also the keys
        and names of the devices of those updates (what their EDUs carry)."""

    def destinations_pending_for_user(self, user_id: str) -> "Deferred[list[str]]":
        """The destinations with pending updates of the user, sorted."""

    def destinations_to_send(self) -> "Deferred[list[str]]":
        """Destinations with pending updates, an in-flight transaction or a
        chain reset, sorted: what the sender schedules at start-up."""

    def add_chain_resets(self, pairs: Collection[tuple[str, str]]) -> "Deferred[None]":
        """Record that the prev_id chain of each ``(destination, user_id)``
        must restart from ``[]`` (a newly sharing server, a destination
        whose pending updates were dropped); idempotent."""

    def prepare_chain_resets(self, destination: str, now_ms: int) -> "Deferred[frozenset[str]]":
        """Queue, for each user with a chain reset for the destination, the
        user's latest device change (so that an EDU of the user goes out at
        an id the destination cannot have seen if it missed anything) and,
        the first time, record that id as the one the restart must reach;
        drop the resets of users that never had a device change.  Returns
        the users whose reset remains."""

    def begin_outbound_transaction(
        self,
        destination: str,
        txn_id: str,
        payload: JsonDict,
        consumed_resets: Collection[str],
    ) -> "Deferred[None]":
        """Persist the transaction about to be sent (as
        :meth:`set_inflight_txn`) and, atomically, delete the chain resets
        of ``consumed_resets`` (the users whose restart it completes)."""

    def compact_destination(self, destination: str) -> "Deferred[int]":
        """Drop the destination's pending device updates, leaving one chain
        reset per user they concerned; return how many rows were dropped.
        Pending signing-key updates (one per user) and the in-flight
        transaction are kept."""

    def count_outbound_rows(self, destination: str) -> "Deferred[OutboundRowCounts]":
        """How many pending, unreferenced and chain-reset rows the destination has."""

    # -- admin API: destination status (devicelist_plugin/standalone/admin.py) --

    def get_destination_statuses(
        self, destination: Optional[str] = None
    ) -> "Deferred[list[DestinationStatus]]":
        """Every destination with pending updates or sender state (or only
        ``destination``), sorted by name."""

    # -- room memberships (the standalone server's MembershipSource) -----------

    def join_room(
        self, room_id: str, user_id: str, own_server_name: str
    ) -> "Deferred[dict[str, frozenset[str]]]":
        """Record that ``user_id`` joined ``room_id``; return, per local
        user, the servers that newly share a room with it
        (:func:`~devicelist_plugin.core.membership.servers_newly_sharing_on_join`),
        and record a chain reset for each such (server, local user) in the
        same transaction.  Joining again changes nothing."""

    def leave_room(
        self, room_id: str, user_id: str, own_server_name: str
    ) -> "Deferred[list[str]]":
        """Record that ``user_id`` left ``room_id``; return the remote users
        no longer sharing a room with any local user
        (:func:`~devicelist_plugin.core.membership.untracked_on_leave`)."""

    def get_servers_sharing_room(
        self, user_id: str, own_server_name: str
    ) -> "Deferred[frozenset[str]]":
        """The servers (never ``own_server_name``) sharing a room with the user."""

    def is_user_tracked(self, user_id: str, own_server_name: str) -> "Deferred[bool]":
        """Whether the user shares a room with a user of ``own_server_name``."""

    def get_tracked_users(
        self, user_ids: Collection[str], own_server_name: str
    ) -> "Deferred[frozenset[str]]":
        """Those of ``user_ids`` sharing a room with a user of ``own_server_name``
        (:meth:`is_user_tracked` of each, in one transaction)."""

    def get_room_members(self, room_id: str) -> "Deferred[list[str]]":
        """The room's members, sorted."""

    # -- remote cache ------------------------------------------------------------

    def get_remote_sync_state(self, user_id: str) -> "Deferred[Optional[RemoteSyncState]]":
        """What is known of a remote user's list; None for an untracked user."""

    def get_remote_cache(self, user_id: str) -> "Deferred[RemoteUserCache]":
        """A remote user's sync state, devices and cross-signing keys, read in
        one transaction (what a key query answers from)."""

    def apply_remote_updates(
        self,
        user_id: str,
        upserts: Sequence[RemoteDevice],
        deletions: Collection[str],
        new_known_ids: Collection[int],
    ) -> "Deferred[None]":
        """Apply a batch of EDUs atomically: upsert and delete devices and
        replace the known stream ids (trimmed to the newest window).

        Creates the user's sync row if missing.  A device both upserted and
        deleted is a ``ValueError``: collapse the batch first.  Devices
        written here carry no stream id (any later update supersedes them);
        the updater uses :meth:`apply_remote_batch`.
        """

    def apply_remote_batch(
        self,
        user_id: str,
        applied: Sequence[DeviceListUpdate],
        known_ids: Optional[Collection[int]],
        processed_stream_ids: Collection[int],
        stale_reason: Optional[str],
        now_ms: int,
    ) -> "Deferred[RemoteBatchResult]":
        """Commit one decision on a user's queued EDUs, atomically.

        Each of ``applied`` (in order) replaces its device's cached entry, or
        deletes it leaving a tombstone with its stream id, unless the cache
        holds that device at a higher stream id (a snapshot's devices are at
        the snapshot's id; ``core.inbound.supersedes``).  ``known_ids``
        (when not None) replaces the known stream ids; ``stale_reason``
        (when not None) makes a stale mark, whose generation is returned;
        the inbox rows of ``processed_stream_ids`` are deleted.  Returns the
        device ids whose entry changed and the sync state as the transaction
        left it (what ``get_remote_sync_state`` would read right after).
        """

    def apply_remote_batches(
        self, batches: Sequence[RemoteBatch], now_ms: int
    ) -> "Deferred[list[RemoteBatchResult]]":
        """Commit decisions on several users' queued EDUs in one transaction:
        each as :meth:`apply_remote_batch` would, results in the same order
        (what a ``/send`` transaction's EDUs cost: one commit, not one per
        user).  At most one batch per user."""

    def mark_remote_stale(self, user_id: str, reason: str, now_ms: int) -> "Deferred[int]":
        """Durably mark the user stale; return the new stale generation."""

    def set_remote_resync_backoff(
        self, user_id: str, attempts: int, retry_ts: Optional[int]
    ) -> "Deferred[None]":
        """Record the user's failed resync attempts and when to try next
        (a no-op for a user without a sync row); a snapshot resets both."""

    def replace_remote_snapshot(
        self,
        user_id: str,
        snapshot: UserDevicesResponse,
        generation: int,
        now_ms: int,
    ) -> "Deferred[bool]":
        """Replace the user's devices and cross-signing keys by a resync answer.

        Sets the snapshot stream id (also each device's stream id), empties
        the known ids and the deletion tombstones, resets the per-user resync
        backoff, and clears stale marks up to ``generation`` (the stale
        generation read before the resync started; 0 for a user never
        marked).  Returns True if the user is no longer stale, False if a
        newer mark was made meanwhile and survives (Synapse #9866).  A
        snapshot whose generation is below one already applied comes from a
        resync overtaken by a later one and changes nothing.  Queued EDUs
        (the inbox) are kept: the caller re-runs them against the snapshot.
        """

    def get_remote_devices(self, user_id: str) -> "Deferred[list[RemoteDevice]]":
        """The cached devices of a remote user, ordered by device id."""

    def get_remote_cross_signing_keys(self, user_id: str) -> "Deferred[dict[str, CrossSigningKey]]":
        """The cached cross-signing keys of a remote user by usage."""

    def set_remote_cross_signing_key(
        self, user_id: str, usage: str, key: CrossSigningKey
    ) -> "Deferred[None]":
        """Cache a remote cross-signing key (from ``m.signing_key_update``)."""

    def set_remote_cross_signing_keys(
        self, user_id: str, keys: Mapping[str, CrossSigningKey]
    ) -> "Deferred[None]":
        """Cache several remote cross-signing keys (by usage) in one transaction."""

    def drop_remote_user(self, user_id: str) -> "Deferred[None]":
        """Forget everything about a remote user, queued EDUs included (Synapse #13651)."""

    def list_stale_remote_users(self) -> "Deferred[list[StaleRemoteUser]]":
        """Remote users due a resync, longest stale first."""

    def queue_remote_update(
        self, user_id: str, stream_id: int, content: JsonDict, now_ms: int
    ) -> "Deferred[bool]":
        """Durably queue a received ``m.device_list_update`` (its validated
        content); False when that (user, stream id) is already queued."""

    def queue_remote_updates(self, entries: Sequence[InboxEntry]) -> "Deferred[list[bool]]":
        """Queue several EDUs in one transaction, as :meth:`queue_remote_update`
        each (its ``received_ts`` the entry's): a flag per entry, in order."""

    def get_remote_inbox(self, user_id: str) -> "Deferred[list[InboxEntry]]":
        """The user's queued EDUs in stream id order."""

    def get_remote_inbox_state(self, user_id: str) -> "Deferred[RemoteInbox]":
        """The user's sync state and queued EDUs (contents as JSON text), read
        in one transaction: ``get_remote_sync_state`` and ``get_remote_inbox``
        in one round trip."""

    def get_remote_inbox_states(self, user_ids: Collection[str]) -> "Deferred[dict[str, RemoteInbox]]":
        """:meth:`get_remote_inbox_state` of several users in one transaction."""

    def list_remote_inbox_users(self) -> "Deferred[list[str]]":
        """The users with queued EDUs, sorted."""

    # -- server keys ---------------------------------------------------------------

    def store_server_keys(self, server_name: str, keys: Sequence[ServerKeyRow]) -> "Deferred[None]":
        """Store fetched keys (the latest fetch of a key wins) and clear the
        server's negative cache entry."""

    def get_server_keys(
        self, server_name: str, key_ids: Optional[Collection[str]] = None
    ) -> "Deferred[dict[str, ServerKeyRow]]":
        """A server's stored keys by key id (all, or those in ``key_ids``)."""

    def get_server_key_failure(self, server_name: str) -> "Deferred[Optional[ServerKeyFailure]]":
        """The last recorded failure to fetch the server's keys."""

    def set_server_key_failure(self, server_name: str, error: str, now_ms: int) -> "Deferred[None]":
        """Record a failure to fetch the server's keys."""

    def clear_server_key_failure(self, server_name: str) -> "Deferred[None]":
        """Forget a recorded failure."""

    # -- received transactions -------------------------------------------------------

    def get_received_txn(self, origin: str, txn_id: str) -> "Deferred[Optional[JsonDict]]":
        """The response given to an already processed transaction, or None."""

    def store_received_txn(
        self, origin: str, txn_id: str, response: JsonDict, now_ms: int
    ) -> "Deferred[bool]":
        """Remember a processed transaction's response; False if it was already stored."""

    def prune_received_txns(self, older_than_ms: int) -> "Deferred[int]":
        """Forget transactions received before ``older_than_ms``; return how many."""
