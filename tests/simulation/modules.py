"""A complete :class:`DeviceListModule` on an in-memory store, serving on a
:class:`~tests.helpers.FakeNetwork`: the unit of the small two-server
simulations."""

from __future__ import annotations

from signedjson.key import generate_signing_key
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from devicelist_plugin.core.backoff import BackoffPolicy
from devicelist_plugin.membership import InMemoryMembership
from devicelist_plugin.module import DeviceListModule, ModuleConfig
from devicelist_plugin.storage import Store, open_sqlite_store
from tests.helpers import FakeNetwork

#: retries after 1 s, doubling to a minute; no jitter
TEST_POLICY = BackoffPolicy(min_interval=1, multiplier=2, max_interval=60)


def start_module(
    case: SynchronousTestCase,
    name: str,
    clock: MemoryReactorClock,
    network: FakeNetwork,
    membership: InMemoryMembership,
) -> DeviceListModule:
    """Start the module of server ``name`` on ``network``; stopped and closed
    at the test's cleanup."""
    store: Store = case.successResultOf(
        open_sqlite_store(":memory:", MemoryReactorClock(), synchronous=True)
    )
    case.addCleanup(store.close)
    module = DeviceListModule(
        name,
        [generate_signing_key("k1")],
        store,
        clock,
        network.agent_for(name),
        membership,
        ModuleConfig(retry_policy=TEST_POLICY),
        jitter=lambda low, high: 1.0,
    )
    network.add_server(name, module.root)
    case.successResultOf(module.start())
    case.addCleanup(lambda: case.successResultOf(module.stop()))
    return module
