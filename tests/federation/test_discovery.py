"""Server discovery: every branch of the specification's resolution order,
``.well-known`` caching on a simulated clock, and SRV handling.  Fetcher and DNS
are fakes; nothing touches the network."""

from __future__ import annotations

import json
import random
from typing import Any, Optional, Union

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.names import dns
from twisted.names.error import DNSNameError, DNSQueryTimeoutError, DNSServerError, DomainError
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http import datetimeToString
from twisted.web.http_headers import Headers

from devicelist_plugin.federation.discovery import (
    ResolvedServer,
    ServerResolutionError,
    ServerResolver,
    SrvTarget,
    WellKnownResponse,
    cache_period_from_headers,
    order_srv_targets,
)
from devicelist_plugin.federation.ipfilter import BlockedAddressError, IPRangeFilter

HOUR = 3600.0

Answer = Union[WellKnownResponse, Exception, "Deferred[WellKnownResponse]"]


def wk_url(host: str) -> str:
    return f"https://{host}/.well-known/matrix/server"


def well_known(
    body: Any, code: int = 200, headers: Optional[dict[str, list[str]]] = None
) -> WellKnownResponse:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return WellKnownResponse(code, Headers(headers or {}), raw)


def delegate(server: str, **headers: str) -> WellKnownResponse:
    return well_known(
        {"m.server": server},
        headers={k.replace("_", "-"): [v] for k, v in headers.items()},
    )


def redirect(location: str, code: int = 301) -> WellKnownResponse:
    return WellKnownResponse(code, Headers({"Location": [location]}), b"")


class FakeFetcher:
    """URL -> answer; unknown URLs fail like a refused connection."""

    def __init__(self) -> None:
        self.answers: dict[str, Answer] = {}
        self.calls: list[str] = []

    def fetch(self, url: str) -> Deferred[WellKnownResponse]:
        self.calls.append(url)
        answer = self.answers.get(url)
        if answer is None:
            return fail(ConnectionRefusedError(url))
        if isinstance(answer, Deferred):
            return answer
        if isinstance(answer, Exception):
            return fail(answer)
        return succeed(answer)


def srv(name: str, target: str, port: int, priority: int = 0, weight: int = 0, ttl: int = 3600) -> dns.RRHeader:
    return dns.RRHeader(
        name=name.encode(),
        type=dns.SRV,
        ttl=ttl,
        payload=dns.Record_SRV(priority, weight, port, target.encode(), ttl=ttl),
    )


class FakeSrv:
    """SRV name -> records; unknown names are NXDOMAIN."""

    def __init__(self) -> None:
        self.records: dict[str, list[dns.RRHeader]] = {}
        self.errors: dict[str, Exception] = {}
        self.calls: list[str] = []

    def lookupService(self, name: str) -> Deferred[Any]:
        self.calls.append(name)
        if name in self.errors:
            return fail(self.errors[name])
        if name in self.records:
            return succeed((self.records[name], [], []))
        return fail(DNSNameError(name))


class DiscoveryTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.fetcher = FakeFetcher()
        self.srv = FakeSrv()
        self.resolver = ServerResolver(
            self.clock,
            self.srv,
            self.fetcher,
            ip_filter=IPRangeFilter(),
            rng=random.Random(4),
            jitter=lambda: 1.0,
        )

    def resolve(self, server_name: str) -> ResolvedServer:
        result: ResolvedServer = self.successResultOf(
            Deferred.fromCoroutine(self.resolver.resolve(server_name))
        )
        return result

    def resolve_fails(self, server_name: str) -> BaseException:
        failure = self.failureResultOf(Deferred.fromCoroutine(self.resolver.resolve(server_name)))
        return failure.value


