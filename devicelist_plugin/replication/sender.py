"""The outbound sender: every local device change, pushed durably to every
interested server.

What goes where.  A local change is queued, in the database transaction that
makes it, for every server sharing a room with the user (the handler does
that; rows are collapsed per destination, user and device, so storage grows
with destinations x changed devices, never with changes x rooms).  The sender
turns those pending rows into ``PUT /_matrix/federation/v1/send/{txnId}``
transactions, one queue per destination:

* at most one transaction in flight per destination, up to
  :data:`~devicelist_plugin.core.outbound.EDU_LIMIT` (100) EDUs each, in
  stream order (per user, across users); a larger backlog goes out as
  several transactions, in order, each chained from the previous one;
* ``m.device_list_update`` EDUs are built by
  :func:`~devicelist_plugin.core.outbound.build_device_list_edus` from the
  pending rows and the devices' state *at send time*
  (:meth:`LocalDeviceHandler.federation_device_states`: keys with the stored
  cross-signing signatures, names only where configured); a device that no
  longer exists goes out as ``deleted: true``;
* ``prev_id``: the first EDU of a user names every id the destination
  acknowledged and nothing referenced yet (``[]`` when none: the receiver
  resyncs), each next one the previous EDU's ``stream_id``;
* the transaction (txnId, body, and what to acknowledge) is persisted
  (``begin_outbound_transaction``) while it is first sent -- the commit and
  the request overlap, and the answer is acted on only once the commit is
  done -- and re-sent unchanged, same txnId, until the destination answers
  200; the 200 is recorded with ``ack_sent`` in one database transaction
  (covered pending rows deleted, unreferenced ids stored, in-flight
  transaction cleared).  Sending before the commit loses nothing: the
  pending rows were committed with the change and stay until acknowledged,
  so after a crash in between the same EDUs go out again in a new
  transaction (receivers ignore stream ids they have), and a chain reset it
  would have consumed is applied once more (one more resync at worst).

When it sends.  Device-list EDUs never wait for other traffic (Synapse #3781):
a committed change wakes, at once and without reading the store, the queues
of the destinations it was queued for (the handler's queued listener; an
idle destination is sent to immediately, a busy one's next transaction takes
every row queued meanwhile); a destination newly sharing
a room with a user (the membership listener) is woken once that user's
current devices are queued (Synapse #11374); on start-up every destination
with pending rows, an in-flight transaction or a chain reset is scheduled
(catch-up).  With ``poll_interval`` the sender also looks for such
destinations periodically: for changes committed by other processes sharing
the database, whose change listeners it does not hear.

Cross-signing (Synapse #7142).  A master or self-signing key upload is a
``signing_key`` change of the user's stream: it takes a stream id from the
same per-user sequence as device changes, and goes out as
``m.signing_key_update`` (``user_id``, ``master_key``, ``self_signing_key``
as stored, signatures merged) carrying no ``stream_id``.  ``prev_id`` only
ever names ids of ``m.device_list_update`` EDUs the destination acknowledged
(or a ``/user/devices`` snapshot it was served), never a signing-key change's
id, so the id it consumed leaves no hole in any device chain and no receiver
resyncs because of a cross-signing upload.  (The unstable
``org.matrix.signing_key_update`` twin Synapse also sends is not sent.)

Failures.  The per-destination backoff is the shared
:class:`~devicelist_plugin.replication.retry.DestinationRetryTracker`
(Synapse's ``destination_min_retry_interval``,
``destination_retry_multiplier``, ``destination_max_retry_interval``, jitter
injected).  After a failure the queue sleeps until the tracker's retry time
(one ``clock.callLater``); local changes made meanwhile are queued but do not
cut the backoff short; a valid signed request from that server (the
authenticator's contact listener -> ``tracker.on_contact``) resets the
backoff and retries at once.  Answers, by what the sender does
(:func:`action_for_error`); none drops anything:

=============================  ==============================================================
answer                         what the sender does
=============================  ==============================================================
200                            acknowledge, reset the backoff, send the next batch at once
5xx                            backoff; retry the same txnId
no answer, network error       timeouts, refused or lost connections, DNS/TLS failures, a
                               2xx body that is not JSON: backoff; retry the same txnId
400 ``M_UNRECOGNIZED``         the server does not speak ``/send`` (or a proxy answers for
                               it): backoff; retry the same txnId; never dropped
404, 405                       as 400 ``M_UNRECOGNIZED``
400 (other errcodes)           the receiver rejects the transaction as malformed and took
                               none of it: backoff; the transaction is abandoned and rebuilt
                               from the pending rows (untouched) at the next attempt, with
                               half as many EDUs, so that one EDU it chokes on stops blocking
                               the others and a newer state of that device replaces it
401                            our signature is not accepted (our key not fetched yet,
                               rotated, clock skew): backoff; same txnId
403                            forbidden (ACL, ban): backoff; same txnId
408                            as a timeout: backoff; same txnId
413                            too large: the transaction is abandoned and its rows sent at
                               once in transactions half as big (no backoff: the server is
                               up); a single EDU too large: as 400
429                            rate limited: backoff, and no attempt before the answer's
                               ``retry_after_ms``; same txnId
other 4xx                      backoff; same txnId
=============================  ==============================================================

The batch size halved by 400/413 doubles back after each 200.

Long-dead destinations.  Pending rows are collapsed per (destination, user,
device), so a dead destination's queue is bounded by the devices of the users
it shares rooms with -- but deleted devices count, so a bot that logs in with
a new device every hour would grow it without end.  Policy: once a
destination has failed without interruption for ``dead_destination_after``
seconds (by default ``destination_max_retry_interval``, one week), each
failed attempt compacts its queue: its pending ``m.device_list_update`` rows
are deleted and replaced by one *chain reset* per user they concerned
(pending signing-key rows, one per user, and the in-flight transaction are
kept).  What is kept for a dead destination is then at most one row per user
(chain reset, signing-key row, unreferenced ids) plus one transaction of at
most 100 EDUs, plus the device changes of one backoff period; attempts
continue at ``destination_max_retry_interval``.  When it answers again (or
contacts us), each reset user's next EDUs -- at least one, for their latest
device change -- go out with ``prev_id: []`` (see Chain resets): the
receiver resyncs that user from ``/user/devices`` and converges to the
current list (that EDU's ``stream_id`` is newer than anything it got from
us, unless it is already up to date).  The cost is one resync per such user
on return, as with Synapse's pruning (#7173).

Chain resets.  The same mechanism restarts the chain of a server that newly
shares a room with a user: it may have received the user's updates before,
left, and missed changes since (a deleted device would never reach it if
our chain resumed from ids it still recognises).  A reset is applied only
while no transaction is in flight to the destination, so no late
acknowledgement can bring the old chain back: the user's latest device
change L is queued, and every EDU of the user goes out with ``prev_id: []``
until a transaction carrying one at or above L is persisted, which consumes
the reset in the same database transaction (a transaction abandoned after a
400 or 413 gives its resets back).  Each such EDU is either one the
receiver already holds (skipped) or one it does not (an empty ``prev_id``:
it resyncs); L itself is unknown to it unless it is up to date.  The join
fan-out records its resets in the join's database transaction when the
membership source is the store-backed one, so it survives a crash.

Several processes.  Stream ids are allocated per user under a row lock
(storage/store.py), so several writer processes sharing one database commit
a user's changes in id order and the sender, which reads pending rows and
unreferenced ids from the database in one transaction for every batch (it
keeps no chain state in memory), names correct ``prev_id`` s whichever
process made the change.  Exactly one sender may serve a destination: give
each process's sender an ``owns_destination`` predicate that shards the
destinations, and a ``poll_interval`` to see other processes' changes.
"""

