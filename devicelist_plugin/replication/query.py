"""Key queries about remote users: the host's (and the standalone server's)
``POST /_matrix/client/v3/keys/query``.

:meth:`RemoteKeyQuerier.query_keys` takes ``{user_id: [device_id, ...]}``
(an empty list: every device) and answers in the client-server shape::

    {"device_keys": {user: {device: DeviceKeys + unsigned.device_display_name}},
     "master_keys": {user: key}, "self_signing_keys": {user: key},
     "failures": {server_name: {"status": int, "message": str}}}

Local users are answered by the local handler when one is given (with the
requester's ``user_signing_keys``).  For a remote user:

* **tracked** (shares a room with a local user) and cached, not stale: from
  the cache, no request;
* **tracked**, without a cache or stale: resynced through the updater
  (``GET /user/devices``, then cached), concurrent queries sharing one fetch;
  if it fails or does not finish within the query's ``timeout`` (default 10
  s, the fetch carries on), the cached list (if any) is returned and the
  server is listed in ``failures``;
* **not tracked**: fetched with ``POST /user/keys/query`` (all of that
  server's requested users in one request, at most one request in flight per
  user: concurrent queries share it) and never cached, since no EDU would
  keep it exact.

A server backing off (the tracker shared with the sender) is not asked: it
is in ``failures`` with 503 "Not ready for retry".  Requests per destination
are bounded by the :class:`DestinationLimiter` shared with the updater.
Answers are validated: device keys for another user or device, and
malformed keys, are dropped and logged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Awaitable, Mapping, Optional, Protocol, Sequence, TypeVar

from twisted.internet.defer import Deferred, TimeoutError, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from devicelist_plugin.core.models import (
    USAGE_MASTER,
    USAGE_SELF_SIGNING,
    CrossSigningKey,
    JsonDict,
)
from devicelist_plugin.core.parse import (
    ParseError,
    parse_cross_signing_key,
    parse_device_keys,
    split_user_id,
)
from devicelist_plugin.federation.client import (
    FederationClientError,
    HttpResponseError,
    RequestSendFailed,
)
from devicelist_plugin.membership import MembershipSource
from devicelist_plugin.replication.inbound_concurrency import DestinationLimiter, SharedResult
from devicelist_plugin.replication.retry import DestinationRetryTracker
from devicelist_plugin.replication.updater import RemoteDeviceListUpdater, ResyncFailure
from devicelist_plugin.storage.interface import IDeviceListStore
from devicelist_plugin.storage.types import RemoteUserCache

__all__ = ["DEFAULT_QUERY_TIMEOUT", "FEDERATION_KEYS_QUERY_PATH", "RemoteKeyQuerier"]

FEDERATION_KEYS_QUERY_PATH = "/_matrix/federation/v1/user/keys/query"
#: seconds a key query waits for remote servers (Synapse's default ``timeout``)
DEFAULT_QUERY_TIMEOUT = 10.0

T = TypeVar("T")


class LocalKeyQuery(Protocol):
    """What the querier needs of :class:`~devicelist_plugin.local.handler.LocalDeviceHandler`."""

    server_name: str

    def query_keys(
        self,
        device_keys: Mapping[str, Sequence[str]],
        *,
        requesting_user_id: Optional[str] = None,
        over_federation: bool = False,
    ) -> "Deferred[JsonDict]": ...


class KeysQueryClient(Protocol):
    """What the querier needs of :class:`~devicelist_plugin.federation.client.FederationClient`."""

    def post_json(
        self,
        destination: str,
        path: str,
        body: JsonDict,
        args: Optional[Mapping[str, str]] = None,
        timeout: Optional[float] = None,
    ) -> Awaitable[JsonDict]: ...


@dataclass
class _UserKeys:
    """One remote user's keys as served to clients."""

    devices: dict[str, JsonDict] = field(default_factory=dict)
    master_key: Optional[JsonDict] = None
    self_signing_key: Optional[JsonDict] = None