class IPLiteralTests(DiscoveryTestCase):
    def test_ipv4(self) -> None:
        self.assertEqual(
            self.resolve("93.184.216.34"),
            ResolvedServer("93.184.216.34", "93.184.216.34", "93.184.216.34", (("93.184.216.34", 8448),)),
        )
        self.assertEqual((self.fetcher.calls, self.srv.calls), ([], []))

    def test_ipv4_with_port(self) -> None:
        self.assertEqual(
            self.resolve("93.184.216.34:8000"),
            ResolvedServer(
                "93.184.216.34:8000", "93.184.216.34:8000", "93.184.216.34", (("93.184.216.34", 8000),)
            ),
        )
        self.assertEqual((self.fetcher.calls, self.srv.calls), ([], []))

    def test_ipv6(self) -> None:
        """Brackets stay in Host, not in the address or the TLS name."""
        self.assertEqual(
            self.resolve("[2606:4700::1]"),
            ResolvedServer("[2606:4700::1]", "[2606:4700::1]", "2606:4700::1", (("2606:4700::1", 8448),)),
        )

    def test_ipv6_with_port(self) -> None:
        self.assertEqual(
            self.resolve("[2606:4700::1]:443"),
            ResolvedServer(
                "[2606:4700::1]:443", "[2606:4700::1]:443", "2606:4700::1", (("2606:4700::1", 443),)
            ),
        )
        self.assertEqual((self.fetcher.calls, self.srv.calls), ([], []))

    def test_blocked_literals_refused(self) -> None:
        for name in ["127.0.0.1", "10.1.2.3:8448", "[::1]", "[fe80::1]:8448", "169.254.169.254"]:
            with self.subTest(name=name):
                self.assertIsInstance(self.resolve_fails(name), BlockedAddressError)
        self.assertEqual((self.fetcher.calls, self.srv.calls), ([], []))

    def test_allowlisted_literal(self) -> None:
        self.resolver = ServerResolver(
            self.clock, self.srv, self.fetcher, ip_filter=IPRangeFilter(allowlist=["127.0.0.1"])
        )
        self.assertEqual(self.resolve("127.0.0.1:8481").targets, (("127.0.0.1", 8481),))

    def test_invalid_server_names(self) -> None:
        for name in ["", "exa mple.org", "example.org:0", "example.org:99999", "[::1", "a..b"]:
            with self.subTest(name=name):
                error = self.resolve_fails(name)
                self.assertIsInstance(error, ServerResolutionError)
                assert isinstance(error, ServerResolutionError)
                self.assertFalse(error.retryable)


class ExplicitPortTests(DiscoveryTestCase):
    def test_hostname_with_port(self) -> None:
        """No .well-known, no SRV: straight to the given port."""
        self.fetcher.answers[wk_url("example.org")] = delegate("elsewhere.example.net")
        self.assertEqual(
            self.resolve("example.org:8443"),
            ResolvedServer("example.org:8443", "example.org:8443", "example.org", (("example.org", 8443),)),
        )
        self.assertEqual((self.fetcher.calls, self.srv.calls), ([], []))


