"""Fake federation servers for the side-by-side benchmarks.

A :class:`FakeServer` is a minimal Matrix homeserver on a loopback TLS port,
named ``localhost:<port>``: it serves its ed25519 key at
``/_matrix/key/v2/server`` (the plugin's :class:`KeyServer`), answers
``/user/devices`` and ``/user/keys/query`` from a :class:`ChainedUser` model
kept consistent with the EDUs it sends, and records every EDU it receives on
``/send`` with its arrival time.  It does not check signatures: it is the
fixture, not the system under test.

Everything runs on the global Twisted reactor in a background thread
(:class:`ReactorThread`), so that a blocking benchmark driver (and the
blocking ``interop`` harness) can use it; :meth:`ReactorThread.call` runs a
function on the reactor thread and waits for its result.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, TypeVar
from urllib.parse import unquote

from signedjson.types import SigningKey
from twisted.internet import reactor as _reactor
from twisted.internet import ssl
from twisted.internet.interfaces import IListeningPort, IReactorSSL, IReactorTime
from twisted.internet.threads import blockingCallFromThread
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from devicelist_plugin.federation.key_server import KeyServer
from devicelist_plugin.standalone.generate import self_signed_certificate

JsonDict = dict[str, Any]
T = TypeVar("T")

reactor: Any = _reactor


class ReactorThread:
    """The global reactor, run in a daemon thread."""

    def __init__(self) -> None:
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(
            target=lambda: reactor.run(installSignalHandlers=False), name="reactor", daemon=True
        )
        self._thread.start()
        # wait until it runs
        self.call(lambda: None)

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        result: T = blockingCallFromThread(reactor, fn, *args)
        return result

    def stop(self) -> None:
        if self._thread is None:
            return
        reactor.callFromThread(reactor.stop)
        self._thread.join(timeout=10)
        self._thread = None


def device_keys(user_id: str, device_id: str, marker: str) -> JsonDict:
    """Device keys of the usual shape; ``marker`` makes each version distinct
    (the fake peer never checks signatures, and neither server under test
    verifies remote device keys' signatures)."""
    pad = (marker + "A" * 43)[:43]
    return {
        "user_id": user_id,
        "device_id": device_id,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": {
            f"curve25519:{device_id}": pad,
            f"ed25519:{device_id}": ("ed" + pad)[:43],
        },
        "signatures": {user_id: {f"ed25519:{device_id}": ("sig" + pad) * 2}},
    }


@dataclass
class ChainedUser:
    """A remote user whose devices change one at a time, each change an EDU
    chained to the previous one.  ``position`` is the last change the fake
    server has published (``/user/devices`` answers the state at it)."""

    user_id: str
    devices: int
    base_stream_id: int = 1000
    position: int = 0
    device_count_override: Optional[int] = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def device_id(self, i: int) -> str:
        return f"DEV{i:05d}"

    def stream_id(self, step: int) -> int:
        return self.base_stream_id + step

    def keys_at(self, device_index: int, step: int) -> JsonDict:
        """The keys of a device after ``step`` changes: device ``d`` last
        changed at the largest step <= ``step`` with ``step % devices == d``."""
        last = step - ((step - device_index) % self.devices) if step >= device_index else 0
        return device_keys(self.user_id, self.device_id(device_index), f"s{last}d{device_index}")

    def edu(self, step: int) -> JsonDict:
        """The ``m.device_list_update`` of change ``step`` (>= 1)."""
        d = step % self.devices
        return {
            "edu_type": "m.device_list_update",
            "content": {
                "user_id": self.user_id,
                "device_id": self.device_id(d),
                "stream_id": self.stream_id(step),
                "prev_id": [self.stream_id(step - 1)] if step > 1 else [],
                "deleted": False,
                "keys": self.keys_at(d, step),
            },
        }

    def publish(self, step: int) -> None:
        with self._lock:
            self.position = max(self.position, step)

    def user_devices(self) -> JsonDict:
        with self._lock:
            step = self.position
        return {
            "user_id": self.user_id,
            "stream_id": self.stream_id(step),
            "devices": [
                {"device_id": self.device_id(d), "keys": self.keys_at(d, step)}
                for d in range(self.devices)
            ],
        }

    def marker(self, step: int) -> str:
        """The curve25519 key value a server shows for this user's device
        changed at ``step``."""
        d = step % self.devices
        keys: dict[str, str] = self.keys_at(d, step)["keys"]
        return keys[f"curve25519:{self.device_id(d)}"]


@dataclass(frozen=True)
class Arrival:
    """An EDU received on ``/send``."""

    at: float  # time.monotonic()
    origin: str
    edu_type: str
    content: JsonDict


class _Root(Resource):
    isLeaf = True

    def __init__(self, server: "FakeServer") -> None:
        super().__init__()
        self._server = server

    def _answer(self, request: Request, code: int, body: JsonDict) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(body).encode("utf-8")

    def render(self, request: Request) -> bytes:
        path = unquote((request.path or b"").decode("utf-8"))
        method = (request.method or b"").decode("ascii")
        body: JsonDict = {}
        if request.content is not None:
            raw = request.content.read()
            if raw:
                body = json.loads(raw)
        code, answer = self._server.handle(method, path, body)
        return self._answer(request, code, answer)


