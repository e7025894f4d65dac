"""The host API for local users' devices and keys.

:class:`LocalDeviceHandler` is what a homeserver embedding the plugin calls
when one of its users logs in or out, renames a device, or uploads keys, and
what the federation endpoints (:mod:`devicelist_plugin.federation.local_endpoints`)
serve from.  Every method returns a Deferred and never blocks the reactor.

Changes.  A change other servers must see (a device created, renamed or
deleted, its keys uploaded, a cross-signing key uploaded, a cross-signing
signature of a device or key) is one store transaction that allocates the
user's next stream id (strictly increasing per user) and, in the same
transaction, queues the change for every server that shares a room with the
user, as the :class:`~devicelist_plugin.membership.MembershipSource` says at
that moment.  After the commit each change listener is called with
``(user_id, stream_id, device_ids)``: the device ids the change concerns, or
``()`` for a change of the cross-signing keys; it is called before anything
else is done after the commit (the sender sends from it), and called again
for the same change when servers that came to share a room with the user
meanwhile have had the current devices queued.  Under concurrency listeners
may see one user's changes out of stream order; they should read what is
pending from the store rather than trust the order of calls.  A listener
that raises, or returns a Deferred that fails, is logged and never fails the
change.

One-time and fallback keys are not federated: uploading them allocates no
stream id.  Uploading identical device or cross-signing keys again changes
nothing and allocates no stream id either.

Validation.  Every upload is validated before anything is stored
(:mod:`devicelist_plugin.core.uploads`); a bad one raises
:class:`~devicelist_plugin.federation.errors.MatrixError` 400 ``M_BAD_JSON``
or ``M_INVALID_PARAM`` whose message starts with the path of the offending
field, and stores nothing.  Other errors, all ``MatrixError``:

- a user id that is malformed or not of this server: 400 ``M_INVALID_PARAM``;
- an unknown device: 404 ``M_NOT_FOUND``;
- creating a device that exists: 400 ``M_INVALID_PARAM``;
- a one-time key id uploaded again with other content: 400
  ``M_INVALID_PARAM`` naming the key.

Big users.  ``GET /user/devices`` answers (:meth:`LocalDeviceHandler.encoded_user_devices_snapshot`)
are read in one short transaction, assembled from the stored keys' JSON text
by the ``cpu_runner`` (a worker thread on a real reactor) for users with
many devices, and kept for the user's last stream id: the servers that
refetch after a change are served the same bytes without reading the devices
again.
Federation key query answers (:meth:`LocalDeviceHandler.encoded_federation_query_keys`)
keep each user's encoded part for the stream id it was read at, whatever the
user's size: while the stream id read with the keys is the same, the part is
served again instead of being decoded, rebuilt and encoded.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import (
    Any,
    Callable,
    Collection,
    Coroutine,
    Generic,
    Mapping,
    Optional,
    Protocol,
    Sequence,
    TypeVar,
)

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from devicelist_plugin.core.models import (
    USAGE_MASTER,
    USAGE_SELF_SIGNING,
    USAGE_USER_SIGNING,
    CrossSigningKey,
    JsonDict,
)
from devicelist_plugin.core.parse import (
    MAX_DEVICE_ID_LENGTH,
    MAX_DISPLAY_NAME_LENGTH,
    ParseError,
    split_user_id,
)
from devicelist_plugin.core.uploads import (
    OneTimeKey,
    SignatureUploadContext,
    UploadError,
    parse_signature_upload,
    signed_objects_needed,
    validate_cross_signing_upload,
    validate_device_keys_upload,
    validate_fallback_keys,
    validate_one_time_keys,
    verify_signature_upload,
)
from devicelist_plugin.federation.errors import (
    M_BAD_JSON,
    M_INVALID_PARAM,
    M_NOT_FOUND,
    MatrixError,
)
from devicelist_plugin.listeners import call_listener
from devicelist_plugin.local.serving import (
    EncodedUserKeys,
    cross_signing_key_json,
    device_keys_json,
    encode_keys_query_body,
    encode_user_devices_body,
    encode_user_keys,
    signatures_by_target,
    user_device_keys,
    user_devices_body,
)
from devicelist_plugin.membership import MembershipSource
from devicelist_plugin.storage.codec import cross_signing_key_from_json
from devicelist_plugin.storage.errors import (
    DeviceExistsError,
    KeyConflictError,
    UnknownDeviceError,
)
from devicelist_plugin.storage.interface import IDeviceListStore
from devicelist_plugin.storage.types import (
    CrossSigningSignature,
    LocalDevice,
    LocalUserKeys,
    StreamChange,
)

__all__ = [
    "DEFAULT_ANSWER_CACHE_BYTES",
    "INLINE_ENCODE_MAX_DEVICES",
    "ChangeListener",
    "QueuedListener",
    "CpuRunner",
    "LocalDeviceHandler",
    "run_inline",
    "thread_pool_runner",
]

T = TypeVar("T")
A = TypeVar("A")
StreamIdT = TypeVar("StreamIdT", int, Optional[int])

#: Answers for fewer devices are encoded on the calling thread, not by the
#: ``cpu_runner``.
INLINE_ENCODE_MAX_DEVICES = 100

#: Default memory for encoded ``/user/devices`` answers of big users.
DEFAULT_ANSWER_CACHE_BYTES = 64 * 1024 * 1024


class _AnswerCache(Generic[A]):
    """Encoded answers by user: the last one of each user (its stream id and
    whether names were included), least recently used dropped first when
    their ``size`` adds up to more than ``max_bytes``."""

    def __init__(self, max_bytes: int, size: Callable[[A], int]) -> None:
        self.max_bytes = max_bytes
        self._sizeof = size
        self._entries: OrderedDict[str, tuple[int, bool, A]] = OrderedDict()
        self._size = 0

    def get(self, user_id: str, include_names: bool) -> Optional[tuple[int, A]]:
        entry = self._entries.get(user_id)
        if entry is None or entry[1] != include_names:
            return None
        self._entries.move_to_end(user_id)
        return entry[0], entry[2]

    def put(self, user_id: str, include_names: bool, stream_id: int, body: A) -> None:
        if self._sizeof(body) > self.max_bytes:
            return
        old = self._entries.pop(user_id, None)
        if old is not None:
            self._size -= self._sizeof(old[2])
            if old[0] > stream_id:
                # a slower request for an older snapshot: keep the newer one
                body, stream_id, include_names = old[2], old[0], old[1]
        self._entries[user_id] = (stream_id, include_names, body)
        self._size += self._sizeof(body)
        while self._size > self.max_bytes:
            _, (_, _, dropped) = self._entries.popitem(last=False)
            self._size -= self._sizeof(dropped)


def _encoded_size(answer: EncodedUserKeys) -> int:
    return answer.size


#: ``listener(user_id, stream_id, device_ids)``, called after each committed change.
ChangeListener = Callable[[str, int, tuple[str, ...]], object]

#: ``listener(user_id, destinations)``, called after each committed change
#: with the servers it was queued for (before the change listeners).
QueuedListener = Callable[[str, frozenset[str]], object]


class CpuRunner(Protocol):
    """Runs a CPU-bound, thread-safe function and gives its result back on
    the reactor thread (see :func:`thread_pool_runner`)."""

    def __call__(self, f: Callable[[], T]) -> "Deferred[T]": ...


def run_inline(f: Callable[[], T]) -> "Deferred[T]":
    """The default :class:`CpuRunner`: run ``f`` now, on the calling thread."""
    return maybeDeferred(f)


def thread_pool_runner(reactor: IReactorFromThreads, pool: ThreadPool) -> CpuRunner:
    """A :class:`CpuRunner` using ``pool`` (e.g. ``reactor.getThreadPool()``).

    Encoding a 10,000-device answer takes up to a few hundred milliseconds
    of Python; in a pool thread the reactor thread still gets the
    interpreter every few milliseconds and keeps serving other requests.
    """

    def run(f: Callable[[], T]) -> "Deferred[T]":
        return deferToThreadPool(reactor, pool, f)

    return run


def _upload_error(e: UploadError) -> MatrixError:
    return MatrixError(400, e.errcode, str(e))


def _check_unicode(value: str, field: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise MatrixError(400, M_INVALID_PARAM, f"{field}: not valid Unicode") from None


def _check_device_id(device_id: object, field: str = "device_id") -> str:
    if not isinstance(device_id, str) or not device_id:
        raise MatrixError(400, M_INVALID_PARAM, f"{field}: expected a non-empty string")
    _check_unicode(device_id, field)
    if len(device_id) > MAX_DEVICE_ID_LENGTH:
        raise MatrixError(
            400, M_INVALID_PARAM, f"{field}: longer than {MAX_DEVICE_ID_LENGTH} characters"
        )
    return device_id


def _check_display_name(display_name: object) -> Optional[str]:
    if display_name is None:
        return None
    if not isinstance(display_name, str):
        raise MatrixError(400, M_INVALID_PARAM, "display_name: expected a string or null")
    _check_unicode(display_name, "display_name")
    if len(display_name) > MAX_DISPLAY_NAME_LENGTH:
        raise MatrixError(
            400,
            M_INVALID_PARAM,
            f"display_name: longer than {MAX_DISPLAY_NAME_LENGTH} characters",
        )
    return display_name


def _unknown_device(e: UnknownDeviceError) -> MatrixError:
    return MatrixError(404, M_NOT_FOUND, f"Unknown device {e.device_id!r} of {e.user_id}")


class LocalDeviceHandler:
    """Local users' devices and keys: the host API and what federation serves.

    :param server_name: our server name; only its users are handled.
    :param store: where devices, keys and the device-list streams live.
    :param membership: the servers each change must be queued for.
    :param clock: timestamps of changes (``clock.seconds()``).
    :param allow_device_name_lookup_over_federation: serve device display
        names to other servers (``/user/devices``, ``/user/keys/query``,
        :meth:`federation_device_states`); off by default, as in Synapse.
        The host's own clients always see them.
    :param cpu_runner: where big answers are encoded; the default runs
        inline (tests on a simulated clock), a host on a real reactor passes
        ``thread_pool_runner(reactor, reactor.getThreadPool())``.
    :param answer_cache_bytes: memory for the encoded ``/user/devices``
        answers, kept per user for its last stream id: after a change every
        server sharing a room refetches, and all but the first are served
        from here, with one short read of the user's stream position; and as much again for the users' parts
        of federation key query answers.  0 disables both caches.
    """

    log = Logger()

    def __init__(
        self,
        server_name: str,
        store: IDeviceListStore,
        membership: MembershipSource,
        clock: IReactorTime,
        *,
        allow_device_name_lookup_over_federation: bool = False,
        cpu_runner: CpuRunner = run_inline,
        answer_cache_bytes: int = DEFAULT_ANSWER_CACHE_BYTES,
    ) -> None:
        self.server_name = server_name
        self._cpu_runner = cpu_runner
        self.allow_device_name_lookup_over_federation = allow_device_name_lookup_over_federation
        self._store = store
        self._membership = membership
        self._clock = clock
        self._listeners: list[ChangeListener] = []
        self._queued_listeners: list[QueuedListener] = []
        self._answers: _AnswerCache[bytes] = _AnswerCache(answer_cache_bytes, len)
        self._key_answers: _AnswerCache[EncodedUserKeys] = _AnswerCache(
            answer_cache_bytes, _encoded_size
        )

    # ------------------------------------------------------------------
    # plumbing

    def add_change_listener(self, listener: ChangeListener) -> None:
        """Call ``listener(user_id, stream_id, device_ids)`` after every
        committed change (see the module docstring)."""
        self._listeners.append(listener)

    def remove_change_listener(self, listener: ChangeListener) -> None:
        """Stop calling ``listener``."""
        self._listeners.remove(listener)

    def add_queued_listener(self, listener: QueuedListener) -> None:
        """Call ``listener(user_id, destinations)`` after every committed
        change, first, with the servers it was queued for: the sender wakes
        exactly those without reading the store."""
        self._queued_listeners.append(listener)

    def remove_queued_listener(self, listener: QueuedListener) -> None:
        """Stop calling ``listener``."""
        self._queued_listeners.remove(listener)

    def is_local_user(self, user_id: str) -> bool:
        """Whether ``user_id`` is a well-formed user id of this server."""
        try:
            return split_user_id(user_id)[1] == self.server_name
        except ParseError:
            return False

    def check_local_user(self, user_id: object, field: str = "user_id") -> str:
        """``user_id`` if it is a well-formed id of one of our users.

        :raise MatrixError: 400 ``M_INVALID_PARAM`` naming the user otherwise.
        """
        if not isinstance(user_id, str):
            raise MatrixError(400, M_INVALID_PARAM, f"{field}: expected a user id string")
        try:
            _, server_name = split_user_id(user_id, field)
        except ParseError as e:
            raise MatrixError(400, M_INVALID_PARAM, f"Invalid user id: {e}") from None
        if server_name != self.server_name:
            raise MatrixError(
                400,
                M_INVALID_PARAM,
                f"User {user_id} is not local to this server ({self.server_name})",
            )
        return user_id

    def _now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    async def _destinations(self, user_id: str) -> frozenset[str]:
        servers = await self._membership.servers_sharing_room(user_id)
        return frozenset(servers) - {self.server_name}

    async def _committed(
        self,
        user_id: str,
        used: frozenset[str],
        notify: Callable[[], None],
    ) -> None:
        """After a change committed for the destinations in ``used``: tell
        the listeners at once (the sender is waiting for it: nothing else
        stands between the commit and the EDU), then cover the servers that
        came to share a room meanwhile.  They may have been sent the devices
        as they were before the change, so the current ones are queued for
        them too, and the listeners told again to send those."""
        self._notify_queued(user_id, used)
        notify()
        new = frozenset(await self._destinations(user_id) - used)
        for destination in sorted(new):
            await self._store.enqueue_current_devices(destination, user_id, self._now_ms())
        if new:
            self._notify_queued(user_id, new)
            notify()

    def _notify_queued(self, user_id: str, destinations: frozenset[str]) -> None:
        if destinations:
            for queued in list(self._queued_listeners):
                self._call_listener(queued, (user_id, destinations), user_id, None)

    def _notify(self, user_id: str, stream_id: int, device_ids: tuple[str, ...]) -> None:
        for listener in list(self._listeners):
            self._call_listener(listener, (user_id, stream_id, device_ids), user_id, stream_id)

    def _call_listener(
        self,
        listener: Callable[..., object],
        args: tuple[Any, ...],
        user_id: str,
        stream_id: Optional[int],
    ) -> None:
        call_listener(
            self.log,
            lambda: listener(*args),
            "Change listener {listener!r} failed for {user_id} at {stream_id}",
            listener=listener,
            user_id=user_id,
            stream_id=stream_id,
        )

    def _notify_changes(self, user_id: str, changes: Sequence[StreamChange]) -> None:
        if changes:
            device_ids = tuple(sorted({c.device_id for c in changes if c.device_id is not None}))
            self._notify(user_id, max(c.stream_id for c in changes), device_ids)

    @staticmethod
    def _run(coroutine: Coroutine[Any, Any, T]) -> "Deferred[T]":
        return Deferred.fromCoroutine(coroutine)

    # ------------------------------------------------------------------
    # devices

    def create_device(
        self, user_id: str, device_id: str, display_name: Optional[str] = None
    ) -> "Deferred[int]":
        """Create a device (at login); return its change's stream id.

        :raise MatrixError: 400 ``M_INVALID_PARAM`` if it exists or an
            argument is malformed.
        """
        return self._run(self._create_device(user_id, device_id, display_name))

    async def _create_device(
        self, user_id: str, device_id: str, display_name: Optional[str]
    ) -> int:
        name = _check_display_name(display_name)
        return await self._change_device(
            user_id,
            device_id,
            lambda now, dests: self._store.create_device(user_id, device_id, name, now, dests),
        )

    async def _change_device(
        self,
        user_id: str,
        device_id: str,
        write: Callable[[int, frozenset[str]], "Deferred[StreamIdT]"],
    ) -> StreamIdT:
        """Check the ids, write the change with every destination's pending
        row in one transaction, then tell the listeners (unless the write
        changed nothing: ``None``)."""
        self.check_local_user(user_id)
        _check_device_id(device_id)
        destinations = await self._destinations(user_id)
        try:
            stream_id = await write(self._now_ms(), destinations)
        except DeviceExistsError:
            raise MatrixError(
                400, M_INVALID_PARAM, f"Device {device_id!r} of {user_id} already exists"
            ) from None
        except UnknownDeviceError as e:
            raise _unknown_device(e) from None
        if stream_id is not None:
            changed: int = stream_id
            await self._committed(
                user_id, destinations, lambda: self._notify(user_id, changed, (device_id,))
            )
        return stream_id

    def rename_device(
        self, user_id: str, device_id: str, display_name: Optional[str]
    ) -> "Deferred[int]":
        """Set (``None``: remove) a device's display name; return the stream id.

        :raise MatrixError: 404 ``M_NOT_FOUND`` for an unknown device.
        """
        return self._run(self._rename_device(user_id, device_id, display_name))

    async def _rename_device(
        self, user_id: str, device_id: str, display_name: Optional[str]
    ) -> int:
        name = _check_display_name(display_name)
        return await self._change_device(
            user_id,
            device_id,
            lambda now, dests: self._store.rename_device(user_id, device_id, name, now, dests),
        )

    def delete_device(self, user_id: str, device_id: str) -> "Deferred[int]":
        """Delete a device with all its keys and the signatures of it (at
        logout); return the stream id of the deletion.

        :raise MatrixError: 404 ``M_NOT_FOUND`` for an unknown device.
        """
        return self._run(self._delete_device(user_id, device_id))

    async def _delete_device(self, user_id: str, device_id: str) -> int:
        return await self._change_device(
            user_id,
            device_id,
            lambda now, dests: self._store.delete_device(user_id, device_id, now, dests),
        )

    def get_devices(self, user_id: str) -> "Deferred[list[LocalDevice]]":
        """A local user's devices, ordered by device id (names, stored keys,
        timestamps): for the host's ``GET /devices``."""
        return self._run(self._get_devices(user_id))

    async def _get_devices(self, user_id: str) -> list[LocalDevice]:
        self.check_local_user(user_id)
        return await self._store.get_devices(user_id)

    # ------------------------------------------------------------------
    # device, one-time and fallback keys

    def upload_device_keys(
        self, user_id: str, device_id: str, keys_json: object
    ) -> "Deferred[Optional[int]]":
        """Store a device's ``DeviceKeys``; return the stream id, or ``None``
        when the same keys were already stored (nothing changes).

        :raise MatrixError: 400 for bad keys (nothing stored), 404
            ``M_NOT_FOUND`` for an unknown device.
        """
        return self._run(self._upload_device_keys(user_id, device_id, keys_json))

    async def _upload_device_keys(
        self, user_id: str, device_id: str, keys_json: object
    ) -> Optional[int]:
        self.check_local_user(user_id)
        _check_device_id(device_id)
        try:
            keys = validate_device_keys_upload(keys_json, user_id, device_id)
        except UploadError as e:
            raise _upload_error(e) from None
        return await self._store_device_keys(user_id, device_id, keys.raw)

    async def _store_device_keys(
        self, user_id: str, device_id: str, raw: JsonDict
    ) -> Optional[int]:
        # the device and its stored keys are checked in the write itself
        return await self._change_device(
            user_id,
            device_id,
            lambda now, dests: self._store.set_device_keys_if_changed(
                user_id, device_id, raw, now, dests
            ),
        )

    def upload_one_time_keys(
        self, user_id: str, device_id: str, keys: object
    ) -> "Deferred[dict[str, int]]":
        """Add one-time keys ``{"<algorithm>:<key_id>": key}``, claimed in the
        order given; return the unclaimed count per algorithm.

        A key id uploaded again with the same content is ignored; with other
        content the whole upload is refused (400 ``M_INVALID_PARAM``).
        """
        return self._run(self._upload_one_time_keys(user_id, device_id, keys))

    async def _upload_one_time_keys(
        self, user_id: str, device_id: str, keys: object
    ) -> dict[str, int]:
        self.check_local_user(user_id)
        _check_device_id(device_id)
        try:
            validated = validate_one_time_keys(keys)
        except UploadError as e:
            raise _upload_error(e) from None
        await self._add_one_time_keys(user_id, device_id, validated)
        return await self._store.count_one_time_keys(user_id, device_id)

    async def _add_one_time_keys(
        self, user_id: str, device_id: str, keys: Sequence[OneTimeKey], path: str = "one_time_keys"
    ) -> None:
        try:
            await self._store.add_one_time_keys(
                user_id, device_id, [(k.algorithm, k.key_id, k.key) for k in keys]
            )
        except UnknownDeviceError as e:
            raise _unknown_device(e) from None
        except KeyConflictError as e:
            raise MatrixError(
                400,
                M_INVALID_PARAM,
                f'{path}["{e.algorithm}:{e.key_id}"]: already uploaded with other content',
            ) from None

    def upload_fallback_keys(
        self, user_id: str, device_id: str, keys: object
    ) -> "Deferred[list[str]]":
        """Replace the device's fallback keys ``{"<algorithm>:<key_id>": key}``
        (at most one per algorithm); return the algorithms whose fallback key
        is unused."""
        return self._run(self._upload_fallback_keys(user_id, device_id, keys))

    async def _upload_fallback_keys(
        self, user_id: str, device_id: str, keys: object
    ) -> list[str]:
        self.check_local_user(user_id)
        _check_device_id(device_id)
        try:
            validated = validate_fallback_keys(keys)
        except UploadError as e:
            raise _upload_error(e) from None
        if await self._store.get_device(user_id, device_id) is None:
            raise _unknown_device(UnknownDeviceError(user_id, device_id))
        await self._set_fallback_keys(user_id, device_id, validated)
        return await self._store.get_unused_fallback_key_algorithms(user_id, device_id)

    async def _set_fallback_keys(
        self, user_id: str, device_id: str, keys: Sequence[OneTimeKey]
    ) -> None:
        for key in keys:
            try:
                await self._store.set_fallback_key(
                    user_id, device_id, key.algorithm, key.key_id, key.key
                )
            except UnknownDeviceError as e:
                raise _unknown_device(e) from None

    def upload_keys(
        self, user_id: str, device_id: str, body: object
    ) -> "Deferred[JsonDict]":
        """A whole ``POST /keys/upload`` body: ``device_keys``,
        ``one_time_keys`` and ``fallback_keys``, each optional.  Every part is
        validated before any is stored.  Returns ``{"one_time_key_counts":
        {algorithm: n}}``."""
        return self._run(self._upload_keys(user_id, device_id, body))

    async def _upload_keys(self, user_id: str, device_id: str, body: object) -> JsonDict:
        self.check_local_user(user_id)
        _check_device_id(device_id)
        if not isinstance(body, dict):
            raise MatrixError(400, M_BAD_JSON, "<body>: expected an object")
        try:
            device_keys = (
                None
                if body.get("device_keys") is None
                else validate_device_keys_upload(body["device_keys"], user_id, device_id)
            )
            one_time_keys = (
                ()
                if body.get("one_time_keys") is None
                else validate_one_time_keys(body["one_time_keys"])
            )
            fallback_keys = (
                ()
                if body.get("fallback_keys") is None
                else validate_fallback_keys(body["fallback_keys"])
            )
        except UploadError as e:
            raise _upload_error(e) from None
        # One-time keys first: their conflicts are the only refusal left,
        # and they are checked atomically by the store.  Each part checks
        # that the device exists; a part that is absent costs nothing (an
        # upload of device keys alone is on the way to other servers).
        if one_time_keys:
            await self._add_one_time_keys(user_id, device_id, one_time_keys)
        await self._set_fallback_keys(user_id, device_id, fallback_keys)
        if device_keys is not None:
            await self._store_device_keys(user_id, device_id, device_keys.raw)
        elif not one_time_keys and not fallback_keys:
            if await self._store.get_device(user_id, device_id) is None:
                raise _unknown_device(UnknownDeviceError(user_id, device_id))
        counts = await self._store.count_one_time_keys(user_id, device_id)
        return {"one_time_key_counts": counts}

    # ------------------------------------------------------------------
    # cross-signing

    async def _own_cross_signing_keys(self, user_id: str) -> dict[str, CrossSigningKey]:
        stored = await self._store.get_cross_signing_keys(user_id)
        return {usage: cross_signing_key_from_json(raw, user_id) for usage, raw in stored.items()}

    def upload_cross_signing_keys(self, user_id: str, body: object) -> "Deferred[Optional[int]]":
        """Store ``master_key``, ``self_signing_key`` and ``user_signing_key``
        (each optional) from a ``/keys/device_signing/upload`` body.

        The keys that differ from the stored ones are stored together as one
        change (one stream id, returned; queued for other servers only when
        the master or self-signing key changed); ``None`` when nothing
        changed.  The self-signing and user-signing keys must be signed by the
        master key (uploaded with them or stored).  User-interactive auth is
        the host's business.
        """
        return self._run(self._upload_cross_signing_keys(user_id, body))

    async def _upload_cross_signing_keys(self, user_id: str, body: object) -> Optional[int]:
        self.check_local_user(user_id)
        existing = await self._own_cross_signing_keys(user_id)
        try:
            uploaded = validate_cross_signing_upload(body, user_id, existing)
        except UploadError as e:
            raise _upload_error(e) from None
        changed = {
            usage: key.raw
            for usage, key in uploaded.items()
            if usage not in existing or existing[usage].raw != key.raw
        }
        if not changed:
            return None
        destinations = await self._destinations(user_id)
        stream_id = await self._store.set_cross_signing_keys(
            user_id, changed, self._now_ms(), destinations
        )
        await self._committed(
            user_id, destinations, lambda: self._notify(user_id, stream_id, ())
        )
        return stream_id

    def upload_signatures(self, user_id: str, body: object) -> "Deferred[JsonDict]":
        """Store the verified signatures of a ``/keys/signatures/upload``
        body; return ``{"failures": {user_id: {key: {"status", "errcode",
        "message"}}}}`` for the entries that were refused.

        Own devices must be signed by the self-signing key, the own master
        key by own devices, other users' master keys by the user-signing
        key; each signed object must equal the stored one apart from
        ``signatures`` and ``unsigned``.  Other users' master keys are taken
        from the store (local users) or the remote cache; an unknown one is a
        404 ``M_NOT_FOUND`` failure.  A body of the wrong shape is a 400
        and stores nothing.
        """
        return self._run(self._upload_signatures(user_id, body))

    async def _upload_signatures(self, user_id: str, body: object) -> JsonDict:
        self.check_local_user(user_id)
        try:
            upload = parse_signature_upload(body)
        except UploadError as e:
            raise _upload_error(e) from None
        device_ids, others = signed_objects_needed(upload, user_id)
        own = (await self._store.get_local_user_keys({user_id: device_ids}))[user_id]
        local_others = [u for u in others if self.is_local_user(u)]
        master_keys: dict[str, CrossSigningKey] = {}
        if local_others:
            found = await self._store.get_local_user_keys({u: () for u in local_others})
            for other, keys in found.items():
                raw = keys.cross_signing_keys.get(USAGE_MASTER)
                if raw is not None:
                    master_keys[other] = cross_signing_key_from_json(raw, other)
        for other in others:
            if other not in local_others:
                remote = await self._store.get_remote_cross_signing_keys(other)
                if USAGE_MASTER in remote:
                    master_keys[other] = remote[USAGE_MASTER]
        context = SignatureUploadContext(
            user_id=user_id,
            cross_signing_keys={
                usage: cross_signing_key_from_json(raw, user_id)
                for usage, raw in own.cross_signing_keys.items()
            },
            devices={d.device_id: d.keys_json for d in own.devices},
            master_keys=master_keys,
        )
        result = verify_signature_upload(upload, context)
        if result.signatures:
            destinations = await self._destinations(user_id)
            changes = await self._store.store_signatures(
                user_id,
                [
                    CrossSigningSignature(
                        s.signer_user_id,
                        s.signer_key_id,
                        s.target_user_id,
                        s.target_id,
                        s.signature,
                    )
                    for s in result.signatures
                ],
                self._now_ms(),
                destinations,
            )
            await self._committed(
                user_id, destinations, lambda: self._notify_changes(user_id, changes)
            )
        return {"failures": result.failures}

    # ------------------------------------------------------------------
    # what other servers (and the host's clients) are served

    def query_keys(
        self,
        device_keys: Mapping[str, Sequence[str]],
        *,
        requesting_user_id: Optional[str] = None,
        over_federation: bool = False,
    ) -> "Deferred[JsonDict]":
        """Answer a key query ``{user_id: [device_id, ...]}`` (an empty list:
        every device) for local users.

        Returns ``device_keys`` (every requested user, devices with keys,
        ``unsigned.device_display_name`` when known and allowed: always for
        the host's clients, over federation only with
        ``allow_device_name_lookup_over_federation``), ``master_keys`` and
        ``self_signing_keys`` of the users that have them, and, unless
        ``over_federation``, ``user_signing_keys`` of ``requesting_user_id``
        alone.  Signatures ``requesting_user_id`` made of other users'
        master keys are shown to them only.

        :raise MatrixError: 400 ``M_INVALID_PARAM`` naming the first user
            that is not ours; nothing is answered for the others.
        """
        return self._run(
            self._query_keys(device_keys, requesting_user_id, over_federation)
        )

    def _wanted_keys(
        self, device_keys: Mapping[str, Sequence[str]]
    ) -> dict[str, Optional[Collection[str]]]:
        """A key query's users (all ours, else 400) and their devices (``None``: every one)."""
        for user_id in device_keys:
            self.check_local_user(user_id, f"device_keys[{user_id!r}]")
        return {
            user_id: (tuple(devices) if devices else None)
            for user_id, devices in device_keys.items()
        }

    async def _query_keys(
        self,
        device_keys: Mapping[str, Sequence[str]],
        requesting_user_id: Optional[str],
        over_federation: bool,
    ) -> JsonDict:
        wanted = self._wanted_keys(device_keys)
        from_user = None if over_federation else requesting_user_id
        found = await self._store.get_local_user_keys(wanted, from_user_id=from_user)
        names = self.allow_device_name_lookup_over_federation if over_federation else True
        body: JsonDict = {"device_keys": {}, "master_keys": {}, "self_signing_keys": {}}
        if not over_federation:
            body["user_signing_keys"] = {}
        for user_id in sorted(found):
            user_keys = found[user_id]
            body["device_keys"][user_id] = user_device_keys(
                user_keys, display_name_in_unsigned=names
            )
            usages = [("master_keys", USAGE_MASTER), ("self_signing_keys", USAGE_SELF_SIGNING)]
            if not over_federation and user_id == requesting_user_id:
                usages.append(("user_signing_keys", USAGE_USER_SIGNING))
            for name, usage in usages:
                key = cross_signing_key_json(user_keys, usage)
                if key is not None:
                    body[name][user_id] = key
        return body

    def encoded_federation_query_keys(
        self, device_keys: Mapping[str, Sequence[str]]
    ) -> "Deferred[bytes]":
        """:meth:`query_keys` with ``over_federation``, as canonical JSON
        bytes: what ``POST /user/keys/query`` sends.

        The part of a user asked for with every device (an empty list, what
        servers ask) is kept for the user's stream id it was read at, and
        served again, without reading, decoding and encoding the keys, while
        the user's stream id is the same: every change that shows in the
        answer moves the stream.
        """
        return self._run(self._encoded_federation_query_keys(device_keys))

    async def _encoded_federation_query_keys(
        self, device_keys: Mapping[str, Sequence[str]]
    ) -> bytes:
        wanted = self._wanted_keys(device_keys)
        names = self.allow_device_name_lookup_over_federation
        kept: dict[str, EncodedUserKeys] = {}
        for user_id, devices in wanted.items():
            cached = self._key_answers.get(user_id, names) if devices is None else None
            if cached is not None:
                kept[user_id] = cached[1]
        found = await self._store.get_local_user_keys_since(
            wanted, {user_id: answer.stream_id for user_id, answer in kept.items()}
        )
        answers: dict[str, EncodedUserKeys] = {}
        for user_id, user_keys in found.items():
            if user_keys is None:
                # still at the stream id of the kept answer
                answers[user_id] = kept[user_id]
                continue
            answer = encode_user_keys(user_keys, include_display_names=names)
            if wanted[user_id] is None and user_keys.stream_id > 0:
                self._key_answers.put(user_id, names, user_keys.stream_id, answer)
            answers[user_id] = answer
        return encode_keys_query_body(answers)

    def claim_keys(self, one_time_keys: Mapping[str, Mapping[str, str]]) -> "Deferred[JsonDict]":
        """Claim one key per ``{user_id: {device_id: algorithm}}``: the
        device's oldest one-time key of that algorithm, removed so that it is
        never handed out again (whatever the concurrency), else its fallback
        key.  Devices with neither are left out.  Returns
        ``{"one_time_keys": {user_id: {device_id: {"<algorithm>:<key_id>": key}}}}``.

        :raise MatrixError: 400 ``M_INVALID_PARAM`` naming the first user
            that is not ours; nothing is claimed.
        """
        return self._run(self._claim_keys(one_time_keys))

    async def _claim_keys(self, one_time_keys: Mapping[str, Mapping[str, str]]) -> JsonDict:
        for user_id in one_time_keys:
            self.check_local_user(user_id, f"one_time_keys[{user_id!r}]")
        requests = [
            (user_id, device_id, algorithm)
            for user_id, devices in one_time_keys.items()
            for device_id, algorithm in devices.items()
        ]
        claimed = await self._store.claim_keys(requests) if requests else {}
        return {"one_time_keys": claimed}

    def user_devices_snapshot(
        self, user_id: str, requesting_server: Optional[str] = None
    ) -> "Deferred[JsonDict]":
        """The ``GET /_matrix/federation/v1/user/devices/{userId}`` answer.

        ``stream_id`` is the user's last stream id (0 if none) and the
        devices are exactly the state after it, read in one transaction.
        With ``requesting_server`` (the authenticated origin) the snapshot is
        also recorded as served to it, in that same transaction: its pending
        updates of the user up to ``stream_id`` are dropped (the snapshot
        carries them) and the next EDU sent to it names ``stream_id`` as
        ``prev_id`` (see :meth:`IDeviceListStore.record_snapshot_served`).

        :raise MatrixError: 400 ``M_INVALID_PARAM`` for a malformed or
            non-local user id.
        """
        return self._run(self._user_devices_snapshot(user_id, requesting_server))

    async def _user_devices_snapshot(
        self, user_id: str, requesting_server: Optional[str]
    ) -> JsonDict:
        snapshot = await self._read_snapshot(user_id, requesting_server)
        return user_devices_body(
            snapshot, include_display_names=self.allow_device_name_lookup_over_federation
        )

    def _snapshot_destination(self, requesting_server: Optional[str]) -> Optional[str]:
        return None if requesting_server == self.server_name else requesting_server

    async def _read_snapshot(self, user_id: str, requesting_server: Optional[str]) -> LocalUserKeys:
        self.check_local_user(user_id)
        destination = self._snapshot_destination(requesting_server)
        return await self._store.get_user_devices_snapshot(user_id, destination)

    def encoded_user_devices_snapshot(
        self, user_id: str, requesting_server: Optional[str] = None
    ) -> "Deferred[bytes]":
        """:meth:`user_devices_snapshot` as canonical JSON bytes, encoded by
        the ``cpu_runner`` (off the reactor thread when the host gave one)
        for users with at least :data:`INLINE_ENCODE_MAX_DEVICES` devices,
        and without decoding the stored keys of devices that have no
        signatures to merge: what ``GET /user/devices`` sends."""
        return self._run(self._encoded_user_devices_snapshot(user_id, requesting_server))

    async def _encoded_user_devices_snapshot(
        self, user_id: str, requesting_server: Optional[str]
    ) -> bytes:
        self.check_local_user(user_id)
        include = self.allow_device_name_lookup_over_federation
        destination = self._snapshot_destination(requesting_server)
        cached = self._answers.get(user_id, include)
        if cached is None:
            snapshot = await self._store.get_user_devices_snapshot(user_id, destination)
        else:
            # The answer for stream id S is a function of S: if S is still
            # the user's last id, serve it again without reading the devices
            # (still recorded as served to D: a change committed since is no
            # harm, D gets the snapshot at S and the EDUs after S, chained
            # from S).
            stream_id, body = cached
            since = await self._store.get_user_devices_snapshot_since(
                user_id, destination, stream_id
            )
            if since is None:
                return body
            snapshot = since

        def encode() -> bytes:
            return encode_user_devices_body(snapshot, include_display_names=include)

        if len(snapshot.devices) < INLINE_ENCODE_MAX_DEVICES:
            # well under a millisecond: not worth a trip to a thread (and a
            # wait behind a big answer being encoded there)
            body = encode()
        else:
            body = await self._cpu_runner(encode)
        if snapshot.stream_id > 0:
            self._answers.put(user_id, include, snapshot.stream_id, body)
        return body

    def federation_device_states(
        self, user_id: str, device_ids: Collection[str]
    ) -> "Deferred[dict[str, JsonDict]]":
        """What an ``m.device_list_update`` EDU carries for each device that
        still exists: ``{"keys": ...}`` when it has keys (with the stored
        cross-signing signatures merged in, as ``/user/devices`` serves them)
        and ``device_display_name`` under the same rule as ``/user/devices``.
        Deleted devices are absent from the result."""
        return self._run(self._federation_device_states(user_id, device_ids))

    async def _federation_device_states(
        self, user_id: str, device_ids: Collection[str]
    ) -> dict[str, JsonDict]:
        self.check_local_user(user_id)
        wanted = sorted(set(device_ids))
        with_keys = (await self._store.get_local_user_keys({user_id: wanted}))[user_id]
        keyed = {d.device_id for d in with_keys.devices}
        names: dict[str, Optional[str]] = {}
        for device_id in wanted:
            if device_id not in keyed:
                device = await self._store.get_device(user_id, device_id)
                if device is not None:
                    names[device_id] = device.display_name
        return self.federation_device_states_of(with_keys, names, wanted)

    def federation_device_states_of(
        self,
        with_keys: LocalUserKeys,
        names: Mapping[str, Optional[str]],
        device_ids: Collection[str],
    ) -> dict[str, JsonDict]:
        """:meth:`federation_device_states` from what was read already: the
        user's keys (as :meth:`IDeviceListStore.get_local_user_keys` reads
        them, for these devices) and the display names of the devices
        without keys that still exist (``names``)."""
        by_target = signatures_by_target(with_keys.signatures)
        keyed = {d.device_id: d for d in with_keys.devices}
        states: dict[str, JsonDict] = {}
        for device_id in sorted(set(device_ids)):
            state: JsonDict = {}
            keyed_device = keyed.get(device_id)
            if keyed_device is not None:
                state["keys"] = device_keys_json(keyed_device, by_target.get(device_id, ()))
                display_name = keyed_device.display_name
            elif device_id in names:
                display_name = names[device_id]
            else:
                continue
            if self.allow_device_name_lookup_over_federation and display_name is not None:
                state["device_display_name"] = display_name
            states[device_id] = state
        return states
