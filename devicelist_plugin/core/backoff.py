"""Retry backoff as a pure function of the attempt number.

The option names and defaults are Synapse's (``federation:`` section of its
configuration), so an operator's knowledge carries over:

==============  ==================================  ==================
field           Synapse option                      default
==============  ==================================  ==================
min_interval    ``destination_min_retry_interval``  10 minutes (600 s)
multiplier      ``destination_retry_multiplier``    2
max_interval    ``destination_max_retry_interval``  1 week (604800 s)
==============  ==================================  ==================

The delay before retry ``attempt`` (0 for the first retry) is
``min(max_interval, min_interval * multiplier ** attempt)`` scaled by a
jitter factor drawn from ``[jitter_low, jitter_high]`` (Synapse draws
``uniform(0.8, 1.4)``), then clamped to ``max_interval``.  The jitter source
is injected (``random.uniform`` in production, a constant in tests), so the
exact delays are testable; unlike Synapse's, the delay does not compound the
previous jitter, so it depends on the attempt number alone.

Applied per destination (not per stale user), it keeps a dead server from
costing a request per user per tick (Synapse #9603, #14119).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

MINUTE = 60.0
WEEK = 7 * 24 * 60 * MINUTE


@dataclass(frozen=True)
class BackoffPolicy:
    # seconds before the first retry (destination_min_retry_interval)
    min_interval: float = 10 * MINUTE
    # growth per attempt (destination_retry_multiplier)
    multiplier: float = 2.0
    # upper bound on any delay, jitter included (destination_max_retry_interval)
    max_interval: float = WEEK
    jitter_low: float = 0.8
    jitter_high: float = 1.4

    def __post_init__(self) -> None:
        for name in ("min_interval", "multiplier", "max_interval", "jitter_low", "jitter_high"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, not {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, not {value!r}")
        if self.min_interval <= 0:
            raise ValueError(f"min_interval must be positive, not {self.min_interval!r}")
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be at least 1, not {self.multiplier!r}")
        if self.max_interval < self.min_interval:
            raise ValueError(
                f"max_interval ({self.max_interval!r}) must be at least "
                f"min_interval ({self.min_interval!r})"
            )
        if self.jitter_low <= 0:
            raise ValueError(f"jitter_low must be positive, not {self.jitter_low!r}")
        if self.jitter_high < self.jitter_low:
            raise ValueError(
                f"jitter_high ({self.jitter_high!r}) must be at least "
                f"jitter_low ({self.jitter_low!r})"
            )

    def delay(self, attempt: int, jitter: Callable[[float, float], float]) -> float:
        """Seconds to wait before retry number ``attempt`` (0 = first retry).

        ``jitter(low, high)`` returns the factor, e.g. ``random.uniform``.
        Raises ``ValueError`` for a negative attempt or a factor that is not
        a positive finite number.
        """
        if attempt < 0:
            raise ValueError(f"attempt must not be negative, not {attempt!r}")
        try:
            raw = self.min_interval * float(self.multiplier) ** attempt
        except OverflowError:
            raw = math.inf
        base = min(self.max_interval, raw)
        factor = jitter(self.jitter_low, self.jitter_high)
        if not (math.isfinite(factor) and factor > 0):
            raise ValueError(f"jitter factor must be positive and finite, not {factor!r}")
        return float(min(self.max_interval, base * factor))