class WellKnownTests(DiscoveryTestCase):
    def test_delegated_with_port(self) -> None:
        """Host is the delegated name with its port; the certificate must be
        the delegated host's; no SRV lookup."""
        self.fetcher.answers[wk_url("example.org")] = delegate("matrix.example.net:443")
        self.assertEqual(
            self.resolve("example.org"),
            ResolvedServer(
                "example.org",
                "matrix.example.net:443",
                "matrix.example.net",
                (("matrix.example.net", 443),),
                delegated_to="matrix.example.net:443",
            ),
        )
        self.assertEqual(self.fetcher.calls, [wk_url("example.org")])
        self.assertEqual(self.srv.calls, [])

    def test_delegated_without_port_no_srv(self) -> None:
        """Delegated name without port and no SRV: both SRV names of the
        *delegated* host are tried, then port 8448."""
        self.fetcher.answers[wk_url("example.org")] = delegate("matrix.example.net")
        self.assertEqual(
            self.resolve("example.org"),
            ResolvedServer(
                "example.org",
                "matrix.example.net",
                "matrix.example.net",
                (("matrix.example.net", 8448),),
                delegated_to="matrix.example.net",
            ),
        )
        self.assertEqual(
            self.srv.calls,
            ["_matrix-fed._tcp.matrix.example.net", "_matrix._tcp.matrix.example.net"],
        )

    def test_delegated_name_through_srv(self) -> None:
        self.fetcher.answers[wk_url("example.org")] = delegate("matrix.example.net")
        self.srv.records["_matrix-fed._tcp.matrix.example.net"] = [
            srv("_matrix-fed._tcp.matrix.example.net", "fed1.hosting.example", 8500)
        ]
        resolved = self.resolve("example.org")
        self.assertEqual(resolved.targets, (("fed1.hosting.example", 8500),))
        # Certificate and Host: the delegated name, never the SRV target.
        self.assertEqual(resolved.tls_hostname, "matrix.example.net")
        self.assertEqual(resolved.host_header, "matrix.example.net")
        self.assertEqual(self.srv.calls, ["_matrix-fed._tcp.matrix.example.net"])

    def test_delegated_name_through_deprecated_srv(self) -> None:
        self.fetcher.answers[wk_url("example.org")] = delegate("matrix.example.net")
        self.srv.records["_matrix._tcp.matrix.example.net"] = [
            srv("_matrix._tcp.matrix.example.net", "old.hosting.example", 8449)
        ]
        resolved = self.resolve("example.org")
        self.assertEqual(resolved.targets, (("old.hosting.example", 8449),))
        self.assertEqual(resolved.tls_hostname, "matrix.example.net")

    def test_delegated_ip_literal(self) -> None:
        self.fetcher.answers[wk_url("example.org")] = delegate("93.184.216.34")
        self.assertEqual(
            self.resolve("example.org"),
            ResolvedServer(
                "example.org",
                "93.184.216.34",
                "93.184.216.34",
                (("93.184.216.34", 8448),),
                delegated_to="93.184.216.34",
            ),
        )
        self.assertEqual(self.srv.calls, [])

    def test_delegated_ipv6_literal_with_port(self) -> None:
        self.fetcher.answers[wk_url("example.org")] = delegate("[2606:4700::1]:8000")
        resolved = self.resolve("example.org")
        self.assertEqual(resolved.host_header, "[2606:4700::1]:8000")
        self.assertEqual(resolved.tls_hostname, "2606:4700::1")
        self.assertEqual(resolved.targets, (("2606:4700::1", 8000),))

    def test_delegated_to_blocked_literal(self) -> None:
        self.fetcher.answers[wk_url("example.org")] = delegate("10.0.0.7:8448")
        error = self.resolve_fails("example.org")
        self.assertIsInstance(error, BlockedAddressError)
        self.assertIn("10.0.0.7", str(error))

    def test_redirect_followed(self) -> None:
        self.fetcher.answers[wk_url("example.org")] = redirect("https://www.example.org/wk")
        self.fetcher.answers["https://www.example.org/wk"] = redirect("/final", code=308)
        self.fetcher.answers["https://www.example.org/final"] = delegate("matrix.example.net:443")
        self.assertEqual(self.resolve("example.org").host_header, "matrix.example.net:443")
        self.assertEqual(
            self.fetcher.calls,
            [wk_url("example.org"), "https://www.example.org/wk", "https://www.example.org/final"],
        )

    def test_redirect_loop_is_a_failure(self) -> None:
        self.fetcher.answers[wk_url("example.org")] = redirect("https://www.example.org/a")
        self.fetcher.answers["https://www.example.org/a"] = redirect(wk_url("example.org"))
        resolved = self.resolve("example.org")
        self.assertIsNone(resolved.delegated_to)
        self.assertEqual(resolved.targets, (("example.org", 8448),))
        self.assertEqual(len(self.fetcher.calls), 2)

    def test_too_many_redirects(self) -> None:
        self.resolver = ServerResolver(
            self.clock, self.srv, self.fetcher, max_redirects=2, jitter=lambda: 1.0
        )
        self.fetcher.answers[wk_url("example.org")] = redirect("https://example.org/1")
        self.fetcher.answers["https://example.org/1"] = redirect("https://example.org/2")
        self.fetcher.answers["https://example.org/2"] = redirect("https://example.org/3")
        self.fetcher.answers["https://example.org/3"] = delegate("matrix.example.net:443")
        self.assertIsNone(self.resolve("example.org").delegated_to)
        self.assertEqual(len(self.fetcher.calls), 3)

    def test_redirect_to_http_refused(self) -> None:
        self.fetcher.answers[wk_url("example.org")] = redirect("http://example.org/wk")
        self.fetcher.answers["http://example.org/wk"] = delegate("matrix.example.net:443")
        self.assertIsNone(self.resolve("example.org").delegated_to)
        self.assertEqual(self.fetcher.calls, [wk_url("example.org")])

    def test_invalid_answers_fall_back_to_srv(self) -> None:
        """Bad JSON, missing or wrong ``m.server``, non-200: treated as no
        .well-known; the original name goes through SRV then 8448."""
        bad: list[WellKnownResponse] = [
            well_known(b"{not json"),
            well_known(b"\xff\xfe"),
            well_known(b"[" * 5_000),  # json.loads: RecursionError
            well_known(["m.server"]),
            well_known({"m.servers": "matrix.example.net"}),
            well_known({"m.server": 8448}),
            well_known({"m.server": "bad name!"}),
            well_known({"m.server": "matrix.example.net:0"}),
            well_known({"m.server": "matrix.example.net"}, code=404),
            well_known({"m.server": "matrix.example.net"}, code=503),
            ConnectionRefusedError(),  # type: ignore[list-item]
        ]
        for index, answer in enumerate(bad):
            with self.subTest(answer=answer):
                host = f"s{index}.example.org"
                self.fetcher.answers[wk_url(host)] = answer
                self.srv.records[f"_matrix-fed._tcp.{host}"] = [
                    srv(f"_matrix-fed._tcp.{host}", f"fed.{host}", 8500)
                ]
                self.assertEqual(
                    self.resolve(host),
                    ResolvedServer(host, host, host, ((f"fed.{host}", 8500),)),
                )


