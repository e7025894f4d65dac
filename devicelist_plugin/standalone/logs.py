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

# what twisted.logger.LoggingFile (twisted.python.log.logfile) emits per line
_IO_FORMAT = "{log_io}"
# what Python logging records when it cannot find the caller
_NO_FILE = "(unknown file)"
_NO_FUNCTION = "(unknown function)"

_LEVELS = {
    LogLevel.debug: logging.DEBUG,
    LogLevel.info: logging.INFO,
    LogLevel.warn: logging.WARNING,
    LogLevel.error: logging.ERROR,
    LogLevel.critical: logging.CRITICAL,
}


@implementer(ILogObserver)
class PythonLoggingObserver:
    """Sends Twisted log events to Python loggers named after their namespace.

    It sees every event of the process, the access log's line per request
    included, so the common case is kept short: loggers are looked up once
    per namespace, an event of a disabled level costs a dictionary look-up,
    a line written through :data:`twisted.python.log.logfile` (the access
    log) is taken as is instead of going through :func:`formatEvent`, and
    records are made without Python logging's caller look-up (which would
    only ever name this observer).
    """

    def __init__(self) -> None:
        # logging.getLogger takes a module-wide lock; a Logger is never
        # replaced (dictConfig reconfigures the existing object)
        self._loggers: dict[str, logging.Logger] = {}

    def _logger(self, namespace: str) -> logging.Logger:
        logger = self._loggers.get(namespace)
        if logger is None:
            logger = self._loggers[namespace] = logging.getLogger(namespace)
        return logger

    def __call__(self, event: LogEvent) -> None:
        level = _LEVELS.get(event.get("log_level", LogLevel.info), logging.INFO)
        if event.get("isError") and level < logging.ERROR:
            level = logging.ERROR
        logger = self._logger(str(event.get("log_namespace") or "twisted"))
        if not logger.isEnabledFor(level):
            return
        failure = event.get("log_failure")
        exc_info = None
        if failure is not None:
            exc_info = (failure.type, failure.value, failure.getTracebackObject())
        text = event.get("log_io")
        if not (isinstance(text, str) and event.get("log_format") == _IO_FORMAT):
            text = formatEvent(event)
        record = logger.makeRecord(
            logger.name, level, _NO_FILE, 0, text, (), exc_info, _NO_FUNCTION
        )
        logger.handle(record)


def apply_log_config(config: Mapping[str, Any]) -> PythonLoggingObserver:
    """Configure Python logging with ``config`` (``dictConfig`` schema);
    return the observer to hand twistd.

    :raise ValueError: the configuration is refused by ``dictConfig``.
    """
    logging.config.dictConfig(dict(config))
    return PythonLoggingObserver()
