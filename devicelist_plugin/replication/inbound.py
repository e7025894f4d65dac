"""The inbound side of one instance, wired in one place.

:class:`InboundDeviceLists` builds, over the store, the federation client,
the membership source and the retry tracker shared with the sender:

- the :class:`~devicelist_plugin.replication.updater.RemoteDeviceListUpdater`
  (the remote cache: EDUs, resyncs, retries);
- the :class:`~devicelist_plugin.federation.send.TransactionReceiver` with the
  device-list EDUs registered (``m.device_list_update``,
  ``m.signing_key_update``, ``org.matrix.signing_key_update``);
- the :class:`~devicelist_plugin.replication.query.RemoteKeyQuerier` (key
  queries for the host's clients);

sharing one per-destination request limit.  The host mounts
:meth:`register` on its federation resource, calls :meth:`start` and
:meth:`stop` with its services, and wires the authenticator's contact
listener to the tracker (``authenticator.add_contact_listener(tracker.on_contact)``,
once per instance, for the sender too) so that a server that contacts us is
retried at once.  A host with its own ``/send`` skips :meth:`register` and
hands EDUs to ``receiver.receive_edus(origin, edus)``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Optional

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from devicelist_plugin.core.models import (
    EDU_DEVICE_LIST_UPDATE,
    EDU_SIGNING_KEY_UPDATE,
    EDU_SIGNING_KEY_UPDATE_UNSTABLE,
)
from devicelist_plugin.federation.client import FederationClient
from devicelist_plugin.federation.resource import JsonResource
from devicelist_plugin.federation.send import (
    DEFAULT_PRUNE_INTERVAL,
    DEFAULT_TXN_RETENTION,
    TransactionReceiver,
)
from devicelist_plugin.local.handler import CpuRunner, run_inline
from devicelist_plugin.membership import MembershipSource
from devicelist_plugin.replication.inbound_concurrency import (
    DEFAULT_PER_DESTINATION_LIMIT,
    DestinationLimiter,
)
from devicelist_plugin.replication.query import (
    DEFAULT_QUERY_TIMEOUT,
    LocalKeyQuery,
    RemoteKeyQuerier,
)
from devicelist_plugin.replication.retry import DestinationRetryTracker
from devicelist_plugin.replication.updater import RemoteDeviceListUpdater, UpdaterConfig
from devicelist_plugin.storage.interface import IDeviceListStore

__all__ = ["InboundConfig", "InboundDeviceLists", "register_device_list_edus"]


@dataclass(frozen=True)
class InboundConfig:
    """Configuration of the inbound side.

    :ivar updater: see :class:`UpdaterConfig` (hold grace, resync timeout,
        device cap, per-user backoff).
    :ivar txn_retention: seconds a processed transaction id is remembered.
    :ivar txn_prune_interval: seconds between prunings of old transaction ids.
    :ivar per_destination_limit: requests in flight to one server (resyncs
        and key queries together).
    :ivar query_timeout: default seconds a key query waits for remote servers.
    """

    updater: UpdaterConfig = field(default_factory=UpdaterConfig)
    txn_retention: float = DEFAULT_TXN_RETENTION
    txn_prune_interval: float = DEFAULT_PRUNE_INTERVAL
    per_destination_limit: int = DEFAULT_PER_DESTINATION_LIMIT
    query_timeout: float = DEFAULT_QUERY_TIMEOUT


def register_device_list_edus(
    receiver: TransactionReceiver, updater: RemoteDeviceListUpdater
) -> None:
    """Dispatch the device-list and cross-signing EDUs to ``updater``."""
    receiver.register_edu_batch_handler(EDU_DEVICE_LIST_UPDATE, updater.receive_device_list_updates)
    receiver.register_edu_handler(EDU_SIGNING_KEY_UPDATE, updater.receive_signing_key_update)
    receiver.register_edu_handler(
        EDU_SIGNING_KEY_UPDATE_UNSTABLE, updater.receive_signing_key_update
    )


class InboundDeviceLists:
    """The updater, the ``/send`` receiver and the key querier of one instance.

    :param local: answers key queries about local users.
    :param cpu_runner: where big ``/user/devices`` answers are parsed; on a
        real reactor pass ``thread_pool_runner(reactor, reactor.getThreadPool())``
        (parsing 10,000 devices takes most of a second of Python).
    :param jitter: the per-user backoff's jitter source.
    """

    def __init__(
        self,
        server_name: str,
        store: IDeviceListStore,
        client: FederationClient,
        clock: IReactorTime,
        membership: MembershipSource,
        retry_tracker: DestinationRetryTracker,
        *,
        config: InboundConfig = InboundConfig(),
        local: Optional[LocalKeyQuery] = None,
        cpu_runner: CpuRunner = run_inline,
        jitter: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self.limiter = DestinationLimiter(config.per_destination_limit)
        self.updater = RemoteDeviceListUpdater(
            server_name,
            store,
            client,
            clock,
            membership,
            retry_tracker,
            limiter=self.limiter,
            config=config.updater,
            cpu_runner=cpu_runner,
            jitter=jitter,
        )
        self.receiver = TransactionReceiver(
            store,
            clock,
            retention=config.txn_retention,
            prune_interval=config.txn_prune_interval,
        )
        register_device_list_edus(self.receiver, self.updater)
        self.querier = RemoteKeyQuerier(
            server_name,
            store,
            client,
            clock,
            membership,
            self.updater,
            retry_tracker,
            limiter=self.limiter,
            local=local,
            default_timeout=config.query_timeout,
        )

    def register(self, resource: JsonResource) -> None:
        """Serve ``PUT /send/{txnId}`` on the federation resource."""
        self.receiver.register(resource)

    def start(self) -> "Deferred[None]":
        """Start pruning transaction ids and resume persisted work."""
        self.receiver.start()
        return self.updater.start()

    def stop(self) -> "Deferred[None]":
        """Stop every timer; fires when in-flight work has ended."""
        self.receiver.stop()
        return self.updater.stop()
