"""Benchmark: serving a local user with 10,000 devices over federation.

Not a test.  Builds a SQLite store (in a temporary directory) holding one
user with ``--devices`` devices, each with device keys of realistic size, and
a small user with three; serves them with the plugin's real federation
resource (X-Matrix authentication included) on a loopback HTTP listener on
the real reactor, encoding big answers in the reactor's thread pool as a host
would (``--inline``: on the reactor thread).  A second process (this script
with ``--client``) is the remote server; it measures

(a) ``GET /_matrix/federation/v1/user/devices/{big user}``, one at a time;
(b) the latency of small requests (``/user/devices`` of the small user),
    first on an idle server, then issued every ``--interval`` seconds while
    ``--concurrent-big`` big requests run back to back.

The server measures, for each phase, the longest time its reactor was kept
from running a 5 ms timer (its "stall"), and, in-process, where the time of
one big answer goes (the store's transaction, the encoding).

``--cross-signed`` gives every device of the big user a self-signing
signature, which must be merged into its keys when served (the slow path:
those keys are decoded and re-encoded).  ``--no-cache`` turns off the
handler's cache of big answers, so that every big request reads and encodes
the whole list (what the first request after each change costs).

Run from the repository root:

    . .venv/bin/activate   # the venv `make test` builds
    python bench/bench_local_devices.py [--devices 10000] [--cross-signed] [--inline]

See bench/README.md for numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Optional
from urllib.parse import quote

# runnable as a script from anywhere: the repository root is importable
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import treq  # noqa: E402
from canonicaljson import encode_canonical_json
from signedjson.key import (
    decode_signing_key_base64,
    encode_signing_key_base64,
    generate_signing_key,
    get_verify_key,
)
from signedjson.types import VerifyKey
from twisted.internet import defer, task, utils
from twisted.internet.defer import Deferred, succeed
from twisted.python.threadpool import ThreadPool
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.server import Site

from devicelist_plugin.federation.auth import FederationAuthenticator
from devicelist_plugin.federation.local_endpoints import LocalDeviceEndpoints
from devicelist_plugin.federation.resource import JsonResource
from devicelist_plugin.federation.xmatrix import build_authorization_header
from devicelist_plugin.local.handler import (
    DEFAULT_ANSWER_CACHE_BYTES,
    LocalDeviceHandler,
    run_inline,
    thread_pool_runner,
)
from devicelist_plugin.local.serving import encode_user_devices_body
from devicelist_plugin.membership import InMemoryMembership
from devicelist_plugin.storage import Store, open_sqlite_store
from devicelist_plugin.storage.codec import dumps
from devicelist_plugin.storage.types import CrossSigningSignature
from devicelist_plugin.storage.engines import Txn

SERVER = "b.bench"
ORIGIN = "a.bench"
BIG = "@big:b.bench"
SMALL = "@small:b.bench"


class OneKey:
    def __init__(self, key: VerifyKey) -> None:
        self.key = key

    def get_verify_key(self, server_name: str, key_id: str, at_ms: int) -> "Deferred[Optional[VerifyKey]]":
        return succeed(self.key if (server_name, key_id) == (ORIGIN, "ed25519:a_1") else None)


def fake_b64(seed: int, length: int = 43) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    out, n = [], seed * 2654435761 + 12345
    for _ in range(length):
        n = (n * 6364136223846793005 + 1442695040888963407) % 2**64
        out.append(alphabet[n >> 58])
    return "".join(out)


def device_keys(user_id: str, device_id: str, i: int) -> dict[str, Any]:
    """A DeviceKeys object of the usual size (about 450 bytes)."""
    return {
        "user_id": user_id,
        "device_id": device_id,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": {
            f"curve25519:{device_id}": fake_b64(2 * i),
            f"ed25519:{device_id}": fake_b64(2 * i + 1),
        },
        "signatures": {user_id: {f"ed25519:{device_id}": fake_b64(3 * i, 86)}},
    }


def populate(store: Store, user_id: str, count: int) -> "Deferred[None]":
    """Insert ``count`` devices with keys in one transaction (setup, not measured:
    the handler would take one transaction per device and per key upload)."""
    devices = [(user_id, f"DEV{i:06d}", f"Device {i}", 1_700_000_000_000) for i in range(count)]
    keys = [
        (user_id, device_id, dumps(device_keys(user_id, device_id, i)), 1_700_000_000_000)
        for i, (_, device_id, _, _) in enumerate(devices)
    ]

    def txn(t: Txn) -> None:
        t.insert_many("local_devices", ("user_id", "device_id", "display_name", "created_ts"), devices)
        t.insert_many("local_device_keys", ("user_id", "device_id", "keys_json", "updated_ts"), keys)
        t.execute(
            "INSERT INTO local_stream_positions (user_id, pos) VALUES (?, ?)", (user_id, 2 * count)
        )

    return store.database.run("populate", txn)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[index]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.1f}"


class StallMeter:
    """Records how late a 5 ms LoopingCall runs: how long the reactor was busy."""

    def __init__(self, reactor: Any, interval: float = 0.005) -> None:
        self.interval = interval
        self.ticks: list[tuple[float, float]] = []  # (wall clock time, lateness)
        self.last = 0.0
        self.loop = task.LoopingCall(self._tick)
        self.loop.clock = reactor

    def _tick(self) -> None:
        now = time.perf_counter()
        if self.last:
            self.ticks.append((time.time(), max(0.0, now - self.last - self.interval)))
        self.last = now

    def start(self) -> None:
        self.loop.start(self.interval)

    def stop(self) -> None:
        self.loop.stop()

    def worst(self, start: float, end: float) -> float:
        return max((late for at, late in self.ticks if start <= at <= end), default=0.0)


# --------------------------------------------------------------------------
# the load generator: a separate process, so that receiving 5 MB answers
# does not compete with the server for its interpreter


async def client(reactor: Any, args: argparse.Namespace) -> None:
    a_key = decode_signing_key_base64("ed25519", "a_1", args.client_key)
    base = f"http://127.0.0.1:{args.client}"
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 16
    http = treq.client.HTTPClient(Agent(reactor, pool=pool))

    async def get_devices(user_id: str) -> tuple[float, bytes]:
        path = "/_matrix/federation/v1/user/devices/" + quote(user_id, safe="")
        header = build_authorization_header(a_key, ORIGIN, SERVER, "GET", path, None)
        t0 = time.perf_counter()
        response = await http.get(base + path, headers=Headers({b"Authorization": [header]}))
        body = await treq.content(response)
        elapsed = time.perf_counter() - t0
        if response.code != 200:
            raise RuntimeError(f"{response.code}: {body[:200]!r}")
        return elapsed, body

    phases: dict[str, Any] = {}

    def phase(name: str, start: float, latencies: list[float]) -> None:
        phases[name] = {"start": start, "end": time.time(), "latencies": latencies}

    first, body = await get_devices(BIG)  # also fills the answer cache, if any
    phases["first"] = {"latencies": [first]}
    size = len(body)
    devices = len(json.loads(body)["devices"])

    start = time.time()
    phase("big", start, [(await get_devices(BIG))[0] for _ in range(args.repeat)])

    start = time.time()
    phase("idle", start, [(await get_devices(SMALL))[0] for _ in range(args.small)])

    done = False
    big_during: list[float] = []

    async def big_loop() -> None:
        while not done:
            big_during.append((await get_devices(BIG))[0])

    loops = [defer.ensureDeferred(big_loop()) for _ in range(args.concurrent_big)]
    await task.deferLater(reactor, 0.05, lambda: None)
    start = time.time()
    small_during: list[float] = []
    pending: list[Deferred[Any]] = []
    for _ in range(args.small):
        pending.append(
            defer.ensureDeferred(get_devices(SMALL)).addCallback(
                lambda result: small_during.append(result[0])
            )
        )
        await task.deferLater(reactor, args.interval, lambda: None)
    await defer.gatherResults(pending)
    phase("load", start, small_during)
    done = True
    await defer.gatherResults(loops)
    phases["load_big"] = {"latencies": big_during}
    await pool.closeCachedConnections()
    print(json.dumps({"size": size, "devices": devices, "phases": phases}))


# --------------------------------------------------------------------------
# the server


async def run(reactor: Any, args: argparse.Namespace) -> None:
    directory = tempfile.mkdtemp(prefix="devicelist-bench-")
    store = await open_sqlite_store(os.path.join(directory, "bench.db"), reactor)
    try:
        await bench(reactor, store, args)
    finally:
        await store.close()


async def bench(reactor: Any, store: Store, args: argparse.Namespace) -> None:
    started = time.perf_counter()
    await populate(store, BIG, args.devices)
    if args.cross_signed:
        signatures = [
            CrossSigningSignature(BIG, "ed25519:SSK", BIG, f"DEV{i:06d}", fake_b64(7 * i, 86))
            for i in range(args.devices)
        ]
        await store.store_signatures(BIG, signatures, 1_700_000_000_000, ())
    if args.inline:
        runner = run_inline
    else:
        # one thread: encoding is CPU-bound, more threads would only fight
        # the reactor thread for the interpreter
        encoder_pool = ThreadPool(minthreads=1, maxthreads=args.encoder_threads, name="encode")
        encoder_pool.start()
        reactor.addSystemEventTrigger("during", "shutdown", encoder_pool.stop)
        runner = thread_pool_runner(reactor, encoder_pool)
    handler = LocalDeviceHandler(
        SERVER,
        store,
        InMemoryMembership(SERVER),
        reactor,
        allow_device_name_lookup_over_federation=True,
        cpu_runner=runner,
        answer_cache_bytes=0 if args.no_cache else DEFAULT_ANSWER_CACHE_BYTES,
    )
    for i in range(3):
        await handler.create_device(SMALL, f"S{i}", f"small {i}")
        await handler.upload_device_keys(SMALL, f"S{i}", device_keys(SMALL, f"S{i}", i))
    print(f"setup: {args.devices} devices in {time.perf_counter() - started:.1f} s", file=sys.stderr)

    a_key = generate_signing_key("a_1")
    resource = JsonResource(
        authenticator=FederationAuthenticator(SERVER, OneKey(get_verify_key(a_key)), reactor)
    )
    LocalDeviceEndpoints(handler).register(resource)
    port = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")

    stall = StallMeter(reactor)
    stall.start()
    out, err, code = await utils.getProcessOutputAndValue(
        sys.executable,
        [
            os.path.abspath(__file__),
            "--client", str(port.getHost().port),
            "--client-key", encode_signing_key_base64(a_key),
            "--repeat", str(args.repeat),
            "--small", str(args.small),
            "--interval", str(args.interval),
            "--concurrent-big", str(args.concurrent_big),
        ],
        env=os.environ,
    )
    stall.stop()
    await port.stopListening()
    if code != 0:
        raise RuntimeError(f"load generator failed ({code}): {err.decode()}")
    result = json.loads(out)
    assert result["devices"] == args.devices, result["devices"]
    phases = result["phases"]

    rows: list[tuple[str, str, str, str, str]] = []

    def row(label: str, values: list[float], window: Optional[dict[str, Any]] = None) -> None:
        stalled = "" if window is None else ms(stall.worst(window["start"], window["end"]))
        rows.append(
            (label, ms(min(values)), ms(statistics.median(values)), ms(max(values)), stalled)
        )

    big = phases["big"]
    label = f"GET /user/devices, {args.devices} devices ({result['size'] / 1e6:.1f} MB)"
    row(f"{label}, first", phases["first"]["latencies"])
    row(f"{label}, again", big["latencies"], big)

    # where the time goes, in-process
    reads, encodes = [], []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        snapshot = await store.get_user_devices_snapshot(BIG, ORIGIN)
        t1 = time.perf_counter()
        encoded = encode_user_devices_body(snapshot, include_display_names=True)
        t2 = time.perf_counter()
        reads.append(t1 - t0)
        encodes.append(t2 - t1)
    assert encode_canonical_json(json.loads(encoded)) == encoded
    where = "reactor thread" if args.inline else "worker thread"
    row("  store read + record (database thread)", reads)
    row(f"  encode answer ({where})", encodes)

    row("GET /user/devices, 3 devices, idle", phases["idle"]["latencies"], phases["idle"])
    row(f"GET /user/devices, 3 devices, {args.concurrent_big} big in flight",
        phases["load"]["latencies"], phases["load"])
    row("  (the big requests meanwhile)", phases["load_big"]["latencies"])

    header = ("request", "min ms", "median ms", "max ms", "stall ms")
    width = max(len(r[0]) for r in rows + [header])
    print(f"{header[0]:<{width}}  {header[1]:>8}  {header[2]:>9}  {header[3]:>8}  {header[4]:>8}")
    for label, low, mid, high, stalled in rows:
        print(f"{label:<{width}}  {low:>8}  {mid:>9}  {high:>8}  {stalled:>8}")
    idle, load = phases["idle"]["latencies"], phases["load"]["latencies"]
    print(
        f"\nsmall requests: p95 {percentile(idle, 95) * 1000:.1f} ms idle, "
        f"{percentile(load, 95) * 1000:.1f} ms with big ones in flight "
        f"({len(phases['load_big']['latencies'])} big answers served meanwhile)"
    )


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5, help="big requests in (a)")
    parser.add_argument("--small", type=int, default=100, help="small requests in each (b) run")
    parser.add_argument("--interval", type=float, default=0.005, help="seconds between small requests")
    parser.add_argument("--concurrent-big", type=int, default=2, help="big requests in flight in (b)")
    parser.add_argument(
        "--cross-signed",
        action="store_true",
        help="every big-user device carries a self-signing signature (merged when served)",
    )
    parser.add_argument(
        "--inline", action="store_true", help="encode on the reactor thread (no cpu_runner)"
    )
    parser.add_argument("--encoder-threads", type=int, default=1, help="threads encoding answers")
    parser.add_argument(
        "--no-cache",
        action="store_true",
        help="no answer cache: every big request reads and encodes the whole list",
    )
    parser.add_argument("--client", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--client-key", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    def go(reactor: Any) -> "Deferred[None]":
        if args.client is not None:
            return defer.ensureDeferred(client(reactor, args))
        return defer.ensureDeferred(run(reactor, args))

    task.react(go)


if __name__ == "__main__":
    main()

