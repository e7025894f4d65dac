"""``examples/embed.py``: its builder, run on a simulated network against a
second module."""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType

import treq
from signedjson.key import generate_signing_key
from twisted.internet.defer import ensureDeferred
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from devicelist_plugin.membership import InMemoryMembership
from devicelist_plugin.module import DeviceListModule
from devicelist_plugin.storage import open_sqlite_store
from tests.helpers import FakeNetwork

EXAMPLE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "embed.py"
)
A = "a.test"
B = "b.test"
BOB = "@bob:b.test"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("devicelist_embed_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class EmbedExampleTests(SynchronousTestCase):
    def test_builder_mounts_the_module_in_the_host_site(self) -> None:
        example = load_example()
        clock = MemoryReactorClock()
        clock.advance(1_700_000_000)
        network = FakeNetwork(clock)

        def store() -> object:
            s = self.successResultOf(
                open_sqlite_store(":memory:", MemoryReactorClock(), synchronous=True)
            )
            self.addCleanup(s.close)
            return s

        host = example.build(A, [generate_signing_key("a1")], store(), clock, network.agent_for(A))
        network.add_server(A, host.site)
        self.successResultOf(host.module.start())
        self.addCleanup(lambda: self.successResultOf(host.module.stop()))

        b_membership = InMemoryMembership(B)
        b = DeviceListModule(
            B, [generate_signing_key("b1")], store(), clock, network.agent_for(B),  # type: ignore[arg-type]
            b_membership,
        )
        network.add_server(B, b.root)
        self.successResultOf(b.start())
        self.addCleanup(lambda: self.successResultOf(b.stop()))
        b_membership.join(f"!demo:{A}", f"@alice:{A}")
        b_membership.join(f"!demo:{A}", BOB)

        # the host's own resource is served next to the module's
        client = network.client_for("tester")
        d = client.get(f"http://{A}/hello")
        network.flush()
        self.assertEqual(self.successResultOf(treq.content(self.successResultOf(d))),
                         b"hello from the host\n")
        d = client.get(f"http://{A}/metrics")
        network.flush()
        self.assertIn(b"devicelist_transactions_sent_total",
                      self.successResultOf(treq.content(self.successResultOf(d))))

        # the demo: memberships, a device change, a query of local and remote users
        done = ensureDeferred(example.demo(host, BOB))
        network.flush()
        self.successResultOf(done)
        # alice's device change reached B (a signed /send verified with the
        # key served under the host's /_matrix), and B fetched her list
        self.assertEqual(host.module.sender.transactions_sent, 1)
        state = self.successResultOf(b.store.get_remote_sync_state(f"@alice:{A}"))
        assert state is not None
        self.assertTrue(state.cached)
