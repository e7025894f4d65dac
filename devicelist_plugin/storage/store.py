"""The store: every query of the plugin, written once for SQLite and PostgreSQL.

Each public method is one database transaction (one :meth:`Database.run`)
and returns a Deferred; nothing runs on the reactor thread.  Timestamps are
passed in by the caller (``now_ms``): the store never reads the clock.  The
methods are documented on :class:`~devicelist_plugin.storage.interface.IDeviceListStore`.

Locking (PostgreSQL, READ COMMITTED writes): every transaction that changes
a local user's devices or keys starts by allocating the next stream id of
that user (``INSERT ... ON CONFLICT DO UPDATE SET pos = pos + 1 RETURNING``),
which locks the user's position row until commit; every write of a remote
user's cache starts by locking that user's ``remote_sync_state`` row; key
uploads lock the device row; claims take one-time keys with
``FOR UPDATE SKIP LOCKED`` so that concurrent claimers never share a key; a
``/user/devices`` snapshot served to a destination locks the user's position
row (``SELECT ... FOR UPDATE``) before reading, so that it is exactly the
state after the stream id it reports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Collection, Iterable, Mapping, Optional, Sequence, TypeVar

from twisted.internet.defer import Deferred, fail, succeed

from devicelist_plugin.core.inbound import supersedes
from devicelist_plugin.core.models import (
    CrossSigningKey,
    DeviceListUpdate,
    RemoteDevice,
    UserDevicesResponse,
)
from devicelist_plugin.storage import migrations
from devicelist_plugin.storage.codec import (
    cross_signing_key_from_json,
    device_keys_from_json,
    dumps,
    loads,
)
from devicelist_plugin.storage.engines import Database, Txn
from devicelist_plugin.storage.errors import (
    DeviceExistsError,
    KeyConflictError,
    UnknownDeviceError,
)
from devicelist_plugin.storage.types import (
    CROSS_SIGNING_USAGES,
    ClaimResult,
    FEDERATED_CROSS_SIGNING_USAGES,
    KIND_DEVICE,
    KIND_SIGNING_KEY,
    CrossSigningSignature,
    InboxEntry,
    QueuedUpdate,
    InflightTransaction,
    JsonDict,
    KeyedDevice,
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
    StreamKind,
)

from devicelist_plugin.core.membership import (
    join_concerns,
    leave_concerns,
    server_of,
    servers_newly_sharing_on_join,
    untracked_on_leave,
)
from devicelist_plugin.storage.engines import Isolation
from devicelist_plugin.storage.types import DestinationStatus, OutboundRowCounts, PendingBatch

if TYPE_CHECKING:
    from devicelist_plugin.storage.interface import IDeviceListStore

# How many stream ids of applied EDUs are remembered per remote user.
DEFAULT_KNOWN_IDS_WINDOW = 100
_T = TypeVar("_T")

# Longest IN (...) list sent in one statement.
_CHUNK = 500


def _chunks(items: Sequence[_T], size: int = _CHUNK) -> Iterable[Sequence[_T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _snapshot_recorded(row: Sequence[Any], stream_id: int) -> bool:
    """Whether an ``outbound_unreferenced`` row (``stream_ids_json``,
    ``snapshot_stream_id``) needs no change for a snapshot served at
    ``stream_id``: the destination acknowledged a later EDU, or this
    snapshot is recorded and nothing was sent since (an unchanged row is no
    write, and on SQLite no commit to sync)."""
    ids = [int(i) for i in loads(row[0])]
    if any(i > stream_id for i in ids):
        return True
    return ids == [stream_id] and row[1] is not None and int(row[1]) == stream_id


def _known_ids_text(stream_ids: Iterable[int]) -> str:
    """``remote_sync_state.known_stream_ids``: decimal ids, comma-separated."""
    return ",".join(str(stream_id) for stream_id in stream_ids)


def _known_ids_of(text: Optional[str]) -> frozenset[int]:
    # (decimal ids between commas are a JSON array's insides: C-speed parsing)
    return frozenset(loads(f"[{text}]")) if text else frozenset()


def _marks(n: int) -> str:
    return ", ".join("?" for _ in range(n))


def _bad_usage(usage: str) -> Optional[ValueError]:
    if usage in CROSS_SIGNING_USAGES:
        return None
    return ValueError(f"unknown cross-signing key usage {usage!r}")


def _pending_device(kind: str, device_id: str) -> Optional[str]:
    return None if kind == KIND_SIGNING_KEY else device_id


class Store:
    """The SQL implementation of :class:`IDeviceListStore` for both engines."""

    def __init__(
        self, database: Database, *, known_ids_window: int = DEFAULT_KNOWN_IDS_WINDOW
    ) -> None:
        if known_ids_window < 1:
            raise ValueError("known_ids_window must be at least 1")
        self.database = database
        self.known_ids_window = known_ids_window

    @property
    def engine(self) -> str:
        """``"sqlite"`` or ``"postgres"``."""
        return self.database.dialect.name

    def close(self) -> "Deferred[None]":
        self.database.close()
        return succeed(None)

    def get_schema_version(self) -> "Deferred[int]":
        return self.database.run("get_schema_version", migrations.current_version, readonly=True)

    # ------------------------------------------------------------------
    # Local devices and the device-list stream
    # ------------------------------------------------------------------

    def _allocate_stream_id(self, t: Txn, user_id: str) -> int:
        """Next stream id of ``user_id``; locks the user's position row."""
        row = t.query_one(
            "INSERT INTO local_stream_positions (user_id, pos) VALUES (?, 1)"
            " ON CONFLICT (user_id) DO UPDATE SET pos = local_stream_positions.pos + 1"
            " RETURNING pos",
            (user_id,),
        )
        assert row is not None
        return int(row[0])

    def _log_change(
        self,
        t: Txn,
        user_id: str,
        stream_id: int,
        device_id: Optional[str],
        kind: StreamKind,
        now_ms: int,
        destinations: Collection[str],
    ) -> StreamChange:
        t.execute(
            "INSERT INTO local_device_stream (user_id, stream_id, device_id, kind, ts)"
            " VALUES (?, ?, ?, ?, ?)",
            (user_id, stream_id, device_id, kind, now_ms),
        )
        self._enqueue_pending(t, destinations, user_id, device_id, stream_id, now_ms)
        return StreamChange(user_id, stream_id, device_id, kind, now_ms)

    def _enqueue_pending(
        self,
        t: Txn,
        destinations: Collection[str],
        user_id: str,
        device_id: Optional[str],
        stream_id: int,
        now_ms: int,
    ) -> None:
        """Upsert pending rows, keeping the larger stream id per (dest, user, device)."""
        kind = KIND_DEVICE if device_id is not None else KIND_SIGNING_KEY
        greatest = t.dialect.greatest("outbound_pending.stream_id", "excluded.stream_id")
        t.executemany(
            "INSERT INTO outbound_pending"
            " (destination, user_id, kind, device_id, stream_id, queued_ts)"
            " VALUES (?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (destination, user_id, kind, device_id) DO UPDATE SET"
            f" stream_id = {greatest},"
            " queued_ts = CASE WHEN excluded.stream_id > outbound_pending.stream_id"
            " THEN excluded.queued_ts ELSE outbound_pending.queued_ts END",
            [
                (destination, user_id, kind, device_id or "", stream_id, now_ms)
                for destination in sorted(set(destinations))
            ],
        )

    def _device_exists(self, t: Txn, user_id: str, device_id: str, *, lock: bool = False) -> bool:
        suffix = t.dialect.for_update if lock else ""
        row = t.query_one(
            f"SELECT 1 FROM local_devices WHERE user_id = ? AND device_id = ?{suffix}",
            (user_id, device_id),
        )
        return row is not None

    def create_device(
        self,
        user_id: str,
        device_id: str,
        display_name: Optional[str],
        now_ms: int,
        destinations: Collection[str],
    ) -> "Deferred[int]":
        if not device_id:
            return fail(ValueError("device_id must not be empty"))

        def txn(t: Txn) -> int:
            stream_id = self._allocate_stream_id(t, user_id)
            if self._device_exists(t, user_id, device_id):
                raise DeviceExistsError(user_id, device_id)
            t.execute(
                "INSERT INTO local_devices (user_id, device_id, display_name, created_ts)"
                " VALUES (?, ?, ?, ?)",
                (user_id, device_id, display_name, now_ms),
            )
            self._log_change(t, user_id, stream_id, device_id, KIND_DEVICE, now_ms, destinations)
            return stream_id

        return self.database.run("create_device", txn)

    def rename_device(
        self,
        user_id: str,
        device_id: str,
        display_name: Optional[str],
        now_ms: int,
        destinations: Collection[str],
    ) -> "Deferred[int]":
        def txn(t: Txn) -> int:
            stream_id = self._allocate_stream_id(t, user_id)
            t.execute(
                "UPDATE local_devices SET display_name = ? WHERE user_id = ? AND device_id = ?",
                (display_name, user_id, device_id),
            )
            if t.rowcount == 0:
                raise UnknownDeviceError(user_id, device_id)
            self._log_change(t, user_id, stream_id, device_id, KIND_DEVICE, now_ms, destinations)
            return stream_id

        return self.database.run("rename_device", txn)

    def delete_device(
        self,
        user_id: str,
        device_id: str,
        now_ms: int,
        destinations: Collection[str],
    ) -> "Deferred[int]":
        def txn(t: Txn) -> int:
            stream_id = self._allocate_stream_id(t, user_id)
            if not self._device_exists(t, user_id, device_id):
                raise UnknownDeviceError(user_id, device_id)
            key = (user_id, device_id)
            for table in ("local_device_keys", "local_one_time_keys", "local_fallback_keys"):
                t.execute(f"DELETE FROM {table} WHERE user_id = ? AND device_id = ?", key)
            t.execute(
                "DELETE FROM local_cross_signing_signatures"
                " WHERE target_user_id = ? AND target_id = ?",
                key,
            )
            t.execute("DELETE FROM local_devices WHERE user_id = ? AND device_id = ?", key)
            self._log_change(t, user_id, stream_id, device_id, KIND_DEVICE, now_ms, destinations)
            return stream_id

        return self.database.run("delete_device", txn)

    def set_device_keys(
        self,
        user_id: str,
        device_id: str,
        keys_json: JsonDict,
        now_ms: int,
        destinations: Collection[str],
    ) -> "Deferred[int]":
        text = dumps(keys_json)

        def txn(t: Txn) -> int:
            return self._set_device_keys(t, user_id, device_id, text, now_ms, destinations)

        return self.database.run("set_device_keys", txn)

    def set_device_keys_if_changed(
        self,
        user_id: str,
        device_id: str,
        keys_json: JsonDict,
        now_ms: int,
        destinations: Collection[str],
    ) -> "Deferred[Optional[int]]":
        text = dumps(keys_json)

        def txn(t: Txn) -> Optional[int]:
            # checked before the user's position row is locked: an upload
            # racing this one is ordered after it, as if this came first
            stored = t.query_one(
                "SELECT d.device_id, k.keys_json FROM local_devices d"
                " LEFT JOIN local_device_keys k"
                " ON k.user_id = d.user_id AND k.device_id = d.device_id"
                " WHERE d.user_id = ? AND d.device_id = ?",
                (user_id, device_id),
            )
            if stored is None:
                raise UnknownDeviceError(user_id, device_id)
            if stored[1] == text:
                return None
            return self._set_device_keys(t, user_id, device_id, text, now_ms, destinations)

        return self.database.run("set_device_keys", txn)

    def _set_device_keys(
        self,
        t: Txn,
        user_id: str,
        device_id: str,
        text: str,
        now_ms: int,
        destinations: Collection[str],
    ) -> int:
        stream_id = self._allocate_stream_id(t, user_id)
        if not self._device_exists(t, user_id, device_id):
            raise UnknownDeviceError(user_id, device_id)
        t.execute(
            "INSERT INTO local_device_keys (user_id, device_id, keys_json, updated_ts)"
            " VALUES (?, ?, ?, ?)"
            " ON CONFLICT (user_id, device_id) DO UPDATE SET"
            " keys_json = excluded.keys_json, updated_ts = excluded.updated_ts",
            (user_id, device_id, text, now_ms),
        )
        self._log_change(t, user_id, stream_id, device_id, KIND_DEVICE, now_ms, destinations)
        return stream_id

    def update_device_last_seen(
        self, user_id: str, device_id: str, now_ms: int
    ) -> "Deferred[bool]":
        def txn(t: Txn) -> bool:
            t.execute(
                "UPDATE local_devices SET last_seen_ts = ? WHERE user_id = ? AND device_id = ?",
                (now_ms, user_id, device_id),
            )
            return t.rowcount > 0

        return self.database.run("update_device_last_seen", txn)

    _DEVICE_COLUMNS = (
        "SELECT d.user_id, d.device_id, d.display_name, k.keys_json, d.created_ts, d.last_seen_ts"
        " FROM local_devices d LEFT JOIN local_device_keys k"
        " ON k.user_id = d.user_id AND k.device_id = d.device_id"
    )

    @staticmethod
    def _local_device(row: Sequence[Any]) -> LocalDevice:
        return LocalDevice(
            user_id=row[0],
            device_id=row[1],
            display_name=row[2],
            keys_json=None if row[3] is None else loads(row[3]),
            created_ts=int(row[4]),
            last_seen_ts=None if row[5] is None else int(row[5]),
        )

    def get_devices(self, user_id: str) -> "Deferred[list[LocalDevice]]":
        def txn(t: Txn) -> list[LocalDevice]:
            rows = t.query(
                f"{self._DEVICE_COLUMNS} WHERE d.user_id = ? ORDER BY d.device_id", (user_id,)
            )
            return [self._local_device(r) for r in rows]

        return self.database.run("get_devices", txn, readonly=True)

    def get_devices_for_users(
        self, user_ids: Collection[str]
    ) -> "Deferred[dict[str, list[LocalDevice]]]":
        wanted = sorted(set(user_ids))

        def txn(t: Txn) -> dict[str, list[LocalDevice]]:
            result: dict[str, list[LocalDevice]] = {u: [] for u in wanted}
            for chunk in _chunks(wanted):
                rows = t.query(
                    f"{self._DEVICE_COLUMNS} WHERE d.user_id IN ({_marks(len(chunk))})"
                    " ORDER BY d.user_id, d.device_id",
                    chunk,
                )
                for row in rows:
                    result[row[0]].append(self._local_device(row))
            return result

        return self.database.run("get_devices_for_users", txn, readonly=True)

    def get_device(self, user_id: str, device_id: str) -> "Deferred[Optional[LocalDevice]]":
        def txn(t: Txn) -> Optional[LocalDevice]:
            row = t.query_one(
                f"{self._DEVICE_COLUMNS} WHERE d.user_id = ? AND d.device_id = ?",
                (user_id, device_id),
            )
            return None if row is None else self._local_device(row)

        return self.database.run("get_device", txn, readonly=True)

    def get_max_stream_id(self, user_id: str) -> "Deferred[Optional[int]]":
        def txn(t: Txn) -> Optional[int]:
            row = t.query_one(
                "SELECT pos FROM local_stream_positions WHERE user_id = ?", (user_id,)
            )
            return None if row is None else int(row[0])

        return self.database.run("get_max_stream_id", txn, readonly=True)

    def get_stream_since(
        self, user_id: str, after: int, limit: Optional[int] = None
    ) -> "Deferred[list[StreamChange]]":
        def txn(t: Txn) -> list[StreamChange]:
            sql = (
                "SELECT stream_id, device_id, kind, ts FROM local_device_stream"
                " WHERE user_id = ? AND stream_id > ? ORDER BY stream_id"
            )
            params: list[Any] = [user_id, after]
            if limit is not None:
                sql += " LIMIT ?"
                params.append(limit)
            return [
                StreamChange(user_id, int(sid), device_id, kind, int(ts))
                for sid, device_id, kind, ts in t.query(sql, params)
            ]

        return self.database.run("get_stream_since", txn, readonly=True)

    # ------------------------------------------------------------------
    # One-time, fallback and cross-signing keys
    # ------------------------------------------------------------------

    def add_one_time_keys(
        self,
        user_id: str,
        device_id: str,
        keys: Sequence[tuple[str, str, KeyJson]],
    ) -> "Deferred[None]":
        batch = [(algorithm, key_id, dumps(key_json)) for algorithm, key_id, key_json in keys]

        def txn(t: Txn) -> None:
            if not self._device_exists(t, user_id, device_id, lock=True):
                raise UnknownDeviceError(user_id, device_id)
            existing = {
                (algorithm, key_id): text
                for algorithm, key_id, text in t.query(
                    "SELECT algorithm, key_id, key_json FROM local_one_time_keys"
                    " WHERE user_id = ? AND device_id = ?",
                    (user_id, device_id),
                )
            }
            new = []
            for algorithm, key_id, text in batch:
                known = existing.get((algorithm, key_id))
                if known is None:
                    existing[(algorithm, key_id)] = text
                    new.append((user_id, device_id, algorithm, key_id, text))
                elif known != text:
                    raise KeyConflictError(user_id, device_id, algorithm, key_id)
            # executemany keeps the list order, which is the claim order.
            t.executemany(
                "INSERT INTO local_one_time_keys (user_id, device_id, algorithm, key_id, key_json)"
                " VALUES (?, ?, ?, ?, ?)",
                new,
            )

        return self.database.run("add_one_time_keys", txn)

    def count_one_time_keys(self, user_id: str, device_id: str) -> "Deferred[dict[str, int]]":
        def txn(t: Txn) -> dict[str, int]:
            rows = t.query(
                "SELECT algorithm, COUNT(*) FROM local_one_time_keys"
                " WHERE user_id = ? AND device_id = ? GROUP BY algorithm",
                (user_id, device_id),
            )
            return {algorithm: int(n) for algorithm, n in rows}

        return self.database.run("count_one_time_keys", txn, readonly=True)

    def set_fallback_key(
        self,
        user_id: str,
        device_id: str,
        algorithm: str,
        key_id: str,
        key_json: KeyJson,
    ) -> "Deferred[None]":
        text = dumps(key_json)

        def txn(t: Txn) -> None:
            if not self._device_exists(t, user_id, device_id, lock=True):
                raise UnknownDeviceError(user_id, device_id)
            # The same key uploaded again keeps its "used" mark; a new key is unused.
            t.execute(
                "INSERT INTO local_fallback_keys"
                " (user_id, device_id, algorithm, key_id, key_json, used)"
                " VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (user_id, device_id, algorithm) DO UPDATE SET"
                " used = CASE WHEN local_fallback_keys.key_id = excluded.key_id"
                " AND local_fallback_keys.key_json = excluded.key_json"
                " THEN local_fallback_keys.used ELSE excluded.used END,"
                " key_id = excluded.key_id, key_json = excluded.key_json",
                (user_id, device_id, algorithm, key_id, text, False),
            )

        return self.database.run("set_fallback_key", txn)

    def get_unused_fallback_key_algorithms(
        self, user_id: str, device_id: str
    ) -> "Deferred[list[str]]":
        def txn(t: Txn) -> list[str]:
            rows = t.query(
                "SELECT algorithm FROM local_fallback_keys"
                " WHERE user_id = ? AND device_id = ? AND used = ? ORDER BY algorithm",
                (user_id, device_id, False),
            )
            return [r[0] for r in rows]

        return self.database.run("get_unused_fallback_key_algorithms", txn, readonly=True)

    def claim_keys(self, requests: Collection[tuple[str, str, str]]) -> "Deferred[ClaimResult]":
        # A fixed order keeps concurrent claimers from deadlocking on fallback rows.
        wanted = sorted(set(requests))

        def txn(t: Txn) -> ClaimResult:
            claimed: ClaimResult = {}
            skip_locked = t.dialect.for_update_skip_locked
            for user_id, device_id, algorithm in wanted:
                row = t.query_one(
                    "DELETE FROM local_one_time_keys WHERE seq = ("
                    " SELECT seq FROM local_one_time_keys"
                    " WHERE user_id = ? AND device_id = ? AND algorithm = ?"
                    f" ORDER BY seq LIMIT 1{skip_locked})"
                    " RETURNING key_id, key_json",
                    (user_id, device_id, algorithm),
                )
                if row is None:
                    row = t.query_one(
                        "UPDATE local_fallback_keys SET used = ?"
                        " WHERE user_id = ? AND device_id = ? AND algorithm = ?"
                        " RETURNING key_id, key_json",
                        (True, user_id, device_id, algorithm),
                    )
                if row is not None:
                    key_id, text = row
                    device_keys = claimed.setdefault(user_id, {}).setdefault(device_id, {})
                    device_keys[f"{algorithm}:{key_id}"] = loads(text)
            return claimed

        return self.database.run("claim_keys", txn)

    def set_cross_signing_key(
        self,
        user_id: str,
        usage: str,
        key_json: JsonDict,
        now_ms: int,
        destinations: Collection[str],
    ) -> "Deferred[int]":
        error = _bad_usage(usage)
        if error is not None:
            return fail(error)
        text = dumps(key_json)
        # user-signing keys are private to their owner: logged, not federated.
        targets = destinations if usage in FEDERATED_CROSS_SIGNING_USAGES else ()

        def txn(t: Txn) -> int:
            stream_id = self._allocate_stream_id(t, user_id)
            t.execute(
                "INSERT INTO local_cross_signing_keys (user_id, usage, key_json, updated_ts)"
                " VALUES (?, ?, ?, ?)"
                " ON CONFLICT (user_id, usage) DO UPDATE SET"
                " key_json = excluded.key_json, updated_ts = excluded.updated_ts",
                (user_id, usage, text, now_ms),
            )
            self._log_change(t, user_id, stream_id, None, KIND_SIGNING_KEY, now_ms, targets)
            return stream_id

        return self.database.run("set_cross_signing_key", txn)

    def set_cross_signing_keys(
        self,
        user_id: str,
        keys: Mapping[str, JsonDict],
        now_ms: int,
        destinations: Collection[str],
    ) -> "Deferred[int]":
        if not keys:
            return fail(ValueError("no cross-signing key to store"))
        for usage in keys:
            error = _bad_usage(usage)
            if error is not None:
                return fail(error)
        rows = [
            (user_id, usage, dumps(key_json), now_ms) for usage, key_json in sorted(keys.items())
        ]
        federated = any(usage in FEDERATED_CROSS_SIGNING_USAGES for usage in keys)
        targets = destinations if federated else ()

        def txn(t: Txn) -> int:
            stream_id = self._allocate_stream_id(t, user_id)
            t.executemany(
                "INSERT INTO local_cross_signing_keys (user_id, usage, key_json, updated_ts)"
                " VALUES (?, ?, ?, ?)"
                " ON CONFLICT (user_id, usage) DO UPDATE SET"
                " key_json = excluded.key_json, updated_ts = excluded.updated_ts",
                rows,
            )
            self._log_change(t, user_id, stream_id, None, KIND_SIGNING_KEY, now_ms, targets)
            return stream_id

        return self.database.run("set_cross_signing_keys", txn)

    def get_cross_signing_keys(self, user_id: str) -> "Deferred[dict[str, JsonDict]]":
        def txn(t: Txn) -> dict[str, JsonDict]:
            rows = t.query(
                "SELECT usage, key_json FROM local_cross_signing_keys WHERE user_id = ?",
                (user_id,),
            )
            return {usage: loads(text) for usage, text in rows}

        return self.database.run("get_cross_signing_keys", txn, readonly=True)

    def store_signatures(
        self,
        signer_user_id: str,
        signatures: Sequence[CrossSigningSignature],
        now_ms: int,
        destinations: Collection[str],
    ) -> "Deferred[list[StreamChange]]":
        for signature in signatures:
            if signature.signer_user_id != signer_user_id:
                return fail(
                    ValueError(
                        f"signature by {signature.signer_user_id!r} passed as one by "
                        f"{signer_user_id!r}"
                    )
                )
        own_targets = sorted(
            {s.target_id for s in signatures if s.target_user_id == signer_user_id}
        )

        def txn(t: Txn) -> list[StreamChange]:
            own_devices: set[str] = set()
            for chunk in _chunks(own_targets):
                own_devices.update(
                    r[0]
                    for r in t.query(
                        "SELECT device_id FROM local_devices WHERE user_id = ?"
                        f" AND device_id IN ({_marks(len(chunk))})",
                        [signer_user_id, *chunk],
                    )
                )
            t.executemany(
                "INSERT INTO local_cross_signing_signatures"
                " (signer_user_id, signer_key_id, target_user_id, target_id, signature)"
                " VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (target_user_id, target_id, signer_user_id, signer_key_id)"
                " DO UPDATE SET signature = excluded.signature",
                [
                    (s.signer_user_id, s.signer_key_id, s.target_user_id, s.target_id, s.signature)
                    for s in signatures
                ],
            )
            changes = []
            for device_id in sorted(own_devices):
                stream_id = self._allocate_stream_id(t, signer_user_id)
                changes.append(
                    self._log_change(
                        t, signer_user_id, stream_id, device_id, KIND_DEVICE, now_ms, destinations
                    )
                )
            if any(target not in own_devices for target in own_targets):
                # a signature of one of the signer's own cross-signing keys
                stream_id = self._allocate_stream_id(t, signer_user_id)
                changes.append(
                    self._log_change(
                        t, signer_user_id, stream_id, None, KIND_SIGNING_KEY, now_ms, destinations
                    )
                )
            return changes

        return self.database.run("store_signatures", txn)

    def get_signatures(
        self, target_user_id: str, target_ids: Optional[Collection[str]] = None
    ) -> "Deferred[list[CrossSigningSignature]]":
        def txn(t: Txn) -> list[CrossSigningSignature]:
            rows = t.query(
                "SELECT signer_user_id, signer_key_id, target_user_id, target_id, signature"
                " FROM local_cross_signing_signatures WHERE target_user_id = ?"
                " ORDER BY target_id, signer_user_id, signer_key_id",
                (target_user_id,),
            )
            result = [CrossSigningSignature(*r) for r in rows]
            if target_ids is not None:
                wanted = set(target_ids)
                result = [s for s in result if s.target_id in wanted]
            return result

        return self.database.run("get_signatures", txn, readonly=True)

    # ------------------------------------------------------------------
    # What other servers see: keys queries and /user/devices snapshots
    # ------------------------------------------------------------------

    def _read_user_keys(
        self,
        t: Txn,
        wanted: Mapping[str, Optional[Collection[str]]],
        positions: Mapping[str, int],
        from_user_id: Optional[str],
    ) -> dict[str, LocalUserKeys]:
        """Devices with keys, cross-signing keys and signatures of the users:
        a fixed number of statements per 500 users (none per device)."""
        users = sorted(wanted)
        devices: dict[str, list[KeyedDevice]] = {u: [] for u in users}
        keys: dict[str, dict[str, JsonDict]] = {u: {} for u in users}
        signatures: dict[str, list[CrossSigningSignature]] = {u: [] for u in users}
        # The keys stay JSON text here: decoding 10,000 of them would hold
        # the connection (SQLite has one) for longer than the query itself.
        columns = (
            "SELECT d.user_id, d.device_id, d.display_name, k.keys_json"
            " FROM local_devices d JOIN local_device_keys k"
            " ON k.user_id = d.user_id AND k.device_id = d.device_id"
        )
        every_device = [u for u in users if wanted[u] is None]
        for chunk in _chunks(every_device):
            for row in t.query(
                f"{columns} WHERE d.user_id IN ({_marks(len(chunk))})"
                " ORDER BY d.user_id, d.device_id",
                chunk,
            ):
                devices[row[0]].append(KeyedDevice(row[1], row[2], row[3]))
        for user_id in users:
            device_ids = wanted[user_id]
            if device_ids is None:
                continue
            for device_chunk in _chunks(sorted(set(device_ids))):
                for row in t.query(
                    f"{columns} WHERE d.user_id = ?"
                    f" AND d.device_id IN ({_marks(len(device_chunk))}) ORDER BY d.device_id",
                    [user_id, *device_chunk],
                ):
                    devices[user_id].append(KeyedDevice(row[1], row[2], row[3]))
        for chunk in _chunks(users):
            marks = _marks(len(chunk))
            for user_id, usage, text in t.query(
                "SELECT user_id, usage, key_json FROM local_cross_signing_keys"
                f" WHERE user_id IN ({marks})",
                chunk,
            ):
                keys[user_id][usage] = loads(text)
            signers = "s.signer_user_id = s.target_user_id"
            params: list[Any] = list(chunk)
            if from_user_id is not None:
                signers += " OR s.signer_user_id = ?"
                params.append(from_user_id)
            for row in t.query(
                "SELECT s.signer_user_id, s.signer_key_id, s.target_user_id, s.target_id,"
                " s.signature FROM local_cross_signing_signatures s"
                f" WHERE s.target_user_id IN ({marks}) AND ({signers})"
                " ORDER BY s.target_user_id, s.target_id, s.signer_user_id, s.signer_key_id",
                params,
            ):
                signatures[row[2]].append(CrossSigningSignature(*row))
        return {
            u: LocalUserKeys(
                user_id=u,
                stream_id=positions.get(u, 0),
                devices=tuple(devices[u]),
                cross_signing_keys=keys[u],
                signatures=tuple(signatures[u]),
            )
            for u in users
        }

    def _stream_positions(self, t: Txn, users: Iterable[str]) -> dict[str, int]:
        positions: dict[str, int] = {}
        for chunk in _chunks(sorted(users)):
            for user_id, pos in t.query(
                "SELECT user_id, pos FROM local_stream_positions"
                f" WHERE user_id IN ({_marks(len(chunk))})",
                chunk,
            ):
                positions[user_id] = int(pos)
        return positions

    def get_local_user_keys(
        self,
        wanted: Mapping[str, Optional[Collection[str]]],
        *,
        from_user_id: Optional[str] = None,
    ) -> "Deferred[dict[str, LocalUserKeys]]":
        requested = {u: (None if ids is None else tuple(ids)) for u, ids in wanted.items()}

        def txn(t: Txn) -> dict[str, LocalUserKeys]:
            positions = self._stream_positions(t, requested)
            return self._read_user_keys(t, requested, positions, from_user_id)

        return self.database.run("get_local_user_keys", txn, readonly=True)

    def get_local_user_keys_since(
        self,
        wanted: Mapping[str, Optional[Collection[str]]],
        known_stream_ids: Mapping[str, int],
    ) -> "Deferred[dict[str, Optional[LocalUserKeys]]]":
        requested = {u: (None if ids is None else tuple(ids)) for u, ids in wanted.items()}
        known = dict(known_stream_ids)

        def txn(t: Txn) -> dict[str, Optional[LocalUserKeys]]:
            positions = self._stream_positions(t, requested)
            changed = {
                u: ids for u, ids in requested.items() if u not in positions or positions[u] != known.get(u)
            }
            found: dict[str, Optional[LocalUserKeys]] = dict.fromkeys(requested)
            if changed:
                found.update(self._read_user_keys(t, changed, positions, None))
            return found

        return self.database.run("get_local_user_keys_since", txn, readonly=True)

    def _user_devices_snapshot(
        self, t: Txn, user_id: str, destination: Optional[str], known_stream_id: Optional[int]
    ) -> Optional[LocalUserKeys]:
        # Holding the user's position row keeps every change of the user
        # (they all take it first, exclusively) out until this snapshot is
        # read; shared, so that concurrent snapshots do not wait on each other.
        lock = t.dialect.for_share if destination is not None else ""
        row = t.query_one(
            f"SELECT pos FROM local_stream_positions WHERE user_id = ?{lock}", (user_id,)
        )
        position = None if row is None else int(row[0])
        snapshot = None
        if position is None or position != known_stream_id:
            positions = {} if position is None else {user_id: position}
            snapshot = self._read_user_keys(t, {user_id: None}, positions, None)[user_id]
        if destination is not None and position is not None:
            self._record_snapshot_served(t, destination, user_id, position)
        return snapshot

    def get_user_devices_snapshot(
        self, user_id: str, destination: Optional[str] = None
    ) -> "Deferred[LocalUserKeys]":
        def txn(t: Txn) -> LocalUserKeys:
            snapshot = self._user_devices_snapshot(t, user_id, destination, None)
            assert snapshot is not None
            return snapshot

        return self.database.run(
            "get_user_devices_snapshot", txn, readonly=destination is None
        )

    def get_user_devices_snapshot_since(
        self, user_id: str, destination: Optional[str], known_stream_id: int
    ) -> "Deferred[Optional[LocalUserKeys]]":
        def txn(t: Txn) -> Optional[LocalUserKeys]:
            return self._user_devices_snapshot(t, user_id, destination, known_stream_id)

        return self.database.run(
            "get_user_devices_snapshot_since", txn, readonly=destination is None
        )

    def _record_snapshot_served(
        self, t: Txn, destination: str, user_id: str, stream_id: int
    ) -> None:
        """The snapshot at ``stream_id`` covers the destination's pending
        changes up to it and becomes what the next EDU names as ``prev_id``,
        unless the destination already acknowledged a later EDU."""
        # Signing-key rows stay: m.signing_key_update carries no stream id,
        # so an older one still in flight (a transaction built before the
        # snapshot) would otherwise be the last word; the row resends the
        # current keys after it.
        t.execute(
            "DELETE FROM outbound_pending WHERE destination = ? AND user_id = ?"
            " AND kind = ? AND stream_id <= ?",
            (destination, user_id, KIND_DEVICE, stream_id),
        )
        sql = (
            "SELECT stream_ids_json, snapshot_stream_id FROM outbound_unreferenced"
            " WHERE destination = ? AND user_id = ?"
        )
        # read unlocked first: the usual answer, "served this snapshot before
        # and nothing sent since", writes nothing, and concurrent requests of
        # one server for one user must not queue on the row's lock for it
        row = t.query_one(sql, (destination, user_id))
        if row is not None and _snapshot_recorded(row, stream_id):
            return
        if t.dialect.for_update:
            row = t.query_one(sql + t.dialect.for_update, (destination, user_id))
            if row is not None and _snapshot_recorded(row, stream_id):
                return
        t.execute(
            "INSERT INTO outbound_unreferenced"
            " (destination, user_id, stream_ids_json, snapshot_stream_id) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (destination, user_id) DO UPDATE SET"
            " stream_ids_json = excluded.stream_ids_json,"
            " snapshot_stream_id = excluded.snapshot_stream_id",
            (destination, user_id, dumps([stream_id]), stream_id),
        )

    def record_snapshot_served(
        self, destination: str, user_id: str, stream_id: int
    ) -> "Deferred[None]":
        if stream_id < 1:
            return fail(ValueError("a served snapshot's stream_id must be at least 1"))

        def txn(t: Txn) -> None:
            row = t.query_one(
                "SELECT pos FROM local_stream_positions"
                f" WHERE user_id = ?{t.dialect.for_update}",
                (user_id,),
            )
            position = 0 if row is None else int(row[0])
            if stream_id > position:
                raise ValueError(
                    f"stream id {stream_id} of {user_id!r} was never allocated (last {position})"
                )
            self._record_snapshot_served(t, destination, user_id, stream_id)

        return self.database.run("record_snapshot_served", txn)

    # ------------------------------------------------------------------
    # Outbound
    # ------------------------------------------------------------------

    def get_pending(self, destination: str, limit: int) -> "Deferred[list[PendingRow]]":
        def txn(t: Txn) -> list[PendingRow]:
            rows = t.query(
                "SELECT user_id, kind, device_id, stream_id FROM outbound_pending"
                " WHERE destination = ?"
                " ORDER BY stream_id, user_id, kind, device_id LIMIT ?",
                (destination, limit),
            )
            return [
                PendingRow(user_id, _pending_device(kind, device_id), int(stream_id))
                for user_id, kind, device_id, stream_id in rows
            ]

        return self.database.run("get_pending", txn, readonly=True)

    def get_unreferenced(
        self, destination: str, user_ids: Collection[str]
    ) -> "Deferred[dict[str, frozenset[int]]]":
        wanted = sorted(set(user_ids))

        def txn(t: Txn) -> dict[str, frozenset[int]]:
            result = {user_id: frozenset[int]() for user_id in wanted}
            for chunk in _chunks(wanted):
                rows = t.query(
                    "SELECT user_id, stream_ids_json FROM outbound_unreferenced"
                    f" WHERE destination = ? AND user_id IN ({_marks(len(chunk))})",
                    [destination, *chunk],
                )
                for user_id, text in rows:
                    result[user_id] = frozenset(int(i) for i in loads(text))
            return result

        return self.database.run("get_unreferenced", txn, readonly=True)

    def ack_sent(
        self,
        destination: str,
        sent: Iterable[SentItem],
        unreferenced_after: Mapping[str, Collection[int]],
        *,
        completed_txn_id: Optional[str] = None,
    ) -> "Deferred[None]":
        rows = []
        for item in sent:
            if isinstance(item, PendingRow):
                user_id, device_id, stream_id = item.user_id, item.device_id, item.stream_id
            else:
                user_id, device_id, stream_id = item
            kind = KIND_DEVICE if device_id is not None else KIND_SIGNING_KEY
            rows.append((destination, user_id, kind, device_id or "", stream_id))
        unreferenced = {u: sorted(set(ids)) for u, ids in unreferenced_after.items()}

        def txn(t: Txn) -> None:
            # A change made after the one sent has a larger stream id and survives.
            t.executemany(
                "DELETE FROM outbound_pending WHERE destination = ? AND user_id = ?"
                " AND kind = ? AND device_id = ? AND stream_id <= ?",
                rows,
            )
            # An acknowledgement whose ids are all older than a /user/devices
            # snapshot served meanwhile (a transaction in flight while it was
            # served) leaves the snapshot's id in place: the destination
            # correlates the next EDU with the snapshot.  One that reaches
            # the snapshot's id ends its protection.
            below_snapshot = (
                "outbound_unreferenced.snapshot_stream_id IS NOT NULL"
                " AND ? < outbound_unreferenced.snapshot_stream_id"
            )
            t.executemany(
                "INSERT INTO outbound_unreferenced"
                " (destination, user_id, stream_ids_json, snapshot_stream_id)"
                " VALUES (?, ?, ?, NULL) ON CONFLICT (destination, user_id) DO UPDATE SET"
                f" stream_ids_json = CASE WHEN {below_snapshot}"
                " THEN outbound_unreferenced.stream_ids_json ELSE excluded.stream_ids_json END,"
                f" snapshot_stream_id = CASE WHEN {below_snapshot}"
                " THEN outbound_unreferenced.snapshot_stream_id ELSE NULL END",
                [
                    (destination, u, dumps(ids), ids[-1], ids[-1])
                    for u, ids in sorted(unreferenced.items())
                    if ids
                ],
            )
            t.executemany(
                "DELETE FROM outbound_unreferenced WHERE destination = ? AND user_id = ?",
                [(destination, u) for u, ids in sorted(unreferenced.items()) if not ids],
            )
            if completed_txn_id is not None:
                self._clear_inflight(t, destination, completed_txn_id)

        return self.database.run("ack_sent", txn)

    def destinations_with_pending(self) -> "Deferred[list[str]]":
        def txn(t: Txn) -> list[str]:
            rows = t.query("SELECT DISTINCT destination FROM outbound_pending ORDER BY destination")
            return [r[0] for r in rows]

        return self.database.run("destinations_with_pending", txn, readonly=True)

    def enqueue_current_devices(
        self, destination: str, user_id: str, now_ms: int
    ) -> "Deferred[list[PendingRow]]":
        def txn(t: Txn) -> list[PendingRow]:
            # Lock the user's stream so that no change commits half-seen.
            row = t.query_one(
                f"SELECT pos FROM local_stream_positions WHERE user_id = ?{t.dialect.for_update}",
                (user_id,),
            )
            if row is None:
                return []
            position = int(row[0])
            latest: dict[Optional[str], int] = {}
            for device_id, stream_id in t.query(
                "SELECT d.device_id, (SELECT MAX(s.stream_id) FROM local_device_stream s"
                " WHERE s.user_id = d.user_id AND s.device_id = d.device_id AND s.kind = ?)"
                " FROM local_devices d WHERE d.user_id = ?",
                (KIND_DEVICE, user_id),
            ):
                latest[device_id] = position if stream_id is None else int(stream_id)
            has_keys = t.query_one(
                "SELECT 1 FROM local_cross_signing_keys WHERE user_id = ?"
                f" AND usage IN ({_marks(len(FEDERATED_CROSS_SIGNING_USAGES))})",
                [user_id, *FEDERATED_CROSS_SIGNING_USAGES],
            )
            if has_keys is not None:
                key_row = t.query_one(
                    "SELECT MAX(stream_id) FROM local_device_stream WHERE user_id = ? AND kind = ?",
                    (user_id, KIND_SIGNING_KEY),
                )
                latest[None] = (
                    position if key_row is None or key_row[0] is None else int(key_row[0])
                )
            for device_id, stream_id in latest.items():
                self._enqueue_pending(t, (destination,), user_id, device_id, stream_id, now_ms)
            return sorted(
                (PendingRow(user_id, d, s) for d, s in latest.items()),
                key=lambda p: (p.stream_id, p.device_id or ""),
            )

        return self.database.run("enqueue_current_devices", txn)

    def _clear_inflight(self, t: Txn, destination: str, txn_id: Optional[str]) -> bool:
        sql = (
            "UPDATE outbound_destinations SET inflight_txn_id = NULL, inflight_payload_json = NULL"
            " WHERE destination = ? AND inflight_txn_id IS NOT NULL"
        )
        params: list[Any] = [destination]
        if txn_id is not None:
            sql += " AND inflight_txn_id = ?"
            params.append(txn_id)
        t.execute(sql, params)
        return t.rowcount > 0

    def get_inflight_txn(self, destination: str) -> "Deferred[Optional[InflightTransaction]]":
        def txn(t: Txn) -> Optional[InflightTransaction]:
            row = t.query_one(
                "SELECT inflight_txn_id, inflight_payload_json FROM outbound_destinations"
                " WHERE destination = ? AND inflight_txn_id IS NOT NULL",
                (destination,),
            )
            return None if row is None else InflightTransaction(row[0], loads(row[1]))

        return self.database.run("get_inflight_txn", txn, readonly=True)

    def set_inflight_txn(
        self, destination: str, txn_id: str, payload: JsonDict
    ) -> "Deferred[None]":
        text = dumps(payload)

        def txn(t: Txn) -> None:
            t.execute(
                "INSERT INTO outbound_destinations"
                " (destination, inflight_txn_id, inflight_payload_json) VALUES (?, ?, ?)"
                " ON CONFLICT (destination) DO UPDATE SET"
                " inflight_txn_id = excluded.inflight_txn_id,"
                " inflight_payload_json = excluded.inflight_payload_json",
                (destination, txn_id, text),
            )

        return self.database.run("set_inflight_txn", txn)

    def clear_inflight_txn(
        self, destination: str, txn_id: Optional[str] = None
    ) -> "Deferred[bool]":
        return self.database.run(
            "clear_inflight_txn", lambda t: self._clear_inflight(t, destination, txn_id)
        )

    def get_retry_state(self, destination: str) -> "Deferred[Optional[RetryState]]":
        def txn(t: Txn) -> Optional[RetryState]:
            row = t.query_one(
                "SELECT failure_ts, retry_last_ts, retry_interval_ms, retry_attempts"
                " FROM outbound_destinations WHERE destination = ?",
                (destination,),
            )
            if row is None or (row[0] is None and row[1] is None and not row[2] and not row[3]):
                return None
            return RetryState(
                failure_ts=None if row[0] is None else int(row[0]),
                retry_last_ts=None if row[1] is None else int(row[1]),
                retry_interval_ms=int(row[2]),
                attempts=int(row[3]),
            )

        return self.database.run("get_retry_state", txn, readonly=True)

    def set_retry_state(self, destination: str, state: Optional[RetryState]) -> "Deferred[None]":
        values = (
            (None, None, 0, 0)
            if state is None
            else (state.failure_ts, state.retry_last_ts, state.retry_interval_ms, state.attempts)
        )

        def txn(t: Txn) -> None:
            t.execute(
                "INSERT INTO outbound_destinations (destination, failure_ts, retry_last_ts,"
                " retry_interval_ms, retry_attempts) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (destination) DO UPDATE SET failure_ts = excluded.failure_ts,"
                " retry_last_ts = excluded.retry_last_ts,"
                " retry_interval_ms = excluded.retry_interval_ms,"
                " retry_attempts = excluded.retry_attempts",
                (destination, *values),
            )

        return self.database.run("set_retry_state", txn)

    # ------------------------------------------------------------------
    # Outbound: the sender's reads, chain resets, dead destinations
    # (devicelist_plugin/replication/sender.py)
    # ------------------------------------------------------------------

    def get_outbound_batch(
        self, destination: str, limit: int, *, with_devices: bool = False
    ) -> "Deferred[PendingBatch]":
        if limit < 1:
            return fail(ValueError("limit must be at least 1"))

        def txn(t: Txn) -> PendingBatch:
            rows = [
                PendingRow(user_id, _pending_device(kind, device_id), int(stream_id))
                for user_id, kind, device_id, stream_id in t.query(
                    "SELECT user_id, kind, device_id, stream_id FROM outbound_pending"
                    " WHERE destination = ?"
                    " ORDER BY stream_id, user_id, kind, device_id LIMIT ?",
                    (destination, limit),
                )
            ]
            users = sorted({row.user_id for row in rows})
            unreferenced = {user_id: frozenset[int]() for user_id in users}
            for chunk in _chunks(users):
                for user_id, text in t.query(
                    "SELECT user_id, stream_ids_json FROM outbound_unreferenced"
                    f" WHERE destination = ? AND user_id IN ({_marks(len(chunk))})",
                    [destination, *chunk],
                ):
                    unreferenced[user_id] = frozenset(int(i) for i in loads(text))
            resets = {
                user_id: None if stream_id is None else int(stream_id)
                for user_id, stream_id in t.query(
                    "SELECT user_id, stream_id FROM outbound_chain_resets WHERE destination = ?",
                    (destination,),
                )
            }
            if not with_devices:
                return PendingBatch(tuple(rows), unreferenced, resets)
            wanted: dict[str, set[str]] = {}
            for row in rows:
                if row.device_id is not None:
                    wanted.setdefault(row.user_id, set()).add(row.device_id)
            names: dict[str, dict[str, Optional[str]]] = {}
            for user_id, device_ids in sorted(wanted.items()):
                names[user_id] = {}
                for chunk in _chunks(sorted(device_ids)):
                    for device_id, name in t.query(
                        "SELECT device_id, display_name FROM local_devices"
                        f" WHERE user_id = ? AND device_id IN ({_marks(len(chunk))})",
                        [user_id, *chunk],
                    ):
                        names[user_id][device_id] = name
            device_keys = self._read_user_keys(
                t, {u: tuple(ids) for u, ids in wanted.items()}, {}, None
            )
            return PendingBatch(tuple(rows), unreferenced, resets, device_keys, names)

        return self.database.run("get_outbound_batch", txn, readonly=True)

    def destinations_pending_for_user(self, user_id: str) -> "Deferred[list[str]]":
        def txn(t: Txn) -> list[str]:
            rows = t.query(
                "SELECT DISTINCT destination FROM outbound_pending WHERE user_id = ?"
                " ORDER BY destination",
                (user_id,),
            )
            return [r[0] for r in rows]

        return self.database.run("destinations_pending_for_user", txn, readonly=True)

    def destinations_to_send(self) -> "Deferred[list[str]]":
        def txn(t: Txn) -> list[str]:
            rows = t.query(
                "SELECT destination FROM outbound_pending"
                " UNION SELECT destination FROM outbound_destinations"
                " WHERE inflight_txn_id IS NOT NULL"
                " UNION SELECT destination FROM outbound_chain_resets"
                " ORDER BY 1"
            )
            return [r[0] for r in rows]

        return self.database.run("destinations_to_send", txn, readonly=True)

    def add_chain_resets(self, pairs: Collection[tuple[str, str]]) -> "Deferred[None]":
        rows = sorted(set(pairs))

        def txn(t: Txn) -> None:
            self._add_chain_resets(t, rows)

        return self.database.run("add_chain_resets", txn)

    @staticmethod
    def _add_chain_resets(t: Txn, pairs: Sequence[tuple[str, str]]) -> None:
        t.executemany(
            "INSERT INTO outbound_chain_resets (destination, user_id) VALUES (?, ?)"
            " ON CONFLICT (destination, user_id) DO NOTHING",
            pairs,
        )

    def prepare_chain_resets(self, destination: str, now_ms: int) -> "Deferred[frozenset[str]]":
        def txn(t: Txn) -> frozenset[str]:
            resets = t.query(
                "SELECT user_id, stream_id FROM outbound_chain_resets WHERE destination = ?"
                " ORDER BY user_id",
                (destination,),
            )
            kept = set()
            for user_id, target in resets:
                latest = t.query_one(
                    "SELECT device_id, stream_id FROM local_device_stream"
                    " WHERE user_id = ? AND kind = ? ORDER BY stream_id DESC LIMIT 1",
                    (user_id, KIND_DEVICE),
                )
                if latest is None:
                    # no device ever changed: there is no chain to restart
                    t.execute(
                        "DELETE FROM outbound_chain_resets WHERE destination = ? AND user_id = ?",
                        (destination, user_id),
                    )
                    continue
                self._enqueue_pending(
                    t, (destination,), user_id, latest[0], int(latest[1]), now_ms
                )
                if target is None:
                    t.execute(
                        "UPDATE outbound_chain_resets SET stream_id = ?"
                        " WHERE destination = ? AND user_id = ?",
                        (int(latest[1]), destination, user_id),
                    )
                kept.add(user_id)
            return frozenset(kept)

        return self.database.run("prepare_chain_resets", txn)

    def begin_outbound_transaction(
        self,
        destination: str,
        txn_id: str,
        payload: JsonDict,
        consumed_resets: Collection[str],
    ) -> "Deferred[None]":
        text = dumps(payload)
        users = sorted(set(consumed_resets))

        def txn(t: Txn) -> None:
            t.execute(
                "INSERT INTO outbound_destinations"
                " (destination, inflight_txn_id, inflight_payload_json) VALUES (?, ?, ?)"
                " ON CONFLICT (destination) DO UPDATE SET"
                " inflight_txn_id = excluded.inflight_txn_id,"
                " inflight_payload_json = excluded.inflight_payload_json",
                (destination, txn_id, text),
            )
            t.executemany(
                "DELETE FROM outbound_chain_resets WHERE destination = ? AND user_id = ?",
                [(destination, user_id) for user_id in users],
            )

        return self.database.run("begin_outbound_transaction", txn)

    def compact_destination(self, destination: str) -> "Deferred[int]":
        def txn(t: Txn) -> int:
            dropped = t.query(
                "DELETE FROM outbound_pending WHERE destination = ? AND kind = ?"
                " RETURNING user_id",
                (destination, KIND_DEVICE),
            )
            users = sorted({r[0] for r in dropped})
            self._add_chain_resets(t, [(destination, user_id) for user_id in users])
            return len(dropped)

        return self.database.run("compact_destination", txn)

    def count_outbound_rows(self, destination: str) -> "Deferred[OutboundRowCounts]":
        def txn(t: Txn) -> OutboundRowCounts:
            def count(sql: str) -> int:
                row = t.query_one(sql, (destination,))
                return 0 if row is None else int(row[0])

            return OutboundRowCounts(
                pending=count("SELECT COUNT(*) FROM outbound_pending WHERE destination = ?"),
                unreferenced=count(
                    "SELECT COUNT(*) FROM outbound_unreferenced WHERE destination = ?"
                ),
                chain_resets=count(
                    "SELECT COUNT(*) FROM outbound_chain_resets WHERE destination = ?"
                ),
            )

        return self.database.run("count_outbound_rows", txn, readonly=True)

    # ------------------------------------------------------------------
    # Admin API: destination status (devicelist_plugin/standalone/admin.py)
    # ------------------------------------------------------------------

    def get_destination_statuses(
        self, destination: Optional[str] = None
    ) -> "Deferred[list[DestinationStatus]]":
        where = "" if destination is None else " WHERE destination = ?"
        args: tuple[str, ...] = () if destination is None else (destination,)

        def txn(t: Txn) -> list[DestinationStatus]:
            pending: dict[str, tuple[int, Optional[int]]] = {
                str(r[0]): (int(r[1]), None if r[2] is None else int(r[2]))
                for r in t.query(
                    "SELECT destination, COUNT(*), MIN(queued_ts) FROM outbound_pending"
                    + where
                    + " GROUP BY destination",
                    args,
                )
            }
            states: dict[str, tuple[Optional[RetryState], Optional[str]]] = {}
            for r in t.query(
                "SELECT destination, failure_ts, retry_last_ts, retry_interval_ms,"
                " retry_attempts, inflight_txn_id FROM outbound_destinations" + where,
                args,
            ):
                healthy = r[1] is None and r[2] is None and not r[3] and not r[4]
                retry = None if healthy else RetryState(
                    failure_ts=None if r[1] is None else int(r[1]),
                    retry_last_ts=None if r[2] is None else int(r[2]),
                    retry_interval_ms=int(r[3]),
                    attempts=int(r[4]),
                )
                states[str(r[0])] = (retry, None if r[5] is None else str(r[5]))
            result = []
            for name in sorted(set(pending) | set(states)):
                count, oldest = pending.get(name, (0, None))
                retry, inflight = states.get(name, (None, None))
                result.append(DestinationStatus(name, count, oldest, retry, inflight))
            return result

        return self.database.run("get_destination_statuses", txn, readonly=True)

    # ------------------------------------------------------------------
    # Room memberships (devicelist_plugin/membership_store.py)
    # ------------------------------------------------------------------

    def join_room(
        self, room_id: str, user_id: str, own_server_name: str
    ) -> "Deferred[dict[str, frozenset[str]]]":
        def txn(t: Txn) -> dict[str, frozenset[str]]:
            members = {
                r[0]
                for r in t.query(
                    "SELECT user_id FROM room_memberships WHERE room_id = ?", (room_id,)
                )
            }
            concerned = sorted(join_concerns(own_server_name, user_id, members))
            joiner = server_of(user_id)
            sharing: dict[str, frozenset[str]] = {}
            if joiner == own_server_name:
                for local_user in concerned:
                    sharing[local_user] = self._servers_sharing_room(
                        t, local_user, own_server_name
                    )
            elif concerned:
                # which local members already share a room with the joiner's server
                already: set[str] = set()
                for chunk in _chunks(concerned):
                    already.update(
                        r[0]
                        for r in t.query(
                            "SELECT DISTINCT a.user_id FROM room_memberships a"
                            " JOIN room_memberships b ON b.room_id = a.room_id"
                            f" WHERE b.server_name = ? AND a.user_id IN ({_marks(len(chunk))})",
                            [joiner, *chunk],
                        )
                    )
                sharing = {u: frozenset({joiner}) for u in already}
            newly = servers_newly_sharing_on_join(own_server_name, user_id, members, sharing)
            t.execute(
                "INSERT INTO room_memberships (room_id, user_id, server_name) VALUES (?, ?, ?)"
                " ON CONFLICT (room_id, user_id) DO NOTHING",
                (room_id, user_id, joiner),
            )
            # Durable fan-out: the chain of each newly sharing server restarts
            # (the sender then sends at least one EDU of the user) even if
            # the process dies before the listeners have run.
            self._add_chain_resets(
                t,
                sorted(
                    (server, local_user)
                    for local_user, servers in newly.items()
                    for server in servers
                ),
            )
            return newly

        # SERIALIZABLE on PostgreSQL: two joins of one room, each reading the
        # members before the other's commit, must not both miss the sharing.
        return self.database.run("join_room", txn, isolation=Isolation.SERIALIZABLE)

    def leave_room(
        self, room_id: str, user_id: str, own_server_name: str
    ) -> "Deferred[list[str]]":
        def txn(t: Txn) -> list[str]:
            members = {
                r[0]
                for r in t.query(
                    "SELECT user_id FROM room_memberships WHERE room_id = ?", (room_id,)
                )
            }
            if user_id not in members:
                return []
            t.execute(
                "DELETE FROM room_memberships WHERE room_id = ? AND user_id = ?",
                (room_id, user_id),
            )
            concerned = sorted(leave_concerns(own_server_name, user_id, members))
            tracked: set[str] = set()
            for chunk in _chunks(concerned):
                tracked.update(
                    r[0]
                    for r in t.query(
                        "SELECT DISTINCT a.user_id FROM room_memberships a"
                        " JOIN room_memberships b ON b.room_id = a.room_id"
                        f" WHERE b.server_name = ? AND a.user_id IN ({_marks(len(chunk))})",
                        [own_server_name, *chunk],
                    )
                )
            return untracked_on_leave(
                own_server_name, user_id, members, {u: True for u in tracked}
            )

        return self.database.run("leave_room", txn, isolation=Isolation.SERIALIZABLE)

    @staticmethod
    def _servers_sharing_room(t: Txn, user_id: str, own_server_name: str) -> frozenset[str]:
        rows = t.query(
            "SELECT DISTINCT b.server_name FROM room_memberships a"
            " JOIN room_memberships b ON b.room_id = a.room_id"
            " WHERE a.user_id = ? AND b.server_name <> ? AND b.server_name <> ''",
            (user_id, own_server_name),
        )
        return frozenset(r[0] for r in rows)

    def get_servers_sharing_room(
        self, user_id: str, own_server_name: str
    ) -> "Deferred[frozenset[str]]":
        return self.database.run(
            "get_servers_sharing_room",
            lambda t: self._servers_sharing_room(t, user_id, own_server_name),
            readonly=True,
        )

    def is_user_tracked(self, user_id: str, own_server_name: str) -> "Deferred[bool]":
        return self.get_tracked_users([user_id], own_server_name).addCallback(
            lambda tracked: user_id in tracked
        )

    def get_tracked_users(
        self, user_ids: Collection[str], own_server_name: str
    ) -> "Deferred[frozenset[str]]":
        users = sorted(set(user_ids))

        def txn(t: Txn) -> frozenset[str]:
            tracked: set[str] = set()
            for chunk in _chunks(users):
                rows = t.query(
                    "SELECT DISTINCT a.user_id FROM room_memberships a"
                    " JOIN room_memberships b ON b.room_id = a.room_id"
                    f" WHERE a.user_id IN ({_marks(len(chunk))}) AND b.server_name = ?",
                    (*chunk, own_server_name),
                )
                tracked.update(row[0] for row in rows)
            return frozenset(tracked)

        return self.database.run("get_tracked_users", txn, readonly=True)

    def get_room_members(self, room_id: str) -> "Deferred[list[str]]":
        def txn(t: Txn) -> list[str]:
            rows = t.query(
                "SELECT user_id FROM room_memberships WHERE room_id = ? ORDER BY user_id",
                (room_id,),
            )
            return [r[0] for r in rows]

        return self.database.run("get_room_members", txn, readonly=True)

    # ------------------------------------------------------------------
    # Remote cache
    # ------------------------------------------------------------------

    def _lock_remote_user(self, t: Txn, user_id: str) -> tuple[int, int]:
        """Create-or-lock the user's sync row; return (stale_generation, cleared_generation)."""
        row = t.query_one(
            "SELECT stale_generation, cleared_generation FROM remote_sync_state"
            " WHERE user_id = ?" + t.dialect.for_update,
            (user_id,),
        )
        if row is not None:
            return int(row[0]), int(row[1])
        row = t.query_one(
            "INSERT INTO remote_sync_state (user_id) VALUES (?)"
            " ON CONFLICT (user_id) DO UPDATE SET user_id = excluded.user_id"
            " RETURNING stale_generation, cleared_generation",
            (user_id,),
        )
        assert row is not None
        return int(row[0]), int(row[1])

    def _replace_known_ids(
        self, t: Txn, user_id: str, known_ids: Collection[int]
    ) -> frozenset[int]:
        """Keep the newest ``known_ids_window`` of ``known_ids`` in the user's
        sync row (which the caller has locked, so it exists); return them."""
        kept = sorted(set(known_ids))[-self.known_ids_window :]
        t.execute(
            "UPDATE remote_sync_state SET known_stream_ids = ? WHERE user_id = ?",
            (_known_ids_text(kept), user_id),
        )
        return frozenset(kept)

    @staticmethod
    def _remote_device_row(user_id: str, device: RemoteDevice) -> tuple[Any, ...]:
        keys = None if device.keys is None else dumps(device.keys.raw)
        return (user_id, device.device_id, device.display_name, keys)

    _SYNC_COLUMNS = (
        "user_id, snapshot_stream_id, stale_generation, cleared_generation, stale_reason,"
        " stale_since_ts, last_resync_ts, resync_attempts, resync_retry_ts, known_stream_ids"
    )

    @staticmethod
    def _sync_state_of(row: Sequence[Any], known: Optional[frozenset[int]]) -> RemoteSyncState:
        return RemoteSyncState(
            user_id=row[0],
            snapshot_stream_id=None if row[1] is None else int(row[1]),
            known_ids=_known_ids_of(row[9]) if known is None else known,
            stale_generation=int(row[2]),
            cleared_generation=int(row[3]),
            stale_reason=row[4],
            stale_since_ts=None if row[5] is None else int(row[5]),
            last_resync_ts=None if row[6] is None else int(row[6]),
            resync_attempts=int(row[7]),
            resync_retry_ts=None if row[8] is None else int(row[8]),
        )

    def _read_remote_sync_state(self, t: Txn, user_id: str) -> Optional[RemoteSyncState]:
        return self._read_remote_sync_states(t, [user_id]).get(user_id)

    def _read_remote_sync_states(
        self, t: Txn, user_ids: Sequence[str], known: Optional[Mapping[str, frozenset[int]]] = None
    ) -> dict[str, RemoteSyncState]:
        """The sync rows of those of ``user_ids`` that have one; ``known``
        holds known stream ids this transaction wrote (not parsed again)."""
        written = known or {}
        states: dict[str, RemoteSyncState] = {}
        for chunk in _chunks(sorted(set(user_ids))):
            rows = t.query(
                f"SELECT {self._SYNC_COLUMNS} FROM remote_sync_state"
                f" WHERE user_id IN ({_marks(len(chunk))})",
                chunk,
            )
            for row in rows:
                states[row[0]] = self._sync_state_of(row, written.get(row[0]))
        return states

    @staticmethod
    def _read_remote_devices(t: Txn, user_id: str) -> list[RemoteDevice]:
        rows = t.query(
            "SELECT device_id, display_name, keys_json FROM remote_devices"
            " WHERE user_id = ? ORDER BY device_id",
            (user_id,),
        )
        return [
            RemoteDevice(
                device_id=device_id,
                keys=(
                    None
                    if text is None
                    else device_keys_from_json(loads(text), user_id, device_id)
                ),
                display_name=display_name,
            )
            for device_id, display_name, text in rows
        ]

    @staticmethod
    def _read_remote_cross_signing_keys(t: Txn, user_id: str) -> dict[str, CrossSigningKey]:
        rows = t.query(
            "SELECT usage, key_json FROM remote_cross_signing_keys WHERE user_id = ?",
            (user_id,),
        )
        return {usage: cross_signing_key_from_json(loads(text), user_id) for usage, text in rows}

    @staticmethod
    def _mark_remote_stale(t: Txn, user_id: str, reason: str, now_ms: int) -> int:
        row = t.query_one(
            "INSERT INTO remote_sync_state"
            " (user_id, stale_generation, stale_reason, stale_since_ts) VALUES (?, 1, ?, ?)"
            " ON CONFLICT (user_id) DO UPDATE SET"
            " stale_generation = remote_sync_state.stale_generation + 1,"
            " stale_reason = excluded.stale_reason,"
            " stale_since_ts = CASE"
            " WHEN remote_sync_state.stale_generation > remote_sync_state.cleared_generation"
            " THEN remote_sync_state.stale_since_ts ELSE excluded.stale_since_ts END"
            " RETURNING stale_generation",
            (user_id, reason, now_ms),
        )
        assert row is not None
        return int(row[0])

    def get_remote_sync_state(self, user_id: str) -> "Deferred[Optional[RemoteSyncState]]":
        def txn(t: Txn) -> Optional[RemoteSyncState]:
            return self._read_remote_sync_state(t, user_id)

        return self.database.run("get_remote_sync_state", txn, readonly=True)

    def get_remote_cache(self, user_id: str) -> "Deferred[RemoteUserCache]":
        def txn(t: Txn) -> RemoteUserCache:
            return RemoteUserCache(
                state=self._read_remote_sync_state(t, user_id),
                devices=tuple(self._read_remote_devices(t, user_id)),
                cross_signing_keys=self._read_remote_cross_signing_keys(t, user_id),
            )

        return self.database.run("get_remote_cache", txn, readonly=True)

    def apply_remote_updates(
        self,
        user_id: str,
        upserts: Sequence[RemoteDevice],
        deletions: Collection[str],
        new_known_ids: Collection[int],
    ) -> "Deferred[None]":
        overlap = {d.device_id for d in upserts} & set(deletions)
        if overlap:
            return fail(ValueError(f"devices both updated and deleted: {sorted(overlap)}"))
        rows = [self._remote_device_row(user_id, d) for d in upserts]

        def txn(t: Txn) -> None:
            self._lock_remote_user(t, user_id)
            t.executemany(
                "INSERT INTO remote_devices (user_id, device_id, display_name, keys_json)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (user_id, device_id) DO UPDATE SET"
                " display_name = excluded.display_name, keys_json = excluded.keys_json",
                rows,
            )
            t.executemany(
                "DELETE FROM remote_devices WHERE user_id = ? AND device_id = ?",
                [(user_id, device_id) for device_id in sorted(set(deletions))],
            )
            self._replace_known_ids(t, user_id, new_known_ids)

        return self.database.run("apply_remote_updates", txn)

    def apply_remote_batch(
        self,
        user_id: str,
        applied: Sequence[DeviceListUpdate],
        known_ids: Optional[Collection[int]],
        processed_stream_ids: Collection[int],
        stale_reason: Optional[str],
        now_ms: int,
    ) -> "Deferred[RemoteBatchResult]":
        batch = RemoteBatch(
            user_id,
            tuple(applied),
            None if known_ids is None else frozenset(known_ids),
            frozenset(processed_stream_ids),
            stale_reason,
        )
        return self.apply_remote_batches([batch], now_ms).addCallback(lambda results: results[0])

    def apply_remote_batches(
        self, batches: Sequence[RemoteBatch], now_ms: int
    ) -> "Deferred[list[RemoteBatchResult]]":
        users = [batch.user_id for batch in batches]
        if len(set(users)) != len(users):
            return fail(ValueError("more than one batch for a user"))
        for batch in batches:
            for owner in [u.user_id for u in batch.applied] + [e.user_id for e in batch.queue]:
                if owner != batch.user_id:
                    return fail(ValueError(f"update of {owner!r} passed for {batch.user_id!r}"))
        def txn(t: Txn) -> list[RemoteBatchResult]:
            return self._apply_remote_batches(t, batches, now_ms)

        return self.database.run("apply_remote_batches", txn)

    def _apply_remote_batches(
        self, t: Txn, batches: Sequence[RemoteBatch], now_ms: int
    ) -> list[RemoteBatchResult]:
        """Every batch with a few statements for all of them (a round trip
        per statement is what PostgreSQL charges)."""
        self._lock_remote_users(
            t,
            [
                b.user_id
                for b in batches
                if b.applied or b.known_ids is not None or b.stale_reason is not None
            ],
        )
        changed = self._apply_remote_device_updates(t, [u for b in batches for u in b.applied])
        known: dict[str, frozenset[int]] = {}
        for batch in batches:
            if batch.known_ids is not None:
                known[batch.user_id] = frozenset(
                    sorted(batch.known_ids)[-self.known_ids_window :]
                )
        t.executemany(
            "UPDATE remote_sync_state SET known_stream_ids = ? WHERE user_id = ?",
            [(_known_ids_text(sorted(ids)), user_id) for user_id, ids in sorted(known.items())],
        )
        generations = {
            b.user_id: self._mark_remote_stale(t, b.user_id, b.stale_reason, now_ms)
            for b in batches
            if b.stale_reason is not None
        }
        t.executemany(
            "DELETE FROM remote_device_inbox WHERE user_id = ? AND stream_id = ?",
            [(b.user_id, sid) for b in batches for sid in sorted(b.processed_stream_ids)],
        )
        t.executemany(
            "INSERT INTO remote_device_inbox (user_id, stream_id, content_json, received_ts)"
            " VALUES (?, ?, ?, ?) ON CONFLICT (user_id, stream_id) DO NOTHING",
            [
                (e.user_id, e.stream_id, dumps(e.content), e.received_ts)
                for b in batches
                for e in b.queue
            ],
        )
        states = self._read_remote_sync_states(t, [b.user_id for b in batches], known)
        return [
            RemoteBatchResult(
                tuple(sorted(changed.get(b.user_id, ()))),
                generations.get(b.user_id),
                states.get(b.user_id),
            )
            for b in batches
        ]

    def _lock_remote_users(self, t: Txn, user_ids: Sequence[str]) -> None:
        """Create-or-lock the users' sync rows, in user order (two processes
        never wait on each other in a cycle)."""
        users = sorted(set(user_ids))
        found: set[str] = set()
        for chunk in _chunks(users):
            rows = t.query(
                f"SELECT user_id FROM remote_sync_state WHERE user_id IN ({_marks(len(chunk))})"
                " ORDER BY user_id" + t.dialect.for_update,
                chunk,
            )
            found.update(row[0] for row in rows)
        for user_id in users:
            if user_id not in found:
                self._lock_remote_user(t, user_id)

    def _apply_remote_device_updates(
        self, t: Txn, updates: Sequence[DeviceListUpdate]
    ) -> dict[str, set[str]]:
        """Apply updates (in order) to their devices unless the cache holds a
        later change of the device; the changed device ids by user."""
        keys = list(dict.fromkeys((u.user_id, u.device_id) for u in updates))
        # (stream id, a cached device rather than a deletion's tombstone)
        initial = self._remote_device_streams(t, keys)
        current = {key: stream for key, (stream, _) in initial.items()}
        final: dict[tuple[str, str], DeviceListUpdate] = {}
        changed: dict[str, set[str]] = {}
        for update in updates:
            key = (update.user_id, update.device_id)
            if not supersedes(update, current.get(key)):
                continue
            current[key] = update.stream_id
            final[key] = update
            changed.setdefault(update.user_id, set()).add(update.device_id)
        upserts: list[tuple[Any, ...]] = []
        deletions: list[tuple[str, str]] = []
        tombstones: list[tuple[str, str, int]] = []
        revived: list[tuple[str, str]] = []
        for key, update in final.items():
            # a device is never both cached and a tombstone
            cached_device = key in initial and initial[key][1]
            tombstone = key in initial and not initial[key][1]
            if update.deleted:
                if cached_device:
                    deletions.append(key)
                tombstones.append((*key, update.stream_id))
            else:
                keys_json = None if update.keys is None else dumps(update.keys.raw)
                upserts.append((*key, update.display_name, keys_json, update.stream_id))
                if tombstone:
                    revived.append(key)
        t.executemany("DELETE FROM remote_devices WHERE user_id = ? AND device_id = ?", deletions)
        t.executemany(
            "INSERT INTO remote_deleted_devices (user_id, device_id, stream_id)"
            " VALUES (?, ?, ?) ON CONFLICT (user_id, device_id) DO UPDATE SET"
            " stream_id = excluded.stream_id",
            tombstones,
        )
        t.executemany(
            "INSERT INTO remote_devices (user_id, device_id, display_name, keys_json, stream_id)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (user_id, device_id) DO UPDATE SET"
            " display_name = excluded.display_name, keys_json = excluded.keys_json,"
            " stream_id = excluded.stream_id",
            upserts,
        )
        t.executemany(
            "DELETE FROM remote_deleted_devices WHERE user_id = ? AND device_id = ?", revived
        )
        return changed

    @staticmethod
    def _remote_device_streams(
        t: Txn, keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], tuple[Optional[int], bool]]:
        """For each (user, device) the cache knows: the stream id it last
        changed at, and whether it is a cached device (else a tombstone)."""
        found: dict[tuple[str, str], tuple[Optional[int], bool]] = {}
        for table, is_device in (("remote_devices", True), ("remote_deleted_devices", False)):
            wanted = [key for key in keys if key not in found]
            for chunk in _chunks(wanted, _CHUNK // 2):
                pairs = ", ".join("(?, ?)" for _ in chunk)
                rows = t.query(
                    f"SELECT user_id, device_id, stream_id FROM {table}"
                    f" WHERE (user_id, device_id) IN (VALUES {pairs})",
                    [part for key in chunk for part in key],
                )
                for user_id, device_id, stream_id in rows:
                    stream = None if stream_id is None else int(stream_id)
                    found[(user_id, device_id)] = (stream, is_device)
        return found

    def mark_remote_stale(self, user_id: str, reason: str, now_ms: int) -> "Deferred[int]":
        def txn(t: Txn) -> int:
            return self._mark_remote_stale(t, user_id, reason, now_ms)

        return self.database.run("mark_remote_stale", txn)

    def set_remote_resync_backoff(
        self, user_id: str, attempts: int, retry_ts: Optional[int]
    ) -> "Deferred[None]":
        def txn(t: Txn) -> None:
            t.execute(
                "UPDATE remote_sync_state SET resync_attempts = ?, resync_retry_ts = ?"
                " WHERE user_id = ?",
                (attempts, retry_ts, user_id),
            )

        return self.database.run("set_remote_resync_backoff", txn)

    def replace_remote_snapshot(
        self,
        user_id: str,
        snapshot: UserDevicesResponse,
        generation: int,
        now_ms: int,
    ) -> "Deferred[bool]":
        if snapshot.user_id != user_id:
            return fail(ValueError(f"snapshot of {snapshot.user_id!r} passed for {user_id!r}"))

        def txn(t: Txn) -> bool:
            stale_generation, cleared_generation = self._lock_remote_user(t, user_id)
            if generation < cleared_generation:
                # A resync that started later already stored its answer: this
                # older one must not overwrite it.
                return stale_generation <= cleared_generation
            # encoded here, in the database thread: a big list costs the
            # reactor nothing
            device_rows = [
                (*self._remote_device_row(user_id, d), snapshot.stream_id)
                for d in snapshot.devices
            ]
            key_rows = [
                (user_id, usage, dumps(key.raw))
                for usage, key in (
                    ("master", snapshot.master_key),
                    ("self_signing", snapshot.self_signing_key),
                )
                if key is not None
            ]
            t.execute("DELETE FROM remote_devices WHERE user_id = ?", (user_id,))
            t.insert_many(
                "remote_devices",
                ("user_id", "device_id", "display_name", "keys_json", "stream_id"),
                device_rows,
            )
            t.execute("DELETE FROM remote_deleted_devices WHERE user_id = ?", (user_id,))
            t.execute("DELETE FROM remote_cross_signing_keys WHERE user_id = ?", (user_id,))
            t.insert_many("remote_cross_signing_keys", ("user_id", "usage", "key_json"), key_rows)
            self._replace_known_ids(t, user_id, ())
            # Clear only the marks this resync started from (Synapse #9866).
            cleared = max(cleared_generation, min(generation, stale_generation))
            still_stale = stale_generation > cleared
            t.execute(
                "UPDATE remote_sync_state SET snapshot_stream_id = ?, cleared_generation = ?,"
                " last_resync_ts = ?, resync_attempts = 0, resync_retry_ts = NULL,"
                " stale_reason = CASE WHEN ? THEN stale_reason ELSE NULL END,"
                " stale_since_ts = CASE WHEN ? THEN stale_since_ts ELSE NULL END"
                " WHERE user_id = ?",
                (snapshot.stream_id, cleared, now_ms, still_stale, still_stale, user_id),
            )
            return not still_stale

        return self.database.run("replace_remote_snapshot", txn)

    def get_remote_devices(self, user_id: str) -> "Deferred[list[RemoteDevice]]":
        def txn(t: Txn) -> list[RemoteDevice]:
            return self._read_remote_devices(t, user_id)

        return self.database.run("get_remote_devices", txn, readonly=True)

    def get_remote_cross_signing_keys(self, user_id: str) -> "Deferred[dict[str, CrossSigningKey]]":
        def txn(t: Txn) -> dict[str, CrossSigningKey]:
            return self._read_remote_cross_signing_keys(t, user_id)

        return self.database.run("get_remote_cross_signing_keys", txn, readonly=True)

    def set_remote_cross_signing_key(
        self, user_id: str, usage: str, key: CrossSigningKey
    ) -> "Deferred[None]":
        error = _bad_usage(usage)
        if error is not None:
            return fail(error)
        text = dumps(key.raw)

        def txn(t: Txn) -> None:
            self._lock_remote_user(t, user_id)
            t.execute(
                "INSERT INTO remote_cross_signing_keys (user_id, usage, key_json) VALUES (?, ?, ?)"
                " ON CONFLICT (user_id, usage) DO UPDATE SET key_json = excluded.key_json",
                (user_id, usage, text),
            )

        return self.database.run("set_remote_cross_signing_key", txn)

    def set_remote_cross_signing_keys(
        self, user_id: str, keys: Mapping[str, CrossSigningKey]
    ) -> "Deferred[None]":
        for usage in keys:
            error = _bad_usage(usage)
            if error is not None:
                return fail(error)
        rows = [(user_id, usage, dumps(key.raw)) for usage, key in sorted(keys.items())]

        def txn(t: Txn) -> None:
            self._lock_remote_user(t, user_id)
            t.executemany(
                "INSERT INTO remote_cross_signing_keys (user_id, usage, key_json) VALUES (?, ?, ?)"
                " ON CONFLICT (user_id, usage) DO UPDATE SET key_json = excluded.key_json",
                rows,
            )

        return self.database.run("set_remote_cross_signing_keys", txn)

    def drop_remote_user(self, user_id: str) -> "Deferred[None]":
        def txn(t: Txn) -> None:
            for table in (
                "remote_devices",
                "remote_deleted_devices",
                "remote_cross_signing_keys",
                "remote_device_inbox",
                "remote_sync_state",
            ):
                t.execute(f"DELETE FROM {table} WHERE user_id = ?", (user_id,))

        return self.database.run("drop_remote_user", txn)

    def list_stale_remote_users(self) -> "Deferred[list[StaleRemoteUser]]":
        def txn(t: Txn) -> list[StaleRemoteUser]:
            rows = t.query(
                "SELECT user_id, stale_generation, stale_reason, stale_since_ts, resync_retry_ts"
                " FROM remote_sync_state WHERE stale_generation > cleared_generation"
                " ORDER BY stale_since_ts, user_id"
            )
            return [
                StaleRemoteUser(
                    user_id,
                    int(gen),
                    reason,
                    None if since is None else int(since),
                    None if retry is None else int(retry),
                )
                for user_id, gen, reason, since, retry in rows
            ]

        return self.database.run("list_stale_remote_users", txn, readonly=True)

    def queue_remote_update(
        self, user_id: str, stream_id: int, content: JsonDict, now_ms: int
    ) -> "Deferred[bool]":
        entry = InboxEntry(user_id, stream_id, content, now_ms)
        return self.queue_remote_updates([entry]).addCallback(lambda queued: queued[0])

    def queue_remote_updates(self, entries: Sequence[InboxEntry]) -> "Deferred[list[bool]]":
        def txn(t: Txn) -> list[bool]:
            return [self._queue_remote_update(t, entry) for entry in entries]

        return self.database.run("queue_remote_updates", txn)

    @staticmethod
    def _queue_remote_update(t: Txn, entry: InboxEntry) -> bool:
        row = t.query_one(
            "INSERT INTO remote_device_inbox"
            " (user_id, stream_id, content_json, received_ts) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (user_id, stream_id) DO NOTHING RETURNING 1",
            (entry.user_id, entry.stream_id, dumps(entry.content), entry.received_ts),
        )
        return row is not None

    @staticmethod
    def _read_remote_inboxes(t: Txn, user_ids: Sequence[str]) -> dict[str, list[QueuedUpdate]]:
        """The queued EDUs of those of ``user_ids`` that have any, in stream id order."""
        entries: dict[str, list[QueuedUpdate]] = {}
        for chunk in _chunks(sorted(set(user_ids))):
            rows = t.query(
                "SELECT user_id, stream_id, content_json, received_ts FROM remote_device_inbox"
                f" WHERE user_id IN ({_marks(len(chunk))}) ORDER BY user_id, stream_id",
                chunk,
            )
            for user_id, stream_id, text, received in rows:
                entries.setdefault(user_id, []).append(
                    QueuedUpdate(user_id, int(stream_id), text, int(received))
                )
        return entries

    def get_remote_inbox(self, user_id: str) -> "Deferred[list[InboxEntry]]":
        def txn(t: Txn) -> list[InboxEntry]:
            return [
                InboxEntry(user_id, e.stream_id, loads(e.content_json), e.received_ts)
                for e in self._read_remote_inboxes(t, [user_id]).get(user_id, ())
            ]

        return self.database.run("get_remote_inbox", txn, readonly=True)

    def get_remote_inbox_state(self, user_id: str) -> "Deferred[RemoteInbox]":
        return self.get_remote_inbox_states([user_id]).addCallback(lambda states: states[user_id])

    def get_remote_inbox_states(self, user_ids: Collection[str]) -> "Deferred[dict[str, RemoteInbox]]":
        users = sorted(set(user_ids))

        def txn(t: Txn) -> dict[str, RemoteInbox]:
            states = self._read_remote_sync_states(t, users)
            entries = self._read_remote_inboxes(t, users)
            return {
                user_id: RemoteInbox(states.get(user_id), tuple(entries.get(user_id, ())))
                for user_id in users
            }

        return self.database.run("get_remote_inbox_states", txn, readonly=True)

    def list_remote_inbox_users(self) -> "Deferred[list[str]]":
        def txn(t: Txn) -> list[str]:
            rows = t.query("SELECT DISTINCT user_id FROM remote_device_inbox ORDER BY user_id")
            return [row[0] for row in rows]

        return self.database.run("list_remote_inbox_users", txn, readonly=True)

    # ------------------------------------------------------------------
    # Remote server keys
    # ------------------------------------------------------------------

    def store_server_keys(self, server_name: str, keys: Sequence[ServerKeyRow]) -> "Deferred[None]":
        for key in keys:
            if key.server_name != server_name:
                return fail(ValueError(f"key of {key.server_name!r} passed for {server_name!r}"))
        rows = [
            (
                server_name,
                k.key_id,
                k.verify_key,
                k.valid_until_ts,
                k.expired_ts,
                k.fetched_ts,
                dumps(k.key_json),
            )
            for k in keys
        ]

        def txn(t: Txn) -> None:
            # The most recent fetch wins; an older answer (a slow notary) does not.
            t.executemany(
                "INSERT INTO server_keys (server_name, key_id, verify_key, valid_until_ts,"
                " expired_ts, fetched_ts, key_json) VALUES (?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (server_name, key_id) DO UPDATE SET"
                " verify_key = excluded.verify_key, valid_until_ts = excluded.valid_until_ts,"
                " expired_ts = excluded.expired_ts, fetched_ts = excluded.fetched_ts,"
                " key_json = excluded.key_json"
                " WHERE excluded.fetched_ts >= server_keys.fetched_ts",
                rows,
            )
            if rows:
                t.execute(
                    "DELETE FROM server_key_fetch_failures WHERE server_name = ?", (server_name,)
                )

        return self.database.run("store_server_keys", txn)

    def get_server_keys(
        self, server_name: str, key_ids: Optional[Collection[str]] = None
    ) -> "Deferred[dict[str, ServerKeyRow]]":
        def txn(t: Txn) -> dict[str, ServerKeyRow]:
            rows = t.query(
                "SELECT key_id, verify_key, valid_until_ts, expired_ts, fetched_ts, key_json"
                " FROM server_keys WHERE server_name = ?",
                (server_name,),
            )
            wanted = None if key_ids is None else set(key_ids)
            return {
                key_id: ServerKeyRow(
                    server_name=server_name,
                    key_id=key_id,
                    verify_key=verify_key,
                    valid_until_ts=int(valid_until),
                    expired_ts=None if expired is None else int(expired),
                    fetched_ts=int(fetched),
                    key_json=loads(text),
                )
                for key_id, verify_key, valid_until, expired, fetched, text in rows
                if wanted is None or key_id in wanted
            }

        return self.database.run("get_server_keys", txn, readonly=True)

    def get_server_key_failure(self, server_name: str) -> "Deferred[Optional[ServerKeyFailure]]":
        def txn(t: Txn) -> Optional[ServerKeyFailure]:
            row = t.query_one(
                "SELECT failed_ts, error FROM server_key_fetch_failures WHERE server_name = ?",
                (server_name,),
            )
            return None if row is None else ServerKeyFailure(server_name, int(row[0]), row[1])

        return self.database.run("get_server_key_failure", txn, readonly=True)

    def set_server_key_failure(self, server_name: str, error: str, now_ms: int) -> "Deferred[None]":
        def txn(t: Txn) -> None:
            t.execute(
                "INSERT INTO server_key_fetch_failures (server_name, failed_ts, error)"
                " VALUES (?, ?, ?) ON CONFLICT (server_name) DO UPDATE SET"
                " failed_ts = excluded.failed_ts, error = excluded.error",
                (server_name, now_ms, error),
            )

        return self.database.run("set_server_key_failure", txn)

    def clear_server_key_failure(self, server_name: str) -> "Deferred[None]":
        def txn(t: Txn) -> None:
            t.execute("DELETE FROM server_key_fetch_failures WHERE server_name = ?", (server_name,))

        return self.database.run("clear_server_key_failure", txn)

    # ------------------------------------------------------------------
    # Received federation transactions
    # ------------------------------------------------------------------

    def get_received_txn(self, origin: str, txn_id: str) -> "Deferred[Optional[JsonDict]]":
        def txn(t: Txn) -> Optional[JsonDict]:
            row = t.query_one(
                "SELECT response_json FROM received_transactions WHERE origin = ? AND txn_id = ?",
                (origin, txn_id),
            )
            return None if row is None else dict(loads(row[0]))

        return self.database.run("get_received_txn", txn, readonly=True)

    def store_received_txn(
        self, origin: str, txn_id: str, response: JsonDict, now_ms: int
    ) -> "Deferred[bool]":
        text = dumps(response)

        def txn(t: Txn) -> bool:
            row = t.query_one(
                "INSERT INTO received_transactions (origin, txn_id, response_json, received_ts)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (origin, txn_id) DO NOTHING RETURNING 1",
                (origin, txn_id, text, now_ms),
            )
            return row is not None

        return self.database.run("store_received_txn", txn)

    def prune_received_txns(self, older_than_ms: int) -> "Deferred[int]":
        def txn(t: Txn) -> int:
            t.execute("DELETE FROM received_transactions WHERE received_ts < ?", (older_than_ms,))
            return t.rowcount

        return self.database.run("prune_received_txns", txn)


if TYPE_CHECKING:
    _check: type[IDeviceListStore] = Store