class FakeServer:
    """One fake homeserver on ``127.0.0.1``, over TLS, named ``localhost:<port>``."""

    def __init__(
        self, signing_key: SigningKey, tls: ssl.CertificateOptions, clock: IReactorTime
    ) -> None:
        self.signing_key = signing_key
        self._tls = tls
        self._clock = clock
        self.server_name = ""
        self.port = 0
        self.users: dict[str, ChainedUser] = {}
        self.device_fetches: dict[str, int] = {}
        self.fetch_times: dict[str, list[float]] = {}
        self.arrivals: list[Arrival] = []
        self.transactions = 0
        self._cond = threading.Condition()
        self._listening: Optional[IListeningPort] = None
        self._key_server: Optional[KeyServer] = None

    def listen(self) -> None:
        """Listen on a free port (call on the reactor thread)."""
        site = Site(_Root(self))
        site.displayTracebacks = False
        r: IReactorSSL = reactor
        self._listening = r.listenSSL(0, site, self._tls, interface="127.0.0.1")
        self.port = self._listening.getHost().port  # type: ignore[attr-defined]
        self.server_name = f"localhost:{self.port}"
        self._key_server = KeyServer(self.server_name, [self.signing_key], self._clock)

    def close(self) -> Any:
        if self._listening is not None:
            return self._listening.stopListening()
        return None

    # -- requests -----------------------------------------------------------------

    def handle(self, method: str, path: str, body: JsonDict) -> tuple[int, JsonDict]:
        if path.startswith("/_matrix/key/v2/server"):
            assert self._key_server is not None
            return 200, self._key_server.response()
        prefix = "/_matrix/federation/v1/"
        if path.startswith(prefix + "user/devices/"):
            user_id = path[len(prefix + "user/devices/"):]
            user = self.users.get(user_id)
            if user is None:
                return 404, {"errcode": "M_NOT_FOUND", "error": "no such user"}
            with self._cond:
                self.device_fetches[user_id] = self.device_fetches.get(user_id, 0) + 1
                self.fetch_times.setdefault(user_id, []).append(time.monotonic())
            return 200, user.user_devices()
        if path == prefix + "user/keys/query" and method == "POST":
            answer: JsonDict = {}
            for user_id in body.get("device_keys", {}):
                known = self.users.get(user_id)
                if known is not None:
                    answer[user_id] = {
                        d["device_id"]: d["keys"] for d in known.user_devices()["devices"]
                    }
            return 200, {"device_keys": answer}
        if path.startswith(prefix + "send/") and method == "PUT":
            now = time.monotonic()
            origin = str(body.get("origin", ""))
            with self._cond:
                self.transactions += 1
                for edu in body.get("edus", []):
                    self.arrivals.append(
                        Arrival(now, origin, str(edu.get("edu_type")), dict(edu.get("content", {})))
                    )
                self._cond.notify_all()
            return 200, {"pdus": {p.get("event_id", ""): {} for p in body.get("pdus", [])}}
        return 404, {"errcode": "M_UNRECOGNIZED", "error": "not served by the fake peer"}

    # -- observation ----------------------------------------------------------------

    def fetches(self) -> int:
        with self._cond:
            return sum(self.device_fetches.values())

    def wait_for(self, predicate: Callable[[list[Arrival]], bool], timeout: float) -> bool:
        """Wait until ``predicate(arrivals)`` holds; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self.arrivals), timeout=timeout)

    def arrival_of(
        self, user_id: str, device_id: str, with_keys: bool, after: float
    ) -> Callable[[list[Arrival]], Optional[float]]:
        """A function finding the first arrival (time) of a device-list EDU
        for this device (carrying keys if ``with_keys``) after ``after``."""

        def find(arrivals: list[Arrival]) -> Optional[float]:
            for a in arrivals:
                if (
                    a.at >= after
                    and a.edu_type == "m.device_list_update"
                    and a.content.get("user_id") == user_id
                    and a.content.get("device_id") == device_id
                    and (not with_keys or bool(a.content.get("keys")))
                ):
                    return a.at
            return None

        return find


def tls_options() -> ssl.CertificateOptions:
    """A self-signed certificate for ``localhost``."""
    cert_pem, key_pem = self_signed_certificate("localhost")
    options: ssl.CertificateOptions = ssl.PrivateCertificate.loadPEM(
        key_pem + cert_pem
    ).options()
    return options


def start_servers(
    thread: ReactorThread, signing_key: SigningKey, count: int
) -> list[FakeServer]:
    """``count`` fake servers sharing one key and one certificate, listening."""
    tls = tls_options()
    servers = [FakeServer(signing_key, tls, reactor) for _ in range(count)]
    for s in servers:
        thread.call(s.listen)
    return servers
