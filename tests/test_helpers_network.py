"""
Tests for L{tests.helpers}: the in-memory multi-server network and its faults.
"""

from __future__ import annotations

import json
from typing import Any

from treq.client import HTTPClient
from treq.response import _Response
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseNeverReceived
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from tests.helpers import FakeNetwork, FaultKind, FaultPlan


def _write_json(request: Request, code: int, body: object) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps(body).encode()


class _Echo(Resource):
    """Answers at once: GET describes the request, PUT echoes the JSON body."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[bytes, object]] = []

    def render_GET(self, request: Request) -> bytes:
        self.calls.append((b"GET", None))
        return _write_json(
            request,
            200,
            {
                "path": request.uri.decode(),
                "secure": request.isSecure(),
                "host": (request.getHeader(b"host") or b"").decode(),
            },
        )

    def render_PUT(self, request: Request) -> bytes:
        assert request.content is not None
        body = json.loads(request.content.read())
        self.calls.append((b"PUT", body))
        content_type = (request.getHeader(b"content-type") or b"").decode()
        return _write_json(request, 201, {"got": body, "content_type": content_type})


class _Slow(Resource):
    """Answers 5 simulated seconds after the request arrives (NOT_DONE_YET)."""

    isLeaf = True

    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self.clock = clock
        self.received: list[float] = []
        self.answered: list[float] = []

    def render_GET(self, request: Request) -> object:
        self.received.append(self.clock.seconds())
        lost: list[object] = []
        request.notifyFinish().addErrback(lost.append)

        def answer(_: None) -> None:
            if lost:
                return
            self.answered.append(self.clock.seconds())
            request.write(_write_json(request, 200, {"slow": True}))
            request.finish()

        deferLater(self.clock, 5, lambda: None).addCallback(answer)
        return NOT_DONE_YET


class _Relay(Resource):
    """While handling a request, asks another server over the network."""

    isLeaf = True

    def __init__(self, http: HTTPClient, target: str) -> None:
        super().__init__()
        self.http = http
        self.target = target

    def render_GET(self, request: Request) -> object:
        async def relay() -> None:
            response = await self.http.get(self.target)
            body = await response.json()
            request.write(_write_json(request, 200, {"relayed": body}))
            request.finish()

        Deferred.fromCoroutine(relay())
        return NOT_DONE_YET


class FakeNetworkTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.network = FakeNetwork(self.clock)
        self.echo = _Echo()
        root = Resource()
        root.putChild(b"echo", self.echo)
        self.network.add_server("b.test", root)
        self.slow = _Slow(self.clock)
        self.network.add_server("c.test", self.slow)
        self.http = HTTPClient(self.network.agent_for("a.test"))

    def answer(self, d: Deferred[_Response]) -> tuple[int, Any]:
        """Flush, then the status and JSON body of the response."""
        self.network.flush()
        response = self.successResultOf(d)
        return response.code, self.successResultOf(response.json())

    def assertQuiet(self) -> None:
        """Every connection is closed and no timer is left on the clock."""
        self.assertEqual(self.network.open_connections(), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_get_sync_resource(self) -> None:
        code, body = self.answer(self.http.get("https://b.test/echo/x?y=1"))
        self.assertEqual(code, 200)
        self.assertEqual(body, {"path": "/echo/x?y=1", "secure": True, "host": "b.test"})
        [record] = self.network.log
        self.assertEqual(
            (record.origin, record.destination, record.method, record.path),
            ("a.test", "b.test", "GET", "/echo/x?y=1"),
        )
        self.assertEqual((record.status, record.deliveries, record.fault), (200, 1, None))
        self.assertQuiet()

    def test_put_json_body(self) -> None:
        code, body = self.answer(self.http.put("https://b.test/echo", json={"edu": [1, 2]}))
        self.assertEqual(code, 201)
        self.assertEqual(body, {"got": {"edu": [1, 2]}, "content_type": "application/json; charset=UTF-8"})
        self.assertEqual(self.echo.calls, [(b"PUT", {"edu": [1, 2]})])
        self.assertEqual(json.loads(self.network.log[0].body), {"edu": [1, 2]})
        self.assertEqual(self.network.log[0].status, 201)
        self.assertQuiet()

    def test_status_codes_pass_through(self) -> None:
        d = self.http.get("https://b.test/nothing-here")
        self.network.flush()
        self.assertEqual(self.successResultOf(d).code, 404)
        self.assertEqual(self.network.log[0].status, 404)

    def test_async_resource_answers_after_clock_advance(self) -> None:
        d = self.http.get("https://c.test/")
        self.network.flush()
        self.assertNoResult(d)
        self.assertEqual(self.slow.received, [0.0])
        self.clock.advance(5)  # fires _Slow's 5 s answer timer
        self.assertEqual(self.answer(d), (200, {"slow": True}))
        self.assertEqual(self.slow.answered, [5.0])
        self.assertQuiet()

    def test_port_in_url_routes_to_server_name(self) -> None:
        code, body = self.answer(self.http.get("https://b.test:8448/echo"))
        self.assertEqual((code, body["host"]), (200, "b.test:8448"))
        self.assertEqual(self.network.log[0].destination, "b.test")

    def test_plain_http(self) -> None:
        code, body = self.answer(self.http.get("http://b.test/echo"))
        self.assertEqual((code, body["secure"]), (200, False))

    def test_unknown_server_refused(self) -> None:
        d = self.http.get("https://nowhere.test/echo")
        self.failureResultOf(d, ConnectionRefusedError)
        [record] = self.network.log
        self.assertEqual((record.destination, record.refused, record.status), ("nowhere.test", True, None))
        self.assertEqual(self.network.faults.counters, {})

    def test_chained_requests_complete_in_one_flush(self) -> None:
        b_client = HTTPClient(self.network.agent_for("b.test"))
        self.network.add_server("relay.test", _Relay(b_client, "https://b.test/echo"))
        code, body = self.answer(self.http.get("https://relay.test/"))
        self.assertEqual((code, body["relayed"]["host"]), (200, "b.test"))
        self.assertEqual(
            [(r.origin, r.destination) for r in self.network.log],
            [("a.test", "relay.test"), ("b.test", "b.test")],
        )
        self.assertQuiet()

    def test_remove_server_loses_inflight_and_refuses_new(self) -> None:
        d = self.http.get("https://c.test/")
        self.network.flush()
        self.network.remove_server("c.test")
        failure = self.failureResultOf(d, ResponseNeverReceived)
        self.assertTrue(failure.value.reasons[0].check(ConnectionLost))
        self.failureResultOf(self.http.get("https://c.test/"), ConnectionRefusedError)
        self.clock.advance(5)  # fires _Slow's answer timer; the request is gone
        self.assertEqual(self.slow.answered, [])
        self.network.add_server("c.test", _Slow(self.clock))
        d = self.http.get("https://c.test/")
        self.network.advance(5)  # the new _Slow's 5 s answer timer
        self.assertEqual(self.successResultOf(d).code, 200)

    def test_remove_origin_loses_its_requests(self) -> None:
        d = self.http.get("https://c.test/")
        self.network.flush()
        self.network.add_server("a.test", _Echo())
        self.network.remove_server("a.test")
        self.failureResultOf(d, ResponseNeverReceived)
        self.assertEqual(self.network.open_connections(), 0)

    def test_crash_of_destination_is_silent_on_its_side(self) -> None:
        process = Clock()
        process.advance(self.clock.seconds())
        slow = _Slow(process)
        self.network.add_server("d.test", slow, reactor=process)
        d = self.http.get("https://d.test/")
        self.network.flush()
        self.assertEqual(len(slow.received), 1)
        self.network.crash_server("d.test")
        # the client loses the connection; the dead server hears nothing
        failure = self.failureResultOf(d, ResponseNeverReceived)
        self.assertTrue(failure.value.reasons[0].check(ConnectionLost))
        # its timers run on its own clock, which its owner stops with it
        self.assertNotEqual(process.getDelayedCalls(), [])
        self.assertEqual(slow.answered, [])
        self.failureResultOf(self.http.get("https://d.test/"), ConnectionRefusedError)
        self.assertEqual((self.network.open_connections(), self.clock.getDelayedCalls()), (0, []))

    def test_crash_of_origin_drops_its_requests_silently(self) -> None:
        process = Clock()
        agent = self.network.agent_for("d.test", reactor=process)
        d = HTTPClient(agent).get("https://c.test/")
        self.network.flush()
        self.network.crash_server("d.test")
        self.network.advance(5)  # _Slow answers a request whose client is gone
        self.assertNoResult(d)  # nothing runs in the dead process
        self.assertEqual(self.slow.answered, [])
        self.assertEqual(self.network.open_connections(), 0)
        # the dead incarnation's agent never answers; a new one works
        logged = len(self.network.log)
        self.assertNoResult(HTTPClient(agent).get("https://b.test/echo"))
        self.assertEqual(len(self.network.log), logged)
        fresh = HTTPClient(self.network.agent_for("d.test"))
        self.assertEqual(self.answer(fresh.get("https://b.test/echo"))[0], 200)

    def test_site_is_used_as_is(self) -> None:
        seen: list[Request] = []

        class _Recording(Request):
            def process(self) -> None:
                seen.append(self)
                super().process()

        site = Site(_Echo(), reactor=self.clock)
        site.requestFactory = _Recording
        self.assertIs(self.network.add_server("site.test", site), site)
        self.assertEqual(self.answer(self.http.get("https://site.test/"))[0], 200)
        self.assertEqual(len(seen), 1)
        self.assertRaises(ValueError, self.network.add_server, "site.test", _Echo())
        self.assertRaises(ValueError, self.network.add_server, "other.test", Site(_Echo()))

    def test_global_reactor_untouched(self) -> None:
        from twisted.internet import reactor

        self.answer(self.http.put("https://b.test/echo", json={"a": 1}))
        self.assertEqual(reactor.getDelayedCalls(), [])


class FaultTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.faults = FaultPlan(seed=0)
        self.network = FakeNetwork(self.clock, self.faults)
        self.echo = _Echo()
        self.slow = _Slow(self.clock)
        for name, resource in [("a.test", _Echo()), ("b.test", self.echo), ("c.test", self.slow)]:
            self.network.add_server(name, resource)
        self.clients = {
            name: HTTPClient(self.network.agent_for(name))
            for name in ("a.test", "b.test", "c.test")
        }

    def get(self, origin: str, destination: str, **kwargs: Any) -> Deferred[_Response]:
        return self.clients[origin].get(f"https://{destination}/", **kwargs)

    def assertReachable(self, origin: str, destination: str) -> None:
        d = self.get(origin, destination)
        self.network.advance(5)  # _Slow's answer timer, when the destination is c.test
        self.assertEqual(self.successResultOf(d).code, 200)

    def assertTimedOut(self, d: Deferred[_Response]) -> None:
        """What treq's timeout gives: the Agent's request cancelled."""
        failure = self.failureResultOf(d, ResponseNeverReceived)
        self.assertTrue(failure.value.reasons[0].check(CancelledError))

    def assertRefused(self, origin: str, destination: str) -> None:
        self.failureResultOf(self.get(origin, destination), ConnectionRefusedError)

    def test_partition_and_heal(self) -> None:
        self.faults.partition({"a.test"}, {"b.test"})
        self.assertRefused("a.test", "b.test")
        self.assertRefused("b.test", "a.test")
        self.assertReachable("a.test", "c.test")
        self.assertReachable("b.test", "c.test")
        self.assertReachable("a.test", "a.test")
        self.assertEqual(self.echo.calls, [])
        self.faults.heal()
        self.assertReachable("a.test", "b.test")
        self.assertEqual(self.faults.counters, {"partition": 2})
        self.assertEqual(
            [r.fault for r in self.network.log],
            ["partition", "partition", None, None, None, None],
        )

    def test_partition_of_several_groups(self) -> None:
        self.faults.partition({"a.test"}, {"b.test", "c.test"})
        self.assertRefused("a.test", "c.test")
        self.assertReachable("b.test", "c.test")

    def test_server_down_is_isolated(self) -> None:
        self.faults.take_down("b.test")
        self.assertRefused("a.test", "b.test")
        self.assertRefused("b.test", "a.test")
        self.assertReachable("a.test", "c.test")
        self.faults.bring_up("b.test")
        self.assertReachable("a.test", "b.test")
        self.assertEqual(self.faults.counters, {"down": 2})

    def test_refuse(self) -> None:
        self.faults.inject(FaultKind.REFUSE, destination="b.test")
        self.assertRefused("a.test", "b.test")
        self.assertReachable("a.test", "b.test")  # only once
        self.assertEqual(self.echo.calls, [(b"GET", None)])

    def test_duplicate_is_processed_twice_answered_once(self) -> None:
        self.faults.inject(FaultKind.DUPLICATE, path_prefix="/txn")
        d = self.clients["a.test"].put("https://b.test/txn/1", json={"n": 1})
        self.network.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 201)
        self.assertEqual(self.echo.calls, [(b"PUT", {"n": 1}), (b"PUT", {"n": 1})])
        [record] = self.network.log
        self.assertEqual((record.fault, record.deliveries, record.status), ("duplicate", 2, 201))
        self.assertEqual(self.network.open_connections(), 0)
        self.assertEqual(self.faults.counters, {"duplicate": 1})

    def test_delay(self) -> None:
        self.faults.inject(FaultKind.DELAY, delay=5)
        d = self.get("a.test", "b.test")
        self.network.flush()
        self.assertNoResult(d)
        self.clock.advance(4)  # not yet the injected 5 s delay
        self.network.flush()
        self.assertNoResult(d)
        self.assertEqual(self.echo.calls, [])
        self.clock.advance(1)  # the injected 5 s delay releases the request
        self.network.flush()
        self.assertEqual(self.successResultOf(d).code, 200)
        self.assertEqual(self.network.log[0].sent_at, 0.0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_delay_then_slow_server_with_advance(self) -> None:
        self.faults.inject(FaultKind.DELAY, delay=3)
        d = self.get("a.test", "c.test")
        self.network.advance(10)  # the 3 s delay, then _Slow's 5 s answer timer
        self.assertEqual(self.successResultOf(d).code, 200)
        self.assertEqual((self.slow.received, self.slow.answered), ([3.0], [8.0]))
        self.assertEqual(self.clock.seconds(), 10.0)

    def test_client_timeout_during_delay(self) -> None:
        self.faults.inject(FaultKind.DELAY, delay=30)
        d = self.get("a.test", "b.test", timeout=10, reactor=self.clock)
        self.network.advance(10)  # treq's 10 s timeout fires before the 30 s delay
        self.assertTimedOut(d)
        self.assertEqual((self.echo.calls, self.network.log[0].deliveries), ([], 0))
        self.assertEqual((self.network.open_connections(), self.clock.getDelayedCalls()), (0, []))

    def test_blackhole_until_client_timeout(self) -> None:
        self.faults.inject(FaultKind.BLACKHOLE)
        d = self.get("a.test", "b.test", timeout=10, reactor=self.clock)
        self.network.flush()
        self.clock.advance(9)  # not yet treq's 10 s timeout
        self.network.flush()
        self.assertNoResult(d)
        self.clock.advance(1)  # treq's 10 s timeout cancels the request
        self.network.flush()
        self.assertTimedOut(d)
        self.assertEqual(self.echo.calls, [])
        self.assertEqual((self.network.open_connections(), self.clock.getDelayedCalls()), (0, []))
        self.assertEqual(self.faults.counters, {"blackhole": 1})

    def test_blackhole_without_timeout_waits_forever(self) -> None:
        self.faults.inject(FaultKind.BLACKHOLE)
        d = self.get("a.test", "b.test")
        self.network.advance(3600)  # nothing is scheduled: an hour passes
        self.assertNoResult(d)
        self.assertEqual(self.network.open_connections(), 1)

    def test_lose_response_after_processing(self) -> None:
        self.faults.inject(FaultKind.LOSE_RESPONSE)
        d = self.clients["a.test"].put("https://b.test/txn/1", json={"n": 1})
        self.network.flush()
        failure = self.failureResultOf(d, ResponseNeverReceived)
        self.assertTrue(failure.value.reasons[0].check(ConnectionLost))
        self.assertEqual(self.echo.calls, [(b"PUT", {"n": 1})])
        self.assertEqual(self.network.log[0].status, 201)
        self.assertEqual(self.network.open_connections(), 0)

    def put_with_timeout(self, seconds: float) -> Deferred[_Response]:
        # treq types reactor= as its own _ITreqReactor, which no Clock declares.
        timeout: dict[str, Any] = {"timeout": seconds, "reactor": self.clock}
        return self.clients["a.test"].put("https://b.test/txn/1", json={"n": 1}, **timeout)

    def test_slow_response_past_client_timeout(self) -> None:
        self.faults.inject(FaultKind.SLOW_RESPONSE, delay=30)
        d = self.put_with_timeout(10)
        self.network.flush()
        # the server did the work at once; its answer is on its way
        self.assertEqual(self.echo.calls, [(b"PUT", {"n": 1})])
        self.network.advance(10)  # treq's 10 s timeout fires before the answer
        self.assertTimedOut(d)
        record = self.network.log[0]
        self.assertEqual((record.status, record.abandoned, record.fault), (201, True, "slow_response"))
        self.assertEqual((self.network.open_connections(), self.clock.getDelayedCalls()), (0, []))

    def test_slow_response_within_client_timeout(self) -> None:
        self.faults.inject(FaultKind.SLOW_RESPONSE, delay=3)
        d = self.put_with_timeout(10)
        self.network.advance(2.9)
        self.assertNoResult(d)
        self.network.advance(0.1)
        self.assertEqual(self.successResultOf(d).code, 201)
        self.assertFalse(self.network.log[0].abandoned)
        self.assertEqual((self.network.open_connections(), self.clock.getDelayedCalls()), (0, []))

    def test_scripted_filters(self) -> None:
        self.faults.inject(FaultKind.REFUSE, origin="b.test", times=2)
        self.assertReachable("a.test", "b.test")
        self.assertRefused("b.test", "a.test")
        self.assertRefused("b.test", "b.test")
        self.assertReachable("b.test", "a.test")

    def test_stop_ends_every_fault(self) -> None:
        self.faults.partition({"a.test"}, {"b.test"})
        self.faults.take_down("c.test")
        self.faults.inject(FaultKind.REFUSE)
        self.faults.probabilities[FaultKind.REFUSE] = 1.0
        self.faults.stop()
        self.assertReachable("a.test", "b.test")
        self.assertReachable("b.test", "c.test")

    def test_bad_plans(self) -> None:
        self.assertRaises(ValueError, FaultPlan, refuse=0.6, delay=0.6)
        self.assertRaises(ValueError, FaultPlan, duplicate=-0.1)
        self.assertRaises(ValueError, FaultPlan, delay_range=(5, 1))
        self.assertRaises(ValueError, FaultPlan, slow_response_range=(-1, 1))
        self.assertRaises(ValueError, self.faults.inject, FaultKind.SLOW_RESPONSE)
        self.assertRaises(ValueError, self.faults.inject, FaultKind.PARTITION)
        self.assertRaises(ValueError, self.faults.inject, FaultKind.DELAY)
        self.assertRaises(ValueError, self.faults.partition, {"a.test"})


def _random_run(seed: int) -> tuple[list[tuple[str, str | None, int]], dict[str, int]]:
    """60 requests through a plan with every random fault; what happened."""
    clock = Clock()
    plan = FaultPlan(
        seed,
        refuse=0.1,
        blackhole=0.1,
        lose_response=0.1,
        duplicate=0.1,
        delay=0.1,
        delay_range=(1, 4),
        slow_response=0.1,
        slow_response_range=(2, 8),
    )
    network = FakeNetwork(clock, plan)
    echo = _Echo()
    network.add_server("b.test", echo)
    http = HTTPClient(network.agent_for("a.test"))
    # treq types reactor= as its own _ITreqReactor, which no Clock declares.
    timeout: dict[str, Any] = {"timeout": 5, "reactor": clock}
    for i in range(60):
        d = http.put(f"https://b.test/txn/{i}", json={"i": i}, **timeout)
        d.addErrback(lambda f: None)
        network.advance(8)  # every delay and slow response (<= 8 s), the 5 s timeout
    events = [(r.path, r.fault, r.deliveries) for r in network.log]
    assert len(echo.calls) == sum(r.deliveries for r in network.log)
    return events, dict(plan.counters)


class SeedTests(SynchronousTestCase):
    def test_same_seed_same_faults(self) -> None:
        events, counters = _random_run(7)
        self.assertEqual(_random_run(7), (events, counters))
        self.assertEqual(
            set(counters),
            {"refuse", "blackhole", "lose_response", "duplicate", "delay", "slow_response"},
        )
        self.assertEqual(sum(counters.values()), sum(1 for e in events if e[1]))

    def test_other_seed_other_faults(self) -> None:
        self.assertNotEqual(_random_run(7)[0], _random_run(8)[0])

    def test_report(self) -> None:
        plan = FaultPlan()
        self.assertEqual(plan.report(), "faults: none")
        plan.counters.update({"duplicate": 1, "delay": 3})
        self.assertEqual(plan.report(), "faults: delay=3 duplicate=1")


class RequestLogTests(SynchronousTestCase):
    def test_filters(self) -> None:
        clock = Clock()
        network = FakeNetwork(clock)
        network.add_server("b.test", _Echo())
        network.add_server("c.test", _Echo())
        http = HTTPClient(network.agent_for("a.test"))
        devices = "/_matrix/federation/v1/user/devices/"
        self.assertEqual(network.requests(path_prefix=devices), [])
        http.get("https://b.test" + devices + "@u:b.test")
        http.get("https://b.test" + devices + "@v:b.test")
        http.put("https://c.test/_matrix/federation/v1/send/1", json={})
        self.failureResultOf(http.get("https://d.test/"), ConnectionRefusedError)
        network.flush()
        self.assertEqual(len(network.requests(path_prefix=devices)), 2)
        self.assertEqual(len(network.requests(destination="c.test", method="PUT")), 1)
        self.assertEqual(
            [(r.destination, r.status, r.refused) for r in network.requests(origin="a.test")],
            [("b.test", 200, False), ("b.test", 200, False), ("c.test", 201, False), ("d.test", None, True)],
        )
        self.assertEqual(network.requests(origin="b.test"), [])
