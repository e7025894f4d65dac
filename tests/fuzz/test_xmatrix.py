"""Fuzzing the ``Authorization: X-Matrix`` parser (a pure function).

Properties:

* any header value, bytes or text, is parsed, declared not ours (``None``)
  or refused with :class:`XMatrixParseError`; nothing else is raised;
* a header written as senders write it (quoted or, where possible, unquoted
  values; parameters in any order and case; whitespace and empty list
  elements between them; unknown parameters) parses back to the values
  written, whatever characters they hold;
* a well-formed header cut short or with a byte changed still only parses,
  returns ``None`` or raises ``XMatrixParseError``.

Run long with ``FUZZ_EXAMPLES=5000``.
"""

from __future__ import annotations

import string
from typing import Any, Optional

from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from devicelist_plugin.federation.xmatrix import (
    XMatrixAuth,
    XMatrixParseError,
    parse_xmatrix_header,
)
from tests.fuzz.common import fuzz

_TOKEN = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
_UNQUOTED = st.text(
    alphabet=st.characters(exclude_characters=' \t,"', exclude_categories=["Cs"]),
    min_size=1,
    max_size=20,
)
values = st.text(alphabet=st.characters(exclude_categories=["Cs"]), min_size=1, max_size=20)
ows = st.sampled_from(["", " ", "\t", "  ", " \t "])


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _case(name: str, upper: list[bool]) -> str:
    return "".join(c.upper() if u else c for c, u in zip(name, upper + [False] * len(name)))


@st.composite
def headers(draw: Any) -> tuple[str, dict[str, str]]:
    """A header as some sender may write it, and the values it carries."""
    params = {
        "origin": draw(values),
        "key": draw(values),
        "sig": draw(values),
    }
    if draw(st.booleans()):
        params["destination"] = draw(values)
    items = list(params.items())
    items += draw(
        st.lists(st.tuples(st.text(alphabet=_TOKEN, min_size=1, max_size=8), values), max_size=2)
        .filter(lambda extra: all(n.lower() not in ("origin", "key", "sig", "destination") for n, _ in extra))
    )
    items = draw(st.permutations(items))
    parts = []
    for name, value in items:
        unquoted_ok = all(c not in ' \t,"' for c in value)
        written = value if unquoted_ok and draw(st.booleans()) else _quote(value)
        upper = draw(st.lists(st.booleans(), max_size=len(name)))
        parts.append(f"{_case(name, upper)}{draw(ows)}={draw(ows)}{written}")
    separators = [draw(st.sampled_from([",", ", ", " ,", ",,", " , , "])) for _ in parts[1:]]
    text = parts[0] + "".join(s + p for s, p in zip(separators, parts[1:]))
    scheme = draw(st.sampled_from(["X-Matrix", "x-matrix", "X-MATRIX"]))
    return f"{draw(ows)}{scheme} {draw(ows)}{text}{draw(ows)}", params


def _parse(value: bytes | str) -> Optional[XMatrixAuth]:
    try:
        return parse_xmatrix_header(value)
    except XMatrixParseError:
        return None


class XMatrixParserFuzz(SynchronousTestCase):
    @fuzz(
        "X-Matrix parser (any value)",
        value=st.one_of(
            st.binary(max_size=80),
            st.text(max_size=80),
            st.text(max_size=60).map(lambda t: "X-Matrix " + t),
            st.binary(max_size=60).map(lambda b: b"X-Matrix " + b),
        ),
    )
    def test_any_value(self, value: bytes | str) -> None:
        _parse(value)

    @fuzz("X-Matrix parser (round trip)", header=headers(), as_bytes=st.booleans())
    def test_round_trip(self, header: tuple[str, dict[str, str]], as_bytes: bool) -> None:
        text, params = header
        auth = parse_xmatrix_header(text.encode("utf-8") if as_bytes else text)
        self.assertEqual(
            auth,
            XMatrixAuth(
                origin=params["origin"],
                destination=params.get("destination"),
                key=params["key"],
                sig=params["sig"],
            ),
        )

    @fuzz(
        "X-Matrix parser (damaged)",
        header=headers(),
        cut=st.integers(0, 200),
        position=st.integers(0, 200),
        byte=st.integers(0, 255),
    )
    def test_damaged(self, header: tuple[str, dict[str, str]], cut: int, position: int, byte: int) -> None:
        raw = header[0].encode("utf-8")
        _parse(raw[:cut])
        if raw:
            i = position % len(raw)
            _parse(raw[:i] + bytes([byte]) + raw[i + 1 :])
