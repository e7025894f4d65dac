"""Fuzzing A's federation endpoints of local device lists, with requests
signed by a known peer: ``GET /user/devices/{userId}`` (user ids of every
shape, percent-encoded or not, non-ASCII), ``POST /user/keys/query`` and
``POST /user/keys/claim`` (near-valid bodies with one field mutated,
arbitrary JSON, non-JSON bytes).

For every example: no 5xx, nothing logged as an error, a JSON answer with an
``errcode`` when refused, and a refused request leaves A's store as it was
and makes no request.  Run long with ``FUZZ_EXAMPLES=5000``.
"""

from __future__ import annotations

import string
from typing import Any
from urllib.parse import quote

from hypothesis import strategies as st

from devicelist_plugin.federation.local_endpoints import KEYS_CLAIM_PATH, KEYS_QUERY_PATH
from tests.fuzz.common import EDGE_STRINGS, encode, fuzz, is_json_object, json_values, mutated, raw_bodies
from tests.fuzz.federation import ALICE, DEVICES_PATH, U, TwoServersCase

_local = st.text(alphabet=string.ascii_lowercase + "._=-/+" + "é💥", max_size=12)
_servers = st.sampled_from(["a.test", "s.test", "a.test:8448", "[::1]", "1.2.3.4:1", "a.test:99999", ""])
user_ids = st.one_of(
    st.sampled_from([ALICE, U, "@bob:a.test", "@alice:A.TEST", "alice:a.test", *EDGE_STRINGS]),
    st.builds(lambda local, server: f"@{local}:{server}", _local, _servers),
    st.text(max_size=30),
)
_percent_junk = st.text(alphabet=string.ascii_letters + string.digits + "%@:/?#.~-_", max_size=30)

#: a path segment, as a client may write it; under Twisted's 16 KiB limit
#: of a request line (beyond it, twisted.web drops the connection before any
#: resource is involved)
segments = st.one_of(
    user_ids.map(lambda u: quote(u, safe="", errors="surrogatepass")),
    user_ids.map(lambda u: quote(u, safe="@:", errors="surrogatepass")),
    user_ids.map(lambda u: quote(quote(u, safe="", errors="surrogatepass"), safe="")),
    _percent_junk,
).filter(lambda segment: len(segment) < 12_000)

QUERY = {"device_keys": {ALICE: ["PHONE"], U: []}}
CLAIM = {"one_time_keys": {ALICE: {"PHONE": "signed_curve25519", "LAPTOP": "signed_curve25519"}}}


def _bodies(valid: dict[str, Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        mutated(valid, json_values()),
        mutated(valid, st.sampled_from([ALICE, U, "", 1, None, [], {}, {ALICE: {}}])),
        json_values(),
        st.dictionaries(st.sampled_from(list(valid) + ["timeout"]), json_values(), max_size=2),
    )


class FederationEndpointsFuzz(TwoServersCase):
    @fuzz("GET /user/devices/{userId}", segment=segments, suffix=st.sampled_from(["", "/", "?x=1", "/x"]))
    def test_user_devices(self, segment: str, suffix: str) -> None:
        path = DEVICES_PATH + segment + suffix
        self.check(lambda: self.signed("GET", path))

    @fuzz("POST /user/keys/query", body=_bodies(QUERY))
    def test_keys_query(self, body: Any) -> None:
        self.check(lambda: self.signed("POST", KEYS_QUERY_PATH, body, raw=encode(body)))

    @fuzz("POST /user/keys/claim", body=_bodies(CLAIM))
    def test_keys_claim(self, body: Any) -> None:
        self.check(lambda: self.signed("POST", KEYS_CLAIM_PATH, body, raw=encode(body)))

    @fuzz("POST /user/keys/{query,claim} (not JSON)", scale=0.3, raw=raw_bodies, claim=st.booleans())
    def test_keys_not_json(self, raw: bytes, claim: bool) -> None:
        path = KEYS_CLAIM_PATH if claim else KEYS_QUERY_PATH
        answer, _ = self.check(lambda: self.signed("POST", path, {}, raw=raw))
        if not is_json_object(raw):
            self.assertGreaterEqual(answer.code, 400)
