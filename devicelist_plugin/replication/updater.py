"""The inbound updater: keeps an exact cache of remote users' device lists.

Where EDUs come from
--------------------
:meth:`RemoteDeviceListUpdater.receive_device_list_updates` takes the
contents of a ``/send`` transaction's ``m.device_list_update`` EDUs (the
receiver's batch handler; :meth:`receive_device_list_update` takes one, for
a host that runs its own ``/send``).  Each is validated
(:func:`~devicelist_plugin.core.parse.parse_device_list_update`, a
:class:`~devicelist_plugin.core.parse.ParseError` names the bad field), its
``user_id`` must belong to the sending server and be tracked (share a room
with a local user, :func:`~devicelist_plugin.membership.tracked_among`, one
call for all), and then it is durably taken before the call returns, so a
transaction is acknowledged only once its EDUs survive a crash.  Ignored EDUs
are counted in :attr:`RemoteDeviceListUpdater.stats`.

Taken how: the users whose worker is idle are claimed and decided on right
away, together -- one read of their sync states and queued EDUs, one commit
(:meth:`apply_remote_batches`) applying what can be applied and queueing in
the store's inbox (``remote_device_inbox``) only what is held; the EDUs of
users whose worker is busy (a resync in flight, a pass running) are queued in
that same commit and their workers kicked.  If the commit fails, all the
EDUs are queued in a plain transaction and every user's worker takes over
(an error there fails the transaction, so the sender retries).

Per-user processing
-------------------
Each remote user has one worker loop; users run in parallel, one user's
work is serialised.  A pass reads the user's sync state and every queued
EDU, decides on them as one batch (:func:`devicelist_plugin.core.inbound.decide`)
and commits the decision in one store transaction
(:meth:`apply_remote_batch`): the APPLY-ed updates (each replacing its
device unless the cache holds that device at a higher stream id, deletions
leaving a tombstone), the new known stream ids, the stale mark when a resync
is needed, and the removal of every EDU decided on.  Held EDUs stay queued
and are decided again with the next pass; once the oldest queued EDU has
waited ``hold_grace`` seconds the batch is decided with ``allow_hold=False``
(an unknown ``prev_id`` is then a lost update).  Listeners hear of the
changed device ids.

EDUs deferred to a resync are removed from the queue: the fetch that clears
the stale mark starts after they arrived, so its snapshot holds them.  EDUs
that arrive *while* a fetch is in flight stay queued and are decided after
the snapshot is stored, against its ``stream_id``: those it covers are
skipped, those chained to it applied, and none forces a second fetch it
did not need.

Resync
------
A stale user is fetched with ``GET /_matrix/federation/v1/user/devices/{userId}``
(``resync_timeout``, 30 s), inside the user's worker so no pass interleaves.
The answer is validated: a wrong ``user_id`` or a malformed body rejects it,
malformed devices are skipped and logged with their field path, and an
answer listing more than ``max_devices_per_user`` devices is refused (never
stored truncated: a list missing devices is worse than a stale one).  The
snapshot replaces the cache atomically with the stale generation read before
the fetch (:meth:`replace_remote_snapshot`), so a mark made meanwhile (by
another process) survives and causes another resync.  Cross-signing keys come
with it; ``m.signing_key_update`` EDUs received during the fetch are
re-applied after it.

Retries
-------
Failures are of two kinds:

* **the server** (connection refused, timeout, TLS, 5xx, 429, an invalid
  body, the endpoint missing): counted once in the shared
  :class:`~devicelist_plugin.replication.retry.DestinationRetryTracker`, so the
  sender backs off too and vice versa.  While a server backs off its stale
  users wait in one queue with one timer; when it is due a single user is
  tried (the probe) and only after a success do the others go, at most
  ``resyncs_per_server`` at a time.  10,000 stale users on a dead server cost
  one request per backoff period.  A server that contacts us (a valid signed
  request) is retried at once (the tracker's wake listeners).
* **the user** (the server answered 4xx for that user, a malformed or
  oversized list): that user alone backs off (``user_backoff``), persisted
  in its sync row.

Stale marks, queued EDUs and both kinds of backoff are in the database:
:meth:`start` lists stale users and queued EDUs and schedules them.

Cross-signing
-------------
:meth:`receive_signing_key_update` takes ``m.signing_key_update`` (and
``org.matrix.signing_key_update``): validated, origin- and tracking-checked,
its master and self-signing keys stored in one transaction before it
returns, listeners notified.

Tracking
--------
When a remote user no longer shares a room with any local user
(:meth:`remote_user_untracked`) its cache, state and queue are dropped (a
fetch in flight is cancelled); a later query fetches fresh.
"""

from __future__ import annotations

import enum
import heapq
import random
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Awaitable, Callable, Mapping, Optional, Protocol, Sequence, Union
from urllib.parse import quote

from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from devicelist_plugin.core.backoff import MINUTE, BackoffPolicy
from devicelist_plugin.core.inbound import (
    Action,
    BatchDecision,
    RemoteUserState,
    decide,
)
from devicelist_plugin.core.models import (
    USAGE_MASTER,
    USAGE_SELF_SIGNING,
    CrossSigningKey,
    DeviceListUpdate,
    JsonDict,
    UserDevicesResponse,
)
from devicelist_plugin.core.parse import (
    ParseError,
    parse_device_list_update,
    parse_signing_key_update,
    parse_user_devices_response,
    server_name_of,
)
from devicelist_plugin.core.serialize import device_list_update_to_json
from devicelist_plugin.federation.client import (
    FederationClientError,
    HttpResponseError,
    NotRetryingDestination,
    RequestSendFailed,
    ResponseTooLargeError,
)
from devicelist_plugin.federation.errors import M_UNRECOGNIZED
from devicelist_plugin.listeners import call_listener
from devicelist_plugin.local.handler import CpuRunner, run_inline
from devicelist_plugin.membership import MembershipSource, tracked_among
from devicelist_plugin.replication.inbound_concurrency import (
    DestinationLimiter,
    SharedResult,
)
from devicelist_plugin.replication.retry import DestinationRetryTracker
from devicelist_plugin.storage.interface import IDeviceListStore
from devicelist_plugin.storage.codec import loads
from devicelist_plugin.storage.types import (
    InboxEntry,
    QueuedUpdate,
    RemoteBatch,
    RemoteBatchResult,
    RemoteSyncState,
)

__all__ = [
    "ChangeListener",
    "EduOutcome",
    "RemoteDeviceListChange",
    "RemoteDeviceListUpdater",
    "ResyncFailure",
    "UpdaterConfig",
    "USER_DEVICES_PATH_PREFIX",
]

USER_DEVICES_PATH_PREFIX = "/_matrix/federation/v1/user/devices/"

#: What became of one EDU handed over with others: None (taken), the reason
#: it was ignored, or the error that rejected it as malformed.
EduOutcome = Union[None, str, ParseError]

