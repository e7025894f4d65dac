"""
Seeded, deterministic fault injection for L{tests.helpers.network.FakeNetwork}.

A L{FaultPlan} is consulted once for every request that names a known server.
It answers, in this order:

 1. C{down}: the origin or the destination was taken down with L{take_down}
    (a down server is isolated: requests to it *and* from it are refused);
 2. C{partition}: origin and destination are in different groups of a
    L{partition};
 3. a scripted fault added with L{inject} whose filters match (first match
    wins, each is used C{times} times);
 4. a random fault, drawn from C{random.Random(seed)} with the plan's
    probabilities.  Every request that reaches this step consumes exactly two
    draws, so the same seed and the same sequence of requests always give the
    same sequence of faults.

What each fault does to a request (see L{FaultKind}):

 - C{refuse}, C{partition}, C{down}: the request fails at once with
   L{twisted.internet.error.ConnectionRefusedError}; the server sees nothing.
 - C{blackhole}: the request is swallowed: the server sees nothing and the
   client never gets an answer, so only the client's own timeout (treq's
   C{timeout=}, which needs C{reactor=clock}) ends it.
 - C{lose_response}: the server processes the request completely; the
   connection then drops before any byte of the response reaches the client,
   which fails with C{ResponseNeverReceived([ConnectionLost])}.
 - C{duplicate}: the server processes the request, then (once the first
   response is complete) a second copy of the same bytes on a new connection;
   the client sees only the first answer.
 - C{delay}: the request bytes reach the server C{delay} simulated seconds
   later (advance the clock, then flush the network).
 - C{slow_response}: the server processes the request at once, but its
   response reaches the client C{delay} simulated seconds later; a client
   whose timeout is shorter gives up while the server has already done the
   work (the classic duplicate delivery once the client retries).

Every fault returned is counted in L{FaultPlan.counters}, keyed by
C{FaultKind.value}.
"""

from __future__ import annotations

import enum
import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass


class FaultKind(enum.Enum):
    REFUSE = "refuse"
    BLACKHOLE = "blackhole"
    LOSE_RESPONSE = "lose_response"
    DUPLICATE = "duplicate"
    DELAY = "delay"
    SLOW_RESPONSE = "slow_response"
    # Structural faults, set with partition() / take_down(), never drawn.
    PARTITION = "partition"
    DOWN = "down"


#: Faults that refuse the connection before the server sees anything.
REFUSING = frozenset({FaultKind.REFUSE, FaultKind.PARTITION, FaultKind.DOWN})

#: The kinds that can be drawn at random, in the order used for the draw.
_RANDOM_KINDS = (
    FaultKind.REFUSE,
    FaultKind.BLACKHOLE,
    FaultKind.LOSE_RESPONSE,
    FaultKind.DUPLICATE,
    FaultKind.DELAY,
    FaultKind.SLOW_RESPONSE,
)

#: The random kinds that take a duration drawn from a range.
_TIMED = frozenset({FaultKind.DELAY, FaultKind.SLOW_RESPONSE})


@dataclass(frozen=True)
class Fault:
    kind: FaultKind
    #: Simulated seconds, for L{FaultKind.DELAY} and L{FaultKind.SLOW_RESPONSE}.
    delay: float = 0.0


@dataclass
class _Rule:
    fault: Fault
    origin: str | None
    destination: str | None
    path_prefix: str | None
    remaining: int

    def matches(self, origin: str, destination: str, path: str) -> bool:
        return (
            self.remaining > 0
            and self.origin in (None, origin)
            and self.destination in (None, destination)
            and (self.path_prefix is None or path.startswith(self.path_prefix))
        )