from __future__ import annotations

import enum
import secrets
from dataclasses import dataclass, field, replace
from typing import (
    Any,
    Awaitable,
    Callable,
    Collection,
    Coroutine,
    Mapping,
    Optional,
    Protocol,
    Sequence,
)
from urllib.parse import quote

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from devicelist_plugin.core.models import (
    EDU_DEVICE_LIST_UPDATE,
    EDU_SIGNING_KEY_UPDATE,
    USAGE_MASTER,
    USAGE_SELF_SIGNING,
    DeviceKeys,
    JsonDict,
)
from devicelist_plugin.core.outbound import EDU_LIMIT, PendingChange, build_device_list_edus
from devicelist_plugin.core.parse import ParseError, parse_device_keys
from devicelist_plugin.core.serialize import device_list_update_to_json
from devicelist_plugin.federation.client import (
    HttpResponseError,
    NotRetryingDestination,
    QueryArgs,
    RequestSendFailed,
)
from devicelist_plugin.federation.errors import M_UNRECOGNIZED
from devicelist_plugin.local.handler import ChangeListener, QueuedListener
from devicelist_plugin.local.serving import cross_signing_key_json
from devicelist_plugin.membership import MembershipSource
from devicelist_plugin.replication.retry import DestinationRetryTracker
from devicelist_plugin.storage.interface import IDeviceListStore
from devicelist_plugin.storage.types import (
    InflightTransaction,
    LocalUserKeys,
    PendingBatch,
    PendingRow,
)

__all__ = [
    "SEND_PATH_PREFIX",
    "DeviceListSender",
    "ErrorAction",
    "LocalDeviceSource",
    "TransactionClient",
    "action_for_error",
]

