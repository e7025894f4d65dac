"""What a simulated server process owns, so that it can crash: its timers
(:class:`ProcessClock`, a view of the shared simulated clock) and its
database handle (:class:`CrashableStore`, which can also make the process
die at a chosen store call, i.e. between any two transactions of whatever it
is doing).

A crash cancels the process's timers and makes every later store call and
timer of the dead incarnation inert: its pending Deferreds never fire, so
nothing of it runs again.  What it committed stays in the database file for
the next incarnation.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.internet.base import DelayedCall
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import Clock
from zope.interface import implementer

from devicelist_plugin.storage import Store

#: Store methods that answer at once (no Deferred): never a crash point.
_SYNCHRONOUS = frozenset({"engine", "close"})

#: What dead processes left behind, kept referenced until the interpreter
#: exits: if the garbage collector reclaimed a dead process's suspended
#: coroutines it would close them, running their ``finally`` blocks (and
#: resuming whatever those wake) as if the process were still alive.
GRAVEYARD: list[object] = []


@implementer(IReactorTime)
class ProcessClock:
    """One process's view of the shared ``clock``: it records the calls it
    schedules so that :meth:`kill` can cancel them; once killed, new calls
    are accepted but never run."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._calls: list[IDelayedCall] = []
        self.dead = False
        #: calls scheduled after death (by code still on the dying stack)
        self.calls_after_death = 0

    def seconds(self) -> float:
        return self._clock.seconds()

    def callLater(
        self, delay: float, callable: Callable[..., Any], *args: object, **kw: object
    ) -> IDelayedCall:
        if self.dead:
            self.calls_after_death += 1
            never = DelayedCall(
                self.seconds() + delay, callable, args, kw, _ignore, _ignore, self.seconds
            )
            GRAVEYARD.append(never)
            return never
        call = self._clock.callLater(delay, callable, *args, **kw)
        self._calls.append(call)
        if len(self._calls) > 256:
            self._calls = [c for c in self._calls if c.active()]
        return call

    def getDelayedCalls(self) -> list[IDelayedCall]:
        return [c for c in self._calls if c.active()]

    def kill(self) -> int:
        """Cancel every pending call of the process; how many there were."""
        self.dead = True
        pending = self.getDelayedCalls()
        for call in pending:
            call.cancel()
        GRAVEYARD.append(pending)
        self._calls = []
        return len(pending)


def _ignore(call: DelayedCall) -> None:
    return None


def _nothing() -> None:
    return None


class CrashableStore:
    """A :class:`Store` that stops answering when its process dies.

    :meth:`arm` makes the process die at its ``n``-th next store call: that
    call never runs (its Deferred never fires) and ``on_crash`` is called at
    once, from inside whatever the process was doing.
    """

    def __init__(self, store: Store, on_crash: Callable[[], None]) -> None:
        self.inner = store
        self._on_crash = on_crash
        self._countdown: Optional[int] = None
        self.dead = False

    def arm(self, n: int) -> None:
        self._countdown = n

    def disarm(self) -> None:
        self._countdown = None

    def kill(self) -> None:
        """The process died: no call runs any more."""
        self.dead = True
        self._countdown = None
        self._on_crash = _nothing  # the remains must not keep the simulation alive

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name in _SYNCHRONOUS or not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            if self._countdown is not None and not self.dead:
                self._countdown -= 1
                if self._countdown <= 0:
                    self._countdown = None
                    self._on_crash()
            if self.dead:
                never: Deferred[Any] = Deferred()
                GRAVEYARD.append(never)
                return never
            return attr(*args, **kwargs)

        return call
