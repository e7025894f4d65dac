"""X-Matrix header parsing, building and verification (pure, no reactor)."""

from __future__ import annotations

import random
import re
from typing import Callable

from signedjson.key import generate_signing_key, get_verify_key
from signedjson.sign import sign_json, verify_signed_json
from twisted.trial.unittest import SynchronousTestCase

from devicelist_plugin.federation import xmatrix
from devicelist_plugin.federation.xmatrix import (
    XMatrixAuth,
    XMatrixParseError,
    XMatrixVerifyError,
    build_authorization_header,
    parse_xmatrix_header,
    request_json_for_signing,
    verify_request_signature,
)

SPEC_EXAMPLE = (
    'X-Matrix origin="origin.hs.example.com",destination="destination.hs.example.com",'
    'key="ed25519:key1",sig="ABCDEF..."'
)
SPEC_AUTH = XMatrixAuth(
    origin="origin.hs.example.com",
    destination="destination.hs.example.com",
    key="ed25519:key1",
    sig="ABCDEF...",
)

# (description, header, expected)
VALID: list[tuple[str, str | bytes, XMatrixAuth]] = [
    ("spec example", SPEC_EXAMPLE, SPEC_AUTH),
    ("spec example as bytes", SPEC_EXAMPLE.encode(), SPEC_AUTH),
    (
        "lowercase scheme, uppercase names",
        'x-matrix ORIGIN="origin.hs.example.com",Destination="destination.hs.example.com",'
        'KEY="ed25519:key1",Sig="ABCDEF..."',
        SPEC_AUTH,
    ),
    (
        "reordered",
        'X-Matrix sig="ABCDEF...",key="ed25519:key1",destination="destination.hs.example.com",'
        'origin="origin.hs.example.com"',
        SPEC_AUTH,
    ),
    (
        "Synapse's order",
        'X-Matrix origin="origin.hs.example.com",key="ed25519:key1",sig="ABCDEF...",'
        'destination="destination.hs.example.com"',
        SPEC_AUTH,
    ),
    (
        "unquoted values",
        "X-Matrix origin=origin.hs.example.com,destination=destination.hs.example.com,"
        "key=ed25519:key1,sig=ABCDEF...",
        SPEC_AUTH,
    ),
    (
        "whitespace around '=' and ',' and tabs",
        'X-Matrix  origin = "origin.hs.example.com" ,\tdestination="destination.hs.example.com" ,'
        ' key=\t"ed25519:key1",sig ="ABCDEF..."  ',
        SPEC_AUTH,
    ),
    (
        "empty list elements",
        'X-Matrix ,origin="origin.hs.example.com",,destination="destination.hs.example.com",'
        ' , key="ed25519:key1",sig="ABCDEF...",',
        SPEC_AUTH,
    ),
    (
        "unknown params ignored, even twice",
        'X-Matrix realm="x",origin="origin.hs.example.com",foo=bar,foo="baz",'
        'destination="destination.hs.example.com",key="ed25519:key1",sig="ABCDEF..."',
        SPEC_AUTH,
    ),
    (
        "backslash escapes",
        r'X-Matrix origin="a\"b\\c",key="ed25519:\k1",sig="s\,t"',
        XMatrixAuth(origin='a"b\\c', destination=None, key="ed25519:k1", sig="s,t"),
    ),
    (
        "comma, equals and spaces inside quotes",
        'X-Matrix origin="a, b=c",key="k",sig="x y"',
        XMatrixAuth(origin="a, b=c", destination=None, key="k", sig="x y"),
    ),
    (
        "no destination",
        'X-Matrix origin="a.example",key="ed25519:k",sig="s"',
        XMatrixAuth(origin="a.example", destination=None, key="ed25519:k", sig="s"),
    ),
    (
        "ports, IPv6 literals and base64 unquoted",
        "X-Matrix origin=[::1]:8448,destination=b.example:8448,key=ed25519:a_b,sig=ab+/cd",
        XMatrixAuth(origin="[::1]:8448", destination="b.example:8448", key="ed25519:a_b", sig="ab+/cd"),
    ),
]

