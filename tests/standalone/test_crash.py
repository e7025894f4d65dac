"""Crash test: three standalone servers as real processes, one killed with
SIGKILL under load and restarted on the same data.

The servers (:mod:`tests.standalone.processes`: SQLite, their own data
directories, federation over TLS on loopback with verification off) each
have two users, and every server's admin API puts all six users in one room.
Then a steady change load runs through the client API, one request at a time
per user, all users at once: new devices (login), device key uploads,
renames, deletions (with user-interactive auth, or logout) and cross-signing
key uploads.  Every change answered 200 is *accepted* and applied to the
test's model of that user (:class:`UserModel`).

The kill: once the victim has accepted :data:`KILL_AFTER` changes, one other
server (the *paused peer*) is stopped with SIGSTOP until the victim reports
updates pending for it (they cannot be acknowledged, so they are surely
queued), then the victim is killed with SIGKILL at a moment when every one
of its users has a request in flight, and the paused peer continues.  The
load goes on on the two others while the victim is down; requests to it
fail and count for nothing, but the one change per user that was in flight
is *in doubt*: it may or may not have committed.

Then the victim restarts on the same data, and the test checks:

* every accepted change on the victim is in its database (admin API and
  ``/keys/query``): its users' devices, names, keys and cross-signing keys
  are exactly the model's, with each in-doubt change either whole or absent;
* it resumes sending what it had queued: with no new change on it, its
  queues empty, it counts EDUs sent since the restart, and both other
  servers' caches of its users come to equal its real lists;
* after the load resumes on all three and stops, every server's own users
  are exactly the model (nothing lost, nothing extra), and every server's
  cache of every remote user (admin API: devices with names and keys, master
  and self-signing keys, not stale) equals that user's real list within
  :data:`CONVERGE_S` seconds, and ``/keys/query`` answers the same on all;
* no server received an update whose ``prev_id`` it lacked
  (:data:`GAP_REASONS`): the chains go on across the kill, with no resync to
  hide a gap.

Every wait is bounded; the servers are stopped by pid and their directories
removed by the test's cleanups.
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional
from urllib.parse import quote

from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.internet.error import ConnectionRefusedError
from twisted.python import log
from twisted.trial.unittest import TestCase

from tests.local.keys import ClientDevice, CrossSigning
from tests.standalone.processes import ADMIN, PASSWORD, V3, ServerProcess, logs_of, sleep

ROOM = "!crash:localhost"
USERS_PER_SERVER = 2
# accepted changes on the victim before it is killed
KILL_AFTER = 25
# seconds of load on the two others while the victim is down, and on all after
DOWN_S = 3.0
AFTER_S = 3.0
# bound of each convergence wait after the load
CONVERGE_S = 60.0
# the kill waits until each of the victim's users has had a request out this long
IN_FLIGHT_S = 0.004
MAX_DEVICES = 6
SEED = 9
# decisions on an update whose predecessor this server did not have
GAP_REASONS = (
    "empty_prev_id", "unknown_prev_id", "prev_id_below_window", "stream_id_below_window",
    "prev_held",
)

View = dict[str, Any]


def empty_view() -> View:
    return {"devices": {}, "master": None, "self_signing": None}


def federated(view: View) -> View:
    """What other servers see of a user: only devices that have keys."""
    devices = {d: v for d, v in view["devices"].items() if v["keys"] is not None}
    return {**view, "devices": devices}


def devices_of(admin_answer: Any) -> dict[str, Any]:
    """The devices of an admin API ``users/{userId}/devices`` answer."""
    return {
        d["device_id"]: {"display_name": d["display_name"], "keys": d["keys"]}
        for d in admin_answer["devices"]
    }


@dataclass
class Change:
    """One change request of the load.

    :param apply: what it does to the user's view when it commits.
    :param done: client bookkeeping after it committed (with the answer, or
        ``None`` when it was in doubt and found committed).
    """

    what: str
    method: str
    path: str
    body: Any
    token: str
    apply: Callable[[View], None]
    done: Callable[[Optional[Any]], None] = lambda answer: None
    uia: bool = False


@dataclass
class UserModel:
    """A local user under load: the accepted state and the client's tokens."""

    server: ServerProcess
    localpart: str
    user_id: str
    rng: random.Random
    view: View = field(default_factory=empty_view)
    tokens: dict[str, str] = field(default_factory=dict)
    main_device: str = ""
    serial: int = 0
    accepted: int = 0
    active: bool = True
    in_doubt: Optional[Change] = None

    @property
    def main_token(self) -> str:
        return self.tokens[self.main_device]

    def next_change(self) -> Change:
        self.serial += 1
        n = self.serial
        devices = self.view["devices"]
        keyless = [d for d in devices if devices[d]["keys"] is None and d in self.tokens]
        others = [d for d in devices if d != self.main_device]
        choices: list[tuple[str, int]] = [("rename", 3), ("cross_signing", 1)]
        if keyless:
            choices.append(("upload", 5))
        if len(devices) < MAX_DEVICES:
            choices.append(("login", 3))
        if others:
            choices.append(("delete", 2))
        if any(d in self.tokens for d in others):
            choices.append(("logout", 2))
        kinds, weights = zip(*choices)
        kind = self.rng.choices(kinds, weights)[0]
        return getattr(self, f"_{kind}")(n, keyless, others)

    def _login(self, n: int, keyless: list[str], others: list[str]) -> Change:
        device_id, name = f"{self.localpart.upper()}{n}", f"dev-{n}"

        def apply(view: View) -> None:
            view["devices"][device_id] = {"display_name": name, "keys": None}

        def done(answer: Optional[Any]) -> None:
            if answer is not None:
                self.tokens[device_id] = answer["access_token"]

        body = ServerProcess.login_body(self.localpart, device_id, name)
        return Change(f"login {device_id}", "POST", f"{V3}/login", body, "", apply, done)

    def _upload(self, n: int, keyless: list[str], others: list[str]) -> Change:
        device_id = self.rng.choice(keyless)
        keys = ClientDevice(self.user_id, device_id).device_keys()

        def apply(view: View) -> None:
            view["devices"][device_id]["keys"] = keys

        return Change(
            f"upload keys of {device_id}", "POST", f"{V3}/keys/upload", {"device_keys": keys},
            self.tokens[device_id], apply,
        )

    def _rename(self, n: int, keyless: list[str], others: list[str]) -> Change:
        device_id, name = self.rng.choice(sorted(self.view["devices"])), f"name-{n}"

        def apply(view: View) -> None:
            view["devices"][device_id]["display_name"] = name

        return Change(
            f"rename {device_id}", "PUT", f"{V3}/devices/{device_id}", {"display_name": name},
            self.main_token, apply,
        )

    def _deleted(self, device_id: str) -> tuple[Callable[[View], None], Callable[[Any], None]]:
        def apply(view: View) -> None:
            del view["devices"][device_id]

        def done(answer: Optional[Any]) -> None:
            self.tokens.pop(device_id, None)

        return apply, done

    def _delete(self, n: int, keyless: list[str], others: list[str]) -> Change:
        device_id = self.rng.choice(others)
        apply, done = self._deleted(device_id)
        return Change(
            f"delete {device_id}", "DELETE", f"{V3}/devices/{device_id}", {},
            self.main_token, apply, done, uia=True,
        )

    def _logout(self, n: int, keyless: list[str], others: list[str]) -> Change:
        device_id = self.rng.choice([d for d in others if d in self.tokens])
        apply, done = self._deleted(device_id)
        return Change(
            f"logout {device_id}", "POST", f"{V3}/logout", {}, self.tokens[device_id], apply, done
        )

    def _cross_signing(self, n: int, keyless: list[str], others: list[str]) -> Change:
        body = CrossSigning(self.user_id).upload_body()

        def apply(view: View) -> None:
            view["master"] = body["master_key"]
            view["self_signing"] = body["self_signing_key"]

        # replacing keys asks for the password
        return Change(
            "upload cross-signing keys", "POST", f"{V3}/keys/device_signing/upload", body,
            self.main_token, apply, uia=self.view["master"] is not None,
        )

    def uia_auth(self, session: str) -> Any:
        return {
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": self.localpart},
            "password": PASSWORD,
            "session": session,
        }


