"""The convergence simulation's world: five complete servers (one
:class:`DeviceListModule` each, on its own SQLite file, with its own
process clock), one :class:`FakeNetwork` with a seeded :class:`FaultPlan`,
a seeded random workload, seeded crashes and restarts, and the check that
every cache equals the truth.  :mod:`tests.simulation.test_convergence`
runs it over many seeds; see its docstring for what is asserted.
"""

from __future__ import annotations

import base64
import os
import random
import shutil
from dataclasses import dataclass, field
from typing import Any, Optional, cast

from signedjson.key import decode_signing_key_base64
from signedjson.sign import sign_json
from signedjson.types import SigningKey
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from devicelist_plugin.core.backoff import BackoffPolicy
from devicelist_plugin.membership import InMemoryMembership
from devicelist_plugin.module import DeviceListModule, ModuleConfig
from devicelist_plugin.storage import Store, open_sqlite_store
from tests.helpers import FakeNetwork, FaultPlan
from tests.local.keys import MEGOLM, OLM, public_key
from tests.simulation.process import GRAVEYARD, CrashableStore, ProcessClock

NOW = 1_700_000_000
SERVERS = tuple(f"s{i}.test" for i in range(5))
USERS = tuple(f"@u{j}:{s}" for s in SERVERS for j in range(2))
ROOM = "!shared:s0.test"
POLICY = BackoffPolicy(min_interval=1, multiplier=2, max_interval=60)
RESYNC_PREFIX = "/_matrix/federation/v1/user/devices/"
SEND_PREFIX = "/_matrix/federation/v1/send/"
#: the federation client's timeout of every request the plugin makes
#: (``/send`` and resyncs): ``FederationTransportConfig.request_timeout`` and
#: ``ModuleConfig.resync_timeout``, both 30 s by default
REQUEST_TIMEOUT = 30.0
#: workload operations per seed
OPS = 60
#: probability, per workload operation, that a running server is crashed
CRASH_RATE = 0.05
#: simulated seconds a crashed server stays down
DOWNTIME = (1.0, 120.0)
#: simulated seconds allowed for convergence once the faults stop
BOUND = 30 * 60
STEP = 15
#: simulated seconds after convergence in which no federation request may
#: happen (nothing is retried forever)
QUIET = 60 * 60
#: successful resyncs allowed beyond one per (server, remote user) pair that
#: started sharing the room (the first EDU of an unknown user costs one) and
#: beyond what crashes cost (see ``Stats.crash_allowance``)
RESYNC_SLACK = 10

#: how a crash happens: between two workload steps; in the middle of the
#: server's work (at its n-th next store call: between two transactions of
#: whatever it is doing, inbound or outbound); right after a local change is
#: committed, before anything is sent
CRASH_KINDS = ("idle", "store_call", "after_commit")


def seed_list(spec: str) -> list[int]:
    """``"0-199"``, ``"7"``, ``"1,5,9-12"`` -> seeds."""
    seeds: list[int] = []
    for part in spec.split(","):
        if "-" in part:
            low, high = part.split("-")
            seeds.extend(range(int(low), int(high) + 1))
        elif part:
            seeds.append(int(part))
    return seeds


def _key(rng: random.Random, version: str) -> SigningKey:
    seed = base64.b64encode(bytes(rng.getrandbits(8) for _ in range(32))).decode()
    return decode_signing_key_base64("ed25519", version, seed)


def _named_key(rng: random.Random) -> SigningKey:
    """A key whose version is its public key (cross-signing key ids)."""
    key = _key(rng, "tmp")
    return decode_signing_key_base64(
        "ed25519", public_key(key), base64.b64encode(bytes(key)).decode()
    )


_TEMPLATE: list[str] = []


def _empty_database(case: SynchronousTestCase) -> str:
    """A migrated, empty SQLite database file to copy: migrating a new file
    costs more than a whole seed's workload."""
    if _TEMPLATE and os.path.exists(_TEMPLATE[0]):
        return _TEMPLATE[0]
    path = os.path.abspath(case.mktemp())
    store: Store = case.successResultOf(
        open_sqlite_store(path, MemoryReactorClock(), synchronous=True)
    )
    store.close()  # the last connection checkpoints the WAL into the file
    _TEMPLATE[:] = [path]
    return path


