"""Per-destination retry backoff, shared by the outbound sender and the inbound updater.

A remote server that fails (5xx, timeout, connection refused) is not tried
again before ``retry_last_ts + retry_interval``; the interval is
:meth:`BackoffPolicy.delay` of the number of consecutive failures, so the
schedule is exact and testable.  The state is persisted (``outbound_destinations``)
and survives a restart.  Both directions use the same tracker, so a dead server
costs one probe per backoff period however many stale users or pending updates
it has (Synapse #9603, #14119).

A valid signed request from a server proves it is up: :meth:`on_contact`
(wired to the authenticator's contact listeners) resets its backoff and wakes
every listener registered with :meth:`add_wake_listener`, so queued work for
it is retried at once.
"""

from __future__ import annotations

import random
from typing import Callable, Optional, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from devicelist_plugin.core.backoff import BackoffPolicy
from devicelist_plugin.storage.types import RetryState

WakeListener = Callable[[str], object]
Jitter = Callable[[float, float], float]


class RetryStateStore(Protocol):
    def get_retry_state(self, destination: str) -> "Deferred[Optional[RetryState]]": ...

    def set_retry_state(self, destination: str, state: Optional[RetryState]) -> "Deferred[None]": ...


class DestinationRetryTracker:
    """When each remote server may be tried again."""

    log = Logger()

    def __init__(
        self,
        store: RetryStateStore,
        clock: IReactorTime,
        policy: BackoffPolicy = BackoffPolicy(),
        jitter: Jitter = random.uniform,
    ) -> None:
        self._store = store
        self._clock = clock
        self.policy = policy
        self._jitter = jitter
        # destination -> state (None: healthy); a missing key: not loaded yet
        self._states: dict[str, Optional[RetryState]] = {}
        self._wake_listeners: list[WakeListener] = []

    def _now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    async def _state(self, destination: str) -> Optional[RetryState]:
        if destination not in self._states:
            state = await self._store.get_retry_state(destination)
            # a concurrent update while loading wins over what was read
            self._states.setdefault(destination, state)
        return self._states[destination]

    async def retry_at(self, destination: str) -> Optional[float]:
        """The time (``clock.seconds()``) before which ``destination`` must not
        be tried, or None when it may be tried now."""
        state = await self._state(destination)
        if state is None or state.retry_last_ts is None:
            return None
        at = (state.retry_last_ts + state.retry_interval_ms) / 1000.0
        return at if at > self._clock.seconds() else None

    async def record_failure(self, destination: str) -> float:
        """Count a failed attempt; return when the next one may be made."""
        state = await self._state(destination)
        attempts = state.attempts if state is not None else 0
        delay = self.policy.delay(attempts, self._jitter)
        now_ms = self._now_ms()
        new = RetryState(
            failure_ts=state.failure_ts if state is not None and state.failure_ts else now_ms,
            retry_last_ts=now_ms,
            retry_interval_ms=int(delay * 1000),
            attempts=attempts + 1,
        )
        self._states[destination] = new
        await self._store.set_retry_state(destination, new)
        self.log.info(
            "{destination} failed {attempts} time(s) in a row; next attempt in {delay:.1f}s",
            destination=destination,
            attempts=new.attempts,
            delay=delay,
        )
        return (now_ms + new.retry_interval_ms) / 1000.0

    async def record_success(self, destination: str) -> None:
        """The destination answered: forget its backoff."""
        if await self._state(destination) is not None:
            self._states[destination] = None
            await self._store.set_retry_state(destination, None)
            self.log.info("{destination} is reachable again", destination=destination)

    def add_wake_listener(self, listener: WakeListener) -> None:
        """``listener(destination)`` is called when a backing-off server contacts us."""
        self._wake_listeners.append(listener)

    def on_contact(self, origin: str) -> "Deferred[None]":
        """A valid signed request came from ``origin``: it is up, retry it now."""
        return Deferred.fromCoroutine(self._on_contact(origin))

    async def _on_contact(self, origin: str) -> None:
        if await self._state(origin) is None:
            return
        await self.record_success(origin)
        for listener in list(self._wake_listeners):
            try:
                listener(origin)
            except Exception:
                self.log.failure("wake listener failed for {destination}", destination=origin)