@dataclass
class Site:
    """One server of the test with its admin token and users."""

    case: TestCase
    process: ServerProcess
    admin_token: str = ""
    users: list[UserModel] = field(default_factory=list)

    @property
    def accepted(self) -> int:
        return sum(u.accepted for u in self.users)

    async def real_view(self, user_id: str) -> View:
        """A local user's devices (all of them) and cross-signing keys, as stored."""
        answer = await self.process.admin_user_devices(self.admin_token, user_id)
        keys = await self.process.ok(
            "POST", f"{V3}/keys/query", {"device_keys": {user_id: []}}, self.admin_token
        )
        return {
            "devices": devices_of(answer),
            "master": keys["master_keys"].get(user_id),
            "self_signing": keys["self_signing_keys"].get(user_id),
        }

    async def query(self, user_ids: list[str]) -> dict[str, View]:
        """What this server's client ``/keys/query`` answers of each user."""
        answer = await self.process.ok(
            "POST", f"{V3}/keys/query", {"device_keys": {u: [] for u in user_ids}},
            self.admin_token,
        )
        self.case.assertEqual(answer["failures"], {})
        return {
            u: {
                "devices": answer["device_keys"].get(u, {}),
                "master": answer["master_keys"].get(u),
                "self_signing": answer["self_signing_keys"].get(u),
            }
            for u in user_ids
        }

    async def cached_view(self, user_id: str) -> tuple[View, bool]:
        """This server's cache of a remote user, and whether it is usable
        (cached and not stale)."""
        answer = await self.process.admin_user_devices(self.admin_token, user_id)
        cross_signing = answer["cross_signing_keys"]
        # devices without keys (announced on creation) are cached, never served
        view = federated({
            "devices": devices_of(answer),
            "master": cross_signing.get("master"),
            "self_signing": cross_signing.get("self_signing"),
        })
        return view, bool(answer["cached"]) and not answer["stale"]


