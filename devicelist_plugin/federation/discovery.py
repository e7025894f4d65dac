"""Server discovery: from a Matrix server name to where and how to connect.

Implements the server-server API's "Resolving server names" section (and
PROTOCOL.md section 4), in this order:

1. **IP literal** (``1.2.3.4``, ``[2001:db8::1]``, optionally ``:port``): that
   address, the given port or 8448.  The certificate must be valid for the IP
   address; ``Host`` is the server name as given (port included if it was).
2. **Hostname with an explicit port**: A/AAAA of the hostname, that port; no
   ``.well-known``, no SRV.  Certificate for the hostname; ``Host`` is the
   server name with its port.
3. **``.well-known`` delegation**: ``GET https://<hostname>/.well-known/matrix/server``
   answering ``{"m.server": "<delegated_hostname>[:<delegated_port>]"}``.  Redirects
   are followed (at most :data:`WELL_KNOWN_MAX_REDIRECTS`, ``https`` only, no
   loops).  The delegated name then goes through: IP literal (its port or 8448);
   explicit port; SRV ``_matrix-fed._tcp.<delegated_hostname>``; the deprecated
   SRV ``_matrix._tcp.<delegated_hostname>``; else ``<delegated_hostname>:8448``.
   In every delegated case the certificate must be valid for the *delegated*
   hostname and ``Host`` is the *delegated* server name (with its port if it has
   one).  This follows the specification text ("Requests must be made with a
   ``Host`` header of ``<delegated_hostname>:<delegated_port>``", "...a ``Host``
   header containing the ``<delegated_hostname>``") and Synapse, which rewrites
   the request URI to the delegated name before computing ``Host``.  PROTOCOL.md's
   short "``Host`` header is the server name" describes the undelegated case.
   The ``X-Matrix`` ``destination`` stays the original server name either way
   (the specification says delegation does not affect signing).
4. **No (valid) ``.well-known``**: SRV ``_matrix-fed._tcp.<hostname>``, then the
   deprecated ``_matrix._tcp.<hostname>``: the records' targets and ports,
   ordered by priority and weight (RFC 2782).  Certificate for ``<hostname>``
   (never the SRV target: DNS is not authenticated), ``Host`` is the server name.
5. Otherwise ``<hostname>:8448``.

A single SRV record whose target is ``.`` means the service is decidedly not
available (RFC 2782): resolution fails, as in Synapse.

Caching of ``.well-known`` (all on the injected clock):

- a valid answer is kept for the response's ``Cache-Control: max-age`` (or its
  ``Expires``), clamped to [5 minutes, 48 hours]; without either header, 24 hours.
  ``no-store`` counts as 0 and so is cached for the 5-minute floor (as Synapse
  does), so a server cannot make us fetch on every request.  During the last 20%
  of that period the next lookup refetches; if that refetch fails *temporarily*
  (connection error, timeout, 5xx) the still-valid answer keeps being used.
- a failure (non-200, bad JSON, no ``m.server``, connection error) is cached for
  up to 1 hour, or up to 2 minutes if the host had a valid ``.well-known`` in the
  last 2 hours beyond its expiry, so a short outage of a delegating server does
  not misroute its traffic for an hour.  Synapse multiplies these periods by a
  random factor in [0.9, 1.1]; we use [0.9, 1.0] (from the injected ``jitter``)
  so the specification's "up to an hour" holds while hosts cached together still
  expire apart.  The 24 h default gets the same jitter; periods taken from
  response headers are used as given.

SRV answers are cached for their TTL (at least 60 s, at most 24 h), "no such
record" for 5 minutes; a DNS failure falls back to an expired cached answer
when there is one.  ``twisted.names``' resolver chain does not cache answers on
its own.

Fetching and DNS are injected: a :class:`WellKnownFetcher` (the real one,
:class:`~devicelist_plugin.federation.agent.TreqWellKnownFetcher`, uses treq
over a certificate-verifying, IP-filtered agent) and an SRV resolver with
``lookupService`` (``twisted.names.client.createResolver()`` in production).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Optional, Protocol, Sequence
from urllib.parse import urljoin, urlsplit

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.names import dns
from twisted.names.error import DNSNameError, DomainError
from twisted.python.failure import Failure
from twisted.web.http import stringToDatetime
from twisted.web.http_headers import Headers

from devicelist_plugin.core.parse import ParseError, parse_server_name

from .ipfilter import BlockedAddressError, IPRangeFilter, is_ip_literal

#: The federation port when neither the server name nor SRV gives one.
DEFAULT_FEDERATION_PORT = 8448

WELL_KNOWN_PATH = "/.well-known/matrix/server"
#: Cache period of a valid ``.well-known`` without caching headers.
WELL_KNOWN_DEFAULT_CACHE_PERIOD = 24 * 3600.0
#: Upper bound for any ``.well-known`` cache period (the specification's 48 h).
WELL_KNOWN_MAX_CACHE_PERIOD = 48 * 3600.0
#: Lower bound for a header-given cache period.
WELL_KNOWN_MIN_CACHE_PERIOD = 5 * 60.0
#: Cache period of a failed ``.well-known`` lookup (the specification's "up to an hour").
WELL_KNOWN_INVALID_CACHE_PERIOD = 3600.0
#: Cache period of a failure for a host that recently had a valid ``.well-known``.
WELL_KNOWN_DOWN_CACHE_PERIOD = 2 * 60.0
#: How long after a valid answer expired a failure counts as "recently valid".
WELL_KNOWN_REMEMBER_VALID_PERIOD = 2 * 3600.0
#: Fraction of a valid answer's period, at its end, in which we refetch early.
WELL_KNOWN_GRACE_PERIOD_FACTOR = 0.2
#: Chosen cache periods are multiplied by a factor in [1 - this, 1].
WELL_KNOWN_CACHE_JITTER = 0.1
#: Redirects followed for one ``.well-known`` lookup.
WELL_KNOWN_MAX_REDIRECTS = 10
_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})

SRV_MIN_CACHE_PERIOD = 60.0
SRV_MAX_CACHE_PERIOD = 24 * 3600.0
SRV_NEGATIVE_CACHE_PERIOD = 5 * 60.0
#: The SRV services tried, in order (the second is deprecated but still deployed).
SRV_SERVICES = ("_matrix-fed._tcp", "_matrix._tcp")

_MAX_LOGGED_BODY = 200


class ServerResolutionError(Exception):
    """A server name could not be resolved to anything to connect to.

    ``retryable`` is False when trying again soon cannot help (a malformed server
    name, an SRV record saying the service does not exist).
    """

    def __init__(self, server_name: str, reason: str, retryable: bool) -> None:
        super().__init__(f"cannot resolve server name {server_name!r}: {reason}")
        self.server_name = server_name
        self.reason = reason
        self.retryable = retryable


@dataclass(frozen=True)
class ResolvedServer:
    """Where and how to reach a server.

    ``targets`` are tried in order; a target's host is a DNS name (to resolve
    with A/AAAA) or an IP address (IPv6 without brackets).  ``tls_hostname`` is
    what the certificate must be valid for (a DNS name or an IP address without
    brackets; SNI is sent only for DNS names).  ``host_header`` is the exact
    ``Host`` header value.  ``delegated_to`` is the ``m.server`` value when
    ``.well-known`` delegation happened.
    """

    server_name: str
    host_header: str
    tls_hostname: str
    targets: tuple[tuple[str, int], ...]
    delegated_to: Optional[str] = None


@dataclass(frozen=True)
class WellKnownResponse:
    """What a :class:`WellKnownFetcher` got back (redirects not followed)."""

    code: int
    headers: Headers
    body: bytes


class WellKnownFetcher(Protocol):
    """Fetches one URL with ``GET``, without following redirects.

    Fails (raises) on connection errors, timeouts and oversized bodies; any HTTP
    answer, whatever its status, is a :class:`WellKnownResponse`.
    """

    def fetch(self, url: str) -> Awaitable[WellKnownResponse]: ...


class SrvResolver(Protocol):
    """The part of ``twisted.names``' ``IResolver`` used here.

    ``lookupService`` answers ``(answers, authority, additional)`` lists of
    :class:`twisted.names.dns.RRHeader`; it fails with
    :class:`twisted.names.error.DNSNameError` when the name does not exist.
    """

    def lookupService(self, name: str) -> Awaitable[Any]: ...


class ServerNameResolver(Protocol):
    """Anything that resolves server names (the agent depends on this only)."""

    async def resolve(self, server_name: str) -> ResolvedServer: ...


@dataclass(frozen=True)
class SrvTarget:
    """One SRV record's payload."""

    host: str
    port: int
    priority: int
    weight: int