def cross_signing_upload(rng: random.Random, user_id: str) -> dict[str, Any]:
    """A ``/keys/device_signing/upload`` body: new master and self-signing keys."""
    master = _named_key(rng)
    self_signing = _named_key(rng)

    def key_json(usage: str, key: SigningKey, signer: Optional[SigningKey]) -> Any:
        pub = public_key(key)
        body = {"user_id": user_id, "usage": [usage], "keys": {f"ed25519:{pub}": pub}}
        return sign_json(body, user_id, signer) if signer is not None else body

    return {
        "master_key": key_json("master", master, None),
        "self_signing_key": key_json("self_signing", self_signing, master),
    }


def server_of(user_id: str) -> str:
    return user_id.split(":", 1)[1]


@dataclass
class Stats:
    seed: int
    changes: int = 0
    converged_after: Optional[float] = None
    resyncs: int = 0
    #: resyncs answered 200 (the others failed under faults)
    resyncs_ok: int = 0
    #: resyncs sent after the faults stopped
    resyncs_after: int = 0
    requests: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    keyless_cached: int = 0
    #: (server, remote user) pairs that started sharing the room: each costs
    #: one resync by design (the first EDU of an unknown user)
    tracking_starts: int = 0
    #: resync answers by status (None: no answer)
    resync_statuses: dict[Optional[int], int] = field(default_factory=dict)
    #: crashes by kind (CRASH_KINDS), and restarts
    crashes: dict[str, int] = field(default_factory=dict)
    restarts: int = 0
    #: timers of crashed processes cancelled with them
    timers_cancelled: int = 0
    #: requests whose client gave up (its timeout) before the answer
    abandoned: int = 0
    #: of those, requests the server had processed (it answered)
    abandoned_answered: int = 0
    #: the remote users each crashed server tracked when it crashed: a crash
    #: may cost one resync of each (a resync in flight is redone, an update
    #: held for its predecessor is resynced after the restart)
    crash_allowance: int = 0
    #: federation requests during the quiet period after convergence
    quiet_requests: list[str] = field(default_factory=list)
    #: local changes skipped because the user's server was down
    skipped: int = 0


@dataclass
class Process:
    """One incarnation of a server."""

    clock: ProcessClock
    store: CrashableStore
    module: DeviceListModule
    membership: InMemoryMembership