class Load:
    """The change load: one worker per user, each one request at a time."""

    def __init__(self) -> None:
        self.stopped = False
        self.errors: list[str] = []
        # how requests to the killed server ended: answered, cut mid-request, refused
        self.cut = 0
        self.refused = 0
        self._workers: list["Deferred[None]"] = []

    def start(self, users: list[UserModel]) -> None:
        for user in users:
            user.active = True
            self._workers.append(ensureDeferred(self._work(user)))

    async def stop(self) -> None:
        self.stopped = True
        workers, self._workers = self._workers, []
        await gatherResults(workers, consumeErrors=True)

    async def _work(self, user: UserModel) -> None:
        server = user.server
        while user.active and not self.stopped:
            change = user.next_change()
            body = change.body
            changing = False
            try:
                if change.uia:
                    code, answer = await server.call(change.method, change.path, body, change.token)
                    if code != 401 or "session" not in answer:
                        self.errors.append(f"{user.user_id} {change.what}: UIA {code} {answer}")
                        return
                    if not user.active or self.stopped:
                        return
                    body = {**body, "auth": user.uia_auth(answer["session"])}
                changing = True
                code, answer = await server.call(change.method, change.path, body, change.token)
            except Exception as e:
                if server.process is None:  # killed: the change is in doubt
                    if changing:
                        user.in_doubt = change
                    if isinstance(e, ConnectionRefusedError):
                        self.refused += 1
                    else:
                        self.cut += 1
                    return
                self.errors.append(f"{user.user_id} {change.what}: {e!r}")
                return
            if code != 200:
                self.errors.append(f"{user.user_id} {change.what}: {code} {answer}")
                return
            change.apply(user.view)
            change.done(answer)
            user.accepted += 1