HOUR = 60 * MINUTE
DAY = 24 * HOUR

# How many skipped devices of one answer are logged one by one.
_MAX_LOGGED_PROBLEMS = 10
# Updates parsed on receipt, kept for when they are applied (the inbox holds
# their JSON; parsing it again was a large part of the per-EDU cost).
_PARSED_KEPT = 10_000


@dataclass(frozen=True)
class UpdaterConfig:
    """Tuning of :class:`RemoteDeviceListUpdater`.

    :ivar hold_grace: seconds an EDU whose ``prev_id`` is unknown waits for
        its predecessor before the user is resynced (reordering costs no
        fetch).
    :ivar resync_timeout: seconds for one ``GET /user/devices``.
    :ivar max_devices_per_user: a resync answer listing more devices is
        refused (and logged); the user stays stale and backs off.  Synapse
        ignores lists over 1,000 devices (#5445); we store big bot accounts
        (10,000+ devices) and refuse only what no real account has.
    :ivar resyncs_per_server: resyncs in flight to one healthy server.
    :ivar user_backoff: the per-user backoff after an error about that user.
    :ivar store_retry_delay: seconds before a user's work is retried after
        a storage error.
    """

    hold_grace: float = 2.0
    resync_timeout: float = 30.0
    max_devices_per_user: int = 50_000
    resyncs_per_server: int = 5
    user_backoff: BackoffPolicy = BackoffPolicy(
        min_interval=5 * MINUTE, multiplier=2.0, max_interval=DAY
    )
    store_retry_delay: float = 10.0

    def __post_init__(self) -> None:
        for name in ("hold_grace", "store_retry_delay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.resync_timeout <= 0:
            raise ValueError("resync_timeout must be positive")
        for name in ("max_devices_per_user", "resyncs_per_server"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")


@dataclass(frozen=True)
class RemoteDeviceListChange:
    """What changed in the cache of one remote user.

    :ivar device_ids: devices whose entry was added, changed or removed.
    :ivar cross_signing: the user's cross-signing keys (may have) changed.
    :ivar resync: the whole list was replaced by a snapshot.
    """

    user_id: str
    device_ids: tuple[str, ...]
    cross_signing: bool = False
    resync: bool = False


ChangeListener = Callable[[RemoteDeviceListChange], object]


@dataclass(frozen=True)
class ResyncFailure:
    """Why a resync did not happen: ``status`` and ``message`` as a
    ``/keys/query`` ``failures`` entry wants them."""

    destination: str
    status: int
    message: str

    def to_json(self) -> JsonDict:
        return {"status": self.status, "message": self.message}


class UserDevicesClient(Protocol):
    """What the updater needs of :class:`~devicelist_plugin.federation.client.FederationClient`."""

    def get_json(
        self,
        destination: str,
        path: str,
        args: Any = None,
        timeout: Optional[float] = None,
    ) -> Awaitable[JsonDict]: ...


class _Outcome(enum.Enum):
    DONE = "done"
    SERVER_FAILED = "server_failed"
    USER_FAILED = "user_failed"
    ABORTED = "aborted"


@dataclass
class _UserSlot:
    """In-memory state of one remote user's worker."""

    running: bool = False
    again: bool = False
    resync_granted: bool = False
    drop_pending: bool = False
    hold_call: Optional[IDelayedCall] = None
    retry_call: Optional[IDelayedCall] = None
    fetch: Optional[Deferred[JsonDict]] = None
    fetching: bool = False
    epoch: int = 0
    signing_during_fetch: list[dict[str, CrossSigningKey]] = field(default_factory=list)
    # the outcome of the next resync attempt, shared by the queries waiting
    next_result: Optional[Deferred[Optional[ResyncFailure]]] = None
    shared: Optional[SharedResult[Optional[ResyncFailure]]] = None


@dataclass(frozen=True)
class _Plan:
    """A decision on a user's queued EDUs, before and after its commit."""

    decision: BatchDecision
    mark: Optional[str]
    # when each queued EDU arrived (seconds), by stream id
    received: dict[int, float]
    # what to commit; None when the decision writes nothing
    batch: Optional[RemoteBatch]


@dataclass
class _ServerQueue:
    """The stale users of one remote server waiting for a resync."""

    name: str
    # insertion-ordered: the next to go first
    pending: dict[str, None] = field(default_factory=dict)
    running: set[str] = field(default_factory=set)
    timer: Optional[IDelayedCall] = None
    # one user at a time until one succeeds: after a failure, and for a
    # server we know nothing of yet (start-up, or idle for a while)
    probing: bool = True
    # bumped each time a failure is recorded in the tracker: attempts that
    # started before it (in flight together) do not count again
    failure_epoch: int = 0
    pumping: bool = False
    pump_again: bool = False


class _RetryHeap:
    """One timer for many (key, time) entries: per-user retries at scale."""

    def __init__(self, clock: IReactorTime, fire: Callable[[str], None]) -> None:
        self._clock = clock
        self._fire = fire
        self._due: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        self._call: Optional[IDelayedCall] = None
        self._stopped = False

    def __contains__(self, key: str) -> bool:
        return key in self._due

    def schedule(self, key: str, at: float) -> None:
        if self._stopped:
            return  # work finishing after stop() schedules nothing
        self._due[key] = at
        heapq.heappush(self._heap, (at, key))
        self._arm()

    def discard(self, key: str) -> None:
        self._due.pop(key, None)

    def start(self) -> None:
        self._stopped = False

    def stop(self) -> None:
        self._stopped = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._due.clear()
        self._heap.clear()

    def _arm(self) -> None:
        while self._heap and self._due.get(self._heap[0][1]) != self._heap[0][0]:
            heapq.heappop(self._heap)  # superseded or discarded
        if not self._heap:
            if self._call is not None and self._call.active():
                self._call.cancel()
            self._call = None
            return
        at = self._heap[0][0]
        if self._call is not None and self._call.active():
            if self._call.getTime() <= at:
                return
            self._call.cancel()
        self._call = self._clock.callLater(max(0.0, at - self._clock.seconds()), self._run)

    def _run(self) -> None:
        self._call = None
        now = self._clock.seconds()
        due: list[str] = []
        while self._heap and self._heap[0][0] <= now:
            at, key = heapq.heappop(self._heap)
            if self._due.get(key) == at:
                del self._due[key]
                due.append(key)
        for key in due:
            self._fire(key)
        self._arm()


def _core_state(sync: Optional[RemoteSyncState]) -> Optional[RemoteUserState]:
    """The core's view of a sync row: None while no snapshot was stored."""
    if sync is None:
        return None
    if not sync.cached:
        if sync.stale:
            return RemoteUserState(snapshot_stream_id=None, known_ids=frozenset(), stale=True)
        return None
    return RemoteUserState(
        snapshot_stream_id=sync.snapshot_stream_id, known_ids=sync.known_ids, stale=sync.stale
    )


def user_devices_path(user_id: str) -> str:
    return USER_DEVICES_PATH_PREFIX + quote(user_id, safe="")


class RemoteDeviceListUpdater:
    """See the module docstring.

    :param server_name: our server name (EDUs about our own users are ignored).
    :param store: the remote cache.
    :param client: the federation client (``GET /user/devices``).
    :param clock: every timer and timestamp.
    :param membership: who is tracked; the updater registers as its listener.
    :param retry_tracker: per-destination backoff shared with the sender;
        the updater registers as its wake listener.
    :param limiter: requests in flight per destination, shared with the key
        querier.
    :param cpu_runner: where big answers are parsed (a thread on a real reactor).
    :param jitter: the per-user backoff's jitter source.
    """

    log = Logger()

    def __init__(
        self,
        server_name: str,
        store: IDeviceListStore,
        client: UserDevicesClient,
        clock: IReactorTime,
        membership: MembershipSource,
        retry_tracker: DestinationRetryTracker,
        *,
        limiter: Optional[DestinationLimiter] = None,
        config: UpdaterConfig = UpdaterConfig(),
        cpu_runner: CpuRunner = run_inline,
        jitter: Callable[[float, float], float] = random.uniform,
        known_ids_window: Optional[int] = None,
    ) -> None:
        self.server_name = server_name
        self.config = config
        self._store = store
        self._client = client
        self._clock = clock
        self._membership = membership
        self._tracker = retry_tracker
        self._limiter = limiter if limiter is not None else DestinationLimiter()
        self._cpu_runner = cpu_runner
        self._jitter = jitter
        window = known_ids_window
        if window is None:
            window = int(getattr(store, "known_ids_window", 100))
        self._window = window
        #: counters: EDU outcomes, decision reasons, resync outcomes
        self.stats: Counter[str] = Counter()
        self._listeners: list[ChangeListener] = []
        self._slots: dict[str, _UserSlot] = {}
        self._parsed: dict[tuple[str, int], DeviceListUpdate] = {}
        self._servers: dict[str, _ServerQueue] = {}
        self._loops: set[Deferred[None]] = set()
        self._user_retries = _RetryHeap(clock, self._user_retry_due)
        self._stopped = False
        retry_tracker.add_wake_listener(self._on_wake)
        membership.add_listener(self)

    # ------------------------------------------------------------------
    # lifecycle

    def start(self) -> "Deferred[None]":
        """Resume the persisted work: queued EDUs and stale users."""
        return Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        self._stopped = False
        self._user_retries.start()
        for user_id in await self._store.list_remote_inbox_users():
            self._kick(user_id)
        now_ms = self._now_ms()
        stale = await self._store.list_stale_remote_users()
        servers: set[str] = set()
        for user in stale:
            if user.retry_ts is not None and user.retry_ts > now_ms:
                self._user_retries.schedule(user.user_id, user.retry_ts / 1000.0)
                continue
            queue = self._server_for(user.user_id)
            if queue is not None and user.user_id not in queue.running:
                queue.pending[user.user_id] = None
                servers.add(queue.name)
        for name in sorted(servers):
            queue = self._servers.get(name)
            if queue is not None:
                self._pump(queue)
        if stale:
            self.log.info(
                "{count} remote user(s) pending a device-list resync, on {servers} server(s)",
                count=len(stale),
                servers=len(servers),
            )

    def stop(self) -> "Deferred[None]":
        """Cancel every timer and fetch; fires when the workers have ended."""
        self._stopped = True
        self._user_retries.stop()
        for queue in self._servers.values():
            if queue.timer is not None and queue.timer.active():
                queue.timer.cancel()
            queue.timer = None
        self._servers.clear()
        for user_id, slot in list(self._slots.items()):
            for call in (slot.hold_call, slot.retry_call):
                if call is not None and call.active():
                    call.cancel()
            slot.hold_call = slot.retry_call = None
            if slot.fetch is not None:
                slot.fetch.cancel()
            self._fire_waiters(
                slot, ResyncFailure(_server_or_none(user_id) or "", 503, "Server is stopping")
            )
        loops = list(self._loops)
        d: Deferred[Any] = DeferredList(loops, consumeErrors=True)
        d.addCallback(lambda _: None)
        return d

    def add_listener(self, listener: ChangeListener) -> None:
        """Call ``listener(change)`` after every committed change of the cache."""
        self._listeners.append(listener)

    def remove_listener(self, listener: ChangeListener) -> None:
        self._listeners.remove(listener)

    # ------------------------------------------------------------------
    # EDUs in

    def receive_device_list_update(self, origin: str, content: object) -> "Deferred[Optional[str]]":
        """Take an ``m.device_list_update`` EDU from ``origin``.

        Fires with None once it is durably queued, or with the reason it was
        ignored (``wrong_origin``, ``local_user``, ``not_tracked``).  Fails
        with :class:`ParseError` for a malformed EDU and with the store's
        error when it could not be queued (the transaction must then fail).
        """
        return Deferred.fromCoroutine(self._receive_device_list_update(origin, content))

    async def _receive_device_list_update(self, origin: str, content: object) -> Optional[str]:
        (outcome,) = await self._receive_device_list_updates(origin, [content])
        if isinstance(outcome, ParseError):
            raise outcome
        return outcome

    def receive_device_list_updates(
        self, origin: str, contents: Sequence[object]
    ) -> "Deferred[list[EduOutcome]]":
        """Take the ``m.device_list_update`` EDUs of one transaction from
        ``origin`` together: each as :meth:`receive_device_list_update`, but
        all queued in one store transaction, and those of users with nothing
        else going on decided on and committed in one more.

        Fires with an outcome per EDU, in order: None (queued), the reason
        it was ignored, or the :class:`ParseError` that rejected it.  Fails
        with the store's error when they could not be queued.
        """
        return Deferred.fromCoroutine(self._receive_device_list_updates(origin, contents))

    async def _receive_device_list_updates(
        self, origin: str, contents: Sequence[object]
    ) -> list[EduOutcome]:
        what = "m.device_list_update"
        outcomes: list[EduOutcome] = [None] * len(contents)
        taken: list[tuple[int, DeviceListUpdate]] = []
        for index, content in enumerate(contents):
            try:
                update = parse_device_list_update(content)
            except ParseError as e:
                outcomes[index] = e
                continue
            ignored = self._check_origin(origin, update.user_id, what)
            if ignored is None:
                taken.append((index, update))
            else:
                outcomes[index] = ignored
        if not taken:
            return outcomes
        tracked = await tracked_among(self._membership, {u.user_id for _, u in taken})
        now_ms = self._now_ms()
        queued: list[DeviceListUpdate] = []
        for index, update in taken:
            if update.user_id in tracked:
                queued.append(update)
            else:
                outcomes[index] = self._not_tracked(update.user_id, what)
        if queued:
            await self._take(queued, now_ms)
        return outcomes

    def receive_signing_key_update(self, origin: str, content: object) -> "Deferred[Optional[str]]":
        """Take an ``m.signing_key_update`` (or ``org.matrix.signing_key_update``)
        EDU from ``origin``: its keys are stored before this fires (None, or
        the reason it was ignored); fails like :meth:`receive_device_list_update`."""
        return Deferred.fromCoroutine(self._receive_signing_key_update(origin, content))

    async def _receive_signing_key_update(self, origin: str, content: object) -> Optional[str]:
        update = parse_signing_key_update(content)
        ignored = await self._check_sender(origin, update.user_id, "m.signing_key_update")
        if ignored is not None:
            return ignored
        keys: dict[str, CrossSigningKey] = {}
        if update.master_key is not None:
            keys[USAGE_MASTER] = update.master_key
        if update.self_signing_key is not None:
            keys[USAGE_SELF_SIGNING] = update.self_signing_key
        if not keys:
            self.stats["signing_key_update_empty"] += 1
            return "no_keys"
        await self._store.set_remote_cross_signing_keys(update.user_id, keys)
        self.stats["signing_key_update_stored"] += 1
        slot = self._slots.get(update.user_id)
        if slot is not None and slot.fetching:
            # the snapshot in flight may predate these keys: re-apply after it
            slot.signing_during_fetch.append(keys)
        self._notify(RemoteDeviceListChange(update.user_id, (), cross_signing=True))
        return None

    async def _check_sender(self, origin: str, user_id: str, what: str) -> Optional[str]:
        ignored = self._check_origin(origin, user_id, what)
        if ignored is None and not await self._membership.is_tracked(user_id):
            return self._not_tracked(user_id, what)
        return ignored

    def _check_origin(self, origin: str, user_id: str, what: str) -> Optional[str]:
        server = server_name_of(user_id)
        if server != origin:
            self.stats["edu_wrong_origin"] += 1
            self.log.warn(
                "Ignoring {what} for {user_id} sent by {origin}: the user is not on that server",
                what=what,
                user_id=user_id,
                origin=origin,
            )
            return "wrong_origin"
        if server == self.server_name:
            self.stats["edu_local_user"] += 1
            return "local_user"
        return None

    def _not_tracked(self, user_id: str, what: str) -> str:
        self.stats["edu_not_tracked"] += 1
        self.log.debug(
            "Ignoring {what} for {user_id}: shares no room with a local user",
            what=what,
            user_id=user_id,
        )
        return "not_tracked"

    # ------------------------------------------------------------------
    # membership

    def servers_newly_sharing(self, local_user_id: str, servers: frozenset[str]) -> object:
        """(The sender's concern.)"""
        return None

    def remote_user_untracked(self, remote_user_id: str) -> object:
        """Drop the user's cache, state and queued EDUs (Synapse #13651)."""
        if self._stopped:
            return None
        slot = self._slot(remote_user_id)
        slot.epoch += 1
        if slot.fetch is not None:
            slot.fetch.cancel()
        if slot.hold_call is not None and slot.hold_call.active():
            slot.hold_call.cancel()
        slot.hold_call = None
        self._user_retries.discard(remote_user_id)
        queue = self._servers.get(_server_or_none(remote_user_id) or "")
        if queue is not None:
            queue.pending.pop(remote_user_id, None)
        slot.drop_pending = True
        self._kick(remote_user_id)
        return None

    # ------------------------------------------------------------------
    # queries

    def is_resync_pending(self, user_id: str) -> bool:
        """Whether a resync of the user is queued or in flight in this process."""
        queue = self._servers.get(_server_or_none(user_id) or "")
        in_queue = queue is not None and (user_id in queue.pending or user_id in queue.running)
        return in_queue or user_id in self._user_retries

    def request_resync(self, user_id: str) -> "Deferred[Optional[ResyncFailure]]":
        """Resync a tracked user now (for a key query): fires with None once
        the cache is fresh, or with why it could not be.

        Concurrent callers share one fetch; each may cancel its own Deferred
        (a timeout) without stopping the fetch.  A user without a cache is
        marked stale first, so a failed fetch is retried with backoff.  A
        server or user backing off is not tried: the failure is returned at
        once.
        """
        return Deferred.fromCoroutine(self._request_resync(user_id))

    async def _request_resync(self, user_id: str) -> Optional[ResyncFailure]:
        destination = server_name_of(user_id)
        if self._stopped:
            return ResyncFailure(destination, 503, "Server is stopping")
        sync = await self._store.get_remote_sync_state(user_id)
        if sync is not None and sync.cached and not sync.stale:
            return None
        if sync is None or not sync.stale:
            await self._store.mark_remote_stale(user_id, "queried without a cache", self._now_ms())
            sync = await self._store.get_remote_sync_state(user_id)
            assert sync is not None
        if sync.resync_retry_ts is not None and sync.resync_retry_ts > self._now_ms():
            self._user_retries.schedule(user_id, sync.resync_retry_ts / 1000.0)
            return ResyncFailure(
                destination, 503, f"Resync of {user_id} is backing off after an error"
            )
        retry_at = await self._tracker.retry_at(destination)
        queue = self._server_queue(destination)
        if retry_at is not None:
            if user_id not in queue.running:
                queue.pending[user_id] = None
            self._pump(queue)
            return ResyncFailure(destination, 503, "Not ready for retry")
        slot = self._slot(user_id)
        if slot.shared is None:
            slot.next_result = Deferred()
            slot.shared = SharedResult(slot.next_result)
        observer = slot.shared.observe()
        if user_id not in queue.running:
            # a query waits: ahead of the background resyncs
            queue.pending.pop(user_id, None)
            queue.pending = {user_id: None, **queue.pending}
        self._pump(queue)
        return await observer

    # ------------------------------------------------------------------
    # per-user worker

    def _now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    def _slot(self, user_id: str) -> _UserSlot:
        slot = self._slots.get(user_id)
        if slot is None:
            slot = self._slots[user_id] = _UserSlot()
        return slot

    def _maybe_forget(self, user_id: str) -> None:
        slot = self._slots.get(user_id)
        if (
            slot is not None
            and not slot.running
            and not slot.again
            and not slot.resync_granted
            and not slot.drop_pending
            and not slot.fetching
            and slot.hold_call is None
            and slot.retry_call is None
            and slot.shared is None
        ):
            del self._slots[user_id]

    def _kick(self, user_id: str) -> None:
        if self._stopped:
            return
        slot = self._slot(user_id)
        slot.again = True
        if slot.running:
            return
        slot.running = True
        loop = Deferred.fromCoroutine(self._run_user(user_id, slot))
        self._loops.add(loop)
        loop.addBoth(self._loop_ended, loop)

    async def _take(self, updates: list[DeviceListUpdate], now_ms: int) -> None:
        """Durably take a transaction's EDUs (already parsed and checked).

        The users whose worker is idle are decided on right here, together:
        one read of their state and queued EDUs, and one commit applying
        what can be applied and queueing only what must wait (held EDUs).
        The others' EDUs are queued in that same commit for their workers.
        Should the commit fail, everything is queued plainly and each user's
        worker takes it from there (a failure there fails the transaction).
        """
        by_user: dict[str, list[DeviceListUpdate]] = {}
        for update in updates:
            by_user.setdefault(update.user_id, []).append(update)
        idle: list[str] = []
        for user_id in by_user:
            slot = self._slot(user_id)
            if not slot.running and not self._stopped:
                slot.running = True
                slot.again = False
                idle.append(user_id)
        try:
            await self._take_together(by_user, idle, now_ms)
        except Exception as e:
            # each user's own worker meets the error again and logs it in full
            self.log.warn(
                "Taking {count} device-list EDU(s) together failed ({error}); queueing them",
                count=len(updates),
                error=repr(e),
            )
            self._give_back(idle)
            await self._queue(updates, now_ms)
            for user_id in by_user:
                self._kick(user_id)
            return
        self._give_back(idle)
        for user_id in by_user:
            if user_id not in idle:
                self._kick(user_id)

    def _give_back(self, user_ids: Sequence[str]) -> None:
        """Give users claimed by :meth:`_take` back to their workers."""
        for user_id in user_ids:
            slot = self._slot(user_id)
            slot.running = False
            if slot.again:
                self._kick(user_id)
            else:
                self._maybe_forget(user_id)

    async def _take_together(
        self, by_user: Mapping[str, list[DeviceListUpdate]], idle: list[str], now_ms: int
    ) -> None:
        inboxes = await self._store.get_remote_inbox_states(idle) if idle else {}
        plans: dict[str, _Plan] = {}
        batches: list[RemoteBatch] = []
        for user_id, new in by_user.items():
            inbox = inboxes.get(user_id)
            if inbox is None or self._slot(user_id).drop_pending:
                # busy: queued for its worker (an untracked user's too, which
                # its worker then drops)
                batches.append(
                    RemoteBatch(user_id, (), None, frozenset(), None, self._entries(new, now_ms))
                )
                self.stats["edu_queued"] += len(new)
                continue
            plan = self._plan_batch(user_id, inbox.state, inbox.entries, new, now_ms)
            plans[user_id] = plan
            if plan.batch is not None:
                batches.append(plan.batch)
        results = await self._store.apply_remote_batches(batches, now_ms)
        by_batch = {b.user_id: r for b, r in zip(batches, results)}
        for user_id, plan in plans.items():
            slot = self._slot(user_id)
            sync = inboxes[user_id].state
            sync = self._finish_batch(user_id, slot, plan, by_batch.get(user_id), sync)
            if sync is not None and sync.stale and not slot.drop_pending:
                self._want_resync(user_id, sync)

    async def _queue(self, updates: list[DeviceListUpdate], now_ms: int) -> None:
        """Queue EDUs for the users' workers."""
        flags = await self._store.queue_remote_updates(self._entries(updates, now_ms))
        for update, new in zip(updates, flags):
            self.stats["edu_queued" if new else "edu_already_queued"] += 1
            if new:
                self._keep_parsed(update)

    def _entries(self, updates: Sequence[DeviceListUpdate], now_ms: int) -> tuple[InboxEntry, ...]:
        return tuple(
            InboxEntry(u.user_id, u.stream_id, device_list_update_to_json(u), now_ms)
            for u in updates
        )

    def _keep_parsed(self, update: DeviceListUpdate) -> None:
        """The inbox row is this update's JSON: keep the parse for when it is decided on."""
        if len(self._parsed) >= _PARSED_KEPT:
            del self._parsed[next(iter(self._parsed))]
        self._parsed[(update.user_id, update.stream_id)] = update

    def _loop_ended(self, result: object, loop: "Deferred[None]") -> None:
        self._loops.discard(loop)
        if isinstance(result, Failure):
            self.log.failure("device-list worker failed", result)

    async def _run_user(self, user_id: str, slot: _UserSlot) -> None:
        try:
            while slot.again and not self._stopped:
                slot.again = False
                try:
                    await self._iteration(user_id, slot)
                except CancelledError:
                    if self._stopped:
                        return
                except Exception:
                    self.log.failure(
                        "Processing the device list of {user_id} failed; retrying in {delay}s",
                        user_id=user_id,
                        delay=self.config.store_retry_delay,
                    )
                    if self._stopped:
                        return
                    if slot.retry_call is None or not slot.retry_call.active():
                        slot.retry_call = self._clock.callLater(
                            self.config.store_retry_delay, self._retry_after_error, user_id
                        )
                    return
        finally:
            slot.running = False
            self._maybe_forget(user_id)

    def _retry_after_error(self, user_id: str) -> None:
        slot = self._slots.get(user_id)
        if slot is not None:
            slot.retry_call = None
        self._kick(user_id)

    async def _iteration(self, user_id: str, slot: _UserSlot) -> None:
        granted, slot.resync_granted = slot.resync_granted, False
        try:
            if slot.drop_pending:
                slot.drop_pending = False
                await self._drop(user_id, "no longer shares a room")
                return
            if not await self._membership.is_tracked(user_id):
                inbox = await self._store.get_remote_inbox_state(user_id)
                if inbox.state is not None or inbox.entries:
                    await self._drop(user_id, "not tracked")
                return
            inbox = await self._store.get_remote_inbox_state(user_id)
            sync = inbox.state
            if inbox.entries:
                sync = await self._process_batch(user_id, slot, sync, inbox.entries)
            else:
                self._cancel_hold(slot)
            if sync is None or not sync.stale:
                return
            if granted:
                granted = False
                await self._resync(user_id, slot, sync)
            else:
                self._want_resync(user_id, sync)
        except BaseException:
            if granted:
                granted = False
                self._release(
                    user_id,
                    _Outcome.ABORTED,
                    ResyncFailure(server_name_of(user_id), 500, "Internal error"),
                )
            raise
        finally:
            if granted:
                # the server queue let us resync, but there was nothing to do
                self._release(user_id, _Outcome.DONE, None)

    async def _drop(self, user_id: str, why: str) -> None:
        slot = self._slot(user_id)
        if slot.hold_call is not None and slot.hold_call.active():
            slot.hold_call.cancel()
        slot.hold_call = None
        self._user_retries.discard(user_id)
        queue = self._servers.get(_server_or_none(user_id) or "")
        if queue is not None:
            queue.pending.pop(user_id, None)
        await self._store.drop_remote_user(user_id)
        for key in [k for k in self._parsed if k[0] == user_id]:
            del self._parsed[key]
        self.stats["user_dropped"] += 1
        self.log.info("Dropped the cached device list of {user_id}: {why}", user_id=user_id, why=why)
        self._fire_waiters(
            slot, ResyncFailure(server_name_of(user_id), 404, f"{user_id} is not tracked")
        )

    async def _process_batch(
        self,
        user_id: str,
        slot: _UserSlot,
        sync: Optional[RemoteSyncState],
        entries: Sequence[QueuedUpdate],
    ) -> Optional[RemoteSyncState]:
        """Decide on the queued EDUs and commit; return the sync state
        afterwards (``sync`` itself when nothing was written)."""
        plan = self._plan_batch(user_id, sync, entries)
        result = None
        if plan.batch is not None:
            (result,) = await self._store.apply_remote_batches([plan.batch], self._now_ms())
        return self._finish_batch(user_id, slot, plan, result, sync)

    def _plan_batch(
        self,
        user_id: str,
        sync: Optional[RemoteSyncState],
        entries: Sequence[QueuedUpdate],
        new: Sequence[DeviceListUpdate] = (),
        now_ms: int = 0,
    ) -> "_Plan":
        """The decision on a user's queued EDUs and on ``new`` ones (received
        at ``now_ms``, not queued yet), and what to commit for it: queued
        EDUs decided on are deleted, new ones held are queued."""
        updates: list[DeviceListUpdate] = []
        unusable: list[int] = []
        for entry in entries:
            kept = self._parsed.pop((user_id, entry.stream_id), None)
            if kept is not None:
                updates.append(kept)
                continue
            try:
                update = parse_device_list_update(loads(entry.content_json))
            except ParseError as e:
                self.log.warn(
                    "Dropping a queued EDU of {user_id} that no longer parses: {error}",
                    user_id=user_id,
                    error=str(e),
                )
                unusable.append(entry.stream_id)
                continue
            if update.user_id != user_id or update.stream_id != entry.stream_id:
                unusable.append(entry.stream_id)
                continue
            updates.append(update)
        received = {e.stream_id: e.received_ts / 1000.0 for e in entries}
        fresh: dict[int, DeviceListUpdate] = {}
        for update in new:
            if update.stream_id in received or update.stream_id in fresh:
                self.stats["edu_already_queued"] += 1
                continue
            fresh[update.stream_id] = update
            received[update.stream_id] = now_ms / 1000.0
            updates.append(update)
            self.stats["edu_queued"] += 1
        now = self._clock.seconds()
        allow_hold = now < min(received.values()) + self.config.hold_grace
        decision = decide(
            _core_state(sync),
            updates,
            tracked=True,
            allow_hold=allow_hold,
            window=self._window,
        )
        # Mark (again) even when already stale: the new generation keeps a
        # snapshot fetched before these EDUs arrived -- possibly by another
        # process -- from clearing the mark that now also stands for them.
        mark = None if decision.resync is None else decision.resync.value
        processed = set(unusable)
        held: list[DeviceListUpdate] = []
        for d in decision.decisions:
            if d.update.stream_id in fresh:
                if d.action is Action.HOLD:
                    held.append(d.update)
                    self._keep_parsed(d.update)
            elif d.action is not Action.HOLD:
                processed.add(d.update.stream_id)
        known = None
        if decision.applied and decision.state is not None:
            known = decision.state.known_ids
        batch = None
        if processed or mark or known is not None or held:
            batch = RemoteBatch(
                user_id,
                tuple(decision.applied),
                None if known is None else frozenset(known),
                frozenset(processed),
                mark,
                self._entries(held, now_ms),
            )
        return _Plan(decision, mark, received, batch)

    def _finish_batch(
        self,
        user_id: str,
        slot: _UserSlot,
        plan: "_Plan",
        result: Optional[RemoteBatchResult],
        sync: Optional[RemoteSyncState],
    ) -> Optional[RemoteSyncState]:
        """After the plan's commit (``result``, None when it wrote nothing):
        count, tell the listeners, arm the hold timer; the sync state now."""
        self._count_decision(user_id, plan.decision, plan.mark)
        if result is not None:
            sync = result.state
            if result.changed_device_ids:
                self._notify(RemoteDeviceListChange(user_id, result.changed_device_ids))
        self._arm_hold(user_id, slot, plan.decision, plan.received)
        return sync

    def _count_decision(self, user_id: str, decision: BatchDecision, mark: Optional[str]) -> None:
        for d in decision.decisions:
            self.stats[f"{d.action.value}:{d.reason.value}"] += 1
            self.log.debug(
                "{user_id} stream_id {stream_id} prev_id {prev_ids}: {action} ({reason})",
                user_id=user_id,
                stream_id=d.update.stream_id,
                prev_ids=list(d.update.prev_ids),
                action=d.action.value,
                reason=d.reason.value,
            )
        if mark is not None:
            self.stats["stale_marked"] += 1
            self.log.info(
                "Device list of {user_id} marked stale ({reason}): resyncing",
                user_id=user_id,
                reason=mark,
            )

    def _arm_hold(
        self,
        user_id: str,
        slot: _UserSlot,
        decision: BatchDecision,
        received: Mapping[int, float],
    ) -> None:
        self._cancel_hold(slot)
        if not decision.held or self._stopped:
            return
        deadline = min(received[u.stream_id] for u in decision.held) + self.config.hold_grace
        delay = max(0.0, deadline - self._clock.seconds())
        slot.hold_call = self._clock.callLater(delay, self._hold_expired, user_id)

    @staticmethod
    def _cancel_hold(slot: _UserSlot) -> None:
        if slot.hold_call is not None and slot.hold_call.active():
            slot.hold_call.cancel()
        slot.hold_call = None

    def _hold_expired(self, user_id: str) -> None:
        slot = self._slots.get(user_id)
        if slot is not None:
            slot.hold_call = None
        self._kick(user_id)

    # ------------------------------------------------------------------
    # resync scheduling

    def _server_queue(self, destination: str) -> _ServerQueue:
        queue = self._servers.get(destination)
        if queue is None:
            queue = self._servers[destination] = _ServerQueue(destination)
        return queue

    def _server_for(self, user_id: str) -> Optional[_ServerQueue]:
        destination = _server_or_none(user_id)
        return None if destination is None else self._server_queue(destination)

    def _want_resync(self, user_id: str, sync: RemoteSyncState) -> None:
        """Queue a stale user's resync behind its server's backoff and its own."""
        if sync.resync_retry_ts is not None and sync.resync_retry_ts > self._now_ms():
            if user_id not in self._user_retries:
                self._user_retries.schedule(user_id, sync.resync_retry_ts / 1000.0)
            return
        queue = self._server_for(user_id)
        if queue is None or user_id in queue.running or user_id in queue.pending:
            return
        queue.pending[user_id] = None
        self._pump(queue)

    def _user_retry_due(self, user_id: str) -> None:
        queue = self._server_for(user_id)
        if queue is None or self._stopped:
            return
        if user_id not in queue.running:
            queue.pending[user_id] = None
        self._pump(queue)

    def _on_wake(self, destination: str) -> None:
        """``destination`` contacted us: its backoff is over, try it now."""
        queue = self._servers.get(destination)
        if queue is None or self._stopped:
            return
        if queue.timer is not None and queue.timer.active():
            queue.timer.cancel()
        queue.timer = None
        self.stats["server_woken"] += 1
        self._pump(queue)

    def _server_timer_fired(self, queue: _ServerQueue) -> None:
        queue.timer = None
        self._pump(queue)

    def _pump(self, queue: _ServerQueue) -> None:
        if self._stopped:
            return
        if queue.pumping:
            queue.pump_again = True
            return
        queue.pumping = True
        d = Deferred.fromCoroutine(self._pump_queue(queue))
        d.addErrback(
            lambda f: self.log.failure("Scheduling resyncs for {server} failed", f, server=queue.name)
        )

    async def _pump_queue(self, queue: _ServerQueue) -> None:
        try:
            while True:
                queue.pump_again = False
                if self._stopped or not queue.pending or queue.timer is not None:
                    break
                retry_at = await self._tracker.retry_at(queue.name)
                if self._stopped:
                    break
                if retry_at is not None:
                    queue.probing = True
                    queue.timer = self._clock.callLater(
                        max(0.0, retry_at - self._clock.seconds()),
                        self._server_timer_fired,
                        queue,
                    )
                    break
                limit = 1 if queue.probing else self.config.resyncs_per_server
                granted: list[str] = []
                while queue.pending and len(queue.running) < limit:
                    user_id = next(iter(queue.pending))
                    del queue.pending[user_id]
                    queue.running.add(user_id)
                    granted.append(user_id)
                # (a resync may end before _kick returns and change the queue:
                # the loop then looks at the backoff again before granting more)
                for user_id in granted:
                    self._slot(user_id).resync_granted = True
                    self._kick(user_id)
                if not queue.pump_again:
                    break
        finally:
            queue.pumping = False
        if not queue.pending and not queue.running and queue.timer is None:
            self._servers.pop(queue.name, None)

    def _release(
        self, user_id: str, outcome: _Outcome, failure: Optional[ResyncFailure]
    ) -> None:
        """A granted resync ended: free its server slot and answer the waiters."""
        slot = self._slots.get(user_id)
        if slot is not None:
            self._fire_waiters(slot, failure)
        queue = self._servers.get(_server_or_none(user_id) or "")
        if queue is None:
            return
        queue.running.discard(user_id)
        if outcome is _Outcome.DONE or outcome is _Outcome.USER_FAILED:
            queue.probing = False
        elif outcome is _Outcome.SERVER_FAILED:
            queue.probing = True
            # to the back: the next probe tries another user
            queue.pending[user_id] = None
            # queries waiting on users of this server must not wait a backoff
            for other in list(queue.pending):
                other_slot = self._slots.get(other)
                if other_slot is not None and other_slot.shared is not None:
                    self._fire_waiters(other_slot, failure)
        self._pump(queue)

    def _fire_waiters(self, slot: _UserSlot, failure: Optional[ResyncFailure]) -> None:
        result, slot.next_result, slot.shared = slot.next_result, None, None
        if result is not None:
            result.callback(failure)

    # ------------------------------------------------------------------
    # the resync itself

    async def _resync(self, user_id: str, slot: _UserSlot, sync: RemoteSyncState) -> None:
        destination = server_name_of(user_id)
        generation = sync.stale_generation
        epoch = slot.epoch
        started = self._server_queue(destination).failure_epoch
        outcome = _Outcome.ABORTED
        failure: Optional[ResyncFailure] = ResyncFailure(destination, 503, "Resync aborted")
        slot.fetching = True
        slot.signing_during_fetch = []
        try:
            self.stats["resync_attempt"] += 1
            try:
                body = await self._fetch(destination, user_id, slot)
            except CancelledError:
                self.stats["resync_cancelled"] += 1
                return
            except FederationClientError as e:
                outcome, failure = await self._fetch_failed(user_id, destination, sync, e, started)
                return
            except Exception:
                outcome, failure = await self._unexpected_failure(user_id, destination, sync)
                return
            await self._tracker.record_success(destination)
            try:
                snapshot = await self._validate(user_id, destination, body)
            except Exception:
                outcome, failure = await self._unexpected_failure(user_id, destination, sync)
                return
            if isinstance(snapshot, ResyncFailure):
                outcome, failure = _Outcome.USER_FAILED, snapshot
                await self._user_failed(user_id, sync, snapshot.message)
                return
            if slot.epoch != epoch or self._stopped:
                return
            if not await self._membership.is_tracked(user_id):
                slot.again = True  # the next pass drops the user
                return
            before = await self._store.get_remote_cache(user_id) if self._listeners else None
            # cross-signing keys that arrived during the fetch may be newer
            # than the snapshot's: they go into the same transaction
            for keys in slot.signing_during_fetch:
                snapshot = replace(
                    snapshot,
                    master_key=keys.get(USAGE_MASTER, snapshot.master_key),
                    self_signing_key=keys.get(USAGE_SELF_SIGNING, snapshot.self_signing_key),
                )
            cleared = await self._store.replace_remote_snapshot(
                user_id, snapshot, generation, self._now_ms()
            )
            outcome, failure = _Outcome.DONE, None
            self.stats["resync_done"] += 1
            self.log.info(
                "Resynced {user_id} from {destination}: {count} device(s) at stream_id {stream_id}"
                "{still}",
                user_id=user_id,
                destination=destination,
                count=len(snapshot.devices),
                stream_id=snapshot.stream_id,
                still="" if cleared else "; marked stale again meanwhile, resyncing again",
            )
            if before is not None:
                self._notify_snapshot(user_id, before.devices, before.cross_signing_keys, snapshot)
            # decide on the EDUs that arrived during the fetch, and resync
            # again if a newer stale mark survived
            slot.again = True
        finally:
            slot.fetching = False
            slot.fetch = None
            slot.signing_during_fetch = []
            self._release(user_id, outcome, failure)

    async def _unexpected_failure(
        self, user_id: str, destination: str, sync: RemoteSyncState
    ) -> "tuple[_Outcome, ResyncFailure]":
        """A resync failed in a way nothing anticipated (a bug, or an answer
        that broke a parser): log it and back this user off like any other
        user-specific failure, so it is retried on a schedule, never in a loop."""
        self.log.failure(
            "Resyncing {user_id} from {destination} failed unexpectedly",
            user_id=user_id,
            destination=destination,
        )
        self.stats["resync_unexpected_error"] += 1
        failure = ResyncFailure(destination, 502, f"Resync of {user_id} failed unexpectedly")
        await self._user_failed(user_id, sync, failure.message)
        return _Outcome.USER_FAILED, failure

    async def _fetch(self, destination: str, user_id: str, slot: _UserSlot) -> JsonDict:
        path = user_devices_path(user_id)

        async def get() -> JsonDict:
            return await self._client.get_json(
                destination, path, timeout=self.config.resync_timeout
            )

        fetch: Deferred[JsonDict] = Deferred.fromCoroutine(self._limiter.run(destination, get))
        slot.fetch = fetch
        return await fetch

    async def _fetch_failed(
        self,
        user_id: str,
        destination: str,
        sync: RemoteSyncState,
        e: FederationClientError,
        started: int,
    ) -> tuple[_Outcome, ResyncFailure]:
        if isinstance(e, HttpResponseError):
            failure = ResyncFailure(destination, e.code, f"{destination} answered {e.code}")
            # 401/403: the server refused *us* (it could not check our key,
            # or it blocks our server), 408: a timeout -- none of them is about
            # this user, so the server backs off (and is woken when it
            # contacts us) instead of the user sitting out a long user backoff
            server_wide = (
                e.code >= 500
                or e.code in (401, 403, 408, 429)
                or (e.code in (404, 405) and e.errcode == M_UNRECOGNIZED)
            )
            if not server_wide:
                await self._tracker.record_success(destination)
                await self._user_failed(
                    user_id, sync, f"{destination} answered {e.code} {e.errcode or ''}".rstrip()
                )
                return _Outcome.USER_FAILED, failure
        elif isinstance(e, ResponseTooLargeError):
            await self._tracker.record_success(destination)
            failure = ResyncFailure(destination, 502, f"{destination} sent an oversized answer")
            await self._user_failed(user_id, sync, str(e))
            return _Outcome.USER_FAILED, failure
        elif isinstance(e, NotRetryingDestination):
            return _Outcome.SERVER_FAILED, ResyncFailure(destination, 503, "Not ready for retry")
        elif isinstance(e, RequestSendFailed):
            failure = ResyncFailure(destination, 503, f"Failed to reach {destination}: {e.reason}")
        else:
            failure = ResyncFailure(destination, 503, f"Failed to reach {destination}")
        self.stats["resync_server_failed"] += 1
        queue = self._server_queue(destination)
        if started == queue.failure_epoch:
            # one failure per backoff period, however many resyncs were in flight
            queue.failure_epoch += 1
            await self._tracker.record_failure(destination)
        self.log.info(
            "Resync of {user_id} failed: {error}; {destination} backs off",
            user_id=user_id,
            error=str(e),
            destination=destination,
        )
        return _Outcome.SERVER_FAILED, failure

    async def _user_failed(self, user_id: str, sync: RemoteSyncState, why: str) -> None:
        self.stats["resync_user_failed"] += 1
        attempts = sync.resync_attempts
        delay = self.config.user_backoff.delay(attempts, self._jitter)
        retry_ts = self._now_ms() + int(delay * 1000)
        await self._store.set_remote_resync_backoff(user_id, attempts + 1, retry_ts)
        self._user_retries.schedule(user_id, retry_ts / 1000.0)
        self.log.warn(
            "Resync of {user_id} failed ({why}); retrying that user in {delay:.0f}s",
            user_id=user_id,
            why=why,
            delay=delay,
        )

    async def _validate(
        self, user_id: str, destination: str, body: JsonDict
    ) -> "UserDevicesResponse | ResyncFailure":
        devices = body.get("devices")
        cap = self.config.max_devices_per_user
        if isinstance(devices, list) and len(devices) > cap:
            self.stats["resync_over_device_cap"] += 1
            self.log.warn(
                "Refusing the device list of {user_id} from {destination}: {count} devices,"
                " over max_devices_per_user ({cap}); the cached list is kept and the user"
                " stays stale",
                user_id=user_id,
                destination=destination,
                count=len(devices),
                cap=cap,
            )
            return ResyncFailure(
                destination, 502, f"{user_id} has {len(devices)} devices, over the limit of {cap}"
            )
        try:
            snapshot = await self._cpu_runner(
                # (the body was decoded for this call alone: its keys are not copied)
                lambda: parse_user_devices_response(body, expected_user_id=user_id, owned=True)
            )
        except ParseError as e:
            self.stats["resync_invalid_answer"] += 1
            self.log.warn(
                "Rejecting the /user/devices answer for {user_id} from {destination}: {error}",
                user_id=user_id,
                destination=destination,
                error=str(e),
            )
            return ResyncFailure(destination, 502, f"Invalid answer from {destination}: {e}")
        for problem in snapshot.skipped[:_MAX_LOGGED_PROBLEMS]:
            self.log.warn(
                "Skipping part of the device list of {user_id} from {destination}:"
                " {path}: {problem}",
                user_id=user_id,
                destination=destination,
                path=problem.path,
                problem=problem.message,
            )
        if len(snapshot.skipped) > _MAX_LOGGED_PROBLEMS:
            self.log.warn(
                "... and {more} more skipped entries in the device list of {user_id}",
                more=len(snapshot.skipped) - _MAX_LOGGED_PROBLEMS,
                user_id=user_id,
            )
        self.stats["resync_skipped_entries"] += len(snapshot.skipped)
        return snapshot

    # ------------------------------------------------------------------
    # listeners

    def _notify_snapshot(
        self,
        user_id: str,
        before_devices: tuple[Any, ...],
        before_keys: Mapping[str, CrossSigningKey],
        snapshot: UserDevicesResponse,
    ) -> None:
        def view(device: Any) -> tuple[Optional[str], Optional[JsonDict]]:
            return device.display_name, None if device.keys is None else device.keys.raw

        old = {d.device_id: view(d) for d in before_devices}
        new = {d.device_id: view(d) for d in snapshot.devices}
        changed = tuple(sorted(d for d in old.keys() | new.keys() if old.get(d) != new.get(d)))
        new_keys = {
            usage: key.raw
            for usage, key in (
                (USAGE_MASTER, snapshot.master_key),
                (USAGE_SELF_SIGNING, snapshot.self_signing_key),
            )
            if key is not None
        }
        old_keys = {usage: key.raw for usage, key in before_keys.items()}
        self._notify(
            RemoteDeviceListChange(
                user_id, changed, cross_signing=old_keys != new_keys, resync=True
            )
        )

    def _notify(self, change: RemoteDeviceListChange) -> None:
        for listener in list(self._listeners):
            call_listener(
                self.log,
                lambda: listener(change),
                "Device-list listener {listener!r} failed for {user_id}",
                listener=listener,
                user_id=change.user_id,
            )


def _server_or_none(user_id: str) -> Optional[str]:
    try:
        return server_name_of(user_id)
    except ParseError:
        return None