class Simulation:
    def __init__(self, case: SynchronousTestCase, seed: int, *, crashes: bool = True) -> None:
        self.case = case
        self.seed = seed
        self.rng = random.Random(seed)
        #: crashes are drawn from their own stream, so that the fault and
        #: workload draws do not shift when crash settings change
        self.crash_rng = random.Random(seed + 2_000_000)
        self.crash_rate = CRASH_RATE if crashes else 0.0
        self.clock = MemoryReactorClock()
        self.clock.advance(NOW)
        self.faults = FaultPlan(
            seed,
            refuse=0.04,
            blackhole=0.01,
            lose_response=0.04,
            duplicate=0.04,
            delay=0.06,
            delay_range=(0.5, 20.0),
            slow_response=0.03,
            slow_response_range=(REQUEST_TIMEOUT / 2, REQUEST_TIMEOUT * 2),
        )
        self.network = FakeNetwork(self.clock, self.faults)
        jitter_rng = random.Random(seed + 1_000_000)
        self.jitter = lambda low, high: jitter_rng.uniform(low, high)
        directory = case.mktemp()
        os.makedirs(directory)
        self.paths = {name: os.path.join(directory, f"{name}.db") for name in SERVERS}
        template = _empty_database(case)
        for path in self.paths.values():
            shutil.copyfile(template, path)
        self.keys = {name: _key(self.rng, "k1") for name in SERVERS}
        #: who is joined, as each server knows it
        self.views: dict[str, set[str]] = {name: set() for name in SERVERS}
        #: membership events a down server has not seen yet
        self.missed: dict[str, list[tuple[str, str]]] = {name: [] for name in SERVERS}
        self.procs: dict[str, Process] = {}
        self.down: dict[str, Optional[IDelayedCall]] = {}
        self.after_commit: set[str] = set()
        self.errors: list[str] = []
        #: every store opened, closed by close()
        self.stores: list[Store] = []
        for name in SERVERS:
            self._boot(name)
        self.joined: set[str] = set()
        self.devices: dict[str, set[str]] = {u: set() for u in USERS}
        self.counter = 0
        self.stats = Stats(seed)
        self.keyless_cached = 0

    # -- processes ---------------------------------------------------------

    def _boot(self, name: str) -> None:
        raw: Store = self.case.successResultOf(
            open_sqlite_store(self.paths[name], MemoryReactorClock(), synchronous=True)
        )
        # A crash here is a process crash, never a power loss: what was
        # committed is in the file whatever the fsync policy, so skip fsync.
        raw.database.pool.connect().execute("PRAGMA synchronous = OFF")
        self.stores.append(raw)
        clock = ProcessClock(self.clock)
        store = CrashableStore(raw, lambda: self.crash(name, "store_call"))
        membership = InMemoryMembership(name)
        for user in sorted(self.views[name]):
            membership.join(ROOM, user)
        module = DeviceListModule(
            name,
            [self.keys[name]],
            cast(Store, store),
            clock,
            self.network.agent_for(name, reactor=clock),
            membership,
            ModuleConfig(retry_policy=POLICY, allow_device_name_lookup_over_federation=True),
            jitter=self.jitter,
        )
        self.procs[name] = Process(clock, store, module, membership)
        self.network.add_server(name, module.root, reactor=clock)
        module.start().addErrback(self._error, f"{name} start")

    def _error(self, failure: Failure, what: str) -> None:
        self.errors.append(f"{what}: {failure.getErrorMessage()}")

    def up(self, name: str) -> bool:
        return name not in self.down

    def crash(self, name: str, kind: str) -> None:
        """Kill ``name`` now: everything not committed is lost."""
        proc = self.procs[name]
        if proc.store.dead:
            return
        proc.store.kill()
        self.stats.timers_cancelled += proc.clock.kill()
        GRAVEYARD.append((proc, self.network.crash_server(name)))
        self.stats.crashes[kind] = self.stats.crashes.get(kind, 0) + 1
        view = self.views[name]
        if any(server_of(u) == name for u in view):
            self.stats.crash_allowance += sum(1 for u in view if server_of(u) != name)
        self.after_commit.discard(name)
        proc.store.inner.close()
        delay = self.crash_rng.uniform(*DOWNTIME)
        self.down[name] = self.clock.callLater(delay, self.restart, name)

    def restart(self, name: str) -> None:
        """A new process from the same database file and signing key; then
        the host tells it the membership events it missed, in order."""
        call = self.down.pop(name)
        if call is not None and call.active():
            call.cancel()
        self.stats.restarts += 1
        self._boot(name)
        for op, user in self.missed[name]:
            self._deliver(name, op, user)
        self.missed[name] = []
        for user in USERS:
            if server_of(user) == name:
                devices = self.procs[name].store.inner.get_devices(user)
                self.devices[user] = {d.device_id for d in self.case.successResultOf(devices)}

    def restart_all(self) -> None:
        for name in sorted(self.down):
            self.restart(name)

    def maybe_crash(self) -> None:
        rng = self.crash_rng
        if rng.random() >= self.crash_rate:
            return
        running = [n for n in SERVERS if self.up(n)]
        if not running:
            return
        name = rng.choice(running)
        kind = rng.choice(CRASH_KINDS)
        if kind == "idle":
            self.crash(name, kind)
        elif kind == "store_call":
            self.procs[name].store.arm(rng.randrange(1, 40))
        else:
            self.after_commit.add(name)

    # -- the workload ------------------------------------------------------

    def settle(self, d: "Deferred[Any]") -> Any:
        self.network.flush()
        return self.case.successResultOf(d)

    def change(self, user_id: str, d: "Deferred[Any]") -> bool:
        """Let a local change run; whether it completed (its server may have
        crashed in the middle: then what it committed is what counts)."""
        name = server_of(user_id)
        if name in self.after_commit and d.called:
            self.crash(name, "after_commit")
            return False
        self.network.flush()
        if not self.up(name) and not d.called:
            return False
        self.case.successResultOf(d)
        return self.up(name)

    def local(self, user_id: str) -> Any:
        return self.procs[server_of(user_id)].module.local

    def tracked_pairs(self) -> set[tuple[str, str]]:
        return {
            (name, user)
            for name in SERVERS
            if any(server_of(u) == name for u in self.joined)
            for user in self.joined
            if server_of(user) != name
        }

    def _deliver(self, name: str, op: str, user: str) -> None:
        proc = self.procs[name]
        if op == "join":
            self.views[name].add(user)
            proc.membership.join(ROOM, user)
        else:
            self.views[name].discard(user)
            proc.membership.leave(ROOM, user)
        if proc.store.dead:
            # The process died while it handled the event (its listener hit
            # the crash point).  The host had not finished with the event
            # either, so it hands it over again after the restart, as a host
            # that resumes its event processing from a stored position does.
            if op == "join":
                self.views[name].discard(user)
            else:
                self.views[name].add(user)
            self.missed[name].insert(0, (op, user))

    def _membership(self, op: str, user: str) -> None:
        for name in SERVERS:
            if self.up(name):
                self._deliver(name, op, user)
            else:
                self.missed[name].append((op, user))

    def join(self, user_id: str) -> None:
        before = self.tracked_pairs()
        self.joined.add(user_id)
        self.stats.tracking_starts += len(self.tracked_pairs() - before)
        self._membership("join", user_id)

    def leave(self, user_id: str) -> None:
        self.joined.discard(user_id)
        self._membership("leave", user_id)

    def device_keys(self, user_id: str, device_id: str) -> dict[str, Any]:
        key = _key(self.rng, device_id)
        body = {
            "user_id": user_id,
            "device_id": device_id,
            "algorithms": [OLM, MEGOLM],
            "keys": {
                f"ed25519:{device_id}": public_key(key),
                f"curve25519:{device_id}": "cv" + public_key(_key(self.rng, "c"))[:20],
            },
        }
        signed: dict[str, Any] = sign_json(body, user_id, key)
        return signed

    def cross_signing(self, user_id: str) -> dict[str, Any]:
        return cross_signing_upload(self.rng, user_id)

    def step(self) -> None:
        rng = self.rng
        user = rng.choice(USERS)
        devices = sorted(self.devices[user])
        roll = rng.random()
        if not self.up(server_of(user)):
            # the user's server is down: nothing they can do
            self.stats.skipped += 1
            return
        local = self.local(user)
        if roll < 0.15:
            if user in self.joined:
                self.leave(user)
            else:
                self.join(user)
            return
        self.stats.changes += 1
        if roll < 0.45 or not devices:
            self.counter += 1
            device_id = f"D{self.counter}"
            d = local.create_device(user, device_id, rng.choice([None, "phone", "laptop"]))
            self.devices[user].add(device_id)
            if self.change(user, d) and rng.random() < 0.8:
                self.stats.changes += 1
                keys = self.device_keys(user, device_id)
                self.change(user, local.upload_device_keys(user, device_id, keys))
        elif roll < 0.6:
            name = f"name{rng.randrange(100)}"
            self.change(user, local.rename_device(user, rng.choice(devices), name))
        elif roll < 0.75:
            device_id = rng.choice(devices)
            self.devices[user].discard(device_id)
            self.change(user, local.delete_device(user, device_id))
        elif roll < 0.92:
            device_id = rng.choice(devices)
            keys = self.device_keys(user, device_id)
            self.change(user, local.upload_device_keys(user, device_id, keys))
        else:
            self.change(user, local.upload_cross_signing_keys(user, self.cross_signing(user)))

    def run_workload(self) -> None:
        for user in USERS:
            if self.rng.random() < 0.6:
                self.join(user)
        partition_at = self.rng.randrange(OPS // 2)
        heal_at = partition_at + self.rng.randrange(5, OPS // 2)
        for i in range(OPS):
            if i == partition_at:
                servers = list(SERVERS)
                self.rng.shuffle(servers)
                cut = self.rng.randrange(1, len(servers))
                self.faults.partition(servers[:cut], servers[cut:])
            if i == heal_at:
                self.faults.heal()
            self.maybe_crash()
            self.step()
            self.network.advance(self.rng.uniform(0, 6))

    # -- the check ---------------------------------------------------------

    def truth(self, user_id: str) -> Any:
        """What other servers must see of the user: the devices that have
        keys (names included), and the master and self-signing keys; and the
        ids of the devices without keys."""
        home = self.procs[server_of(user_id)].module
        devices = self.settle(home.store.get_devices(user_id))
        cross = self.settle(home.store.get_cross_signing_keys(user_id))
        keyed = sorted(
            (d.device_id, d.display_name, d.keys_json["keys"])
            for d in devices
            if d.keys_json is not None
        )
        keyless = {d.device_id for d in devices if d.keys_json is None}
        return (
            keyed,
            {
                usage: key.get("keys")
                for usage, key in cross.items()
                if usage in ("master", "self_signing")
            },
        ), keyless

    def cached(self, module: DeviceListModule, user_id: str) -> Any:
        cache = self.settle(module.store.get_remote_cache(user_id))
        keyed = sorted(
            (d.device_id, d.display_name, dict(d.keys.keys))
            for d in cache.devices
            if d.keys is not None
        )
        keyless = {d.device_id for d in cache.devices if d.keys is None}
        stale = cache.state is not None and cache.state.stale_generation > cache.state.cleared_generation
        return (
            keyed,
            {
                usage: dict(key.keys)
                for usage, key in cache.cross_signing_keys.items()
                if usage in ("master", "self_signing")
            },
        ), keyless, stale

    def differences(self) -> list[str]:
        """Every (server, remote user sharing the room with one of its users)
        whose cache differs from the truth: the devices with keys, their names
        and keys, the cross-signing keys; a cached keyless device must be a
        real keyless device (no ghost of a deleted one); the user must not be
        left stale."""
        problems = []
        truths = {u: self.truth(u) for u in USERS}
        self.keyless_cached = 0
        for name, proc in self.procs.items():
            if not any(server_of(u) == name for u in self.joined):
                continue
            for user in sorted(self.joined):
                if server_of(user) == name:
                    continue
                expected, real_keyless = truths[user]
                got, keyless, stale = self.cached(proc.module, user)
                self.keyless_cached += len(keyless)
                if got != expected:
                    problems.append(f"{name} caches {user}: {got!r} != {expected!r}")
                if not keyless <= real_keyless:
                    problems.append(
                        f"{name} caches {user}: ghost keyless devices {sorted(keyless - real_keyless)}"
                    )
                if stale:
                    problems.append(f"{name} still has {user} stale")
        return problems

    def converge(self) -> list[str]:
        """Stop the faults (restart every crashed server, disarm pending
        crashes), then wait for every cache to equal the truth."""
        self.faults.stop()
        self.crash_rate = 0.0
        self.after_commit.clear()
        for proc in self.procs.values():
            proc.store.disarm()
        self.restart_all()
        start = self.clock.seconds()
        problems = self.differences()
        while problems and self.clock.seconds() - start < BOUND:
            self.network.advance(STEP)
            problems = self.differences()
        if not problems:
            self.stats.converged_after = self.clock.seconds() - start
            # still equal a while later (nothing undoes it)
            self.network.advance(5 * 60)
            problems = self.differences()
            # then nothing more is sent: no retry goes on forever
            before = len(self.network.log)
            self.network.advance(QUIET)
            self.stats.quiet_requests = [
                f"{r.origin}->{r.destination} {r.method} {r.path}"
                for r in self.network.log[before:]
            ]
        self._collect(start)
        return problems + self.errors

    def _collect(self, start: float) -> None:
        resyncs = self.network.requests(path_prefix=RESYNC_PREFIX)
        self.stats.resyncs = len(resyncs)
        self.stats.resyncs_ok = sum(1 for r in resyncs if r.status == 200)
        self.stats.resyncs_after = sum(1 for r in resyncs if r.sent_at >= start)
        statuses: dict[Optional[int], int] = {}
        for r in resyncs:
            statuses[r.status] = statuses.get(r.status, 0) + 1
        self.stats.resync_statuses = statuses
        self.stats.requests = len(self.network.log)
        self.stats.abandoned = sum(1 for r in self.network.log if r.abandoned)
        self.stats.abandoned_answered = sum(
            1 for r in self.network.log if r.abandoned and r.status is not None
        )
        self.stats.faults = dict(self.faults.counters)
        self.stats.keyless_cached = self.keyless_cached

    def stop(self) -> list[Any]:
        """Stop every module; the delayed calls left (none, if all is well)."""
        for proc in self.procs.values():
            self.settle(proc.module.stop())
        self.network.flush()
        return list(self.clock.getDelayedCalls())

    def close(self) -> None:
        """Close every database (a soak opens thousands)."""
        for store in self.stores:
            store.close()
        self.stores = []