SEND_PATH_PREFIX = "/_matrix/federation/v1/send/"
# the version of the in-flight payload written by this module
_PAYLOAD_VERSION = 1


class TransactionClient(Protocol):
    """What the sender needs of :class:`~devicelist_plugin.federation.client.FederationClient`."""

    def put_json(
        self,
        destination: str,
        path: str,
        body: JsonDict,
        args: Optional[QueryArgs] = None,
        timeout: Optional[float] = None,
    ) -> Awaitable[JsonDict]: ...


class LocalDeviceSource(Protocol):
    """What the sender needs of :class:`~devicelist_plugin.local.handler.LocalDeviceHandler`."""

    def federation_device_states_of(
        self,
        with_keys: LocalUserKeys,
        names: Mapping[str, Optional[str]],
        device_ids: Collection[str],
    ) -> dict[str, JsonDict]: ...

    def add_change_listener(self, listener: ChangeListener) -> None: ...

    def remove_change_listener(self, listener: ChangeListener) -> None: ...

    def add_queued_listener(self, listener: QueuedListener) -> None: ...

    def remove_queued_listener(self, listener: QueuedListener) -> None: ...


class ErrorAction(enum.Enum):
    """What to do after a non-200 answer (the table in the module docstring)."""

    # back off, then send the same transaction (same txnId) again
    RETRY = "retry"
    # abandon the transaction and send the pending rows at once, in smaller ones
    SPLIT = "split"
    # back off, then build a new, smaller transaction from the pending rows
    REBUILD = "rebuild"


def action_for_error(code: int, errcode: Optional[str], edu_count: int) -> ErrorAction:
    """The sender's action for an HTTP answer ``code`` (not 2xx) with
    ``errcode`` to a transaction of ``edu_count`` EDUs."""
    if code == 413:
        return ErrorAction.SPLIT if edu_count > 1 else ErrorAction.REBUILD
    if code == 400 and errcode != M_UNRECOGNIZED:
        return ErrorAction.REBUILD
    return ErrorAction.RETRY


class _Outcome(enum.Enum):
    DELIVERED = "delivered"
    AGAIN = "again"
    RETRY_LATER = "retry_later"
    STOPPED = "stopped"


SentKey = tuple[str, Optional[str], int]


