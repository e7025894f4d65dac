"""Fuzzing ``PUT /_matrix/federation/v1/send/{txnId}`` on A.

Bodies are signed by S, a known peer, so the checks behind the X-Matrix
signature (the transaction envelope, then each EDU's parser and the device
list updater) are really reached: arbitrary JSON, near-valid transactions
with one field mutated, EDUs with wrong types, huge, negative or float
stream ids, bad ``prev_id`` s, users of unknown servers or of A, other EDU
types, too many EDUs, bodies over the size limit, non-JSON bytes.  The
``Authorization`` header is fuzzed separately, on a valid body.

Properties, for every example: no 5xx, nothing logged as an error, a JSON
answer with an ``errcode`` when refused; a refused request leaves A's store
as it was and makes A send no request (a header naming an unknown server or
key makes A fetch that server's keys, as it must: there, the key cache and
the key requests are left out of the comparison).

Convergence: a sequence of accepted transactions about a remote user of S
(``@vN:s.test``, a new one per example), mixing EDUs that carry the user's
true devices under fuzzed ``stream_id`` / ``prev_id`` chains with malformed
EDUs and EDUs about other users, with time passing between transactions;
then S starts sharing a room with A (so it sends the user's list as it
does to any server newly interested) and A's cache of the user must end
equal to S's true list, not stale, within two simulated hours.  The chains
never reuse one of S's own stream ids for the user (a server that sends two
different updates under one id cannot be followed by anyone).

Run long with ``FUZZ_EXAMPLES=5000``.
"""

from __future__ import annotations

import itertools
import json
from typing import Any, Optional

from canonicaljson import encode_canonical_json
from hypothesis import strategies as st

from devicelist_plugin.core.parse import ParseError, parse_device_list_update
from devicelist_plugin.federation.resource import DEFAULT_MAX_BODY_SIZE
from devicelist_plugin.federation.send import SEND_PATH
from tests.fuzz.common import (
    encode,
    fuzz,
    is_json_object,
    integers,
    json_values,
    mutated,
    raw_bodies,
    scalars,
)
from tests.fuzz.federation import ALICE, KEY_PATH_PREFIX, NOW, S, U, Answer, TwoServersCase
from tests.local.keys import ClientDevice

DEVICE_LIST = "m.device_list_update"
SIGNING_KEY = "m.signing_key_update"
#: S's own stream ids for a fuzzed user stay below this (two devices: a few ids)
S_RANGE = range(0, 50)
#: a bound on the simulated time allowed to converge
BOUND = 2 * 3600

_txn_ids = st.one_of(
    st.text(alphabet="abcXYZ019-_.~%", min_size=1, max_size=20),
    st.sampled_from(["%00", "%ff", "%2F", "%C3%A9", "a%20b", "x" * 300]),
)


def _send_path(txn_id: str) -> str:
    return SEND_PATH.replace("{txnId}", txn_id)


def _edu(content: Any, edu_type: str = DEVICE_LIST) -> dict[str, Any]:
    return {"edu_type": edu_type, "content": content}


def _transaction(edus: list[Any], origin: str = S) -> dict[str, Any]:
    return {"origin": origin, "origin_server_ts": NOW * 1000, "pdus": [], "edus": edus}


VALID_UPDATE = {
    "user_id": U,
    "device_id": "NEW",
    "stream_id": 1000,
    "prev_id": [999],
    "deleted": False,
    "device_display_name": "phone",
    "keys": ClientDevice(U, "NEW").device_keys(),
}
VALID_SIGNING = {
    "user_id": U,
    "master_key": {"user_id": U, "usage": ["master"], "keys": {"ed25519:m": "m"}},
}

#: values of the wrong kind, or out of range, for any field
wrong = st.one_of(
    scalars,
    st.sampled_from([[], {}, [1.5], ["1"], [True], [None], [2**63], list(range(30)), 1.0, -0.0, 1e300]),
)
other_users = st.sampled_from(
    ["@w:s.test", "@x:other.test", ALICE, "@v:s.test:8448", "@:s.test", "s.test", "@v:S.TEST", ""]
)
edus = st.one_of(
    st.builds(_edu, mutated(VALID_UPDATE, wrong)),
    st.builds(_edu, mutated(VALID_UPDATE, other_users)),
    st.builds(_edu, mutated(VALID_SIGNING, wrong), st.just(SIGNING_KEY)),
    st.builds(_edu, json_values(), st.sampled_from([DEVICE_LIST, SIGNING_KEY, "m.other"])),
    mutated(_edu(VALID_UPDATE), wrong),
    json_values(),
)


