"""The remote key ring: other servers' verify keys, fetched, checked and cached.

:class:`KeyRing` is the :class:`~devicelist_plugin.federation.auth.VerifyKeyLookup`
of the :class:`~devicelist_plugin.federation.auth.FederationAuthenticator`:
``get_verify_key(server_name, key_id, at_ms)`` answers the key ``key_id`` of
``server_name`` usable for a request signed at ``at_ms``, or ``None`` (never an
exception) when it is unknown, cannot be fetched or is no longer valid, so that
the request is answered 401 ``M_UNAUTHORIZED``.

Key ring policy
---------------

*Our own keys* (the signing keys and the configured ``old_signing_keys``) are
answered from memory, never fetched: a current key is always usable, an old key
for requests signed before its ``expired_ts``.

*Validity.* A key from a response's ``verify_keys`` is usable for a request at
time *t* (ms) while ``t <= min(valid_until_ts, fetched_ts + 7 days)``: the
specification's "use a key until min(valid_until_ts, now + 7 days)", counted
from when we fetched it, so a server publishing a far-future
``valid_until_ts`` is still asked again within a week.  A key from
``old_verify_keys`` is usable only for requests signed strictly before its
``expired_ts`` (and without the 7-day cap: its expiry is a fact that does not
go stale).  A key id in both maps is taken from ``verify_keys``.

*Cache.* Two layers: a dictionary in memory in front of the store's
``server_keys`` rows (which keep the whole key response in ``key_json``, so the
store stays able to answer notary queries, and which other processes sharing
the database see).  A miss in memory reads the store; a miss there fetches.

*Fetching.* Direct first: ``GET /_matrix/key/v2/server`` on the server itself
through the :class:`~devicelist_plugin.federation.client.FederationClient`.
The response must name the server asked in ``server_name``, carry an integer
``valid_until_ts``, well-formed ``verify_keys`` (and ``old_verify_keys``), and
be self-signed: at least one signature of ``server_name`` by a key of its own
``verify_keys``, and every such signature must verify.  Entries with an
algorithm other than ed25519 are ignored; a malformed ed25519 entry rejects
the response.  Then, only for the key ids still not usable (the direct fetch
failed, or did not have them), each configured notary in turn
(``trusted_key_servers``): ``POST /_matrix/key/v2/query`` with
``{"server_keys": {server: {key_id: {"minimum_valid_until_ts": t}}}}``.  Every
object returned must be signed by the notary with one of its *configured*
keys (each configured key that signed it must verify) and pass the same
checks as a direct response, self-signature of the origin included; objects
that do not are dropped and logged.  Synapse asks notaries first and the
server itself last; we ask the server first because it is the authority on
its own keys and needs no trust in a third party, and keep notaries as the
fallback for servers we cannot reach.  No notary is configured by default
(Synapse defaults to ``matrix.org``); a notary without ``verify_keys`` is
refused (Synapse's ``accept_keys_insecurely`` is not offered).

*Sharing.* Concurrent look-ups of one server share one fetch: a second
look-up while a fetch of that server is in flight waits for it instead of
starting another.  A look-up joining after the notaries were asked may not
have its key id asked of them; it then answers ``None``.

*Negative cache.* After a successful fetch of a server, look-ups that miss
the cache do not fetch that server again for ``failure_cache_ms`` (default
:data:`DEFAULT_KEY_FETCH_FAILURE_CACHE_MS`, 60 s), counted from when the fetch
ended: they answer ``None``.  So a request naming a random key id of a live
server cannot make us fetch its keys more often than once a minute.

A failed fetch (no source gave a valid answer) holds the server off for
``failure_retry_ms`` (default :data:`DEFAULT_KEY_FETCH_RETRY_MS`, 2 s), doubled
after each consecutive failure up to ``failure_cache_ms``.  A request signed by
a server is evidence that it is up, and one lost packet must not make us
refuse every request from a peer for a minute (a peer answered 401 backs off:
Synapse's first retry is minutes away).  A dead server is still asked at most
once a minute after its first few failures.  The failure is also recorded in
the store (``set_server_key_failure``) so that other processes sharing the
database hold off for ``failure_retry_ms`` too; a successful fetch clears it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Awaitable, Iterable, Mapping, Optional, Protocol, Sequence

from signedjson.key import (
    decode_verify_key_base64,
    get_verify_key,
    is_signing_algorithm_supported,
)
from signedjson.sign import verify_signed_json
from signedjson.types import SigningKey, VerifyKey
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from devicelist_plugin.core.models import JsonDict
from devicelist_plugin.core.parse import ParseError, parse_server_name
from devicelist_plugin.storage.types import ServerKeyFailure, ServerKeyRow

from .client import FederationClientError, QueryArgs
from .key_server import KEY_SERVER_PATH
from .signing_keys import OldVerifyKey, key_id as key_id_of

KEY_QUERY_PATH = "/_matrix/key/v2/query"

#: How long a fetched key may be used at most, from when it was fetched (the
#: specification's 7 days), whatever its ``valid_until_ts`` says.
MAX_KEY_CACHE_LIFETIME_MS = 7 * 24 * 60 * 60 * 1000

#: After a fetch of a server's keys, how long look-ups that miss the cache
#: answer ``None`` instead of fetching again.
DEFAULT_KEY_FETCH_FAILURE_CACHE_MS = 60 * 1000

#: After a failed fetch of a server's keys, the first hold-off; doubled for
#: each further consecutive failure, up to the failure cache period.
DEFAULT_KEY_FETCH_RETRY_MS = 2 * 1000

#: Seconds allowed for one key request (direct or to one notary).
DEFAULT_KEY_FETCH_TIMEOUT = 10.0

_ED25519 = "ed25519"
# Our own current keys never expire for us.
_FOREVER = sys.maxsize


class KeyResponseError(Exception):
    """A key response failed validation; the message says why."""


class TrustedKeyServersError(ValueError):
    """The ``trusted_key_servers`` configuration is malformed; the message says where."""


@dataclass(frozen=True)
class TrustedKeyServer:
    """A notary: a server whose ``/_matrix/key/v2/query`` answers we accept
    when signed by one of ``verify_keys``."""

    server_name: str
    verify_keys: tuple[VerifyKey, ...]


def parse_trusted_key_servers(config: object) -> list[TrustedKeyServer]:
    """Parse Synapse's ``trusted_key_servers`` shape; ``None`` is no notary::

        - server_name: notary.example
          verify_keys:
            "ed25519:auto": "<unpadded base64 public key>"

    :raise TrustedKeyServersError: naming the offending entry.
    """
    if config is None:
        return []
    if not isinstance(config, (list, tuple)):
        raise TrustedKeyServersError(
            "trusted_key_servers: expected a list of {server_name, verify_keys}"
        )
    result: list[TrustedKeyServer] = []
    seen: set[str] = set()
    for index, entry in enumerate(config):
        where = f"trusted_key_servers[{index}]"
        if not isinstance(entry, Mapping):
            raise TrustedKeyServersError(f"{where}: expected {{server_name, verify_keys}}")
        name = entry.get("server_name")
        if not isinstance(name, str):
            raise TrustedKeyServersError(f"{where}.server_name: expected a server name")
        try:
            parse_server_name(name, f"{where}.server_name")
        except ParseError as e:
            raise TrustedKeyServersError(str(e)) from None
        if name in seen:
            raise TrustedKeyServersError(f"{where}: {name!r} listed twice")
        seen.add(name)
        keys = entry.get("verify_keys")
        if not isinstance(keys, Mapping) or not keys:
            raise TrustedKeyServersError(
                f"{where}.verify_keys: the notary's keys are required,"
                " as a mapping of key id to base64 key"
            )
        verify_keys: list[VerifyKey] = []
        for kid, value in keys.items():
            if not isinstance(kid, str) or _version_of(kid) is None:
                raise TrustedKeyServersError(
                    f"{where}.verify_keys: key id {kid!r} must be 'ed25519:<version>'"
                )
            if not isinstance(value, str):
                raise TrustedKeyServersError(f"{where}.verify_keys.{kid}: expected a base64 string")
            try:
                verify_keys.append(_decode_key(kid, value))
            except KeyResponseError as e:
                raise TrustedKeyServersError(f"{where}.verify_keys.{kid}: {e}") from None
        result.append(TrustedKeyServer(name, tuple(verify_keys)))
    return result


class ServerKeyStore(Protocol):
    """The part of the store the key ring uses (see ``IDeviceListStore``)."""

    def store_server_keys(
        self, server_name: str, keys: Sequence[ServerKeyRow]
    ) -> Deferred[None]: ...

    def get_server_keys(
        self, server_name: str, key_ids: Optional[Sequence[str]] = None
    ) -> Deferred[dict[str, ServerKeyRow]]: ...

    def get_server_key_failure(self, server_name: str) -> Deferred[Optional[ServerKeyFailure]]: ...

    def set_server_key_failure(
        self, server_name: str, error: str, now_ms: int
    ) -> Deferred[None]: ...


class KeyFetchClient(Protocol):
    """The part of :class:`~devicelist_plugin.federation.client.FederationClient` used."""

    def get_json(
        self,
        destination: str,
        path: str,
        args: Optional[QueryArgs] = None,
        timeout: Optional[float] = None,
    ) -> Awaitable[JsonDict]: ...

    def post_json(
        self,
        destination: str,
        path: str,
        body: JsonDict,
        args: Optional[QueryArgs] = None,
        timeout: Optional[float] = None,
    ) -> Awaitable[JsonDict]: ...


# ----------------------------------------------------------------------
# validation (pure)


def _version_of(kid: str) -> str | None:
    """The version of an ``ed25519:<version>`` key id, else ``None``."""
    alg, sep, version = kid.partition(":")
    if alg != _ED25519 or not sep or not version:
        return None
    return version


def _decode_key(kid: str, key_b64: str) -> VerifyKey:
    version = _version_of(kid)
    if version is None:
        raise KeyResponseError(f"key id {kid!r} is not 'ed25519:<version>'")
    try:
        return decode_verify_key_base64(_ED25519, version, key_b64)
    except Exception as e:
        raise KeyResponseError(
            f"key {kid!r} is not a valid ed25519 public key ({type(e).__name__})"
        ) from None


def _timestamp(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise KeyResponseError(f"{what} must be a non-negative integer")
    return value


def _parse_key_map(
    value: object, what: str, old: bool
) -> dict[str, tuple[VerifyKey, str, Optional[int]]]:
    """``{key_id: (verify_key, base64, expired_ts)}``, other algorithms skipped."""
    if not isinstance(value, dict):
        raise KeyResponseError(f"{what} must be an object")
    keys: dict[str, tuple[VerifyKey, str, Optional[int]]] = {}
    for kid, entry in value.items():
        if not is_signing_algorithm_supported(kid):
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("key"), str):
            raise KeyResponseError(f"{what}.{kid} must be an object with a string 'key'")
        expired_ts = (
            _timestamp(entry.get("expired_ts"), f"{what}.{kid}.expired_ts") if old else None
        )
        keys[kid] = (_decode_key(kid, entry["key"]), entry["key"], expired_ts)
    return keys


def _check_signatures(obj: JsonDict, signer: str, keys: Iterable[VerifyKey], what: str) -> None:
    """At least one of ``keys`` signed ``obj`` as ``signer``, and each of
    ``keys`` that did verifies."""
    signatures = obj.get("signatures")
    if not isinstance(signatures, dict) or not isinstance(signatures.get(signer), dict):
        raise KeyResponseError(f"no signature of {signer}")
    present = signatures[signer]
    checked = 0
    for verify_key in keys:
        kid = key_id_of(verify_key)
        if kid not in present:
            continue
        try:
            verify_signed_json(obj, signer, verify_key)
        except Exception:
            raise KeyResponseError(
                f"{what} signature of {signer} with {kid} does not verify"
            ) from None
        checked += 1
    if not checked:
        raise KeyResponseError(f"not signed by {signer} with any of the expected keys ({what})")


def parse_key_response(response: object, server_name: str, fetched_ts: int) -> list[ServerKeyRow]:
    """Validate a key response of ``server_name`` (see the module docstring)
    and return its keys as store rows fetched at ``fetched_ts``.

    :raise KeyResponseError: with the reason.
    """
    if not isinstance(response, dict):
        raise KeyResponseError("key response is not an object")
    if response.get("server_name") != server_name:
        raise KeyResponseError(
            f"server_name {response.get('server_name')!r} is not {server_name!r}"
        )
    valid_until_ts = _timestamp(response.get("valid_until_ts"), "valid_until_ts")
    current = _parse_key_map(response.get("verify_keys"), "verify_keys", old=False)
    old = _parse_key_map(response.get("old_verify_keys", {}), "old_verify_keys", old=True)
    _check_signatures(response, server_name, (vk for vk, _, _ in current.values()), "self")
    rows = [
        ServerKeyRow(
            server_name=server_name,
            key_id=kid,
            verify_key=b64,
            valid_until_ts=valid_until_ts,
            expired_ts=expired_ts,
            fetched_ts=fetched_ts,
            key_json=response,
        )
        for source in (current, old)
        for kid, (_, b64, expired_ts) in source.items()
        if source is current or kid not in current
    ]
    return rows


def key_usable_until(row: ServerKeyRow) -> int:
    """The last ms a stored key may be used for (inclusive): see the module docstring."""
    if row.expired_ts is not None:
        return row.expired_ts - 1
    return min(row.valid_until_ts, row.fetched_ts + MAX_KEY_CACHE_LIFETIME_MS)


# ----------------------------------------------------------------------
# the key ring


@dataclass(frozen=True)
class _CachedKey:
    verify_key: VerifyKey
    # usable for requests signed at or before this ms
    usable_until: int


@dataclass
class _Fetch:
    # key id -> the latest time a look-up needs it valid at
    wanted: dict[str, int] = field(default_factory=dict)
    waiters: list[Deferred[None]] = field(default_factory=list)

    def want(self, key_id: str, at_ms: int) -> Deferred[None]:
        self.wanted[key_id] = max(at_ms, self.wanted.get(key_id, at_ms))
        waiter: Deferred[None] = Deferred()
        self.waiters.append(waiter)
        return waiter


class KeyRing:
    """Remote servers' verify keys; see the module docstring for the policy.

    :param server_name: our own name, whose keys are answered locally.
    :param signing_keys: our current keys.
    :param old_verify_keys: our retired keys.
    :param store: where fetched keys and fetch failures are kept.
    :param client: fetches keys (signed requests are fine).
    :param clock: the time validity and the negative cache are measured on.
    :param trusted_key_servers: the notaries, asked in order after the server itself.
    :param failure_cache_ms: how long after a successful fetch a server is not
        fetched again, and the longest hold-off after failed ones.
    :param failure_retry_ms: the hold-off after a first failed fetch (doubled
        per consecutive failure).
    :param fetch_timeout: seconds per key request.
    """

    log = Logger()

    def __init__(
        self,
        server_name: str,
        store: ServerKeyStore,
        client: KeyFetchClient,
        clock: IReactorTime,
        *,
        signing_keys: Sequence[SigningKey] = (),
        old_verify_keys: Sequence[OldVerifyKey] = (),
        trusted_key_servers: Sequence[TrustedKeyServer] = (),
        failure_cache_ms: int = DEFAULT_KEY_FETCH_FAILURE_CACHE_MS,
        failure_retry_ms: int = DEFAULT_KEY_FETCH_RETRY_MS,
        fetch_timeout: float = DEFAULT_KEY_FETCH_TIMEOUT,
    ) -> None:
        self._server_name = server_name
        self._store = store
        self._client = client
        self._clock = clock
        self._notaries = tuple(trusted_key_servers)
        self._failure_cache_ms = failure_cache_ms
        self._failure_retry_ms = min(failure_retry_ms, failure_cache_ms)
        self._fetch_timeout = fetch_timeout
        self._local: dict[str, _CachedKey] = {}
        for old in old_verify_keys:
            self._local[old.key_id] = _CachedKey(old.verify_key, old.expired_ts - 1)
        for signing_key in signing_keys:
            self._local[key_id_of(signing_key)] = _CachedKey(get_verify_key(signing_key), _FOREVER)
        self._keys: dict[str, dict[str, _CachedKey]] = {}
        # server name -> (when its last fetch ended (ms), hold-off after it (ms))
        self._attempts: dict[str, tuple[int, int]] = {}
        # server name -> consecutive failed fetches
        self._failures: dict[str, int] = {}
        self._inflight: dict[str, _Fetch] = {}

    def get_verify_key(
        self, server_name: str, key_id: str, at_ms: int
    ) -> Deferred[Optional[VerifyKey]]:
        """The key ``key_id`` of ``server_name`` usable at ``at_ms``, or ``None``.

        Unknown, unfetchable and expired keys are ``None``, never an error;
        only a failure to read the store fails the Deferred.
        """
        if server_name != self._server_name:
            # the common case, every signed request of a known server: no
            # coroutine (only valid server names are ever cached)
            key = self._cached(server_name, key_id, at_ms)
            if key is not None:
                return succeed(key)
        return Deferred.fromCoroutine(self._get_verify_key(server_name, key_id, at_ms))

    def _now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    async def _get_verify_key(
        self, server_name: str, key_id: str, at_ms: int
    ) -> Optional[VerifyKey]:
        if server_name == self._server_name:
            local = self._local.get(key_id)
            return local.verify_key if local is not None and at_ms <= local.usable_until else None
        if _version_of(key_id) is None:
            return None
        try:
            parse_server_name(server_name)
        except ParseError:
            self.log.info("Not fetching keys of invalid server name {server!r}", server=server_name)
            return None

        key = self._cached(server_name, key_id, at_ms)
        if key is not None:
            return key
        rows = await self._store.get_server_keys(server_name, [key_id])
        self._remember(server_name, rows.values())
        key = self._cached(server_name, key_id, at_ms)
        if key is not None:
            return key

        fetch = self._inflight.get(server_name)
        if fetch is None:
            if await self._recently_fetched(server_name):
                # (a fetch may have ended while we looked)
                return self._cached(server_name, key_id, at_ms)
            # another look-up may have started a fetch while we read the store
            fetch = self._inflight.get(server_name)
        if fetch is not None:
            await fetch.want(key_id, at_ms)
        else:
            fetch = _Fetch()
            self._inflight[server_name] = fetch
            waiter = fetch.want(key_id, at_ms)
            Deferred.fromCoroutine(self._run_fetch(server_name, fetch))
            await waiter
        return self._cached(server_name, key_id, at_ms)

    def _cached(self, server_name: str, key_id: str, at_ms: int) -> Optional[VerifyKey]:
        cached = self._keys.get(server_name, {}).get(key_id)
        if cached is not None and at_ms <= cached.usable_until:
            return cached.verify_key
        return None

    def _remember(self, server_name: str, rows: Iterable[ServerKeyRow]) -> None:
        for row in rows:
            try:
                verify_key = _decode_key(row.key_id, row.verify_key)
            except KeyResponseError as e:
                self.log.warn(
                    "Ignoring stored key {key_id} of {server}: {reason}",
                    key_id=row.key_id,
                    server=server_name,
                    reason=str(e),
                )
                continue
            # (no entry for servers without keys: names come from requests)
            self._keys.setdefault(server_name, {})[row.key_id] = _CachedKey(
                verify_key, key_usable_until(row)
            )

    async def _recently_fetched(self, server_name: str) -> bool:
        now_ms = self._now_ms()
        attempt = self._attempts.get(server_name)
        if attempt is not None and now_ms < attempt[0] + attempt[1]:
            return True
        failure = await self._store.get_server_key_failure(server_name)
        if failure is not None and now_ms < failure.failed_ts + self._failure_retry_ms:
            self.log.debug(
                "Not fetching keys of {server}: failed at {failed_ts} ({error})",
                server=server_name,
                failed_ts=failure.failed_ts,
                error=failure.error,
            )
            return True
        return False

    def _hold_off_ms(self, server_name: str, failed: bool) -> int:
        """The hold-off after a fetch of ``server_name`` that just ended."""
        if not failed:
            self._failures.pop(server_name, None)
            return self._failure_cache_ms
        n = self._failures.get(server_name, 0) + 1
        hold_off = self._failure_retry_ms * 2 ** min(n - 1, 30)
        if hold_off < self._failure_cache_ms:
            self._failures[server_name] = n
        return min(hold_off, self._failure_cache_ms)

    async def _run_fetch(self, server_name: str, fetch: _Fetch) -> None:
        failed = True
        try:
            failed = not await self._fetch(server_name, fetch)
        except Exception:
            self.log.failure("Unexpected error fetching the keys of {server}", server=server_name)
        finally:
            now_ms = self._now_ms()
            self._attempts[server_name] = (now_ms, self._hold_off_ms(server_name, failed))
            for name, (ended, hold_off) in list(self._attempts.items()):
                if now_ms >= ended + hold_off:
                    del self._attempts[name]
            if self._inflight.get(server_name) is fetch:
                del self._inflight[server_name]
            waiters, fetch.waiters = fetch.waiters, []
            for waiter in waiters:
                if not waiter.called:  # a cancelled look-up
                    waiter.callback(None)

    def _missing(self, server_name: str, wanted: Mapping[str, int]) -> dict[str, int]:
        return {
            kid: at_ms
            for kid, at_ms in wanted.items()
            if self._cached(server_name, kid, at_ms) is None
        }

    async def _fetch(self, server_name: str, fetch: _Fetch) -> bool:
        """Fetch and save the keys of ``server_name``; whether a source answered."""
        errors: list[str] = []
        answered = False
        try:
            rows = await self._fetch_direct(server_name)
        except Exception as e:
            errors.append(self._fetch_failed(server_name, server_name, e))
        else:
            answered = True
            await self._save(server_name, rows)

        for notary in self._notaries:
            missing = self._missing(server_name, fetch.wanted)
            if not missing:
                break
            try:
                rows = await self._fetch_from_notary(notary, server_name, missing)
            except Exception as e:
                errors.append(self._fetch_failed(notary.server_name, server_name, e))
            else:
                answered = True
                if rows:
                    await self._save(server_name, rows)

        if not answered:
            try:
                await self._store.set_server_key_failure(
                    server_name, "; ".join(errors), self._now_ms()
                )
            except Exception:
                self.log.failure(
                    "Cannot record the key fetch failure of {server}", server=server_name
                )
        return answered

    def _fetch_failed(self, source: str, server_name: str, e: Exception) -> str:
        if isinstance(e, (FederationClientError, KeyResponseError)):
            self.log.info(
                "Fetching the keys of {server} from {source} failed: {reason}",
                server=server_name,
                source=source,
                reason=str(e),
            )
        else:
            self.log.failure(
                "Unexpected error fetching the keys of {server} from {source}",
                server=server_name,
                source=source,
            )
        return f"{source}: {type(e).__name__}: {e}"

    async def _fetch_direct(self, server_name: str) -> list[ServerKeyRow]:
        response = await self._client.get_json(
            server_name, KEY_SERVER_PATH, timeout=self._fetch_timeout
        )
        return parse_key_response(response, server_name, self._now_ms())

    async def _fetch_from_notary(
        self, notary: TrustedKeyServer, server_name: str, missing: Mapping[str, int]
    ) -> list[ServerKeyRow]:
        body: JsonDict = {
            "server_keys": {
                server_name: {
                    kid: {"minimum_valid_until_ts": at_ms} for kid, at_ms in missing.items()
                }
            }
        }
        response = await self._client.post_json(
            notary.server_name, KEY_QUERY_PATH, body, timeout=self._fetch_timeout
        )
        objects: Any = response.get("server_keys")
        if not isinstance(objects, list):
            raise KeyResponseError("server_keys must be a list")
        fetched_ts = self._now_ms()
        rows: list[ServerKeyRow] = []
        rejected: list[str] = []
        for index, obj in enumerate(objects):
            if not isinstance(obj, dict) or obj.get("server_name") != server_name:
                # not an answer about the server asked: not ours to judge
                continue
            try:
                _check_signatures(obj, notary.server_name, notary.verify_keys, "notary")
                rows.extend(parse_key_response(obj, server_name, fetched_ts))
            except KeyResponseError as e:
                self.log.warn(
                    "Dropping key object {index} for {server} from notary {notary}: {reason}",
                    index=index,
                    server=server_name,
                    notary=notary.server_name,
                    reason=str(e),
                )
                rejected.append(str(e))
        if rejected and not rows:
            raise KeyResponseError("; ".join(rejected))
        return rows

    async def _save(self, server_name: str, rows: Sequence[ServerKeyRow]) -> None:
        self._remember(server_name, rows)
        try:
            await self._store.store_server_keys(server_name, rows)
        except Exception:
            # the keys were verified: use them from memory all the same
            self.log.failure("Cannot store the keys of {server}", server=server_name)
