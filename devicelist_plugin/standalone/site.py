"""What a listener serves: the resources its ``resources`` names, composed
into one root.

:data:`RESOURCE_MOUNTS` maps each resource name a listener may list to a
function returning ``(path prefix, resource)`` pairs built from the server's
:class:`~devicelist_plugin.standalone.components.ServerComponents`:

==============  ==========================================================
name            paths
==============  ==========================================================
``federation``  ``/_matrix/federation/*`` and ``/_matrix/key/*``
``keys``        ``/_matrix/key/*``
``client``      ``/_matrix/client/*`` and ``/_synapse/admin/v1/register``
``admin``       ``/_devicelist/admin/*`` (:mod:`.admin`)
``metrics``     ``/_devicelist/metrics`` and ``/_synapse/metrics``
                (Prometheus text format, :mod:`devicelist_plugin.metrics`)
==============  ==========================================================

(Synapse's names and paths.)  A new resource is one more entry here and its
name in :data:`~devicelist_plugin.standalone.config.SERVED_RESOURCE_NAMES`.

:class:`PrefixRoot` routes a request to the resource whose prefix matches the
most leading path segments (the raw, percent-encoded segments); any other
path, ``/`` included, is answered with JSON 404 ``M_UNRECOGNIZED``, never a
Twisted HTML page.
"""

from __future__ import annotations

import re
from typing import Callable, Optional, Sequence

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.web import http
from twisted.web.http import _escape, _XForwardedForAddress
from twisted.web.iweb import IAccessLogFormatter, IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import Site
from zope.interface import provider

from devicelist_plugin.federation.ipfilter import parse_address
from devicelist_plugin.federation.resource import (
    DEFAULT_MAX_BODY_SIZE,
    JsonResource,
    SizeLimitingRequest,
)
from devicelist_plugin.standalone.components import ServerComponents

__all__ = [
    "Mount",
    "access_log_line",
    "PrefixRoot",
    "RESOURCE_MOUNTS",
    "XForwardedRequest",
    "build_root_resource",
    "make_site",
]

#: ``(path prefix, resource)``, the prefix like ``"/_matrix/client"``.
Mount = tuple[str, IResource]


def _federation(components: ServerComponents) -> list[Mount]:
    resource = components.transport.resource
    return [("/_matrix/federation", resource), ("/_matrix/key", resource)]


def _keys(components: ServerComponents) -> list[Mount]:
    return [("/_matrix/key", components.key_resource)]


def _client(components: ServerComponents) -> list[Mount]:
    resource = components.client_api.resource
    return [("/_matrix/client", resource), ("/_synapse/admin/v1/register", resource)]


def _admin(components: ServerComponents) -> list[Mount]:
    return [("/_devicelist/admin", components.admin_api.resource)]


def _metrics(components: ServerComponents) -> list[Mount]:
    resource = components.module.metrics.resource
    return [("/_devicelist/metrics", resource), ("/_synapse/metrics", resource)]


RESOURCE_MOUNTS: dict[str, Callable[[ServerComponents], list[Mount]]] = {
    "federation": _federation,
    "keys": _keys,
    "client": _client,
    "admin": _admin,
    "metrics": _metrics,
}


def _segments(prefix: str) -> tuple[bytes, ...]:
    if not prefix.startswith("/") or prefix.endswith("/"):
        raise ValueError(f"a mount prefix starts with '/' and does not end with one: {prefix!r}")
    return tuple(prefix[1:].encode("ascii").split(b"/"))


class PrefixRoot(Resource):
    """A Site root routing on path prefixes (see the module docstring).

    The first mount of a prefix wins.  The matched segments are moved to
    ``request.prepath``, so a non-leaf resource continues traversal below its
    prefix; the plugin's JSON resources are leaves that route on the whole
    path anyway.
    """

    def __init__(self, mounts: Sequence[Mount], fallback: Optional[IResource] = None) -> None:
        super().__init__()
        by_prefix: dict[tuple[bytes, ...], IResource] = {}
        for prefix, resource in mounts:
            by_prefix.setdefault(_segments(prefix), resource)
        self._mounts = sorted(by_prefix.items(), key=lambda item: -len(item[0]))
        self._fallback: IResource = fallback if fallback is not None else JsonResource()

    @property
    def prefixes(self) -> list[str]:
        return ["/" + b"/".join(segments).decode("ascii") for segments, _ in self._mounts]

    def getChildWithDefault(self, path: bytes, request: IRequest) -> IResource:
        segments = [path, *request.postpath]
        for prefix, resource in self._mounts:
            if tuple(segments[: len(prefix)]) == prefix:
                for _ in range(len(prefix) - 1):
                    request.prepath.append(request.postpath.pop(0))
                return resource
        return self._fallback