class FaultPlan:
    """
    Which requests fail and how; see the module docstring.

    @ivar counters: faults injected so far, keyed by C{FaultKind.value}.
    @ivar random_enabled: set to C{False} (or call L{stop}) to stop drawing
        random faults; the draws are then skipped too.
    """

    def __init__(
        self,
        seed: int = 0,
        *,
        refuse: float = 0.0,
        blackhole: float = 0.0,
        lose_response: float = 0.0,
        duplicate: float = 0.0,
        delay: float = 0.0,
        delay_range: tuple[float, float] = (1.0, 10.0),
        slow_response: float = 0.0,
        slow_response_range: tuple[float, float] = (1.0, 10.0),
    ) -> None:
        self.probabilities: dict[FaultKind, float] = {
            FaultKind.REFUSE: refuse,
            FaultKind.BLACKHOLE: blackhole,
            FaultKind.LOSE_RESPONSE: lose_response,
            FaultKind.DUPLICATE: duplicate,
            FaultKind.DELAY: delay,
            FaultKind.SLOW_RESPONSE: slow_response,
        }
        if any(p < 0 for p in self.probabilities.values()):
            raise ValueError("fault probabilities must be >= 0")
        if sum(self.probabilities.values()) > 1.0:
            raise ValueError("fault probabilities must add up to at most 1")
        for name, (low, high) in (
            ("delay_range", delay_range),
            ("slow_response_range", slow_response_range),
        ):
            if not 0 <= low <= high:
                raise ValueError(f"bad {name} {(low, high)!r}")
        self.seed = seed
        self.rng = random.Random(seed)
        self.ranges: dict[FaultKind, tuple[float, float]] = {
            FaultKind.DELAY: delay_range,
            FaultKind.SLOW_RESPONSE: slow_response_range,
        }
        self.random_enabled = True
        self.counters: Counter[str] = Counter()
        self._rules: list[_Rule] = []
        self._partitions: list[tuple[frozenset[str], ...]] = []
        self._down: set[str] = set()

    # -- structural faults ------------------------------------------------

    def partition(self, *groups: Iterable[str]) -> None:
        """
        Refuse every request between two servers in different C{groups}.
        Servers named in no group are unaffected.  Partitions accumulate
        until L{heal}.
        """
        sets = tuple(frozenset(g) for g in groups)
        if len(sets) < 2:
            raise ValueError("a partition needs at least two groups")
        self._partitions.append(sets)

    def heal(self) -> None:
        """Remove every partition."""
        self._partitions.clear()

    def take_down(self, server_name: str) -> None:
        """Refuse every request to or from C{server_name}."""
        self._down.add(server_name)

    def bring_up(self, server_name: str) -> None:
        self._down.discard(server_name)

    def is_down(self, server_name: str) -> bool:
        return server_name in self._down

    def partitioned(self, origin: str, destination: str) -> bool:
        for groups in self._partitions:
            o = {i for i, g in enumerate(groups) if origin in g}
            d = {i for i, g in enumerate(groups) if destination in g}
            if o and d and not o & d:
                return True
        return False

    # -- scripted faults --------------------------------------------------

    def inject(
        self,
        kind: FaultKind,
        *,
        origin: str | None = None,
        destination: str | None = None,
        path_prefix: str | None = None,
        times: int = 1,
        delay: float = 0.0,
    ) -> None:
        """
        Apply C{kind} to the next C{times} requests matching every given
        filter, before any random draw.
        """
        if kind in (FaultKind.PARTITION, FaultKind.DOWN):
            raise ValueError("use partition() / take_down() for structural faults")
        if kind in _TIMED and delay <= 0:
            raise ValueError(f"a scripted {kind.value} needs delay > 0")
        self._rules.append(
            _Rule(Fault(kind, delay), origin, destination, path_prefix, times)
        )

    def stop(self) -> None:
        """Stop every fault: heal, bring all up, drop scripts, no random."""
        self.heal()
        self._down.clear()
        self._rules.clear()
        self.random_enabled = False

    # -- the decision -----------------------------------------------------

    def decide(self, origin: str, destination: str, path: str) -> Fault | None:
        """The fault for one request (counted), or C{None}."""
        fault = self._choose(origin, destination, path)
        if fault is not None:
            self.counters[fault.kind.value] += 1
        return fault

    def _choose(self, origin: str, destination: str, path: str) -> Fault | None:
        if origin in self._down or destination in self._down:
            return Fault(FaultKind.DOWN)
        if self.partitioned(origin, destination):
            return Fault(FaultKind.PARTITION)
        for rule in self._rules:
            if rule.matches(origin, destination, path):
                rule.remaining -= 1
                if rule.remaining == 0:
                    self._rules.remove(rule)
                return rule.fault
        if not self.random_enabled:
            return None
        # Always exactly two draws, whatever the outcome.
        roll = self.rng.random()
        fraction = self.rng.random()
        for kind in _RANDOM_KINDS:
            roll -= self.probabilities[kind]
            if roll < 0:
                if kind not in _TIMED:
                    return Fault(kind)
                low, high = self.ranges[kind]
                return Fault(kind, low + (high - low) * fraction)
        return None

    def report(self) -> str:
        """One line, e.g. C{"faults: delay=3 duplicate=1"}, sorted by name."""
        parts = [f"{k}={v}" for k, v in sorted(self.counters.items())]
        return "faults: " + (" ".join(parts) if parts else "none")
