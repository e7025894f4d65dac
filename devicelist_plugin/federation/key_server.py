"""``GET /_matrix/key/v2/server``: this server's public keys, self-signed.

The deprecated ``/_matrix/key/v2/server/{keyId}`` form answers the same (the
spec says to ignore ``keyId``).  No authentication: this is how other
servers learn the keys to authenticate us with.
"""

from __future__ import annotations

from typing import Sequence

from signedjson.key import encode_verify_key_base64
from signedjson.sign import sign_json
from signedjson.types import SigningKey
from twisted.internet.interfaces import IReactorTime

from devicelist_plugin.core.models import JsonDict
from devicelist_plugin.federation.resource import JsonRequest, JsonResource
from devicelist_plugin.federation.signing_keys import OldVerifyKey, key_id, verify_key_base64

KEY_SERVER_PATH = "/_matrix/key/v2/server"
KEY_SERVER_KEY_ID_PATH = "/_matrix/key/v2/server/{keyId}"

# Synapse's default key_refresh_interval: one day.
DEFAULT_REFRESH_INTERVAL_MS = 24 * 60 * 60 * 1000


class KeyServer:
    """Builds and serves this server's key response.

    :param signing_keys: the current keys; all are published and all sign.
    :param old_verify_keys: retired keys, published in ``old_verify_keys``.
    :param refresh_interval_ms: ``valid_until_ts`` is now plus this.
    :raise ValueError: no signing key, or an old key id equal to a current one.
    """

    def __init__(
        self,
        server_name: str,
        signing_keys: Sequence[SigningKey],
        clock: IReactorTime,
        old_verify_keys: Sequence[OldVerifyKey] = (),
        refresh_interval_ms: int = DEFAULT_REFRESH_INTERVAL_MS,
    ) -> None:
        if not signing_keys:
            raise ValueError("the key server needs at least one signing key")
        current = {key_id(k) for k in signing_keys}
        for old in old_verify_keys:
            if old.key_id in current:
                raise ValueError(f"old signing key {old.key_id} is also a current signing key")
        self._server_name = server_name
        self._signing_keys = tuple(signing_keys)
        self._old_verify_keys = tuple(old_verify_keys)
        self._clock = clock
        self._refresh_interval_ms = refresh_interval_ms

    def response(self) -> JsonDict:
        """A freshly signed key response, valid for the refresh interval from now."""
        now_ms = int(self._clock.seconds() * 1000)
        body: JsonDict = {
            "server_name": self._server_name,
            "verify_keys": {key_id(k): {"key": verify_key_base64(k)} for k in self._signing_keys},
            "old_verify_keys": {
                old.key_id: {
                    "key": encode_verify_key_base64(old.verify_key),
                    "expired_ts": old.expired_ts,
                }
                for old in self._old_verify_keys
            },
            "valid_until_ts": now_ms + self._refresh_interval_ms,
        }
        for key in self._signing_keys:
            body = sign_json(body, self._server_name, key)
        return body

    async def handle(self, request: JsonRequest) -> tuple[int, JsonDict]:
        """The handler of both key paths."""
        return 200, self.response()

    def register(self, resource: JsonResource) -> None:
        """Serve :data:`KEY_SERVER_PATH` and :data:`KEY_SERVER_KEY_ID_PATH` on ``resource``."""
        resource.register("GET", KEY_SERVER_PATH, self.handle)
        resource.register("GET", KEY_SERVER_KEY_ID_PATH, self.handle)
