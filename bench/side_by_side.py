"""Side-by-side benchmarks: our standalone server against Synapse.

Not a test.  The same workload runs against both servers (each a real
process on loopback, SQLite, started by the ``interop`` harness) in one run
on one machine, and the script prints, per figure, ours, Synapse's and the
ratio, and writes everything as JSON.  Scenarios (``--only``, repeatable):

``serve``
    ``GET /user/devices`` and ``POST /user/keys/query`` of a local user with
    10 devices, signed (one precomputed X-Matrix header per request kind),
    driven by ``wrk`` at concurrency 1 and 16: requests/s, p50, p99; each
    run ``--rounds`` times (3), the two servers alternating, and each figure
    the median of its rounds (the machine's noise moves single runs by a
    quarter).
``inbound``
    A fake origin server (``bench/fake_peer.py``) whose 200 users share a
    room with the target's local user (ours: admin API; Synapse:
    ``make_join``/``send_join``).  Priming: one EDU per user with
    ``prev_id: []`` (one resync each, reported apart).  Then 20,000 chained
    ``m.device_list_update`` EDUs (100 per user, round-robin over the users)
    in 200 signed transactions of 100, sent one after the other; measured
    until the target's client ``/keys/query`` shows every user's last
    change.  EDUs applied/s, the server's CPU time per EDU,
    ``/user/devices`` fetches the fake peer served meanwhile (resyncs), RSS
    and database growth.
``latency``
    A client logs in a new device, then uploads its keys; time from the
    upload request to the EDU carrying the keys arriving at the fake peer
    (20 times, median).
``fanout``
    One new device of a user sharing a room with users of 100 fake servers
    (one process, 100 TLS listeners): time from the login to all 100 having
    the EDU.
``big``
    A local user with 10,000 devices (seeded into the database): time of
    ``GET /user/devices``; and a remote user with 10,000 devices: time from
    the EDU that makes the target resync it to its ``/keys/query`` showing
    its last device (polled every 0.25 s, one device asked for).

Both servers run throughout; the one not being measured is idle.  The serve
runs of the two alternate.  ``--database postgres`` puts both on one
throwaway PostgreSQL cluster (``initdb``/``pg_ctl`` as for the tests, Unix
socket only, the server's durable defaults), a database each, instead of
SQLite; psycopg2 is then installed into the Synapse virtualenv if missing.  ``--profile DIR`` records the servers with
``py-spy`` during the inbound run, the concurrency-16 serve runs and the big
resync (collapsed stacks).

Run from the repository root (needs ``wrk`` and a Synapse virtualenv, see
``interop/synapse.py``)::

    python bench/side_by_side.py [--only serve] [--seconds 10] [--database postgres] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Optional, Sequence
from urllib.parse import quote

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from signedjson.key import generate_signing_key  # noqa: E402
from signedjson.types import SigningKey  # noqa: E402

from bench.fake_peer import ChainedUser, FakeServer, ReactorThread, start_servers  # noqa: E402
from bench.load import SignedSender, run_wrk  # noqa: E402
from bench.targets import (  # noqa: E402
    PASSWORD,
    OursTarget,
    PostgresDatabase,
    SynapseTarget,
    Target,
    cpu_seconds,
    rss_kb,
)
from interop.common import wait_until  # noqa: E402
from interop.synapse import synapse_python  # noqa: E402
from tests.storage.pgcluster import start_cluster  # noqa: E402

SCENARIOS = ("serve", "inbound", "latency", "fanout", "big")
# PostgreSQL's durable defaults (fsync, synchronous_commit), no TCP listener
BENCH_POSTGRES_OPTIONS = "-c listen_addresses='' -c max_connections=200"


def ensure_synapse_psycopg2() -> None:
    """Synapse's PostgreSQL driver in its virtualenv (the interop harness
    installs Synapse for SQLite only)."""
    python = synapse_python()
    if subprocess.run([python, "-c", "import psycopg2"], capture_output=True).returncode != 0:
        log("installing psycopg2-binary into the Synapse virtualenv")
        subprocess.run([python, "-m", "pip", "install", "--quiet", "psycopg2-binary"], check=True)
Results = dict[str, Any]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- serve ----------------------------------------------------------------------


def scenario_serve(targets: Sequence[Target], peer: FakeServer,
                   args: argparse.Namespace) -> dict[str, Results]:
    """Both targets' runs interleaved (ours, Synapse, ours, ...), so that a
    change in the machine's load hits both alike."""
    plans = []
    for target in targets:
        user_id, _ = target.new_user("ten", 10)
        sender = SignedSender(peer.signing_key, peer.server_name, target.server_name,
                              target.server.federation_port)
        requests: dict[str, tuple[str, str, Any]] = {
            "user_devices": (
                "GET", f"/_matrix/federation/v1/user/devices/{quote(user_id, safe='')}", None),
            "keys_query": ("POST", "/_matrix/federation/v1/user/keys/query",
                           {"device_keys": {user_id: []}}),
        }
        prepared = {}
        for name, (method, uri, content) in requests.items():
            body, headers = sender.prepare(method, uri, content)
            status, answer = sender.send(method, uri, body, headers)  # warm-up, key fetch
            if status != 200:
                raise RuntimeError(f"{target.label} {name}: {status} {answer}")
            prepared[name] = (method, uri, body, headers)
        sender.close()
        plans.append((target, prepared))
    out: dict[str, Results] = {t.label: {} for t in targets}
    for name in ("user_devices", "keys_query"):
        for c, threads in ((1, 1), (16, 2)):
            rounds: dict[str, list[dict[str, Any]]] = {t.label: [] for t, _ in plans}
            for round_ in range(args.rounds):
                for target, prepared in plans:
                    method, uri, body, headers = prepared[name]
                    url = f"https://127.0.0.1:{target.server.federation_port}{uri}"
                    profile = args.profile if c == 16 and round_ == 0 else None
                    with Profiler(profile, target, f"{name}-c16"):
                        r = run_wrk(url, method, body, headers, c, args.seconds, threads)
                    log(f"{target.label} {name} c={c}: {r.rps:.0f} req/s p50 {r.p50_ms:.2f} ms "
                        f"p99 {r.p99_ms:.2f} ms non-2xx {r.non_2xx} errors {r.socket_errors}")
                    rounds[target.label].append(r.as_json())
            for label, runs in rounds.items():
                out[label][f"{name}_c{c}"] = _median_run(runs)
    return out


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure's median over the rounds (and every round's, under ``rounds``)."""
    merged: dict[str, Any] = {
        key: statistics.median(run[key] for run in runs)
        for key in ("rps", "p50_ms", "p99_ms")
    }
    merged["non_2xx"] = sum(run["non_2xx"] for run in runs)
    merged["socket_errors"] = sum(run["socket_errors"] for run in runs)
    merged["rounds"] = runs
    return merged


class Profiler:
    """``py-spy record`` of the target process while the block runs (when
    ``directory`` is set): collapsed stacks in ``<directory>/<target>-<name>.txt``.
    With ``--profile-gil``, only the thread holding the GIL is sampled: the
    stacks then add up to the process's Python CPU time."""

    gil_only = False

    def __init__(self, directory: Optional[str], target: Target, name: str) -> None:
        self.path = (None if directory is None
                     else os.path.join(directory, f"{target.label}-{name}.txt"))
        self.pid = target.pid
        self.process: Optional[subprocess.Popen[bytes]] = None

    def __enter__(self) -> "Profiler":
        if self.path is not None and self.pid is not None:
            self.process = subprocess.Popen(
                ["py-spy", "record", "--pid", str(self.pid), "--format", "raw", "--rate", "200",
                 "--threads", "--output", self.path, *(["--gil"] if self.gil_only else [])],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            time.sleep(1)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            os.kill(self.process.pid, signal.SIGINT)
            self.process.wait(timeout=60)


# -- inbound ----------------------------------------------------------------------


def _send_all(sender: SignedSender, peer: FakeServer, edus: list[tuple[ChainedUser, int]],
              per_txn: int, txn_prefix: str) -> None:
    """Send EDUs in transactions of ``per_txn``, precomputed, one at a time;
    each user's change is published by the fake peer before it is sent."""
    prepared = []
    for i in range(0, len(edus), per_txn):
        chunk = edus[i:i + per_txn]
        uri = f"/_matrix/federation/v1/send/{txn_prefix}{i // per_txn}"
        content = {
            "origin": peer.server_name,
            "origin_server_ts": int(time.time() * 1000),
            "pdus": [],
            "edus": [u.edu(step) for u, step in chunk],
        }
        prepared.append((chunk, uri, *sender.prepare("PUT", uri, content)))
    for chunk, uri, body, headers in prepared:
        for u, step in chunk:
            u.publish(step)
        status, answer = sender.send("PUT", uri, body, headers)
        if status != 200:
            raise RuntimeError(f"/send {uri}: {status} {answer}")


def _shows(target: Target, users: Sequence[ChainedUser], step: int) -> Callable[[], bool]:
    """Whether the target's ``/keys/query`` shows every user's change ``step``."""

    def probe() -> bool:
        answer = target.query_keys([u.user_id for u in users])
        for u in users:
            device = u.device_id(step % u.devices)
            keys = answer.get(u.user_id, {}).get(device, {}).get("keys", {})
            if keys.get(f"curve25519:{device}") != u.marker(step):
                return False
        return True

    return probe


def scenario_inbound(target: Target, peer: FakeServer, args: argparse.Namespace) -> Results:
    users = [ChainedUser(f"@r{i}-{target.label}:{peer.server_name}", 2)
             for i in range(args.users)]
    for u in users:
        peer.users[u.user_id] = u
    t = time.monotonic()
    target.share([u.user_id for u in users], peer.server_name, peer.signing_key)
    log(f"{target.label}: {len(users)} users share the room ({time.monotonic() - t:.1f} s)")
    sender = SignedSender(peer.signing_key, peer.server_name, target.server_name,
                          target.server.federation_port)
    # priming: one EDU each, prev_id [] -> one resync each
    fetches0 = peer.fetches()
    t0 = time.monotonic()
    _send_all(sender, peer, [(u, 1) for u in users], 100, f"prime-{target.label}-")
    wait_until(_shows(target, users, 1), 600, "priming", interval=0.1)
    prime_s = time.monotonic() - t0
    prime_fetches = peer.fetches() - fetches0
    log(f"{target.label}: primed in {prime_s:.2f} s, {prime_fetches} fetches")
    time.sleep(1)
    # measured part
    steps = args.edus // len(users)
    edus = [(u, step) for step in range(2, 2 + steps) for u in users]
    last = 1 + steps
    mem0, db0, fetches0 = rss_kb(target.pid), target.db_bytes(), peer.fetches()
    cpu0 = cpu_seconds(target.pid)
    with Profiler(args.profile, target, "inbound"):
        t0 = time.monotonic()
        _send_all(sender, peer, edus, 100, f"chain-{target.label}-")
        sent_s = time.monotonic() - t0
        wait_until(_shows(target, users, last), 1800, "the last EDU applied", interval=0.05)
        elapsed = time.monotonic() - t0
    mem1, db1 = rss_kb(target.pid), target.db_bytes()
    cpu = cpu_seconds(target.pid) - cpu0
    sender.close()
    out = {
        "users": len(users),
        "edus": len(edus),
        "prime_s": prime_s,
        "prime_fetches": prime_fetches,
        "send_s": sent_s,
        "applied_s": elapsed,
        "edus_per_s": len(edus) / elapsed,
        "server_cpu_s": cpu,
        "cpu_ms_per_edu": cpu * 1000 / len(edus),
        "resyncs": peer.fetches() - fetches0,
        "rss_kb_before": mem0["rss_kb"],
        "rss_kb_after": mem1["rss_kb"],
        "peak_rss_kb": mem1["peak_rss_kb"],
        "db_bytes_before": db0,
        "db_bytes_after": db1,
        "db_growth_bytes": db1 - db0,
    }
    log(f"{target.label} inbound: {out}")
    return out


# -- latency ----------------------------------------------------------------------


def _watch(target: Target, peer: FakeServer, localpart: str) -> None:
    if localpart not in peer.users:
        watcher = ChainedUser(f"@{localpart}:{peer.server_name}", 1)
        peer.users[watcher.user_id] = watcher
        target.share([watcher.user_id], peer.server_name, peer.signing_key)


def scenario_latency(target: Target, peer: FakeServer, args: argparse.Namespace) -> Results:
    _watch(target, peer, f"watcher-{target.label}")
    samples = []
    for _ in range(args.repeat):
        token, device_id = target.server.login(target.local_user, PASSWORD)
        created = peer.arrival_of(target.local_user, device_id, False, 0.0)
        peer.wait_for(lambda a: created(a) is not None, 10)
        time.sleep(0.2)
        t0 = time.monotonic()
        target.upload_keys(token, target.local_user, device_id)
        with_keys = peer.arrival_of(target.local_user, device_id, True, t0)
        if not peer.wait_for(lambda a: with_keys(a) is not None, 60):
            raise RuntimeError(f"{target.label}: no EDU with the keys of {device_id}")
        arrived = with_keys(peer.arrivals)
        assert arrived is not None
        samples.append((arrived - t0) * 1000)
    out = {"samples_ms": samples, "median_ms": statistics.median(samples),
           "min_ms": min(samples), "max_ms": max(samples)}
    log(f"{target.label} latency: median {out['median_ms']:.1f} ms")
    return out


# -- fan-out -------------------------------------------------------------------------


def scenario_fanout(target: Target, peers: list[FakeServer], args: argparse.Namespace) -> Results:
    user_id, _ = target.server.register("fan", PASSWORD)
    token, first = target.server.login(user_id, PASSWORD)
    room_target = target.room_id
    # the fan-out user shares the room; each fake server has one user in it
    if isinstance(target, OursTarget):
        target.server.add_member(room_target, user_id)
    else:
        target.server.client_ok("POST", f"/_matrix/client/v3/join/{quote(room_target)}", token, {})
    t = time.monotonic()
    for p in peers:
        member = ChainedUser(f"@fan-{target.label}:{p.server_name}", 1)
        p.users[member.user_id] = member
        target.share([member.user_id], p.server_name, p.signing_key)
    log(f"{target.label}: {len(peers)} servers joined ({time.monotonic() - t:.1f} s)")
    time.sleep(5)  # let the joins' own traffic settle
    t0 = time.monotonic()
    _, device_id = target.server.login(user_id, PASSWORD)
    arrivals = []
    for p in peers:
        found = p.arrival_of(user_id, device_id, False, t0)
        if not p.wait_for(lambda a: found(a) is not None, 120):
            raise RuntimeError(f"{target.label}: {p.server_name} never got {device_id}")
        at = found(p.arrivals)
        assert at is not None
        arrivals.append((at - t0) * 1000)
    out = {"destinations": len(peers), "all_ms": max(arrivals),
           "median_ms": statistics.median(arrivals), "first_ms": min(arrivals)}
    log(f"{target.label} fan-out: {out}")
    return out


# -- big -------------------------------------------------------------------------------


def scenario_big(target: Target, peer: FakeServer, args: argparse.Namespace) -> Results:
    out: Results = {}
    # serving: seed a local user's devices while the server is stopped
    user_id, _ = target.server.register("big", PASSWORD)
    token, device_id = target.server.login(user_id, PASSWORD)
    target.upload_keys(token, user_id, device_id)
    target.stop()
    target.seed_devices(user_id, args.big - 1, signed_device_keys_fast)
    target.start()
    sender = SignedSender(peer.signing_key, peer.server_name, target.server_name,
                          target.server.federation_port)
    uri = f"/_matrix/federation/v1/user/devices/{quote(user_id, safe='')}"
    times = []
    body, headers = sender.prepare("GET", uri, None)
    for _ in range(args.big_repeat):
        t0 = time.monotonic()
        status, raw = sender.send("GET", uri, body, headers, decode=False)
        times.append((time.monotonic() - t0) * 1000)
        answer = json.loads(raw)  # checked, not timed
        if status != 200 or len(answer["devices"]) != args.big:
            raise RuntimeError(f"{target.label}: {status}, {len(answer.get('devices', []))} devices")
    out["serve_bytes"] = len(raw)
    sender.close()
    out["serve_first_ms"] = times[0]
    out["serve_median_ms"] = statistics.median(times[1:])
    log(f"{target.label} big serve: first {times[0]:.0f} ms, then median {out['serve_median_ms']:.0f} ms")
    # resync: a remote user with many devices
    big = ChainedUser(f"@big-{target.label}:{peer.server_name}", args.big)
    peer.users[big.user_id] = big
    target.share([big.user_id], peer.server_name, peer.signing_key)
    sender = SignedSender(peer.signing_key, peer.server_name, target.server_name,
                          target.server.federation_port)

    last = big.device_id(args.big - 1)

    def complete() -> bool:
        # one device asked for, so that polling costs little: a resync
        # stores the whole list in one transaction on both servers
        answer = target.server.client_ok("POST", "/_matrix/client/v3/keys/query",
                                         target.local_token,
                                         {"device_keys": {big.user_id: [last]}})
        return last in answer.get("device_keys", {}).get(big.user_id, {})

    with Profiler(args.profile, target, "big-resync"):
        t0 = time.monotonic()
        _send_all(sender, peer, [(big, 1)], 1, f"big-{target.label}-")
        wait_until(complete, 600, "the big user resynced", interval=0.25)
        out["resync_ms"] = (time.monotonic() - t0) * 1000
    cached = target.query_keys([big.user_id]).get(big.user_id, {})
    if len(cached) != args.big:
        raise RuntimeError(f"{target.label}: {len(cached)} devices cached after the resync")
    fetched = peer.fetch_times.get(big.user_id, [])
    out["resync_fetch_started_ms"] = (fetched[0] - t0) * 1000 if fetched else None
    out["resync_fetches"] = len(fetched)
    sender.close()
    log(f"{target.label} big resync: {out['resync_ms']:.0f} ms")
    return out


def signed_device_keys_fast(user_id: str, device_id: str) -> dict[str, Any]:
    """Seeded keys: the shape of real ones, no real signature (never checked
    when served)."""
    from bench.fake_peer import device_keys

    return device_keys(user_id, device_id, device_id)


# -- driver ------------------------------------------------------------------------------


def run_all(targets: Sequence[Target], peers: list[FakeServer], only: Sequence[str],
            args: argparse.Namespace, results: Results) -> None:
    """Every scenario on every target (both servers run throughout; the one
    not measured is idle)."""
    for target in targets:
        results[target.label] = {}
        target.start()
        target.setup_room()
    peer = peers[0]
    for name in only:
        if name == "serve":
            for label, served in scenario_serve(targets, peer, args).items():
                results[label][name] = served
            continue
        for target in targets:
            log(f"{target.label}: {name}")
            if name == "inbound":
                results[target.label][name] = scenario_inbound(target, peer, args)
            elif name == "latency":
                results[target.label][name] = scenario_latency(target, peer, args)
            elif name == "fanout":
                results[target.label][name] = scenario_fanout(
                    target, peers[1:1 + args.fanout], args)
            elif name == "big":
                results[target.label][name] = scenario_big(target, peer, args)
    for target in targets:
        results[target.label]["final_rss"] = rss_kb(target.pid)


ROWS: list[tuple[str, str, str, bool]] = [
    # (label, scenario, key path, higher is better)
    ("/user/devices c=1 req/s", "serve", "user_devices_c1.rps", True),
    ("/user/devices c=1 p50 ms", "serve", "user_devices_c1.p50_ms", False),
    ("/user/devices c=1 p99 ms", "serve", "user_devices_c1.p99_ms", False),
    ("/user/devices c=16 req/s", "serve", "user_devices_c16.rps", True),
    ("/user/devices c=16 p50 ms", "serve", "user_devices_c16.p50_ms", False),
    ("/user/devices c=16 p99 ms", "serve", "user_devices_c16.p99_ms", False),
    ("/user/keys/query c=1 req/s", "serve", "keys_query_c1.rps", True),
    ("/user/keys/query c=1 p50 ms", "serve", "keys_query_c1.p50_ms", False),
    ("/user/keys/query c=1 p99 ms", "serve", "keys_query_c1.p99_ms", False),
    ("/user/keys/query c=16 req/s", "serve", "keys_query_c16.rps", True),
    ("/user/keys/query c=16 p50 ms", "serve", "keys_query_c16.p50_ms", False),
    ("/user/keys/query c=16 p99 ms", "serve", "keys_query_c16.p99_ms", False),
    ("inbound: priming 200 users, s", "inbound", "prime_s", False),
    ("inbound: priming fetches", "inbound", "prime_fetches", False),
    ("inbound: EDUs applied/s", "inbound", "edus_per_s", True),
    ("inbound: server CPU per EDU, ms", "inbound", "cpu_ms_per_edu", False),
    ("inbound: /send time of 200 txns, s", "inbound", "send_s", False),
    ("inbound: until last applied, s", "inbound", "applied_s", False),
    ("inbound: resyncs while measured", "inbound", "resyncs", False),
    ("inbound: RSS after, MB", "inbound", "rss_kb_after", False),
    ("inbound: peak RSS, MB", "inbound", "peak_rss_kb", False),
    ("inbound: database growth, MB", "inbound", "db_growth_bytes", False),
    ("key upload -> EDU at peer, median ms", "latency", "median_ms", False),
    ("key upload -> EDU at peer, max ms", "latency", "max_ms", False),
    ("fan-out to 100 servers, all, ms", "fanout", "all_ms", False),
    ("fan-out to 100 servers, median, ms", "fanout", "median_ms", False),
    ("10,000-device /user/devices, first ms", "big", "serve_first_ms", False),
    ("10,000-device /user/devices, median ms", "big", "serve_median_ms", False),
    ("10,000-device resync, ms", "big", "resync_ms", False),
]


def _get(results: Results, scenario: str, path: str) -> Optional[float]:
    value: Any = results.get(scenario)
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    if not isinstance(value, (int, float)):
        return None
    if path.endswith("_kb") or path.endswith("rss_kb_after"):
        return value / 1024
    if path.endswith("_bytes"):
        return value / 1e6
    return float(value)


def table(ours: Results, synapse: Results) -> str:
    lines = [f"| {'figure':<42} | {'ours':>10} | {'Synapse':>10} | {'ratio':>7} |",
             f"|{'-' * 44}|{'-' * 12}:|{'-' * 12}:|{'-' * 9}:|"]
    for label, scenario, path, higher in ROWS:
        a, b = _get(ours, scenario, path), _get(synapse, scenario, path)
        if a is None and b is None:
            continue
        ratio = ""
        if a is not None and b is not None and a > 0 and b > 0:
            ratio = f"{(a / b if higher else b / a):.1f}x"
        fa = "" if a is None else f"{a:,.2f}" if a < 100 else f"{a:,.0f}"
        fb = "" if b is None else f"{b:,.2f}" if b < 100 else f"{b:,.0f}"
        lines.append(f"| {label:<42} | {fa:>10} | {fb:>10} | {ratio:>7} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", choices=SCENARIOS)
    parser.add_argument("--servers", action="append", choices=("ours", "synapse"))
    parser.add_argument("--seconds", type=int, default=10, help="wrk duration per run")
    parser.add_argument("--rounds", type=int, default=3,
                        help="serve: runs per figure and server, alternating; medians reported")
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--edus", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=20, help="latency samples")
    parser.add_argument("--fanout", type=int, default=100)
    parser.add_argument("--big", type=int, default=10000)
    parser.add_argument("--big-repeat", type=int, default=6)
    parser.add_argument("--json", default="side_by_side.json")
    parser.add_argument("--profile", metavar="DIR",
                        help="py-spy the servers during the inbound run and the c=16 serve runs, "
                             "stacks into DIR")
    parser.add_argument("--profile-gil", action="store_true",
                        help="with --profile: sample only the thread holding the GIL")
    parser.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite",
                        help="both servers on SQLite (default), or both on one throwaway "
                             "PostgreSQL cluster (durable settings), a database each")
    parser.add_argument("--keep", action="store_true", help="keep the servers' directories")
    parser.add_argument("--report", metavar="JSON",
                        help="print the table of an earlier run's JSON and exit")
    args = parser.parse_args(argv)
    Profiler.gil_only = args.profile_gil
    if args.report:
        with open(args.report) as f:
            earlier = json.load(f)
        print(table(earlier.get("ours", {}), earlier.get("synapse", {})))
        print(f"started {earlier['started']}, load average before {earlier['load_before']}, "
              f"after {earlier['load_after']}")
        return
    only = args.only or list(SCENARIOS)
    kinds = args.servers or ["ours", "synapse"]

    thread = ReactorThread()
    thread.start()
    key: SigningKey = generate_signing_key("bench")
    peers = start_servers(thread, key, 1 + (args.fanout if "fanout" in only else 0))
    workdir = tempfile.mkdtemp(prefix="side-by-side-")
    results: Results = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                        "load_before": os.getloadavg(), "args": vars(args)}
    databases: dict[str, Optional[PostgresDatabase]] = {kind: None for kind in kinds}
    stop_cluster: Callable[[], None] = lambda: None
    if args.database == "postgres":
        if "synapse" in kinds:
            ensure_synapse_psycopg2()
        cluster, stop_cluster = start_cluster(BENCH_POSTGRES_OPTIONS)
        for kind in kinds:
            name, dsn = cluster.create_database()
            databases[kind] = PostgresDatabase(dsn, name)
    results["database"] = args.database
    targets: list[Target] = [
        (OursTarget if kind == "ours" else SynapseTarget)(os.path.join(workdir, kind),
                                                          databases[kind])
        for kind in kinds
    ]
    try:
        run_all(targets, peers, only, args, results)
    finally:
        for target in targets:
            target.stop()
        stop_cluster()
        results["load_after"] = os.getloadavg()
        for p in peers:
            thread.call(p.close)
        thread.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"kept {workdir}")
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print(table(results.get("ours", {}), results.get("synapse", {})))
    print(f"load average before {results['load_before']}, after {results['load_after']}")


if __name__ == "__main__":
    main()