NOT_XMATRIX: list[str | bytes] = [
    "",
    "Bearer abc",
    'Basic origin="a",key="k",sig="s"',
    'X-Matrixy origin="a",key="k",sig="s"',
    'X-Matrix2 origin="a",key="k",sig="s"',
    b"Bearer \xff\xfe",
]

MALFORMED: list[tuple[str, str | bytes]] = [
    ("scheme alone", "X-Matrix"),
    ("missing origin", 'X-Matrix key="k",sig="s"'),
    ("missing key", 'X-Matrix origin="a",sig="s"'),
    ("missing sig", 'X-Matrix origin="a",key="k"'),
    ("empty origin", 'X-Matrix origin="",key="k",sig="s"'),
    ("empty destination", 'X-Matrix origin="a",destination="",key="k",sig="s"'),
    ("missing comma", 'X-Matrix origin="a" key="k",sig="s"'),
    ("unterminated quote", 'X-Matrix origin="a,key="k",sig="s'),
    ("trailing backslash", 'X-Matrix origin="a",key="k",sig="s\\'),
    ("name without value", 'X-Matrix origin,key="k",sig="s"'),
    ("value without name", 'X-Matrix ="a",key="k",sig="s"'),
    ("empty value", 'X-Matrix origin=,key="k",sig="s"'),
    ("comma right after scheme", 'X-Matrix,origin="a",key="k",sig="s"'),
    ("duplicate origin", 'X-Matrix origin="a",origin="b",key="k",sig="s"'),
    ("duplicate sig, different case", 'X-Matrix origin="a",key="k",sig="s",SIG="t"'),
    ("not UTF-8", b'X-Matrix origin="\xff",key="k",sig="s"'),
    ("garbage", "X-Matrix !!!@@@"),
]


class ParseTests(SynchronousTestCase):
    def test_valid(self) -> None:
        for description, header, expected in VALID:
            with self.subTest(description):
                self.assertEqual(parse_xmatrix_header(header), expected)

    def test_other_schemes_are_none(self) -> None:
        for header in NOT_XMATRIX:
            with self.subTest(header=header):
                self.assertIsNone(parse_xmatrix_header(header))

    def test_malformed_raises_with_reason(self) -> None:
        for description, header in MALFORMED:
            with self.subTest(description):
                with self.assertRaises(XMatrixParseError) as cm:
                    parse_xmatrix_header(header)
                self.assertTrue(str(cm.exception))

    def test_missing_params_are_named(self) -> None:
        with self.assertRaises(XMatrixParseError) as cm:
            parse_xmatrix_header('X-Matrix destination="b"')
        self.assertIn("origin", str(cm.exception))
        self.assertIn("key", str(cm.exception))
        self.assertIn("sig", str(cm.exception))


DEFAULT_CONTENT = {"origin": "a.example", "edus": []}