class _QueryFailed(Exception):
    def __init__(self, failure: ResyncFailure) -> None:
        super().__init__(failure.message)
        self.failure = failure


def _served_device_keys(raw: JsonDict, display_name: Optional[str]) -> JsonDict:
    # a shallow copy: ``raw`` comes fresh from the store or a parsed answer
    # and nothing modifies the nested objects (a 10,000-device answer must
    # not deep-copy on the reactor thread)
    served = dict(raw)
    served.pop("unsigned", None)
    if display_name is not None:
        served["unsigned"] = {"device_display_name": display_name}
    return served


def _from_cache(cache: RemoteUserCache) -> _UserKeys:
    keys = _UserKeys()
    for device in cache.devices:
        if device.keys is not None:
            keys.devices[device.device_id] = _served_device_keys(
                device.keys.raw, device.display_name
            )
    master = cache.cross_signing_keys.get(USAGE_MASTER)
    if master is not None:
        keys.master_key = master.raw
    self_signing = cache.cross_signing_keys.get(USAGE_SELF_SIGNING)
    if self_signing is not None:
        keys.self_signing_key = self_signing.raw
    return keys


class RemoteKeyQuerier:
    """Answers key queries; see the module docstring.

    :param local: answers the local users of a query; without it a query
        naming a local user is a ``ValueError``.
    :param request_timeout: seconds for one ``POST /user/keys/query``.
    """

    log = Logger()

    def __init__(
        self,
        server_name: str,
        store: IDeviceListStore,
        client: KeysQueryClient,
        clock: IReactorTime,
        membership: MembershipSource,
        updater: RemoteDeviceListUpdater,
        retry_tracker: DestinationRetryTracker,
        *,
        limiter: Optional[DestinationLimiter] = None,
        local: Optional[LocalKeyQuery] = None,
        default_timeout: float = DEFAULT_QUERY_TIMEOUT,
        request_timeout: float = DEFAULT_QUERY_TIMEOUT,
    ) -> None:
        self.server_name = server_name
        self._store = store
        self._client = client
        self._clock = clock
        self._membership = membership
        self._updater = updater
        self._tracker = retry_tracker
        self._limiter = limiter if limiter is not None else DestinationLimiter()
        self._local = local
        self._default_timeout = default_timeout
        self._request_timeout = request_timeout
        self._untracked_in_flight: dict[str, SharedResult[dict[str, _UserKeys]]] = {}

    def query_keys(
        self,
        device_keys: Mapping[str, Sequence[str]],
        *,
        timeout: Optional[float] = None,
        requesting_user_id: Optional[str] = None,
    ) -> "Deferred[JsonDict]":
        """Answer ``{user_id: [device_id, ...]}`` (see the module docstring).

        User ids must be well-formed (``parse_device_keys_request`` checks a
        request body); a malformed one is a ``ValueError``.
        """
        return Deferred.fromCoroutine(
            self._query_keys(device_keys, timeout, requesting_user_id)
        )

    async def _query_keys(
        self,
        device_keys: Mapping[str, Sequence[str]],
        timeout: Optional[float],
        requesting_user_id: Optional[str],
    ) -> JsonDict:
        wait = self._default_timeout if timeout is None else timeout
        local: dict[str, Sequence[str]] = {}
        remote: dict[str, dict[str, Sequence[str]]] = {}
        for user_id, devices in device_keys.items():
            try:
                _, server = split_user_id(user_id)
            except ParseError as e:
                raise ValueError(f"malformed user id in a key query: {e}") from None
            if server == self.server_name:
                local[user_id] = devices
            else:
                remote.setdefault(server, {})[user_id] = devices
        if local and self._local is None:
            raise ValueError("local users in a key query but no local handler")

        body: JsonDict = {
            "device_keys": {},
            "master_keys": {},
            "self_signing_keys": {},
            "failures": {},
        }
        if self._local is not None and (local or requesting_user_id is not None):
            local_body = await self._local.query_keys(
                local, requesting_user_id=requesting_user_id
            )
            for name in ("device_keys", "master_keys", "self_signing_keys", "user_signing_keys"):
                if name in local_body:
                    body.setdefault(name, {}).update(local_body[name])

        results: list[tuple[dict[str, _UserKeys], Optional[ResyncFailure]]] = await gatherResults(
            [
                Deferred.fromCoroutine(self._query_server(server, users, wait))
                for server, users in sorted(remote.items())
            ],
            consumeErrors=True,
        )
        for (server, users), (found, failure) in zip(sorted(remote.items()), results):
            if failure is not None:
                body["failures"][server] = failure.to_json()
            for user_id, wanted in users.items():
                keys = found.get(user_id)
                if keys is None:
                    continue
                body["device_keys"][user_id] = {
                    device_id: served
                    for device_id, served in keys.devices.items()
                    if not wanted or device_id in wanted
                }
                if keys.master_key is not None:
                    body["master_keys"][user_id] = keys.master_key
                if keys.self_signing_key is not None:
                    body["self_signing_keys"][user_id] = keys.self_signing_key
        return body

    async def _query_server(
        self, server: str, users: Mapping[str, Sequence[str]], wait: float
    ) -> tuple[dict[str, _UserKeys], Optional[ResyncFailure]]:
        tracked: list[str] = []
        untracked: list[str] = []
        for user_id in sorted(users):
            if await self._membership.is_tracked(user_id):
                tracked.append(user_id)
            else:
                untracked.append(user_id)
        found: dict[str, _UserKeys] = {}
        failure: Optional[ResyncFailure] = None
        outcomes: list[tuple[Optional[_UserKeys], Optional[ResyncFailure]]] = await gatherResults(
            [Deferred.fromCoroutine(self._tracked_user(u, wait)) for u in tracked],
            consumeErrors=True,
        )
        for user_id, (keys, user_failure) in zip(tracked, outcomes):
            if keys is not None:
                found[user_id] = keys
            failure = failure or user_failure
        if untracked:
            try:
                fetched = await self._untracked_users(server, untracked, wait)
            except _QueryFailed as e:
                failure = failure or e.failure
            else:
                found.update(fetched)
        return found, failure

    # -- tracked users: the cache, resynced when needed -----------------------------

    async def _tracked_user(
        self, user_id: str, wait: float
    ) -> tuple[Optional[_UserKeys], Optional[ResyncFailure]]:
        cache = await self._store.get_remote_cache(user_id)
        if cache.state is not None and cache.state.cached and not cache.state.stale:
            return _from_cache(cache), None
        try:
            failure = await self._within(self._updater.request_resync(user_id), wait)
        except TimeoutError:
            destination = split_user_id(user_id)[1]
            failure = ResyncFailure(destination, 504, f"Timed out waiting for {destination}")
        cache = await self._store.get_remote_cache(user_id)
        if cache.state is None or not cache.state.cached:
            return None, failure
        return _from_cache(cache), failure

    def _within(self, d: "Deferred[T]", wait: float) -> "Deferred[T]":
        """``d``'s outcome, or a ``TimeoutError`` after ``wait`` seconds
        (``d`` itself is never cancelled: other callers may share it)."""
        observer = SharedResult(d).observe()
        observer.addTimeout(wait, self._clock)
        return observer

    # -- untracked users: asked, not cached ----------------------------------------

    async def _untracked_users(
        self, server: str, users: Sequence[str], wait: float
    ) -> dict[str, _UserKeys]:
        to_fetch = [u for u in users if u not in self._untracked_in_flight]
        shared: dict[int, SharedResult[dict[str, _UserKeys]]] = {}
        if to_fetch:
            operation: Deferred[dict[str, _UserKeys]] = Deferred.fromCoroutine(
                self._post_keys_query(server, to_fetch)
            )

            def done(result: object) -> object:
                for u in to_fetch:
                    self._untracked_in_flight.pop(u, None)
                return result

            operation.addBoth(done)
            fetch = SharedResult(operation)
            if not fetch.done:
                for u in to_fetch:
                    self._untracked_in_flight[u] = fetch
            shared[id(fetch)] = fetch
        for u in users:
            if u in self._untracked_in_flight:
                s = self._untracked_in_flight[u]
                shared[id(s)] = s
        found: dict[str, _UserKeys] = {}
        for fetch in shared.values():
            try:
                result = await self._within(fetch.observe(), wait)
            except TimeoutError:
                raise _QueryFailed(
                    ResyncFailure(server, 504, f"Timed out waiting for {server}")
                ) from None
            found.update({u: k for u, k in result.items() if u in users})
        return found

    async def _post_keys_query(self, server: str, users: Sequence[str]) -> dict[str, _UserKeys]:
        if await self._tracker.retry_at(server) is not None:
            raise _QueryFailed(ResyncFailure(server, 503, "Not ready for retry"))
        request: JsonDict = {"device_keys": {u: [] for u in users}}

        async def post() -> JsonDict:
            return await self._client.post_json(
                server, FEDERATION_KEYS_QUERY_PATH, request, timeout=self._request_timeout
            )

        try:
            response = await self._limiter.run(server, post)
        except HttpResponseError as e:
            if e.code >= 500 or e.code == 429:
                await self._tracker.record_failure(server)
            else:
                await self._tracker.record_success(server)
            raise _QueryFailed(ResyncFailure(server, e.code, f"{server} answered {e.code}")) from e
        except RequestSendFailed as e:
            await self._tracker.record_failure(server)
            raise _QueryFailed(
                ResyncFailure(server, 503, f"Failed to reach {server}: {e.reason}")
            ) from e
        except FederationClientError as e:
            raise _QueryFailed(ResyncFailure(server, 503, f"Failed to reach {server}")) from e
        await self._tracker.record_success(server)
        return self._parse_keys_query(server, users, response)

    def _parse_keys_query(
        self, server: str, users: Sequence[str], response: JsonDict
    ) -> dict[str, _UserKeys]:
        found: dict[str, _UserKeys] = {}
        device_keys = response.get("device_keys")
        if not isinstance(device_keys, dict):
            device_keys = {}
        for user_id in users:
            keys = found[user_id] = _UserKeys()
            devices = device_keys.get(user_id)
            if isinstance(devices, dict):
                for device_id, obj in devices.items():
                    path = f"device_keys[{user_id!r}][{device_id!r}]"
                    try:
                        parsed = parse_device_keys(
                            obj, path, expected_user_id=user_id, expected_device_id=device_id
                        )
                    except ParseError as e:
                        self.log.warn(
                            "Skipping keys from {server}'s key query answer: {error}",
                            server=server,
                            error=str(e),
                        )
                        continue
                    unsigned = obj.get("unsigned") if isinstance(obj, dict) else None
                    name = unsigned.get("device_display_name") if isinstance(unsigned, dict) else None
                    keys.devices[device_id] = _served_device_keys(
                        parsed.raw, name if isinstance(name, str) else None
                    )
            keys.master_key = self._cross_signing(server, response, "master_keys", user_id, USAGE_MASTER)
            keys.self_signing_key = self._cross_signing(
                server, response, "self_signing_keys", user_id, USAGE_SELF_SIGNING
            )
        return found

    def _cross_signing(
        self, server: str, response: JsonDict, name: str, user_id: str, usage: str
    ) -> Optional[JsonDict]:
        section = response.get(name)
        if not isinstance(section, dict) or section.get(user_id) is None:
            return None
        try:
            key: CrossSigningKey = parse_cross_signing_key(
                section[user_id],
                f"{name}[{user_id!r}]",
                expected_user_id=user_id,
                expected_usage=usage,
            )
        except ParseError as e:
            self.log.warn(
                "Skipping a key from {server}'s key query answer: {error}",
                server=server,
                error=str(e),
            )
            return None
        return key.raw

