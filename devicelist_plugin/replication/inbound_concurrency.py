"""Sharing one fetch between several waiters, and a per-destination request limit.

:class:`SharedResult` lets any number of callers wait for one operation (a
resync, a key query) without being able to cancel it for the others: each
caller gets its own Deferred, which it may cancel (a client's timeout) while
the operation runs on for the rest.

:class:`DestinationLimiter` bounds how many requests of the inbound side
(resync fetches and key queries) are in flight to one remote server at once,
so a burst of queries or a start-up with thousands of stale users never opens
thousands of connections to one server.
"""

from __future__ import annotations

from typing import Awaitable, Callable, Generic, Optional, TypeVar

from twisted.internet.defer import Deferred, DeferredSemaphore, fail, succeed
from twisted.python.failure import Failure

T = TypeVar("T")

#: Requests in flight to one destination at once (resyncs and key queries).
DEFAULT_PER_DESTINATION_LIMIT = 5


class SharedResult(Generic[T]):
    """The outcome of one Deferred, observed by many.

    ``observe()`` returns a new Deferred that fires with the outcome; it can
    be cancelled (it then fails with ``CancelledError``) without touching
    the operation or the other observers.
    """

    def __init__(self, operation: "Deferred[T]") -> None:
        self._observers: list[Deferred[T]] = []
        self._done = False
        self._result: Optional[T] = None
        self._failure: Optional[Failure] = None
        operation.addBoth(self._finished)

    @property
    def done(self) -> bool:
        return self._done

    def _finished(self, outcome: object) -> None:
        self._done = True
        if isinstance(outcome, Failure):
            self._failure = outcome
        else:
            self._result = outcome  # type: ignore[assignment]
        observers, self._observers = self._observers, []
        for observer in observers:
            if isinstance(outcome, Failure):
                observer.errback(outcome)
            else:
                observer.callback(outcome)  # type: ignore[arg-type]
        # the operation's own chain ends here: its failure is observed
        return None

    def observe(self) -> "Deferred[T]":
        if self._done:
            if self._failure is not None:
                return fail(self._failure)
            return succeed(self._result)  # type: ignore[arg-type]

        def cancel(observer: "Deferred[T]") -> None:
            if observer in self._observers:
                self._observers.remove(observer)

        observer: Deferred[T] = Deferred(cancel)
        self._observers.append(observer)
        return observer


class DestinationLimiter:
    """At most ``limit`` operations in flight per destination."""

    def __init__(self, limit: int = DEFAULT_PER_DESTINATION_LIMIT) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit!r}")
        self.limit = limit
        self._semaphores: dict[str, DeferredSemaphore] = {}
        self._users: dict[str, int] = {}

    def in_flight(self, destination: str) -> int:
        """Operations holding a slot for ``destination`` now."""
        semaphore = self._semaphores.get(destination)
        return 0 if semaphore is None else semaphore.limit - semaphore.tokens

    async def run(self, destination: str, operation: Callable[[], Awaitable[T]]) -> T:
        """Run ``operation`` once a slot for ``destination`` is free."""
        semaphore = self._semaphores.get(destination)
        if semaphore is None:
            semaphore = self._semaphores[destination] = DeferredSemaphore(self.limit)
        self._users[destination] = self._users.get(destination, 0) + 1
        try:
            await semaphore.acquire()
            try:
                return await operation()
            finally:
                semaphore.release()
        finally:
            self._users[destination] -= 1
            if not self._users[destination]:
                # nobody holds or waits for a slot: forget the destination
                del self._users[destination]
                del self._semaphores[destination]
