"""``log_config``: Twisted's log events through Python's ``logging``.

Without ``log_config`` twistd logs as usual (stdout with ``-n``, else
``twistd.log``; see ``twistd --help`` for ``--logfile``).  With it, the
standalone server applies the file with :func:`logging.config.dictConfig`
(the format of Synapse's ``<server_name>.log.config``, minus Synapse's own
filters) and hands twistd a log observer that sends every event to the Python
logger named after the event's namespace (``devicelist_plugin.client.api``,
``twisted.web.server``, ...), so the file's levels, handlers and formats
govern all output.  Failures keep their tracebacks (``exc_info``).
"""

from __future__ import annotations

import logging
import logging.config
from typing import Any, Mapping

from twisted.logger import ILogObserver, LogEvent, LogLevel, formatEvent
from zope.interface import implementer

__all__ = ["PythonLoggingObserver", "apply_log_config"]

_LEVELS = {
    LogLevel.debug: logging.DEBUG,
    LogLevel.info: logging.INFO,
    LogLevel.warn: logging.WARNING,
    LogLevel.error: logging.ERROR,
    LogLevel.critical: logging.CRITICAL,
}


@implementer(ILogObserver)
class PythonLoggingObserver:
    """Sends Twisted log events to Python loggers named after their namespace."""

    def __call__(self, event: LogEvent) -> None:
        level = _LEVELS.get(event.get("log_level", LogLevel.info), logging.INFO)
        if event.get("isError") and level < logging.ERROR:
            level = logging.ERROR
        logger = logging.getLogger(str(event.get("log_namespace") or "twisted"))
        if not logger.isEnabledFor(level):
            return
        failure = event.get("log_failure")
        exc_info = None
        if failure is not None:
            exc_info = (failure.type, failure.value, failure.getTracebackObject())
        logger.log(level, "%s", formatEvent(event), exc_info=exc_info)


def apply_log_config(config: Mapping[str, Any]) -> PythonLoggingObserver:
    """Configure Python logging with ``config`` (``dictConfig`` schema);
    return the observer to hand twistd.

    :raise ValueError: the configuration is refused by ``dictConfig``.
    """
    logging.config.dictConfig(dict(config))
    return PythonLoggingObserver()