class CrashTest(TestCase):
    timeout = 120
    maxDiff = None

    def test_kill_restart_under_load(self) -> "Deferred[None]":
        return ensureDeferred(self.run_scenario())

    async def run_scenario(self) -> None:
        started = time.monotonic()
        deadline = started + 100
        config = {
            "allow_device_name_lookup_over_federation": True,
            # retries every 1 s at first, as in the e2e test, but a server down for
            # the whole maximum interval gets its queue compacted into chain
            # resets, which is not what this test is about: keep that far away
            "federation": {
                "destination_min_retry_interval": "1s",
                "destination_max_retry_interval": "60s",
            },
        }
        sites = [Site(self, ServerProcess(self, config)) for _ in range(3)]
        self.sites = sites
        for site in sites:
            site.process.start()
        for site in sites:
            await site.process.wait_ready(deadline)
        rng = random.Random(SEED)
        for i, site in enumerate(sites):
            server = site.process
            await server.register("root", admin=True)
            site.admin_token = await server.login("root", "ADMIN")
            for j in range(USERS_PER_SERVER):
                localpart = f"u{i}{j}"
                user = UserModel(
                    server, localpart, await server.register(localpart, inhibit_login=True),
                    random.Random(rng.random()),
                )
                user.main_device = f"{localpart.upper()}MAIN"
                user.tokens[user.main_device] = await server.login(localpart, user.main_device)
                keys = await server.upload_keys(user.user_id, user.main_device, user.main_token)
                user.view["devices"][user.main_device] = {"display_name": None, "keys": keys}
                site.users.append(user)
        everyone = [u for site in sites for u in site.users]
        # every server records the remote users first, then its own users join
        # (each join sends the user's devices to the servers sharing the room;
        # a server whose users had not joined yet resyncs on first contact)
        for site in sites:
            for user in everyone:
                if user.server is not site.process:
                    await site.process.set_membership(site.admin_token, ROOM, user.user_id)
        for site in sites:
            for user in site.users:
                await site.process.set_membership(site.admin_token, ROOM, user.user_id)
        setup_s = time.monotonic() - started

        victim, peer, paused = sites
        load = Load()
        self.addCleanup(load.stop)
        # cleanups run last first: a paused server continues before the workers stop
        for site in sites:
            self.addCleanup(site.process.resume)
        load.start(everyone)
        load_started = time.monotonic()
        in_flight = await self.kill_under_load(victim, paused, deadline)
        killed = time.monotonic()
        accepted_before_kill = victim.accepted
        await self.wait_for(lambda: killed + DOWN_S < time.monotonic(), deadline, "the load")
        self.assertEqual(load.errors, [])

        victim.process.start()
        await victim.process.wait_ready(deadline)
        restarted = time.monotonic()
        in_doubt = await self.check_nothing_lost(victim)
        await self.check_queue_resumed(victim, (peer, paused), deadline)
        resumed_s = time.monotonic() - restarted

        load.start(victim.users)
        await self.wait_for(lambda: restarted + AFTER_S < time.monotonic(), deadline, "the load")
        await load.stop()
        load_s = time.monotonic() - load_started
        self.assertEqual(load.errors, [])

        for site in sites:
            for user in site.users:
                self.assertEqual(await site.real_view(user.user_id), user.view, user.user_id)
        stopped = time.monotonic()
        await self.converge(sites, min(deadline, stopped + CONVERGE_S))
        converge_s = time.monotonic() - stopped
        # and clients see the same through /keys/query on every server
        user_ids = [u.user_id for u in everyone]
        answers = [await site.query(user_ids) for site in sites]
        for site, answer in zip(sites, answers):
            for user in site.users:
                for other in answers:
                    self.assertEqual(other[user.user_id], answer[user.user_id], user.user_id)
        # no update arrived out of its chain: nothing was resent wrongly or lost
        # (the restarted server's counters start at its restart)
        for site in sites:
            decided = await site.process.metric_samples("devicelist_edus_decided_total")
            breaks = {k: v for k, v in decided.items() if v and any(r in k for r in GAP_REASONS)}
            self.assertEqual(breaks, {}, site.process.server_name)
        log.msg(
            f"crash test: setup {setup_s:.1f} s, load {load_s:.1f} s; accepted changes "
            f"{[s.accepted for s in sites]}; killed after {accepted_before_kill} on the victim "
            f"with {in_flight} requests in flight ({load.cut} cut, {load.refused} refused, "
            f"{in_doubt} in doubt and committed); its queue drained and peers caught up "
            f"{resumed_s:.1f} s after restart; converged {converge_s:.1f} s after the "
            f"load; total {time.monotonic() - started:.1f} s"
        )

    async def wait_for(
        self, condition: Callable[[], bool], deadline: float, what: str, interval: float = 0.05
    ) -> None:
        while not condition():
            if time.monotonic() > deadline:
                self.fail(f"timed out waiting for {what}\n{logs_of(s.process for s in self.sites)}")
            await sleep(interval)

    async def kill_under_load(self, victim: Site, paused: Site, deadline: float) -> int:
        """SIGKILL the victim after :data:`KILL_AFTER` accepted changes, while
        it has updates queued for ``paused`` (stopped meanwhile, so they stay
        queued) and a request of each of its users in flight."""
        await self.wait_for(lambda: victim.accepted >= KILL_AFTER, deadline, "the first changes")
        paused.process.pause()
        destination = f"{ADMIN}/destinations/{quote(paused.process.server_name)}"
        while True:
            status = await victim.process.ok("GET", destination, token=victim.admin_token)
            if status["pending"] > 0:
                break
            if time.monotonic() > deadline:
                self.fail(f"nothing queued for the paused server: {status}")
            await sleep(0.05)
        # every user's request sent a few milliseconds ago: connected, written,
        # being handled (a rename takes about as long, a login or UIA longer)
        await self.wait_for(
            lambda: victim.process.in_flight(IN_FLIGHT_S) >= len(victim.users), deadline,
            "requests in flight", interval=0.001,
        )
        in_flight = victim.process.in_flight()
        for user in victim.users:
            user.active = False
        victim.process.kill()
        paused.process.resume()
        return in_flight

    async def check_nothing_lost(self, victim: Site) -> int:
        """Every change the victim accepted is in its database; a change in
        doubt is there whole or not at all.  The model adopts what is there."""
        committed = 0
        for user in victim.users:
            real = await victim.real_view(user.user_id)
            change, user.in_doubt = user.in_doubt, None
            if change is not None and real != user.view:
                with_change = copy.deepcopy(user.view)
                change.apply(with_change)
                self.assertEqual(real, with_change, f"{user.user_id}: {change.what} half done")
                change.apply(user.view)
                change.done(None)
                committed += 1
            self.assertEqual(real, user.view, f"{user.user_id}: accepted changes lost")
        return committed

    async def check_queue_resumed(
        self, victim: Site, others: tuple[Site, ...], deadline: float
    ) -> None:
        """With no new change on the restarted victim, it sends what it had
        queued: its queues empty, it counts EDUs sent, and the others' caches
        of its users equal its real lists."""
        server = victim.process
        while True:
            statuses = (await server.ok("GET", f"{ADMIN}/destinations", token=victim.admin_token))[
                "destinations"
            ]
            if all(s["pending"] == 0 for s in statuses):
                break
            if time.monotonic() > deadline:
                self.fail(f"the restarted server's queues never drained: {statuses}")
            await sleep(0.1)
        self.assertGreater(await server.metric_total("devicelist_edus_sent_total"), 0)
        await self.converge(others, deadline, owners=[victim])

    async def converge(
        self, sites: Any, deadline: float, owners: Optional[list[Site]] = None
    ) -> None:
        """Until every site's cache of every remote user of ``owners`` (default:
        every site) equals that user's real list; fail at ``deadline``."""
        owners = list(sites) if owners is None else owners
        while True:
            differences = []
            for owner in owners:
                for user in owner.users:
                    real = federated(await owner.real_view(user.user_id))
                    for site in sites:
                        if site is owner:
                            continue
                        cached, usable = await site.cached_view(user.user_id)
                        if cached != real or not usable:
                            differences.append((site.process.server_name, user.user_id, cached, real))
            if not differences:
                return
            if time.monotonic() > deadline:
                server, user_id, cached, real = differences[0]
                self.fail(
                    f"{len(differences)} caches differ, e.g. {server}'s of {user_id}:\n"
                    f"cached {cached}\nreal   {real}\n{logs_of(s.process for s in self.sites)}"
                )
            await sleep(0.5)
