"""The federation layer of one instance, wired in one place.

:func:`build_federation_transport` takes what an instance has (its name,
signing keys, store, clock, an ``IAgent`` and a few configuration values) and
builds, once:

- the :class:`~.key_server.KeyServer` (``GET /_matrix/key/v2/server``);
- the :class:`~.client.FederationClient`, signing every request with the first
  signing key (:func:`~.xmatrix.build_authorization_header`);
- the :class:`~.keyring.KeyRing`, fetching remote keys through that client;
- the :class:`~.auth.FederationAuthenticator`, looking keys up in the key ring;
- the :class:`~.resource.JsonResource` serving the version and key-server
  endpoints, on which the other federation endpoints register with
  ``requires_auth=True``;
- a root :class:`~twisted.web.resource.Resource` for a
  :class:`~twisted.web.server.Site`: ``/_matrix/...`` goes to the JSON
  resource, and so does every other path, to be answered with a JSON 404
  ``M_UNRECOGNIZED`` rather than Twisted's HTML page.  The JSON resource is a
  leaf that routes on the whole request path, so a host can equally mount
  :attr:`FederationTransport.resource` as the ``_matrix`` child of its own root.

The agent is :func:`~.agent.build_federation_agent`'s in production and any
in-memory ``IAgent`` in tests (``FakeNetwork.agent_for(name)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from signedjson.types import SigningKey
from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IAgent, IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import Site

from devicelist_plugin.core.models import JsonDict

from .auth import FederationAuthenticator
from .client import DEFAULT_MAX_RESPONSE_SIZE, DEFAULT_TIMEOUT, FederationClient
from .key_server import DEFAULT_REFRESH_INTERVAL_MS, KeyServer
from .keyring import (
    DEFAULT_KEY_FETCH_FAILURE_CACHE_MS,
    DEFAULT_KEY_FETCH_TIMEOUT,
    KeyRing,
    ServerKeyStore,
    TrustedKeyServer,
)
from .resource import (
    DEFAULT_MAX_BODY_SIZE,
    VERSION_PATH,
    JsonResource,
    SizeLimitingRequest,
    version_handler,
)
from .signing_keys import OldVerifyKey
from .xmatrix import build_authorization_header


@dataclass(frozen=True)
class FederationTransportConfig:
    """The configuration values of the federation layer.

    :ivar key_refresh_interval_ms: our key responses' ``valid_until_ts`` is
        now plus this (Synapse's ``key_refresh_interval``, one day).
    :ivar trusted_key_servers: notaries, asked in order after the server
        itself (see :func:`~.keyring.parse_trusted_key_servers`).
    :ivar max_body_size: the largest request body accepted, in bytes.
    :ivar key_fetch_failure_cache_ms: after a fetch of a server's keys, how
        long it is not fetched again.
    :ivar key_fetch_timeout: seconds per key request.
    :ivar request_timeout: default seconds per outbound request.
    :ivar max_response_size: the largest response body read, in bytes.
    """

    key_refresh_interval_ms: int = DEFAULT_REFRESH_INTERVAL_MS
    trusted_key_servers: tuple[TrustedKeyServer, ...] = ()
    max_body_size: int = DEFAULT_MAX_BODY_SIZE
    key_fetch_failure_cache_ms: int = DEFAULT_KEY_FETCH_FAILURE_CACHE_MS
    key_fetch_timeout: float = DEFAULT_KEY_FETCH_TIMEOUT
    request_timeout: float = DEFAULT_TIMEOUT
    max_response_size: int = DEFAULT_MAX_RESPONSE_SIZE


class FederationRootResource(Resource):
    """A Site root sending every path to one JSON resource (``/_matrix`` as
    its named child, anything else as the fallback, answered with JSON 404)."""

    def __init__(self, json_resource: JsonResource) -> None:
        super().__init__()
        self._json_resource = json_resource
        self.putChild(b"_matrix", json_resource)

    def getChild(self, path: bytes, request: IRequest) -> IResource:
        return self._json_resource


@dataclass(frozen=True)
class FederationTransport:
    """The federation layer of one instance (see the module docstring).

    :ivar resource: register further federation endpoints here
        (``requires_auth=True`` authenticates with :attr:`authenticator`).
    :ivar root: the Site root serving :attr:`resource`.
    """

    server_name: str
    clock: IReactorTime
    key_server: KeyServer
    key_ring: KeyRing
    authenticator: FederationAuthenticator
    client: FederationClient
    resource: JsonResource
    root: FederationRootResource
    max_body_size: int

    def make_site(self, reactor: Optional[IReactorTime] = None) -> Site:
        """A Site serving :attr:`root` with the body size limit enforced while
        receiving (:class:`~.resource.SizeLimitingRequest`) and no form
        parsing; on ``reactor``, by default the transport's clock."""
        return Site(
            self.root,
            requestFactory=SizeLimitingRequest.with_limit(self.max_body_size),
            parsePOSTFormSubmission=False,
            reactor=reactor if reactor is not None else self.clock,
        )


def build_federation_transport(
    server_name: str,
    signing_keys: Sequence[SigningKey],
    store: ServerKeyStore,
    clock: IReactorTime,
    agent: IAgent,
    *,
    old_verify_keys: Sequence[OldVerifyKey] = (),
    config: FederationTransportConfig = FederationTransportConfig(),
) -> FederationTransport:
    """Build the federation layer of ``server_name``.

    :param signing_keys: the current keys, all published; the first signs
        outbound requests.
    :param old_verify_keys: retired keys, published and still accepted from
        ourselves until their ``expired_ts``.
    :param store: keeps remote servers' keys and key fetch failures.
    :param agent: what outbound requests go through.
    :raise ValueError: no signing key, or an old key id equal to a current one.
    """
    key_server = KeyServer(
        server_name,
        signing_keys,
        clock,
        old_verify_keys=old_verify_keys,
        refresh_interval_ms=config.key_refresh_interval_ms,
    )
    signing_key = signing_keys[0]

    def sign(method: str, destination: str, uri: bytes, content: Optional[JsonDict]) -> bytes:
        return build_authorization_header(
            signing_key, server_name, destination, method, uri, content
        )

    client = FederationClient(
        server_name,
        agent,
        clock,
        sign,
        default_timeout=config.request_timeout,
        max_response_size=config.max_response_size,
    )
    key_ring = KeyRing(
        server_name,
        store,
        client,
        clock,
        signing_keys=signing_keys,
        old_verify_keys=old_verify_keys,
        trusted_key_servers=config.trusted_key_servers,
        failure_cache_ms=config.key_fetch_failure_cache_ms,
        fetch_timeout=config.key_fetch_timeout,
    )
    authenticator = FederationAuthenticator(server_name, key_ring, clock)
    resource = JsonResource(authenticator=authenticator, max_body_size=config.max_body_size)
    resource.register("GET", VERSION_PATH, version_handler())
    key_server.register(resource)
    return FederationTransport(
        server_name=server_name,
        clock=clock,
        key_server=key_server,
        key_ring=key_ring,
        authenticator=authenticator,
        client=client,
        resource=resource,
        root=FederationRootResource(resource),
        max_body_size=config.max_body_size,
    )