class WellKnownCacheTests(DiscoveryTestCase):
    def test_cache_hit_without_second_fetch(self) -> None:
        self.fetcher.answers[wk_url("example.org")] = delegate("matrix.example.net:443")
        first = self.resolve("example.org")
        self.clock.advance(60)  # well inside the 24 h default period: no timer, no refetch
        self.assertEqual(self.resolve("example.org"), first)
        self.assertEqual(self.resolve("EXAMPLE.org").targets, first.targets)
        self.assertEqual(self.fetcher.calls, [wk_url("example.org")])

    def test_max_age_honoured(self) -> None:
        """max-age=3600: reused until 80% of it (the refresh window), then
        fetched again."""
        self.fetcher.answers[wk_url("example.org")] = delegate(
            "matrix.example.net:443", cache_control="public, max-age=3600"
        )
        self.resolve("example.org")
        self.clock.advance(2879)  # just before the refresh point (0.8 * 3600)
        self.resolve("example.org")
        self.assertEqual(len(self.fetcher.calls), 1)
        self.fetcher.answers[wk_url("example.org")] = delegate("new.example.net:443")
        self.clock.advance(1)  # the refresh point
        self.assertEqual(self.resolve("example.org").host_header, "new.example.net:443")
        self.assertEqual(len(self.fetcher.calls), 2)

    def test_expired_entry_not_used(self) -> None:
        """Past the full max-age with the server gone: no stale delegation."""
        self.fetcher.answers[wk_url("example.org")] = delegate(
            "matrix.example.net:443", cache_control="max-age=3600"
        )
        self.resolve("example.org")
        del self.fetcher.answers[wk_url("example.org")]
        self.clock.advance(3600)  # the entry's expiry
        resolved = self.resolve("example.org")
        self.assertIsNone(resolved.delegated_to)
        self.assertEqual(resolved.targets, (("example.org", 8448),))

    def test_max_cache_period_48h(self) -> None:
        self.fetcher.answers[wk_url("example.org")] = delegate(
            "matrix.example.net:443", cache_control="max-age=864000"
        )
        self.resolve("example.org")
        self.clock.advance(0.8 * 48 * HOUR - 1)  # just before 80% of the 48 h cap
        self.resolve("example.org")
        self.assertEqual(len(self.fetcher.calls), 1)
        self.clock.advance(1)  # the capped refresh point
        self.resolve("example.org")
        self.assertEqual(len(self.fetcher.calls), 2)

    def test_default_period_24h(self) -> None:
        self.fetcher.answers[wk_url("example.org")] = delegate("matrix.example.net:443")
        self.resolve("example.org")
        self.clock.advance(0.8 * 24 * HOUR - 1)  # just before 80% of 24 h
        self.resolve("example.org")
        self.assertEqual(len(self.fetcher.calls), 1)
        self.clock.advance(1)  # the default refresh point
        self.resolve("example.org")
        self.assertEqual(len(self.fetcher.calls), 2)

    def test_default_period_jittered_down(self) -> None:
        self.resolver = ServerResolver(self.clock, self.srv, self.fetcher, jitter=lambda: 0.9)
        self.fetcher.answers[wk_url("example.org")] = delegate("matrix.example.net:443")
        self.resolve("example.org")
        self.clock.advance(0.8 * 0.9 * 24 * HOUR)  # refresh point of the jittered period
        self.resolve("example.org")
        self.assertEqual(len(self.fetcher.calls), 2)

    def test_expires_header(self) -> None:
        self.clock.advance(1_700_000_000)  # a realistic wall-clock time
        expires = datetimeToString(int(self.clock.seconds()) + 2 * 3600).decode()
        self.fetcher.answers[wk_url("example.org")] = delegate(
            "matrix.example.net:443", expires=expires
        )
        self.resolve("example.org")
        self.clock.advance(0.8 * 2 * HOUR - 1)  # just before 80% of the 2 h
        self.resolve("example.org")
        self.assertEqual(len(self.fetcher.calls), 1)
        self.clock.advance(1)  # refresh point
        self.resolve("example.org")
        self.assertEqual(len(self.fetcher.calls), 2)

    def test_no_store_gets_the_floor(self) -> None:
        self.fetcher.answers[wk_url("example.org")] = delegate(
            "matrix.example.net:443", cache_control="no-store"
        )
        self.resolve("example.org")
        self.resolve("example.org")
        self.assertEqual(len(self.fetcher.calls), 1)
        self.clock.advance(0.8 * 300)  # refresh point of the 5-minute floor
        self.resolve("example.org")
        self.assertEqual(len(self.fetcher.calls), 2)

    def test_failure_cached_then_retried(self) -> None:
        self.fetcher.answers[wk_url("example.org")] = well_known({}, code=404)
        self.assertIsNone(self.resolve("example.org").delegated_to)
        self.fetcher.answers[wk_url("example.org")] = delegate("matrix.example.net:443")
        self.clock.advance(HOUR - 1)  # just before the 1 h failure period ends
        self.assertIsNone(self.resolve("example.org").delegated_to)
        self.assertEqual(len(self.fetcher.calls), 1)
        self.clock.advance(1)  # the failure period ends
        self.assertEqual(self.resolve("example.org").delegated_to, "matrix.example.net:443")
        self.assertEqual(len(self.fetcher.calls), 2)

    def test_failure_period_jittered_below_an_hour(self) -> None:
        self.resolver = ServerResolver(self.clock, self.srv, self.fetcher, jitter=lambda: 0.9)
        self.resolve("example.org")  # refused connection: a failure
        self.clock.advance(0.9 * HOUR)  # the jittered failure period ends
        self.resolve("example.org")
        self.assertEqual(len(self.fetcher.calls), 2)

    def test_default_jitter_within_bounds(self) -> None:
        resolver = ServerResolver(self.clock, self.srv, self.fetcher, rng=random.Random(7))
        self.successResultOf(Deferred.fromCoroutine(resolver.resolve("example.org")))
        self.clock.advance(0.9 * HOUR - 1)  # before the shortest possible period
        self.successResultOf(Deferred.fromCoroutine(resolver.resolve("example.org")))
        self.assertEqual(len(self.fetcher.calls), 1)
        self.clock.advance(0.1 * HOUR + 1)  # past the longest possible period
        self.successResultOf(Deferred.fromCoroutine(resolver.resolve("example.org")))
        self.assertEqual(len(self.fetcher.calls), 2)

    def test_failure_after_recent_success_cached_briefly(self) -> None:
        self.fetcher.answers[wk_url("example.org")] = delegate(
            "matrix.example.net:443", cache_control="max-age=600"
        )
        self.resolve("example.org")
        self.fetcher.answers[wk_url("example.org")] = well_known({}, code=404)
        self.clock.advance(600)  # the valid answer expires
        self.assertIsNone(self.resolve("example.org").delegated_to)
        self.fetcher.answers[wk_url("example.org")] = delegate("matrix.example.net:443")
        self.clock.advance(119)  # just before the 2-minute "was valid" failure period
        self.assertIsNone(self.resolve("example.org").delegated_to)
        self.clock.advance(1)  # the short failure period ends
        self.assertEqual(self.resolve("example.org").delegated_to, "matrix.example.net:443")
        self.assertEqual(len(self.fetcher.calls), 3)

    def test_temporary_failure_in_refresh_window_keeps_answer(self) -> None:
        self.fetcher.answers[wk_url("example.org")] = delegate(
            "matrix.example.net:443", cache_control="max-age=3600"
        )
        self.resolve("example.org")
        del self.fetcher.answers[wk_url("example.org")]  # now refused
        self.clock.advance(2880)  # the refresh window opens
        self.assertEqual(self.resolve("example.org").delegated_to, "matrix.example.net:443")
        self.assertEqual(len(self.fetcher.calls), 2)
        self.clock.advance(119)  # retry of the refresh not before 2 minutes
        self.resolve("example.org")
        self.assertEqual(len(self.fetcher.calls), 2)
        self.clock.advance(1)  # refresh retried
        self.assertEqual(self.resolve("example.org").delegated_to, "matrix.example.net:443")
        self.assertEqual(len(self.fetcher.calls), 3)

    def test_permanent_failure_in_refresh_window_drops_answer(self) -> None:
        """A 404 is an answer: the server stopped delegating."""
        self.fetcher.answers[wk_url("example.org")] = delegate(
            "matrix.example.net:443", cache_control="max-age=3600"
        )
        self.resolve("example.org")
        self.fetcher.answers[wk_url("example.org")] = well_known({}, code=404)
        self.clock.advance(2880)  # the refresh window opens
        self.assertIsNone(self.resolve("example.org").delegated_to)

    def test_concurrent_lookups_share_one_fetch(self) -> None:
        pending: Deferred[WellKnownResponse] = Deferred()
        self.fetcher.answers[wk_url("example.org")] = pending
        first = Deferred.fromCoroutine(self.resolver.resolve("example.org"))
        second = Deferred.fromCoroutine(self.resolver.resolve("example.org"))
        self.assertNoResult(first)
        self.assertNoResult(second)
        pending.callback(delegate("matrix.example.net:443"))
        self.assertEqual(self.successResultOf(first).host_header, "matrix.example.net:443")
        self.assertEqual(self.successResultOf(second).host_header, "matrix.example.net:443")
        self.assertEqual(len(self.fetcher.calls), 1)

    def test_cancelled_waiter_does_not_break_the_others(self) -> None:
        pending: Deferred[WellKnownResponse] = Deferred()
        self.fetcher.answers[wk_url("example.org")] = pending
        first = Deferred.fromCoroutine(self.resolver.resolve("example.org"))
        second = Deferred.fromCoroutine(self.resolver.resolve("example.org"))
        first.cancel()
        self.failureResultOf(first)
        pending.callback(delegate("matrix.example.net:443"))
        self.assertEqual(self.successResultOf(second).host_header, "matrix.example.net:443")