def order_srv_targets(records: Sequence[SrvTarget], rng: random.Random) -> list[SrvTarget]:
    """Order SRV records per RFC 2782: ascending priority; within a priority,
    a weighted random order (zero-weight records last, in random order)."""
    by_priority: dict[int, list[SrvTarget]] = {}
    for record in records:
        by_priority.setdefault(record.priority, []).append(record)
    ordered: list[SrvTarget] = []
    for priority in sorted(by_priority):
        remaining = list(by_priority[priority])
        weighted = [r for r in remaining if r.weight > 0]
        unweighted = [r for r in remaining if r.weight <= 0]
        while weighted:
            total = sum(r.weight for r in weighted)
            pick = rng.randint(1, total)
            for index, record in enumerate(weighted):
                pick -= record.weight
                if pick <= 0:
                    ordered.append(weighted.pop(index))
                    break
        rng.shuffle(unweighted)
        ordered.extend(unweighted)
    return ordered


def cache_period_from_headers(headers: Headers, now: float) -> Optional[float]:
    """The cache lifetime a response's headers ask for, in seconds, or None if
    they say nothing.  ``Cache-Control: no-store`` is 0; ``max-age`` wins over
    ``Expires``; an invalid ``Expires`` means already expired (RFC 9111)."""
    directives: dict[str, Optional[str]] = {}
    for header in headers.getRawHeaders("cache-control") or []:
        for directive in header.split(","):
            name, eq, value = directive.partition("=")
            directives[name.strip().lower()] = value.strip().strip('"') if eq else None
    if "no-store" in directives:
        return 0.0
    max_age = directives.get("max-age")
    if max_age is not None:
        try:
            return float(max(int(max_age), 0))
        except ValueError:
            pass
    expires = headers.getRawHeaders(b"expires")
    if expires:
        try:
            return max(stringToDatetime(expires[-1]) - now, 0.0)
        except (ValueError, IndexError, KeyError):
            return 0.0
    return None


