"""Embedding devicelist-plugin in a Twisted homeserver: a runnable example.

The "homeserver" here is a ``Site`` of its own with one resource of its own
(``/hello``); it mounts the module's federation resource as ``/_matrix`` and
its metrics as ``/metrics``, supplies room memberships, reports a device
change and queries a remote user's devices.

Run it (serves http://127.0.0.1:8090 until Ctrl-C)::

    python examples/embed.py --server-name localhost:8090 --port 8090

:func:`build` is what a host writes; ``tests/test_embed_example.py`` runs it
on a simulated network.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Sequence

from signedjson.key import generate_signing_key
from signedjson.types import SigningKey
from twisted.internet.defer import ensureDeferred
from twisted.web.iweb import IAgent, IRequest
from twisted.web.resource import Resource
from twisted.web.server import Site

from devicelist_plugin.membership import InMemoryMembership
from devicelist_plugin.module import DeviceListModule, ModuleConfig
from devicelist_plugin.storage import Store


class Hello(Resource):
    """A resource of the host's own."""

    isLeaf = True

    def render_GET(self, request: IRequest) -> bytes:
        return b"hello from the host\n"


@dataclass
class Host:
    """What the host keeps: its Site, the module and its memberships."""

    site: Site
    module: DeviceListModule
    membership: InMemoryMembership


def build(
    server_name: str,
    signing_keys: Sequence[SigningKey],
    store: Store,
    reactor: Any,
    agent: IAgent,
    config: ModuleConfig = ModuleConfig(),
) -> Host:
    """Build the module and mount it in the host's own Site."""
    # 1. memberships: the host knows its rooms; here they are kept in memory
    membership = InMemoryMembership(server_name)
    # 2. the module
    module = DeviceListModule(
        server_name, signing_keys, store, reactor, agent, membership, config
    )
    # 3. the host's root: its own resources, and the module's under /_matrix
    root = Resource()
    root.putChild(b"hello", Hello())
    root.putChild(b"_matrix", module.resource)
    root.putChild(b"metrics", module.metrics.resource)
    site = Site(root, reactor=reactor)
    return Host(site, module, membership)


async def demo(host: Host, remote_user: str) -> None:
    """What a host does at run time."""
    module = host.module
    me = f"@alice:{module.server_name}"
    room = f"!demo:{module.server_name}"
    # tell the module about rooms (the remote user's server then gets alice's devices)
    host.membership.join(room, me)
    host.membership.join(room, remote_user)
    # report a local device change (a login): queued and sent to servers sharing a room
    await module.local.create_device(me, "DEMODEVICE", "demo device")
    # ask for devices of local and remote users
    answer = await module.query_keys({me: [], remote_user: []}, timeout=5)
    print("keys/query:", answer)


def main(argv: Sequence[str]) -> None:
    from twisted.internet import reactor as global_reactor
    from twisted.web.client import Agent

    reactor: Any = global_reactor

    from devicelist_plugin.storage import open_sqlite_store

    parser = argparse.ArgumentParser()
    parser.add_argument("--server-name", default="localhost:8090")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--remote-user", default="@bob:localhost:8091")
    args = parser.parse_args(argv)

    async def run() -> None:
        directory = tempfile.mkdtemp(prefix="devicelist-embed-")
        store = await open_sqlite_store(os.path.join(directory, "devicelist.db"), reactor)
        # a real host passes its federation agent (server discovery, TLS policy);
        # build_federation_agent in devicelist_plugin.federation.agent is one
        host = build(args.server_name, [generate_signing_key("a1")], store, reactor, Agent(reactor))
        reactor.listenTCP(args.port, host.site, interface="127.0.0.1")
        # the module is also an IService: setServiceParent(application) works too
        await host.module.start()
        reactor.addSystemEventTrigger(
            "before", "shutdown", lambda: host.module.stop().addBoth(lambda _: store.close())
        )
        print(f"serving {args.server_name} on http://127.0.0.1:{args.port}/hello")
        await demo(host, args.remote_user)

    def failed(failure: Any) -> None:
        print(failure.getTraceback(), file=sys.stderr)

    ensureDeferred(run()).addErrback(failed)
    reactor.run()


__all__ = ["Host", "build", "demo", "main"]

if __name__ == "__main__":
    main(sys.argv[1:])
