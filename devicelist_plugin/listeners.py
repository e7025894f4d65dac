"""Calling listeners (hooks of the host and of the plugin's own parts).

A listener may return nothing, a Deferred or a coroutine; whether it raises
at once or fails later, its failure is logged and never reaches the code
that called it: one broken listener must not stop a change, nor the other
listeners.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["call_listener"]


def call_listener(
    log: Logger, call: Callable[[], object], message: str, **fields: Any
) -> "Optional[Deferred[Any]]":
    """Run ``call`` (a listener with its arguments); a failure, raised or
    later, is logged with ``message`` (a log format over ``fields``).

    Returns the listener's Deferred, its failure already handled, for a
    caller that waits for listeners; None when there is nothing to wait for.
    """
    try:
        result = call()
    except Exception:
        log.failure(message, **fields)
        return None
    if inspect.iscoroutine(result):
        result = Deferred.fromCoroutine(result)
    if not isinstance(result, Deferred):
        return None

    def failed(failure: Failure) -> None:
        log.failure(message, failure, **fields)

    return result.addErrback(failed)
