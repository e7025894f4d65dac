"""The access log line and the observer that hands Twisted's events to
Python logging."""

from __future__ import annotations

import logging
from typing import Optional

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.logger import Logger, LogLevel, LogPublisher
from twisted.logger._io import LoggingFile
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http import _XForwardedForAddress, combinedLogFormatter
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyChannel

from devicelist_plugin.standalone.logs import PythonLoggingObserver
from devicelist_plugin.standalone.site import access_log_line

TIMESTAMP = "[27/Nov/2026:20:00:00 +0000]"


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _request(
    uri: bytes = b"/_matrix/federation/v1/user/devices/%40a%3Ab",
    method: bytes = b"GET",
    headers: Optional[dict[bytes, list[bytes]]] = None,
    address: object = None,
    code: int = 200,
    sent: int = 1234,
) -> Request:
    request = Request(DummyChannel(), False)
    request.method = method
    request.uri = uri
    request.clientproto = b"HTTP/1.1"
    request.code = code
    request.sentLength = sent
    for name, values in (headers or {}).items():
        request.requestHeaders.setRawHeaders(name, values)
    if address is not None:
        request.client = address
    return request


class AccessLogLineTests(SynchronousTestCase):
    """access_log_line writes what twisted.web's combined formatter writes."""

    def assertSameLine(self, request: Request) -> None:
        self.assertEqual(
            access_log_line(TIMESTAMP, request), combinedLogFormatter(TIMESTAMP, request)
        )

    def test_plain_request(self) -> None:
        request = _request(
            headers={b"User-Agent": [b"Synapse/1.0"], b"Referer": [b"https://x.example/"]},
            address=IPv4Address("TCP", "10.1.2.3", 4567),
        )
        self.assertSameLine(request)
        self.assertEqual(
            access_log_line(TIMESTAMP, request),
            f'"10.1.2.3" - - {TIMESTAMP} "GET /_matrix/federation/v1/user/devices/%40a%3Ab'
            ' HTTP/1.1" 200 1234 "https://x.example/" "Synapse/1.0"',
        )

    def test_fields_needing_escapes(self) -> None:
        for value in [b'a"b', b"a'b", b"a\\b", b"\x00\x7f\xff", b"tab\there", b"", b"'\""]:
            with self.subTest(value=value):
                self.assertSameLine(
                    _request(
                        uri=b"/p?q=" + value,
                        method=value or b"GET",
                        headers={b"User-Agent": [value], b"Referer": [b"first", value]},
                        address=IPv6Address("TCP", "::1", 1),
                    )
                )

    def test_no_headers_no_length_other_addresses(self) -> None:
        for address in [
            UNIXAddress(b"/sock"),
            _XForwardedForAddress("192.0.2.7"),
            IPv4Address("TCP", "127.0.0.1", 1),
        ]:
            with self.subTest(address=address):
                self.assertSameLine(_request(address=address, sent=0, code=404))


class PythonLoggingObserverTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.handler = _Records()
        self.names = ["test.devicelist.logs", "test.devicelist.io"]
        for name in self.names:
            logger = logging.getLogger(name)
            logger.addHandler(self.handler)
            logger.setLevel(logging.INFO)
            logger.propagate = False
            self.addCleanup(logger.removeHandler, self.handler)
            self.addCleanup(setattr, logger, "propagate", True)
            self.addCleanup(logger.setLevel, logging.NOTSET)
        self.publisher = LogPublisher(PythonLoggingObserver())

    def test_formatted_events_by_namespace_and_level(self) -> None:
        log = Logger(namespace="test.devicelist.logs", observer=self.publisher)
        log.info("served {n} requests, {pct}% done", n=3, pct=50)
        log.debug("not shown {x}", x=1)
        log.warn("careful")
        self.assertEqual(
            [(r.name, r.levelno, r.getMessage()) for r in self.handler.records],
            [
                ("test.devicelist.logs", logging.INFO, "served 3 requests, 50% done"),
                ("test.devicelist.logs", logging.WARNING, "careful"),
            ],
        )

    def test_lines_written_to_a_log_file(self) -> None:
        """What twisted.python.log.logfile (the access log) writes arrives
        line by line, as written, '%' and braces included."""
        logfile = LoggingFile(Logger(namespace="test.devicelist.io", observer=self.publisher))
        logfile.write('"127.0.0.1" - - "GET /a%40b?{x} HTTP/1.1" 200 5\nsecond line\n')
        self.assertEqual(
            [(r.levelno, r.getMessage()) for r in self.handler.records],
            [
                (logging.INFO, '"127.0.0.1" - - "GET /a%40b?{x} HTTP/1.1" 200 5'),
                (logging.INFO, "second line"),
            ],
        )

    def test_failures_keep_their_traceback(self) -> None:
        log = Logger(namespace="test.devicelist.logs", observer=self.publisher)
        try:
            1 / 0
        except ZeroDivisionError:
            log.failure("it broke", Failure())
        (record,) = self.handler.records
        self.assertEqual(record.levelno, logging.CRITICAL)
        self.assertEqual(record.getMessage(), "it broke")
        assert record.exc_info is not None
        self.assertIs(record.exc_info[0], ZeroDivisionError)

    def test_legacy_errors_are_errors(self) -> None:
        """An event flagged isError (twisted.python.log.err) is at least ERROR."""
        log = Logger(namespace="test.devicelist.logs", observer=self.publisher)
        log.emit(LogLevel.info, "legacy {what}", what="error", isError=1)
        self.assertEqual(
            [(r.levelno, r.getMessage()) for r in self.handler.records],
            [(logging.ERROR, "legacy error")],
        )
