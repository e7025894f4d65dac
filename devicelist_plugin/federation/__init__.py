"""Federation: server signing keys, the key server, X-Matrix request
signing and verification, and the JSON resource every HTTP endpoint of the
plugin is served through (with its single error mapping).

Modules:

- :mod:`.errors`: :class:`~.errors.MatrixError`, the one error type handlers
  raise, and the ``errcode`` constants.
- :mod:`.resource`: :class:`~.resource.JsonResource`, routing, body limits,
  JSON in and out, authentication hook.
- :mod:`.xmatrix`: pure ``Authorization: X-Matrix`` parsing, building and
  verification (no reactor).
- :mod:`.signing_keys`: the signing key file (Synapse's format) and
  ``old_signing_keys`` configuration.
- :mod:`.key_server`: ``GET /_matrix/key/v2/server``.
- :mod:`.auth`: :class:`~.auth.FederationAuthenticator`, which verifies
  inbound federation requests.
- :mod:`.keyring`: :class:`~.keyring.KeyRing`, remote servers' verify keys
  (fetched directly or through notaries, checked, cached).
- :mod:`.transport`: :func:`~.transport.build_federation_transport`, which
  wires all of the above for one instance.
- :mod:`.local_endpoints`: ``/user/devices``, ``/user/keys/query`` and
  ``/user/keys/claim``, serving local users' devices and keys; register
  them on the transport's resource.
"""