class _WellKnownFailure(Exception):
    def __init__(self, reason: str, temporary: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.temporary = temporary


@dataclass
class _WellKnownEntry:
    delegated: Optional[str]
    refresh_at: float
    expires_at: float


@dataclass
class _SrvEntry:
    records: tuple[SrvTarget, ...]
    # the single "." record: the service is decidedly not available
    unavailable: bool
    expires_at: float


class ServerResolver:
    """Resolves server names as the module docstring describes.

    :param clock: the time source of every cache.
    :param srv_resolver: SRV lookups (``twisted.names.client.createResolver()``).
    :param well_known_fetcher: fetches ``.well-known`` URLs.
    :param ip_filter: if given, IP-literal server names (and delegated IP
        literals) in a blocked range are refused with
        :class:`~devicelist_plugin.federation.ipfilter.BlockedAddressError`
        (addresses from DNS are checked by the agent, after A/AAAA resolution).
    :param rng: randomness for SRV weights and cache jitter (seed it in tests).
    :param jitter: returns the factor applied to the default and failure cache
        periods; default uniform in [0.9, 1.0] from ``rng``.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        srv_resolver: SrvResolver,
        well_known_fetcher: WellKnownFetcher,
        *,
        ip_filter: Optional[IPRangeFilter] = None,
        rng: Optional[random.Random] = None,
        jitter: Optional[Callable[[], float]] = None,
        max_redirects: int = WELL_KNOWN_MAX_REDIRECTS,
    ) -> None:
        self._clock = clock
        self._srv = srv_resolver
        self._fetcher = well_known_fetcher
        self._ip_filter = ip_filter
        self._rng = rng if rng is not None else random.Random()
        self._jitter = (
            jitter
            if jitter is not None
            else lambda: self._rng.uniform(1.0 - WELL_KNOWN_CACHE_JITTER, 1.0)
        )
        self._max_redirects = max_redirects
        self._well_known: dict[str, _WellKnownEntry] = {}
        self._had_valid_until: dict[str, float] = {}
        self._in_flight: dict[str, list[Deferred[Optional[str]]]] = {}
        self._srv_cache: dict[str, _SrvEntry] = {}

    async def resolve(self, server_name: str) -> ResolvedServer:
        """Resolve ``server_name`` (``host[:port]``) to a :class:`ResolvedServer`.

        :raises ServerResolutionError: malformed name, SRV "no service", DNS failure.
        :raises BlockedAddressError: an IP literal in a blocked range.
        """
        try:
            host, port = parse_server_name(server_name)
        except ParseError as e:
            raise ServerResolutionError(server_name, e.message, retryable=False) from None

        if is_ip_literal(host):
            return self._ip_literal(server_name, server_name, host, port, None)
        if port is not None:
            return ResolvedServer(server_name, server_name, host.lower(), ((host.lower(), port),))

        delegated = await self.get_delegated_server(host)
        if delegated is not None:
            d_host, d_port = parse_server_name(delegated)
            if is_ip_literal(d_host):
                return self._ip_literal(server_name, delegated, d_host, d_port, delegated)
            d_host = d_host.lower()
            if d_port is not None:
                return ResolvedServer(
                    server_name, delegated, d_host, ((d_host, d_port),), delegated
                )
            targets = await self._srv_or_default(server_name, d_host)
            return ResolvedServer(server_name, d_host, d_host, targets, delegated)

        host = host.lower()
        targets = await self._srv_or_default(server_name, host)
        return ResolvedServer(server_name, server_name, host, targets)

    def _ip_literal(
        self,
        server_name: str,
        name: str,
        host: str,
        port: Optional[int],
        delegated: Optional[str],
    ) -> ResolvedServer:
        address = host[1:-1] if host.startswith("[") else host
        if self._ip_filter is not None and self._ip_filter.is_blocked(address):
            # Named after the server only when delegation led to the address.
            raise BlockedAddressError(address, server_name if delegated else None)
        return ResolvedServer(
            server_name, name, address, ((address, port or DEFAULT_FEDERATION_PORT),), delegated
        )

    # ------------------------------------------------------------------
    # .well-known

    async def get_delegated_server(self, hostname: str) -> Optional[str]:
        """The ``m.server`` of ``hostname``'s ``.well-known``, or None if it has
        no valid one (cached as described in the module docstring).  Concurrent
        lookups of one host share a single fetch."""
        key = hostname.lower()
        entry = self._well_known.get(key)
        now = self._clock.seconds()
        if entry is not None and now < entry.refresh_at:
            return entry.delegated

        waiter: Deferred[Optional[str]] = Deferred()
        waiters = self._in_flight.get(key)
        if waiters is not None:
            waiters.append(waiter)
            return await waiter
        waiters = [waiter]
        self._in_flight[key] = waiters
        fetch = Deferred.fromCoroutine(self._fetch_and_cache(key))
        fetch.addBoth(self._deliver, key, waiters)
        return await waiter

    def _deliver(
        self, result: Optional[str] | Failure, key: str, waiters: list[Deferred[Optional[str]]]
    ) -> None:
        del self._in_flight[key]
        for waiter in waiters:
            # A waiter cancelled by its caller ignores this (no canceller).
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

    async def _fetch_and_cache(self, key: str) -> Optional[str]:
        try:
            delegated, period = await self._fetch_well_known(key)
        except _WellKnownFailure as failure:
            return self._cache_failure(key, failure)
        now = self._clock.seconds()
        self._well_known[key] = _WellKnownEntry(
            delegated,
            refresh_at=now + period * (1.0 - WELL_KNOWN_GRACE_PERIOD_FACTOR),
            expires_at=now + period,
        )
        self._had_valid_until[key] = now + period + WELL_KNOWN_REMEMBER_VALID_PERIOD
        self.log.info(
            "{host} delegates federation to {delegated} (cached for {period:.0f}s)",
            host=key,
            delegated=delegated,
            period=period,
        )
        return delegated

    def _cache_failure(self, key: str, failure: _WellKnownFailure) -> Optional[str]:
        now = self._clock.seconds()
        previous = self._well_known.get(key)
        if (
            failure.temporary
            and previous is not None
            and previous.delegated is not None
            and now < previous.expires_at
        ):
            # Still valid: keep using it, try again a little later.
            previous.refresh_at = min(now + WELL_KNOWN_DOWN_CACHE_PERIOD, previous.expires_at)
            self.log.info(
                "Refreshing .well-known of {host} failed ({reason}); "
                "still using {delegated} until it expires",
                host=key,
                reason=failure.reason,
                delegated=previous.delegated,
            )
            return previous.delegated
        had_valid = self._had_valid_until.get(key, 0.0) > now
        base = WELL_KNOWN_DOWN_CACHE_PERIOD if had_valid else WELL_KNOWN_INVALID_CACHE_PERIOD
        period = base * self._jitter()
        self._well_known[key] = _WellKnownEntry(None, now + period, now + period)
        self.log.info(
            "No valid .well-known for {host}: {reason} (not retried for {period:.0f}s)",
            host=key,
            reason=failure.reason,
            period=period,
        )
        return None

    async def _fetch_well_known(self, host: str) -> tuple[str, float]:
        url = f"https://{host}{WELL_KNOWN_PATH}"
        seen = {url}
        redirects = 0
        while True:
            try:
                response = await self._fetcher.fetch(url)
            except CancelledError:
                raise
            except Exception as e:
                raise _WellKnownFailure(f"fetching {url} failed: {e!r}", temporary=True) from e
            if response.code not in _REDIRECT_CODES:
                break
            locations = response.headers.getRawHeaders("location")
            if not locations:
                raise _WellKnownFailure(f"{url}: {response.code} without Location", False)
            if redirects >= self._max_redirects:
                raise _WellKnownFailure(f"{url}: more than {self._max_redirects} redirects", False)
            target = urljoin(url, locations[-1].strip())
            if urlsplit(target).scheme != "https":
                raise _WellKnownFailure(f"{url}: redirect to non-https {target!r}", False)
            if target in seen:
                raise _WellKnownFailure(f"{url}: redirect loop back to {target!r}", False)
            seen.add(target)
            redirects += 1
            url = target

        if 500 <= response.code < 600:
            raise _WellKnownFailure(f"{url}: HTTP {response.code}", temporary=True)
        if response.code != 200:
            raise _WellKnownFailure(f"{url}: HTTP {response.code}", temporary=False)
        delegated = _parse_well_known(url, response.body)

        now = self._clock.seconds()
        period = cache_period_from_headers(response.headers, now)
        if period is None:
            period = WELL_KNOWN_DEFAULT_CACHE_PERIOD * self._jitter()
        else:
            period = min(max(period, WELL_KNOWN_MIN_CACHE_PERIOD), WELL_KNOWN_MAX_CACHE_PERIOD)
        return delegated, period

    # ------------------------------------------------------------------
    # SRV

    async def _srv_or_default(self, server_name: str, host: str) -> tuple[tuple[str, int], ...]:
        for service in SRV_SERVICES:
            records = await self._lookup_srv(server_name, f"{service}.{host}")
            if records:
                ordered = order_srv_targets(records, self._rng)
                return tuple((r.host, r.port) for r in ordered)
        return ((host, DEFAULT_FEDERATION_PORT),)

    async def _lookup_srv(self, server_name: str, name: str) -> tuple[SrvTarget, ...]:
        now = self._clock.seconds()
        entry = self._srv_cache.get(name)
        if entry is None or now >= entry.expires_at:
            entry = await self._query_srv(server_name, name, entry)
        if entry.unavailable:
            raise ServerResolutionError(
                server_name, f"SRV {name} says the service is not available", retryable=False
            )
        return entry.records

    async def _query_srv(
        self, server_name: str, name: str, stale: Optional[_SrvEntry]
    ) -> _SrvEntry:
        now = self._clock.seconds()
        try:
            answers, _authority, _additional = await self._srv.lookupService(name)
        except CancelledError:
            raise
        except DomainError as e:
            if not _no_such_record(e):
                return self._srv_failed(server_name, name, stale, e)
            entry = _SrvEntry((), False, now + SRV_NEGATIVE_CACHE_PERIOD)
            self._srv_cache[name] = entry
            return entry
        except Exception as e:
            return self._srv_failed(server_name, name, stale, e)

        records = []
        ttls = []
        for answer in answers:
            if answer.type != dns.SRV or answer.payload is None:
                continue
            payload = answer.payload
            target = payload.target.name.decode("ascii", "replace").rstrip(".").lower()
            records.append(SrvTarget(target, payload.port, payload.priority, payload.weight))
            ttls.append(answer.ttl)
        unavailable = len(records) == 1 and records[0].host == ""
        records = [r for r in records if r.host]
        if records or unavailable:
            ttl = float(min(ttls))
            period = min(max(ttl, SRV_MIN_CACHE_PERIOD), SRV_MAX_CACHE_PERIOD)
        else:
            period = SRV_NEGATIVE_CACHE_PERIOD
        entry = _SrvEntry(tuple(records), unavailable, now + period)
        self._srv_cache[name] = entry
        self.log.debug("SRV {name}: {records}", name=name, records=records)
        return entry

    def _srv_failed(
        self, server_name: str, name: str, stale: Optional[_SrvEntry], error: Exception
    ) -> _SrvEntry:
        if stale is not None:
            self.log.warn(
                "SRV lookup of {name} failed ({error!r}); using the expired answer",
                name=name,
                error=error,
            )
            return stale
        raise ServerResolutionError(
            server_name, f"SRV lookup of {name} failed: {error!r}", retryable=True
        ) from error


def _no_such_record(e: DomainError) -> bool:
    """NXDOMAIN, or a name server that does not implement the query (rcode
    NOTIMP, e.g. a resolver for .onion names): both mean "no SRV record"."""
    if isinstance(e, DNSNameError):
        return True
    message = e.args[0] if e.args else None
    return isinstance(message, dns.Message) and message.rCode == dns.ENOTIMP


def _parse_well_known(url: str, body: bytes) -> str:
    try:
        parsed = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _WellKnownFailure(
            f"{url}: not JSON: {body[:_MAX_LOGGED_BODY]!r}", temporary=False
        ) from None
    if not isinstance(parsed, dict):
        raise _WellKnownFailure(f"{url}: not a JSON object", temporary=False)
    server = parsed.get("m.server")
    if not isinstance(server, str):
        raise _WellKnownFailure(f"{url}: no string 'm.server'", temporary=False)
    try:
        parse_server_name(server, "m.server")
    except ParseError as e:
        raise _WellKnownFailure(f"{url}: {e}", temporary=False) from None
    return server