def _transactions() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.builds(_transaction, st.lists(edus, max_size=4)),
        mutated(_transaction([_edu(VALID_UPDATE)]), wrong),
        st.builds(_transaction, st.lists(edus, max_size=4), st.sampled_from(["a.test", "other.test", ""])),
        json_values(),
    )


class SendFuzz(TwoServersCase):
    def put(self, txn_id: str, body: Any, raw: Optional[bytes] = None) -> Answer:
        return self.signed("PUT", _send_path(txn_id), body, raw=raw if raw is not None else encode(body))

    @fuzz("PUT /send (signed bodies)", txn_id=_txn_ids, body=_transactions())
    def test_signed_bodies(self, txn_id: str, body: Any) -> None:
        self.check(lambda: self.put(txn_id, body))

    @fuzz(
        "PUT /send (not JSON, too many EDUs, too large)",
        scale=0.3,
        txn_id=_txn_ids,
        raw=st.one_of(
            raw_bodies.map(lambda raw: (None, raw)),
            st.integers(101, 150).map(
                lambda n: (_transaction([_edu(VALID_UPDATE)] * n), None)
            ),
            st.integers(51, 60).map(
                lambda n: ({**_transaction([]), "pdus": [{"event_id": "$e"}] * n}, None)
            ),
            st.just((_transaction([_edu({"pad": "x" * (DEFAULT_MAX_BODY_SIZE // 3)})] * 4), None)),
        ),
    )
    def test_envelope(self, txn_id: str, raw: tuple[Any, Optional[bytes]]) -> None:
        body, text = raw
        answer, _ = self.check(lambda: self.put(txn_id, body if body is not None else {}, raw=text))
        if text is None or not is_json_object(text):
            self.assertGreaterEqual(answer.code, 400)

    @fuzz(
        "PUT /send (Authorization headers)",
        headers=st.lists(
            st.one_of(
                st.binary(max_size=60),
                st.sampled_from(["origin", "destination", "key", "sig"]).flatmap(
                    lambda name: st.tuples(st.just(name), st.one_of(
                        st.sampled_from([S, "a.test", "other.test", "ed25519:s1", "ed25519:zz", "rsa:s1",
                                         "", "s.test:8448", "1.2.3.4", "[::1]", "é.test", "x" * 300]),
                        st.text(max_size=10),
                    ))
                ),
                st.sampled_from(["valid", "valid-wrong-body", "bearer"]),
            ),
            max_size=3,
        ),
    )
    def test_authorization(self, headers: list[Any]) -> None:
        txn_id = f"auth{next(self._ids)}"
        path = _send_path(txn_id)
        body = _transaction([_edu(VALID_UPDATE)])
        valid = self.sign("PUT", path, body)
        assert valid is not None
        values: list[bytes] = []
        for header in headers:
            if header == "valid":
                values.append(valid)
            elif header == "valid-wrong-body":
                values.append(self.sign("PUT", path, {"other": 1}) or b"")
            elif header == "bearer":
                values.append(b"Bearer abc")
            elif isinstance(header, tuple):
                values.append(_replace_param(valid, *header))
            else:
                values.append(header)
        # NUL, CR and LF never reach a resource: twisted.web refuses such a
        # header value with a bare 400 of its own
        values = [value.translate(None, b"\x00\r\n") for value in values]
        answer, _ = self.check(
            lambda: self.request("PUT", path, encode(body), values),
            ignore_tables=("server_keys", "server_key_fetch_failures"),
            ignore_outbound=KEY_PATH_PREFIX,
        )
        self.assertEqual(answer.code == 200, valid in values, answer.body)

    # -- convergence -------------------------------------------------------------

    _ids = itertools.count()

    @fuzz(
        "PUT /send (accepted sequences converge)",
        scale=0.5,
        script=st.lists(
            st.tuples(
                st.lists(
                    st.one_of(
                        st.tuples(
                            st.just("true"),
                            st.sampled_from(["D1", "D2", "GONE"]),
                            st.one_of(st.integers(S_RANGE.stop, S_RANGE.stop + 20), integers).filter(
                                lambda i: i not in S_RANGE
                            ),
                            st.lists(
                                st.one_of(
                                    st.integers(-1, 6),
                                    st.integers(S_RANGE.stop, S_RANGE.stop + 20),
                                    integers,
                                ),
                                max_size=3,
                            ),
                        ),
                        st.tuples(st.just("raw"), edus),
                    ),
                    max_size=5,
                ),
                st.sampled_from([0, 0, 1, 3, 30]),
                st.booleans(),
            ),
            min_size=1,
            max_size=5,
        ),
    )
    def test_accepted_sequences_converge(self, script: list[Any]) -> None:
        n = next(self._ids)
        user = f"@v{n}:s.test"
        room = f"!v{n}:s.test"
        self.memberships["a.test"].join(room, ALICE)
        self.memberships["a.test"].join(room, user)
        truth = {d: ClientDevice(user, d) for d in ("D1", "D2")}
        for device_id, device in truth.items():
            self.settle(self.s.local.create_device(user, device_id, None))
            self.settle(self.s.local.upload_device_keys(user, device_id, device.device_keys()))
        top = self.settle(self.s.store.get_max_stream_id(user))
        self.assertLess(top, S_RANGE.stop - 10)
        for i, (items, pause, replay) in enumerate(script):
            edus: list[Any] = []
            for item in items:
                if item[0] == "true":
                    _, device_id, stream_id, prev_ids = item
                    content: dict[str, Any] = {
                        "user_id": user,
                        "device_id": device_id,
                        "stream_id": stream_id,
                        "prev_id": prev_ids,
                    }
                    if device_id in truth:
                        content["keys"] = truth[device_id].device_keys()
                    else:
                        content["deleted"] = True
                    edus.append(_edu(content))
                else:
                    edus.append(_untruthful_to_other_user(item[1], user))
            # a sender can only sign what has a canonical JSON form
            edus = [edu for edu in edus if _signable(edu)]
            txn_id = f"conv{n}-{i - 1 if replay and i else i}"
            answer, _ = self.check(lambda: self.put(txn_id, _transaction(edus)))
            self.assertEqual(answer.code, 200, answer.body)
            self.network.advance(pause)
        # S now shares a room with A: it sends the user's devices
        self.memberships["s.test"].join(room, ALICE)
        self.memberships["s.test"].join(room, user)
        expected = self.true_list(user)
        waited = 0
        while self.cached_list(user) != (expected, False) and waited < BOUND:
            self.network.advance(60)
            waited += 60
        self.assertEqual(self.cached_list(user), (expected, False))
        self.assertEqual(self.flushLoggedErrors(), [])

    def true_list(self, user: str) -> Any:
        devices = self.settle(self.s.store.get_devices(user))
        return sorted((d.device_id, json.dumps(d.keys_json["keys"], sort_keys=True)) for d in devices if d.keys_json)

    def cached_list(self, user: str) -> tuple[Any, bool]:
        cache = self.settle(self.a.store.get_remote_cache(user))
        keyed = sorted(
            (d.device_id, json.dumps(dict(d.keys.keys), sort_keys=True))
            for d in cache.devices
            if d.keys is not None
        )
        stale = cache.state is not None and cache.state.stale_generation > cache.state.cleared_generation
        return keyed, stale


def _signable(value: Any) -> bool:
    try:
        encode_canonical_json(value)
    except Exception:
        return False
    return True


def _replace_param(header: bytes, name: str, value: str) -> bytes:
    """``header`` with the parameter ``name`` set to ``value`` (quoted)."""
    text = header.decode("utf-8")
    start = text.index(f"{name}=")
    end = text.index('"', text.index('"', start) + 1) + 1
    quoted = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return (text[:start] + f"{name}={quoted}" + text[end:]).encode("utf-8")


def _untruthful_to_other_user(edu: Any, user: str) -> Any:
    """A fuzzed EDU for the convergence test: malformed, or about another
    user than ``user``.  A well-formed update of ``user`` itself would be a
    lie no receiver can undo, so it is re-addressed to an untracked user."""
    if not isinstance(edu, dict) or edu.get("edu_type") != DEVICE_LIST:
        if isinstance(edu, dict) and edu.get("edu_type") == SIGNING_KEY:
            content = edu.get("content")
            if isinstance(content, dict) and content.get("user_id") == U:
                return _edu({**content, "user_id": "@w:s.test"}, SIGNING_KEY)
        return edu
    content = edu.get("content")
    try:
        update = parse_device_list_update(content)
    except ParseError:
        return edu
    if update.user_id in (U, user):
        assert isinstance(content, dict)
        return _edu({**content, "user_id": "@w:s.test"})
    return edu