@dataclass(frozen=True)
class _Transaction:
    txn_id: str
    body: JsonDict
    # the pending rows it covers: deleted once acknowledged
    sent: tuple[SentKey, ...]
    # the users' unreferenced ids once acknowledged
    unreferenced_after: Mapping[str, Sequence[int]]
    edu_count: int
    # the users whose chain reset it consumed when it was persisted (they
    # come back if it is abandoned)
    restarted: tuple[str, ...] = ()
    # the commit persisting a new transaction (None: read back from the
    # store); it never fails (a failure is logged)
    persisted: "Optional[Deferred[None]]" = field(default=None, compare=False)

    def payload(self) -> JsonDict:
        return {
            "version": _PAYLOAD_VERSION,
            "body": self.body,
            "sent": [list(item) for item in self.sent],
            "unreferenced_after": {u: list(ids) for u, ids in self.unreferenced_after.items()},
            "restarted": list(self.restarted),
        }

    @classmethod
    def from_inflight(cls, inflight: InflightTransaction) -> "_Transaction":
        """The persisted transaction; ``ValueError`` if it is not one of ours."""
        p = inflight.payload
        try:
            if p.get("version") != _PAYLOAD_VERSION:
                raise ValueError(f"unknown payload version {p.get('version')!r}")
            body = p["body"]
            edus = body["edus"]
            sent = tuple(
                (str(u), None if d is None else str(d), int(s)) for u, d, s in p["sent"]
            )
            unreferenced = {
                str(u): tuple(int(i) for i in ids) for u, ids in p["unreferenced_after"].items()
            }
            restarted = tuple(str(u) for u in p["restarted"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"malformed in-flight transaction: {e}") from None
        if not isinstance(body, dict) or not isinstance(edus, list):
            raise ValueError("malformed in-flight transaction body")
        return cls(inflight.txn_id, body, sent, unreferenced, len(edus), restarted)


def _default_txn_id(now_ms: int) -> str:
    # unique across restarts without any state: time plus 48 random bits
    return f"{now_ms}-{secrets.token_urlsafe(6)}"


class DeviceListSender(Service):
    """One queue per destination; see the module docstring.

    :param server_name: our server name (the transactions' ``origin``).
    :param store: pending rows, in-flight transactions, chain resets.
    :param client: sends the signed ``PUT /send`` requests.
    :param clock: time of transactions and retries (``callLater``).
    :param tracker: the per-destination backoff shared with the inbound side.
    :param local: the device states EDUs carry, and the queued listener.
    :param membership: heard for servers newly sharing a room with a user.
    :param edu_limit: EDUs per transaction (at most 100).
    :param compact_dead_destinations: apply the long-dead destination policy
        of the module docstring (False keeps every pending row forever).
    :param dead_destination_after: seconds of uninterrupted failure after
        which a destination's pending device updates are compacted; by
        default ``tracker.policy.max_interval``.
    :param owns_destination: the destinations this sender serves (sharding
        between processes); all by default.
    :param poll_interval: look for destinations with work every so many
        seconds (other processes' changes); None (default) never.
    :param request_timeout: seconds per ``/send`` request (the client's
        default when None).
    :param txn_id_factory: ``f(now_ms)`` gives a new txnId.
    """

    log = Logger()

    def __init__(
        self,
        server_name: str,
        store: IDeviceListStore,
        client: TransactionClient,
        clock: IReactorTime,
        tracker: DestinationRetryTracker,
        local: LocalDeviceSource,
        membership: Optional[MembershipSource] = None,
        *,
        edu_limit: int = EDU_LIMIT,
        compact_dead_destinations: bool = True,
        dead_destination_after: Optional[float] = None,
        owns_destination: Callable[[str], bool] = lambda destination: True,
        poll_interval: Optional[float] = None,
        request_timeout: Optional[float] = None,
        txn_id_factory: Callable[[int], str] = _default_txn_id,
    ) -> None:
        if not 1 <= edu_limit <= EDU_LIMIT:
            raise ValueError(f"edu_limit must be between 1 and {EDU_LIMIT}")
        if poll_interval is not None and poll_interval <= 0:
            raise ValueError("poll_interval must be positive")
        self.server_name = server_name
        self.setName("devicelist-sender")
        self._store = store
        self._client = client
        self._clock = clock
        self._tracker = tracker
        self._local = local
        self._membership = membership
        self._edu_limit = edu_limit
        if dead_destination_after is None:
            dead_destination_after = tracker.policy.max_interval
        if dead_destination_after < 0:
            raise ValueError("dead_destination_after must not be negative")
        #: seconds of uninterrupted failure before compaction; None: never
        self.dead_destination_after: Optional[float] = (
            dead_destination_after if compact_dead_destinations else None
        )
        self._owns = owns_destination
        self._poll_interval = poll_interval
        self._request_timeout = request_timeout
        self._txn_id_factory = txn_id_factory

        self._started = False
        self._stopped = True
        self._registered = False
        self._poller: Optional[LoopingCall] = None
        # destinations whose send loop is running
        self._running: set[str] = set()
        # woken while their loop ran: look again before it stops
        self._again: set[str] = set()
        self._timers: dict[str, IDelayedCall] = {}
        self._requests: dict[str, Deferred[JsonDict]] = {}
        # no attempt before this time (429 retry_after_ms)
        self._not_before: dict[str, float] = {}
        # EDUs per transaction, reduced by 400/413
        self._limits: dict[str, int] = {}
        # destinations known (from this sender's own reads and writes) to have
        # no in-flight transaction: the next one is built without reading it
        self._no_inflight: set[str] = set()
        self._tasks: set[object] = set()
        self._idle_waiters: list[Deferred[None]] = []

        # plain counters (metrics come later)
        self.transactions_sent = 0
        self.edus_sent = 0
        self.failures = 0
        self.compacted_rows = 0
        #: destination -> clock time of the last delivered transaction (this process)
        self.last_success: dict[str, float] = {}
        #: destination -> (clock time, reason) of the last failed attempt (this process)
        self.last_error: dict[str, tuple[float, str]] = {}

    # ------------------------------------------------------------------
    # life cycle

    def startService(self) -> None:
        super().startService()
        self.start()

    def stopService(self) -> "Deferred[None]":
        super().stopService()
        return self.stop()

    def start(self) -> "Deferred[None]":
        """Register the listeners and schedule every destination with work
        (catch-up); the Deferred fires once they are scheduled."""
        if self._started:
            return succeed(None)
        self._started = True
        self._stopped = False
        self._no_inflight.clear()
        self._local.add_queued_listener(self.on_queued)
        if not self._registered:
            # neither offers a way to unregister: calls after stop() are ignored
            self._registered = True
            self._tracker.add_wake_listener(self._on_contact)
            if self._membership is not None:
                self._membership.add_listener(self)
        if self._poll_interval is not None:
            self._poller = LoopingCall(self._poll)
            self._poller.clock = self._clock
            self._poller.start(self._poll_interval, now=False).addErrback(
                lambda f: self.log.failure("outbound poll stopped", f)
            )
        return self._spawn("catch-up", self._catch_up())

    def stop(self) -> "Deferred[None]":
        """Cancel every timer and request in progress; fires once every send
        loop has ended.  In-flight transactions stay persisted and are sent
        again (same txnId) by the next start."""
        if self._started:
            self._started = False
            self._stopped = True
            self._local.remove_queued_listener(self.on_queued)
            if self._poller is not None:
                if self._poller.running:
                    self._poller.stop()
                self._poller = None
            for call in self._timers.values():
                if call.active():
                    call.cancel()
            self._timers.clear()
            for request in list(self._requests.values()):
                request.cancel()
        return self.idle()

    def idle(self) -> "Deferred[None]":
        """Fires when no send loop and no listener's work is running."""
        if not self._running and not self._tasks:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle_waiters.append(d)
        return d

    def _check_idle(self) -> None:
        if not self._running and not self._tasks:
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                d.callback(None)

    def _spawn(self, what: str, coroutine: Coroutine[Any, Any, None]) -> "Deferred[None]":
        token = object()
        self._tasks.add(token)

        def finished(result: object) -> None:
            self._tasks.discard(token)
            if isinstance(result, Failure):
                self.log.failure("outbound {what} failed", result, what=what)
            self._check_idle()

        d = Deferred.fromCoroutine(coroutine)
        d.addBoth(finished)
        return d

    # ------------------------------------------------------------------
    # what wakes a queue

    def on_queued(self, user_id: str, destinations: frozenset[str]) -> None:
        """The handler's queued listener: wake the queues a change was just
        queued for, without reading the store (its change is committed)."""
        for destination in sorted(destinations):
            self.wake(destination)

    def on_local_change(
        self, user_id: str, stream_id: int, device_ids: tuple[str, ...]
    ) -> "Deferred[None]":
        """A change listener for another writer's handler (sharing the
        database): wake the queues holding the user's rows."""
        return self._spawn("wake after a change", self._wake_for_user(user_id))

    async def _wake_for_user(self, user_id: str) -> None:
        if self._stopped:
            return
        for destination in await self._store.destinations_pending_for_user(user_id):
            self.wake(destination)

    def servers_newly_sharing(self, local_user_id: str, servers: frozenset[str]) -> object:
        """Membership listener: queue the user's current devices for
        ``servers`` and restart its chain to them (see the module docstring)."""
        return self._spawn("join fan-out", self._fan_out(local_user_id, servers))

    async def _fan_out(self, user_id: str, servers: Collection[str]) -> None:
        targets = sorted(set(servers) - {self.server_name, ""})
        if not targets:
            return
        # durable first: if we die now, the reset still makes them resync
        await self._store.add_chain_resets([(server, user_id) for server in targets])
        now_ms = self._now_ms()
        for server in targets:
            rows = await self._store.enqueue_current_devices(server, user_id, now_ms)
            self.log.info(
                "{server} newly shares a room with {user_id}: {n} update(s) queued",
                server=server,
                user_id=user_id,
                n=len(rows),
            )
        for server in targets:
            self.wake(server)

    def remote_user_untracked(self, remote_user_id: str) -> object:
        """Membership listener: nothing to do on the outbound side."""
        return None

    def _on_contact(self, destination: str) -> None:
        # the tracker has just reset the destination's backoff
        self._not_before.pop(destination, None)
        self._cancel_timer(destination)
        self.wake(destination)

    async def _catch_up(self) -> None:
        for destination in await self._store.destinations_to_send():
            self.wake(destination)

    def _poll(self) -> "Deferred[None]":
        return self._spawn("poll", self._poll_once())

    async def _poll_once(self) -> None:
        for destination in await self._store.destinations_to_send():
            if destination not in self._timers:
                self.wake(destination)

    def wake(self, destination: str) -> None:
        """Send to ``destination`` now, unless it is backing off (then its
        timer stays) or this sender does not serve it."""
        if self._stopped or destination == self.server_name or not self._owns(destination):
            return
        if destination in self._running:
            self._again.add(destination)
            return
        self._running.add(destination)
        d = Deferred.fromCoroutine(self._run(destination))
        d.addErrback(self._loop_crashed, destination)
        d.addBoth(self._loop_finished, destination)

    def _loop_crashed(self, failure: Failure, destination: str) -> None:
        self.log.failure("send loop for {destination} crashed", failure, destination=destination)
        # never leave a destination with work and no timer
        self._schedule(destination, self._clock.seconds() + self._tracker.policy.min_interval)

    def _loop_finished(self, _: object, destination: str) -> None:
        self._running.discard(destination)
        self._check_idle()

    # ------------------------------------------------------------------
    # timers

    def _now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    def _cancel_timer(self, destination: str) -> None:
        call = self._timers.pop(destination, None)
        if call is not None and call.active():
            call.cancel()

    def _schedule(self, destination: str, at: float) -> None:
        self._cancel_timer(destination)
        if self._stopped:
            return
        delay = max(0.0, at - self._clock.seconds())
        self._timers[destination] = self._clock.callLater(delay, self._timer_fired, destination)

    def _timer_fired(self, destination: str) -> None:
        self._timers.pop(destination, None)
        self.wake(destination)

    async def _blocked_until(self, destination: str) -> Optional[float]:
        at = await self._tracker.retry_at(destination)
        not_before = self._not_before.get(destination)
        if not_before is not None and not_before <= self._clock.seconds():
            del self._not_before[destination]
            not_before = None
        times = [t for t in (at, not_before) if t is not None]
        return max(times) if times else None

    # ------------------------------------------------------------------
    # the send loop of one destination

    async def _run(self, destination: str) -> None:
        while not self._stopped:
            self._again.discard(destination)
            until = await self._blocked_until(destination)
            if self._stopped:
                return
            if until is not None:
                self._schedule(destination, until)
                return
            self._cancel_timer(destination)
            try:
                txn = await self._next_transaction(destination)
            except Exception:
                self.log.failure(
                    "building a transaction for {destination} failed", destination=destination
                )
                await self._failed(destination, None, "could not build a transaction")
                return
            if self._stopped:
                if txn is not None and txn.persisted is not None:
                    # the loop ends (and stop() fires) only after its commit
                    await txn.persisted
                return
            if txn is None:
                if destination in self._again:
                    continue
                return
            outcome = await self._attempt(destination, txn)
            if outcome in (_Outcome.RETRY_LATER, _Outcome.STOPPED):
                return

    async def _next_transaction(self, destination: str) -> Optional[_Transaction]:
        # Only this sender writes the destination's in-flight transaction
        # (one sender per destination), so once it has seen or made the
        # destination without one it need not read it again.
        inflight = None
        if destination not in self._no_inflight:
            inflight = await self._store.get_inflight_txn(destination)
        if inflight is None:
            self._no_inflight.add(destination)
        else:
            try:
                return _Transaction.from_inflight(inflight)
            except ValueError as e:
                # not ours (a newer format after a downgrade): its rows are
                # still pending, so rebuilding loses nothing
                self.log.warn(
                    "{destination}: rebuilding in-flight transaction {txn_id}: {error}",
                    destination=destination,
                    txn_id=inflight.txn_id,
                    error=str(e),
                )
                await self._store.clear_inflight_txn(destination, inflight.txn_id)
                self._no_inflight.add(destination)
        while True:
            txn = await self._build(destination)
            if txn is None or txn.edu_count > 0:
                return txn
            # only rows with nothing left to send (a signing-key row whose
            # keys are gone): acknowledge them without a request
            await self._store.ack_sent(destination, txn.sent, {})

    async def _build(self, destination: str) -> Optional[_Transaction]:
        limit = self._limits.get(destination, self._edu_limit)
        # the rows and the state of their devices in one read
        batch = await self._store.get_outbound_batch(destination, limit, with_devices=True)
        if batch.resets:
            await self._store.prepare_chain_resets(destination, self._now_ms())
            batch = await self._store.get_outbound_batch(destination, limit, with_devices=True)
        if not batch.rows:
            return None
        device_rows = [r for r in batch.rows if r.device_id is not None]
        key_rows = [r for r in batch.rows if r.device_id is None]

        # (stream_id, user_id, kind order, edu)
        edus: list[tuple[int, str, int, JsonDict]] = []
        sent: list[SentKey] = []
        unreferenced_after: dict[str, tuple[int, ...]] = {}
        # the highest stream id of each restarted user's EDUs in this batch
        restarted: dict[str, int] = {}

        changes = self._pending_changes(device_rows, batch)
        if changes:
            built = build_device_list_edus(changes, batch.unreferenced, limit=len(changes))
            for update in built.edus:
                if update.user_id in batch.resets:
                    # a restarted chain: no continuity claimed (module docstring)
                    update = replace(update, prev_ids=())
                    restarted[update.user_id] = update.stream_id
                content = device_list_update_to_json(update)
                edus.append(
                    (
                        update.stream_id,
                        update.user_id,
                        0,
                        {"edu_type": EDU_DEVICE_LIST_UPDATE, "content": content},
                    )
                )
            sent.extend((c.user_id, c.device_id, c.stream_id) for c in built.covered)
            unreferenced_after = {
                u: tuple(sorted(ids)) for u, ids in built.unreferenced_after_ack.items()
            }

        contents = await self._signing_key_contents(sorted({r.user_id for r in key_rows}))
        for row in key_rows:
            key_content = contents.get(row.user_id)
            if key_content is None:
                self.log.info(
                    "{user_id} has no federated cross-signing key any more: nothing to send",
                    user_id=row.user_id,
                )
            else:
                edus.append(
                    (
                        row.stream_id,
                        row.user_id,
                        1,
                        {"edu_type": EDU_SIGNING_KEY_UPDATE, "content": key_content},
                    )
                )
            sent.append((row.user_id, None, row.stream_id))

        edus.sort(key=lambda e: (e[0], e[1], e[2]))
        now_ms = self._now_ms()
        txn_id = self._txn_id_factory(now_ms)
        body: JsonDict = {
            "origin": self.server_name,
            "origin_server_ts": now_ms,
            "pdus": [],
            "edus": [e[3] for e in edus],
        }
        # a restart ends with the transaction reaching the id it was
        # prepared for: until then every EDU of the user says prev_id []
        consumed = tuple(
            sorted(
                user
                for user, highest in restarted.items()
                if (target := batch.resets[user]) is not None and highest >= target
            )
        )
        txn = _Transaction(txn_id, body, tuple(sent), unreferenced_after, len(edus), consumed)
        if txn.edu_count == 0:
            return txn
        # not awaited: the request is made while this commits (module docstring)
        self._no_inflight.discard(destination)
        persisted = self._store.begin_outbound_transaction(
            destination, txn_id, txn.payload(), consumed
        )
        persisted.addErrback(self._persist_failed, destination, txn_id)
        return replace(txn, persisted=persisted)

    def _persist_failed(self, failure: Failure, destination: str, txn_id: str) -> None:
        self.log.failure(
            "persisting transaction {txn_id} to {destination} failed; its rows stay pending",
            failure,
            txn_id=txn_id,
            destination=destination,
        )

    def _pending_changes(
        self, rows: Sequence[PendingRow], batch: PendingBatch
    ) -> list[PendingChange]:
        by_user: dict[str, list[PendingRow]] = {}
        for row in rows:
            by_user.setdefault(row.user_id, []).append(row)
        changes: list[PendingChange] = []
        for user_id in sorted(by_user):
            user_rows = by_user[user_id]
            device_ids = sorted({r.device_id for r in user_rows if r.device_id is not None})
            states = self._local.federation_device_states_of(
                batch.device_keys[user_id], batch.device_names.get(user_id, {}), device_ids
            )
            for row in user_rows:
                assert row.device_id is not None
                state = states.get(row.device_id)
                if state is None:
                    changes.append(
                        PendingChange(user_id, row.device_id, row.stream_id, deleted=True)
                    )
                    continue
                name = state.get("device_display_name")
                changes.append(
                    PendingChange(
                        user_id,
                        row.device_id,
                        row.stream_id,
                        display_name=name if isinstance(name, str) else None,
                        keys=self._device_keys(user_id, row.device_id, state.get("keys")),
                    )
                )
        return changes

    def _device_keys(self, user_id: str, device_id: str, raw: object) -> Optional[DeviceKeys]:
        if raw is None:
            return None
        try:
            return parse_device_keys(
                raw, expected_user_id=user_id, expected_device_id=device_id
            )
        except ParseError as e:
            # Validated at upload, so this is not expected; the stored object
            # is what /user/devices serves, so send it as it is.
            self.log.warn(
                "stored keys of {user_id}/{device_id} do not parse ({error}); sent as stored",
                user_id=user_id,
                device_id=device_id,
                error=str(e),
            )
            stored = raw if isinstance(raw, dict) else {}
            return DeviceKeys(user_id, device_id, (), {}, {}, raw=stored)

    async def _signing_key_contents(self, user_ids: Sequence[str]) -> dict[str, JsonDict]:
        if not user_ids:
            return {}
        found = await self._store.get_local_user_keys({u: () for u in user_ids})
        contents: dict[str, JsonDict] = {}
        for user_id in user_ids:
            user_keys = found[user_id]
            content: JsonDict = {"user_id": user_id}
            for name, usage in (
                ("master_key", USAGE_MASTER),
                ("self_signing_key", USAGE_SELF_SIGNING),
            ):
                key = cross_signing_key_json(user_keys, usage)
                if key is not None:
                    content[name] = key
            if len(content) > 1:
                contents[user_id] = content
        return contents

    # ------------------------------------------------------------------
    # one attempt

    async def _attempt(self, destination: str, txn: _Transaction) -> _Outcome:
        path = SEND_PATH_PREFIX + quote(txn.txn_id, safe="")
        request = Deferred.fromCoroutine(
            _send(self._client, destination, path, txn.body, self._request_timeout)
        )
        self._requests[destination] = request
        error: Optional[Exception] = None
        try:
            await request
        except Exception as e:
            error = e
        finally:
            self._requests.pop(destination, None)
        if txn.persisted is not None:
            # whatever the answer, act on it only once the transaction is
            # persisted: an acknowledgement must clear it, a retry resend it
            await txn.persisted

        if isinstance(error, CancelledError):
            if self._stopped:
                return _Outcome.STOPPED
            return await self._failed(destination, txn, "request cancelled")
        if isinstance(error, HttpResponseError):
            return await self._http_error(destination, txn, error)
        if isinstance(error, NotRetryingDestination):
            self._schedule(destination, error.retry_at)
            return _Outcome.RETRY_LATER
        if isinstance(error, RequestSendFailed):
            return await self._failed(destination, txn, str(error))
        if error is not None:
            self.log.failure(
                "sending transaction {txn_id} to {destination} failed unexpectedly",
                Failure(error),
                txn_id=txn.txn_id,
                destination=destination,
            )
            return await self._failed(destination, txn, f"{type(error).__name__}: {error}")

        await self._store.ack_sent(
            destination, txn.sent, txn.unreferenced_after, completed_txn_id=txn.txn_id
        )
        self._no_inflight.add(destination)
        await self._tracker.record_success(destination)
        self.last_success[destination] = self._clock.seconds()
        self._not_before.pop(destination, None)
        limit = self._limits.pop(destination, self._edu_limit)
        if limit * 2 < self._edu_limit:
            self._limits[destination] = limit * 2
        self.transactions_sent += 1
        self.edus_sent += txn.edu_count
        self.log.debug(
            "{destination} took transaction {txn_id} ({n} EDUs)",
            destination=destination,
            txn_id=txn.txn_id,
            n=txn.edu_count,
        )
        return _Outcome.DELIVERED

    async def _http_error(
        self, destination: str, txn: _Transaction, error: HttpResponseError
    ) -> _Outcome:
        action = action_for_error(error.code, error.errcode, txn.edu_count)
        reason = f"{error.code} {error.errcode or ''}: {error.message}"
        if action is ErrorAction.SPLIT:
            limit = max(1, txn.edu_count // 2)
            self._limits[destination] = limit
            await self._abandon(destination, txn)
            self.log.warn(
                "{destination} refused transaction {txn_id} of {n} EDUs as too large;"
                " sending at most {limit} per transaction",
                destination=destination,
                txn_id=txn.txn_id,
                n=txn.edu_count,
                limit=limit,
            )
            return _Outcome.AGAIN
        not_before = None
        if error.code == 429 and error.retry_after_ms is not None:
            not_before = self._clock.seconds() + error.retry_after_ms / 1000.0
        if action is ErrorAction.REBUILD:
            self._limits[destination] = max(1, txn.edu_count // 2)
        return await self._failed(
            destination,
            txn,
            reason,
            rebuild=action is ErrorAction.REBUILD,
            not_before=not_before,
        )

    async def _failed(
        self,
        destination: str,
        txn: Optional[_Transaction],
        reason: str,
        *,
        rebuild: bool = False,
        not_before: Optional[float] = None,
    ) -> _Outcome:
        self.failures += 1
        self.last_error[destination] = (self._clock.seconds(), reason)
        if rebuild and txn is not None:
            await self._abandon(destination, txn)
        retry_at = await self._tracker.record_failure(destination)
        if not_before is not None:
            self._not_before[destination] = not_before
            retry_at = max(retry_at, not_before)
        self.log.warn(
            "sending {txn_id} to {destination} failed ({reason}); next attempt in {delay:.0f}s",
            txn_id=txn.txn_id if txn is not None else "-",
            destination=destination,
            reason=reason,
            delay=retry_at - self._clock.seconds(),
        )
        await self._compact_if_dead(destination)
        self._schedule(destination, retry_at)
        return _Outcome.RETRY_LATER

    async def _abandon(self, destination: str, txn: _Transaction) -> None:
        """Forget the in-flight transaction (its rows are still pending);
        the chains it restarted must restart in the next one too."""
        if txn.restarted:
            await self._store.add_chain_resets([(destination, u) for u in txn.restarted])
        await self._store.clear_inflight_txn(destination, txn.txn_id)
        self._no_inflight.add(destination)

    async def _compact_if_dead(self, destination: str) -> None:
        if self.dead_destination_after is None:
            return
        state = await self._store.get_retry_state(destination)
        if state is None or state.failure_ts is None:
            return
        failing_ms = self._now_ms() - state.failure_ts
        if failing_ms < self.dead_destination_after * 1000:
            return
        dropped = await self._store.compact_destination(destination)
        if dropped:
            self.compacted_rows += dropped
            self.log.warn(
                "{destination} has been unreachable for {hours:.0f}h: dropped its {n} pending"
                " device update(s); each user concerned will be resynced when it is back",
                destination=destination,
                hours=failing_ms / 3_600_000,
                n=dropped,
            )


async def _send(
    client: TransactionClient,
    destination: str,
    path: str,
    body: JsonDict,
    timeout: Optional[float],
) -> JsonDict:
    return await client.put_json(destination, path, body, timeout=timeout)