class SimpleShapeTests(SynchronousTestCase):
    """The fast path for the usual header shape gives what the full parser
    gives, for every header, the malformed ones included."""

    def outcome(self, parse: Callable[[str], XMatrixAuth | None], header: str) -> object:
        try:
            return parse(header)
        except XMatrixParseError as e:
            return ("error", str(e))

    def assertSameAsFull(self, header: str) -> None:
        self.assertEqual(
            self.outcome(parse_xmatrix_header, header),
            self.outcome(xmatrix._parse_full, header),
            header,
        )

    def test_usual_headers_take_the_fast_path(self) -> None:
        self.assertEqual(xmatrix._parse_simple(SPEC_EXAMPLE), SPEC_AUTH)
        header = build_authorization_header(
            generate_signing_key("k1"), "a.example:8448", "b.example", "GET", "/x", None
        ).decode()
        self.assertIsNotNone(xmatrix._parse_simple(header))

    def test_usual_and_unusual_headers(self) -> None:
        for header in [
            SPEC_EXAMPLE,
            'X-Matrix origin="a",key="ed25519:k",sig="s"',
            ' \tX-Matrix sig="s",key="k",origin="a",extra="" \t',
            'X-Matrix origin="a",key="k",sig="s",origin="b"',
            'X-Matrix origin="a",key="k",sig="s",destination=""',
            'X-Matrix origin="",key="k",sig="s"',
            'X-Matrix origin="a",key="k"',
            'X-Matrix ORIGIN="a",Key="k",SIG="s",Destination="d"',
            'x-matrix origin="a",key="k",sig="s"',
            'X-Matrix  origin="a",key="k",sig="s"',
            'X-Matrix origin="a", key="k",sig="s"',
            'X-Matrix origin="a\\"b",key="k",sig="s"',
            'X-Matrix origin=a,key=k,sig=s',
            'X-Matrix origin="é.example",key="k",sig="s"',
            'Bearer abc',
            'X-Matrix',
        ]:
            with self.subTest(header=header):
                self.assertSameAsFull(header)

    def test_random_headers(self) -> None:
        rng = random.Random(8)
        pieces = ['origin="a"', 'key="k"', 'sig="s"', 'destination="d"', 'x="y"', 'origin=""',
                  'Key="K"', "sig=s", '"', "\\", ",", " ", "=", "X-Matrix ", "é"]
        for _ in range(3000):
            header = "X-Matrix " + ",".join(rng.choice(pieces) for _ in range(rng.randrange(6)))
            if rng.random() < 0.3:
                header = "".join(rng.choice(pieces) for _ in range(rng.randrange(8)))
            self.assertSameAsFull(header)


class SigningTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.key = generate_signing_key("k1")
        self.verify_key = get_verify_key(self.key)

    def header(
        self,
        method: str = "PUT",
        uri: str = "/_matrix/federation/v1/send/t1?x=%2F",
        destination: str = "b.example",
        content: object | None = DEFAULT_CONTENT,
    ) -> bytes:
        return build_authorization_header(self.key, "a.example", destination, method, uri, content)

    def test_header_shape(self) -> None:
        header = self.header()
        self.assertRegex(
            header.decode("ascii"),
            r'^X-Matrix origin="a\.example",destination="b\.example",key="ed25519:k1",'
            r'sig="[A-Za-z0-9+/]+"$',
        )

    def test_signature_is_signedjsons(self) -> None:
        # ed25519 is deterministic: the header carries exactly what signedjson
        # produces for the spec's request object.
        content = {"edus": [{"edu_type": "m.device_list_update", "content": {}}]}
        header = self.header(method="PUT", uri="/_matrix/federation/v1/send/1", content=content)
        auth = parse_xmatrix_header(header)
        assert auth is not None
        expected = sign_json(
            {
                "method": "PUT",
                "uri": "/_matrix/federation/v1/send/1",
                "origin": "a.example",
                "destination": "b.example",
                "content": content,
            },
            "a.example",
            self.key,
        )
        self.assertEqual(auth.sig, expected["signatures"]["a.example"]["ed25519:k1"])
        # and signedjson verifies what we would verify
        signed = request_json_for_signing(
            "PUT", "/_matrix/federation/v1/send/1", "a.example", "b.example", content
        )
        signed["signatures"] = {auth.origin: {auth.key: auth.sig}}
        verify_signed_json(signed, "a.example", self.verify_key)

    def test_round_trip(self) -> None:
        uri = "/_matrix/federation/v1/user/devices/%40u%3Aa.example"
        header = self.header(method="GET", uri=uri, content=None)
        auth = parse_xmatrix_header(header)
        assert auth is not None
        self.assertEqual((auth.origin, auth.destination, auth.key), ("a.example", "b.example", "ed25519:k1"))
        verify_request_signature(
            auth, self.verify_key, b"GET", uri.encode("ascii"), "b.example", None
        )

    def test_round_trip_with_content_and_ipv6_names(self) -> None:
        header = build_authorization_header(
            self.key, "[::1]:8448", "[::2]:8448", "POST", b"/p?a=b", {"a": [1, "é"]}
        )
        auth = parse_xmatrix_header(header)
        assert auth is not None
        self.assertEqual((auth.origin, auth.destination), ("[::1]:8448", "[::2]:8448"))
        verify_request_signature(auth, self.verify_key, "POST", "/p?a=b", "[::2]:8448", {"a": [1, "é"]})

    def test_tampering_is_detected(self) -> None:
        uri = "/_matrix/federation/v1/send/t1?x=%2F"
        content = {"origin": "a.example", "edus": []}
        auth = parse_xmatrix_header(self.header())
        assert auth is not None
        verify_request_signature(auth, self.verify_key, "PUT", uri, "b.example", content)
        tampered: list[tuple[str, str, str, str, object | None]] = [
            ("method", "POST", uri, "b.example", content),
            ("uri path", "PUT", "/_matrix/federation/v1/send/t2?x=%2F", "b.example", content),
            ("uri query", "PUT", "/_matrix/federation/v1/send/t1?x=/", "b.example", content),
            ("content", "PUT", uri, "b.example", {"origin": "a.example", "edus": [{}]}),
            ("content removed", "PUT", uri, "b.example", None),
            ("destination", "PUT", uri, "c.example", content),
        ]
        for what, method, turi, destination, tcontent in tampered:
            with self.subTest(what):
                with self.assertRaises(XMatrixVerifyError):
                    verify_request_signature(auth, self.verify_key, method, turi, destination, tcontent)

    def test_tampered_header_fields(self) -> None:
        uri = "/u"
        auth = parse_xmatrix_header(self.header(uri=uri, content=None))
        assert auth is not None
        other_key = generate_signing_key("k1")
        cases = [
            ("origin", XMatrixAuth("evil.example", auth.destination, auth.key, auth.sig), self.verify_key),
            (
                "sig",
                XMatrixAuth(auth.origin, auth.destination, auth.key, "AAAA" + auth.sig[4:]),
                self.verify_key,
            ),
            ("sig not base64", XMatrixAuth(auth.origin, auth.destination, auth.key, "!!"), self.verify_key),
            ("other key, same id", auth, get_verify_key(other_key)),
            (
                "key id mismatch",
                XMatrixAuth(auth.origin, auth.destination, "ed25519:k2", auth.sig),
                self.verify_key,
            ),
        ]
        for what, tauth, verify_key in cases:
            with self.subTest(what):
                with self.assertRaises(XMatrixVerifyError):
                    verify_request_signature(tauth, verify_key, "PUT", uri, "b.example", None)

    def test_destination_absent_from_header_is_verified_as_ours(self) -> None:
        auth = parse_xmatrix_header(self.header(uri="/u", content=None))
        assert auth is not None
        without = XMatrixAuth(auth.origin, None, auth.key, auth.sig)
        verify_request_signature(without, self.verify_key, "PUT", "/u", "b.example", None)
        with self.assertRaises(XMatrixVerifyError):
            verify_request_signature(without, self.verify_key, "PUT", "/u", "c.example", None)

    def test_wrong_destination_names_it(self) -> None:
        auth = parse_xmatrix_header(self.header(uri="/u", content=None, destination="c.example"))
        assert auth is not None
        with self.assertRaises(XMatrixVerifyError) as cm:
            verify_request_signature(auth, self.verify_key, "PUT", "/u", "b.example", None)
        self.assertIn("c.example", str(cm.exception))

    def test_request_json_for_signing(self) -> None:
        self.assertEqual(
            request_json_for_signing(b"GET", b"/a?b=c", "o", None, None),
            {"method": "GET", "uri": "/a?b=c", "origin": "o"},
        )
        self.assertEqual(
            request_json_for_signing("PUT", "/a", "o", "d", {}),
            {"method": "PUT", "uri": "/a", "origin": "o", "destination": "d", "content": {}},
        )
        with self.assertRaises(ValueError):
            request_json_for_signing("GET", b"/\xff", "o", "d", None)

    def test_escaping_round_trip(self) -> None:
        # Server names never contain quotes or backslashes, but the header
        # builder quotes correctly anyway.
        header = build_authorization_header(self.key, 'we"ird\\', "b", "GET", "/", None)
        self.assertTrue(re.search(rb'origin="we\\"ird\\\\"', header))
        auth = parse_xmatrix_header(header)
        assert auth is not None
        self.assertEqual(auth.origin, 'we"ird\\')