def build_root_resource(names: Sequence[str], components: ServerComponents) -> PrefixRoot:
    """The root serving the resources ``names`` (see :data:`RESOURCE_MOUNTS`)."""
    mounts: list[Mount] = []
    for name in names:
        mounts.extend(RESOURCE_MOUNTS[name](components))
    return PrefixRoot(mounts)


class XForwardedRequest(SizeLimitingRequest):
    """A request behind a reverse proxy: the client address is the first
    ``X-Forwarded-For`` entry (``x_forwarded: true``)."""

    def getClientAddress(self) -> IAddress:
        forwarded = self.requestHeaders.getRawHeaders(b"X-Forwarded-For")
        if forwarded:
            first = forwarded[0].split(b",")[0].strip().decode("ascii", "replace")
            try:
                address = parse_address(first)
            except ValueError:
                pass
            else:
                if address.version == 6:
                    return IPv6Address("TCP", str(address), 0)
                return IPv4Address("TCP", str(address), 0)
        return super().getClientAddress()


#: Called with each finished request and its duration in seconds.
RequestObserver = Callable[[IRequest, float], None]


def _timed(
    base: type[SizeLimitingRequest], clock: IReactorTime, observer: RequestObserver
) -> type[SizeLimitingRequest]:
    """``base`` telling ``observer`` of each finished request and its duration."""
    class TimedRequest(base):  # type: ignore[valid-type,misc]
        _started: Optional[float] = None

        def process(self) -> None:
            self._started = clock.seconds()
            super().process()

        def finish(self) -> None:
            super().finish()
            if self._started is not None:
                started, self._started = self._started, None
                try:
                    observer(self, clock.seconds() - started)
                except Exception:
                    pass

    return TimedRequest


# bytes that twisted.web's _escape (a repr) leaves as they are
_NEEDS_ESCAPE = re.compile(rb'[^ !#-&(-\[\]-~]')


def _escaped(value: bytes) -> str:
    if _NEEDS_ESCAPE.search(value) is None:
        return value.decode("ascii")
    result: str = _escape(value)
    return result


@provider(IAccessLogFormatter)
def access_log_line(timestamp: str, request: http.Request) -> str:
    """twisted.web's ``combinedLogFormatter`` line, the same text, made
    with less work: one header look-up each and no ``repr`` of the fields
    that need no escaping (all of them, normally).  It runs once per
    request."""
    address = request.getClientAddress()
    if isinstance(address, (IPv4Address, IPv6Address, _XForwardedForAddress)):
        ip = _escaped(address.host.encode("ascii"))
    else:
        ip = "-"
    headers = request.requestHeaders
    referrer = headers.getRawHeaders(b"referer")
    agent = headers.getRawHeaders(b"user-agent")
    length = request.sentLength or "-"
    return (
        f'"{ip}" - - {timestamp} "{_escaped(request.method)} {_escaped(request.uri)}'
        f' {_escaped(request.clientproto)}" {request.code} {length}'
        f' "{_escaped((referrer[-1] if referrer else b"") or b"-")}"'
        f' "{_escaped((agent[-1] if agent else b"") or b"-")}"'
    )


def make_site(
    root: IResource,
    reactor: object,
    *,
    x_forwarded: bool = False,
    max_body_size: int = DEFAULT_MAX_BODY_SIZE,
    request_observer: Optional[RequestObserver] = None,
) -> Site:
    """A Site for ``root``: request bodies limited while received, no form
    parsing, client addresses from ``X-Forwarded-For`` when ``x_forwarded``;
    ``request_observer(request, seconds)`` is told of each finished request
    (the metrics' latency histogram).  The access log has twisted.web's
    combined format (:func:`access_log_line`)."""
    base: type[SizeLimitingRequest] = XForwardedRequest if x_forwarded else SizeLimitingRequest
    if request_observer is not None:
        base = _timed(base, reactor, request_observer)  # type: ignore[arg-type]
    return Site(
        root,
        requestFactory=base.with_limit(max_body_size),
        parsePOSTFormSubmission=False,
        reactor=reactor,
        logFormatter=access_log_line,
    )