class SrvTests(DiscoveryTestCase):
    def test_matrix_fed_srv(self) -> None:
        self.srv.records["_matrix-fed._tcp.example.org"] = [
            srv("_matrix-fed._tcp.example.org", "fed.example.org", 8500)
        ]
        self.srv.records["_matrix._tcp.example.org"] = [
            srv("_matrix._tcp.example.org", "legacy.example.org", 8448)
        ]
        self.assertEqual(
            self.resolve("example.org"),
            ResolvedServer("example.org", "example.org", "example.org", (("fed.example.org", 8500),)),
        )
        self.assertEqual(self.srv.calls, ["_matrix-fed._tcp.example.org"])
        self.assertEqual(self.fetcher.calls, [wk_url("example.org")])

    def test_deprecated_matrix_srv(self) -> None:
        self.srv.records["_matrix._tcp.example.org"] = [
            srv("_matrix._tcp.example.org", "legacy.example.org.", 8449)
        ]
        resolved = self.resolve("example.org")
        self.assertEqual(resolved.targets, (("legacy.example.org", 8449),))
        self.assertEqual(resolved.tls_hostname, "example.org")
        self.assertEqual(resolved.host_header, "example.org")
        self.assertEqual(
            self.srv.calls, ["_matrix-fed._tcp.example.org", "_matrix._tcp.example.org"]
        )

    def test_default_port(self) -> None:
        self.assertEqual(
            self.resolve("example.org"),
            ResolvedServer("example.org", "example.org", "example.org", (("example.org", 8448),)),
        )
        self.assertEqual(
            self.srv.calls, ["_matrix-fed._tcp.example.org", "_matrix._tcp.example.org"]
        )

    def test_priority_and_weight_order(self) -> None:
        name = "_matrix-fed._tcp.example.org"
        self.srv.records[name] = [
            srv(name, "backup.example.org", 8448, priority=20, weight=5),
            srv(name, "a.example.org", 8448, priority=10, weight=1),
            srv(name, "b.example.org", 8448, priority=10, weight=3),
            srv(name, "zero.example.org", 8448, priority=10, weight=0),
        ]
        hosts = [host for host, _ in self.resolve("example.org").targets]
        self.assertEqual(set(hosts[:2]), {"a.example.org", "b.example.org"})
        self.assertEqual(hosts[2:], ["zero.example.org", "backup.example.org"])

    def test_dot_target_means_no_service(self) -> None:
        self.srv.records["_matrix-fed._tcp.example.org"] = [
            srv("_matrix-fed._tcp.example.org", ".", 0)
        ]
        error = self.resolve_fails("example.org")
        self.assertIsInstance(error, ServerResolutionError)
        assert isinstance(error, ServerResolutionError)
        self.assertFalse(error.retryable)
        self.assertIn("not available", str(error))

    def test_dns_failure(self) -> None:
        self.srv.errors["_matrix-fed._tcp.example.org"] = DNSServerError("SERVFAIL")
        error = self.resolve_fails("example.org")
        self.assertIsInstance(error, ServerResolutionError)
        assert isinstance(error, ServerResolutionError)
        self.assertTrue(error.retryable)

    def test_server_without_srv_support_means_no_record(self) -> None:
        """rcode NOTIMP (e.g. a .onion resolver): fall back as for NXDOMAIN."""
        self.srv.errors["_matrix-fed._tcp.example.org"] = DomainError(
            dns.Message(rCode=dns.ENOTIMP)
        )
        self.assertEqual(self.resolve("example.org").targets, (("example.org", 8448),))

    def test_srv_timeout(self) -> None:
        self.srv.errors["_matrix-fed._tcp.example.org"] = DNSQueryTimeoutError("x")
        error = self.resolve_fails("example.org")
        self.assertIsInstance(error, ServerResolutionError)

    def test_srv_cached_for_ttl_and_stale_on_failure(self) -> None:
        name = "_matrix-fed._tcp.example.org"
        self.srv.records[name] = [srv(name, "fed.example.org", 8500, ttl=300)]
        self.resolve("example.org")
        self.clock.advance(299)  # within the record's TTL
        self.resolve("example.org")
        self.assertEqual(self.srv.calls, [name])
        self.srv.errors[name] = DNSServerError("SERVFAIL")
        self.clock.advance(1)  # the TTL ends: looked up again, fails, stale answer used
        self.assertEqual(self.resolve("example.org").targets, (("fed.example.org", 8500),))
        self.assertEqual(self.srv.calls, [name, name])

    def test_missing_srv_cached_briefly(self) -> None:
        self.resolve("example.org")
        self.clock.advance(299)  # within the 5-minute negative cache
        self.resolve("example.org")
        self.assertEqual(len(self.srv.calls), 2)
        self.srv.records["_matrix-fed._tcp.example.org"] = [
            srv("_matrix-fed._tcp.example.org", "fed.example.org", 8500)
        ]
        self.clock.advance(1)  # the 5-minute negative cache ends (.well-known stays cached: 1 h)
        self.assertEqual(self.resolve("example.org").targets, (("fed.example.org", 8500),))

    def test_order_srv_targets(self) -> None:
        records = [
            SrvTarget("c", 1, 2, 0),
            SrvTarget("a", 1, 1, 0),
            SrvTarget("b", 1, 1, 10),
        ]
        self.assertEqual(
            [r.host for r in order_srv_targets(records, random.Random(0))], ["b", "a", "c"]
        )

    def test_weights_bias_the_order(self) -> None:
        records = [SrvTarget("heavy", 1, 0, 90), SrvTarget("light", 1, 0, 10)]
        rng = random.Random(3)
        firsts = [order_srv_targets(records, rng)[0].host for _ in range(1000)]
        self.assertGreater(firsts.count("heavy"), 800)
        self.assertGreater(firsts.count("light"), 50)


class CachePeriodTests(SynchronousTestCase):
    def period(self, **headers: str) -> Optional[float]:
        h = Headers({k.replace("_", "-"): [v] for k, v in headers.items()})
        return cache_period_from_headers(h, now=1_000_000.0)

    def test_headers(self) -> None:
        self.assertIsNone(self.period())
        self.assertEqual(self.period(cache_control="max-age=60"), 60.0)
        self.assertEqual(self.period(cache_control='public, MAX-AGE="120"'), 120.0)
        self.assertEqual(self.period(cache_control="no-store, max-age=60"), 0.0)
        self.assertEqual(
            self.period(cache_control="max-age=60", expires=datetimeToString(1_000_500).decode()),
            60.0,
        )
        self.assertEqual(self.period(expires=datetimeToString(1_000_500).decode()), 500.0)
        self.assertEqual(self.period(expires="0"), 0.0)
        self.assertEqual(self.period(expires=datetimeToString(10).decode()), 0.0)
        self.assertIsNone(self.period(cache_control="max-age=soon"))
