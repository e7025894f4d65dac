"""What every fuzz module shares: the hypothesis settings, the per-target
case counter, JSON strategies, and the checks made on every answer.

``FUZZ_EXAMPLES`` (default :data:`DEFAULT_EXAMPLES`) is the number of
examples per target; the generation is derandomized and keeps no example
database, so a run is repeatable.  A long fuzz::

    FUZZ_EXAMPLES=5000 PYTHONPATH=. trial tests.fuzz
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any, Callable, Mapping, TypeVar

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

#: examples per target when ``FUZZ_EXAMPLES`` is not set
DEFAULT_EXAMPLES = 500

Case = TypeVar("Case", bound=SynchronousTestCase)


def examples(scale: float = 1.0) -> int:
    """The examples to run for one target (at least 1)."""
    return max(1, int(int(os.environ.get("FUZZ_EXAMPLES", DEFAULT_EXAMPLES)) * scale))


def fuzz_settings(scale: float = 1.0) -> settings:
    return settings(
        max_examples=examples(scale),
        derandomize=True,
        database=None,
        deadline=None,
        print_blob=False,
        report_multiple_bugs=False,
        phases=(Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink),
        suppress_health_check=list(HealthCheck),
    )


def fuzz(
    target: str, scale: float = 1.0, **strategies: st.SearchStrategy[Any]
) -> Callable[[Callable[..., None]], Callable[[Case], None]]:
    """Make a test method that runs ``body(self, **drawn)`` for every
    example of ``strategies``, then prints how many cases ran for ``target``."""

    def decorate(body: Callable[..., None]) -> Callable[[Case], None]:
        def test(self: Case) -> None:
            count = 0
            statuses: Counter[int] = Counter()
            setattr(self, "statuses", statuses)

            @fuzz_settings(scale)
            @given(**strategies)
            def run(**drawn: Any) -> None:
                nonlocal count
                count += 1
                body(self, **drawn)

            try:
                run()
            except BaseException as e:
                # hypothesis puts the falsifying example in the exception's
                # notes, which trial's report leaves out
                for note in getattr(e, "__notes__", []):
                    print(note[:2000])
                raise
            mix = ", ".join(f"{code}: {n}" for code, n in sorted(statuses.items()))
            print(f"\nfuzz {target}: {count} cases" + (f" (answers {mix})" if mix else ""))

        test.__name__ = body.__name__
        test.__qualname__ = body.__qualname__
        test.__doc__ = body.__doc__
        return test

    return decorate


# -- JSON ------------------------------------------------------------------

#: integers where parsers and databases change behaviour
EDGE_INTS = (
    0,
    -1,
    1,
    2**31 - 1,
    2**31,
    2**53 - 1,
    2**53,
    -(2**53),
    2**63 - 1,
    2**63,
    -(2**63) - 1,
    2**64,
    10**30,
)

#: strings that are awkward to store, encode or route
EDGE_STRINGS = (
    "",
    " ",
    "\x00",
    "\ud800",  # a lone surrogate: valid in JSON text, not encodable as UTF-8
    "a\udfffb",
    "\u202e",
    "é",
    "💥",
    "%2F",
    "../..",
    "@",
    ":",
    "@a:",
    "@:b",
    "x" * 300,
    "y" * 70_000,
)

integers = st.one_of(st.sampled_from(EDGE_INTS), st.integers(), st.integers(-5, 20))
floats = st.floats(allow_nan=False, allow_infinity=False)
strings = st.one_of(st.sampled_from(EDGE_STRINGS), st.text(max_size=20))
scalars = st.one_of(st.none(), st.booleans(), integers, floats, strings)


def json_values(keys: st.SearchStrategy[str] = strings) -> st.SearchStrategy[Any]:
    """Any JSON value (floats and huge integers included)."""
    return st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)
        ),
        max_leaves=12,
    )


def mutated(
    value: Any, replacement: st.SearchStrategy[Any]
) -> st.SearchStrategy[Any]:
    """``value`` (a JSON object or list) with one field, at any depth,
    replaced by a draw of ``replacement``, or deleted, or left alone."""

    def paths(v: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        found = [prefix]
        if isinstance(v, dict):
            for k, child in v.items():
                found += paths(child, prefix + (k,))
        elif isinstance(v, list):
            for i, child in enumerate(v):
                found += paths(child, prefix + (i,))
        return found

    def apply(path: tuple[Any, ...], new: Any, delete: bool) -> Any:
        if not path:
            return value if delete else new
        copy = json.loads(json.dumps(value))
        parent = copy
        for step in path[:-1]:
            parent = parent[step]
        if delete and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = new
        return copy

    return st.builds(apply, st.sampled_from(paths(value)), replacement, st.booleans())


def deep(depth: int) -> bytes:
    """A JSON object nested ``depth`` levels deep."""
    return b'{"a":' * depth + b"1" + b"}" * depth


#: bodies that are not (usable) JSON text
raw_bodies = st.one_of(
    st.binary(max_size=64),
    st.sampled_from(
        [
            b"",
            b"\xff\xfe{}",
            b'{"a": "\xc3\x28"}',
            b'{"a": NaN}',
            b'{"a": Infinity}',
            b'{"a": 1e999}',
            b'{"a": 1, "a": 2}',
            b"[" * 100_000,
            deep(5_000),
            deep(900),
            b'"' + b"\\ud800" * 4 + b'"',
            b"{" + b'"k": 1,' * 10 + b"}",
            b"nul\x00l",
        ]
    ),
    st.integers(1, 5_000).map(lambda n: b"[" * n + b"]" * n),
)


def encode(value: Any) -> bytes:
    """JSON text (ASCII, so lone surrogates are escaped, as a client may)."""
    return json.dumps(value).encode("ascii")


# -- answers ------------------------------------------------------------------


def check_answer(
    case: SynchronousTestCase, code: int, headers: Mapping[bytes, list[bytes]], body: bytes
) -> Any:
    """No 5xx; a JSON body (an object with an ``errcode`` string for an
    error); returns the parsed body."""
    statuses = getattr(case, "statuses", None)
    if statuses is not None:
        statuses[code] += 1
    case.assertLess(code, 500, body[:500])
    case.assertEqual(headers.get(b"content-type"), [b"application/json"], body[:200])
    parsed = json.loads(body)
    if code >= 400:
        case.assertIsInstance(parsed, dict, body[:200])
        case.assertIsInstance(parsed.get("errcode"), str, body[:200])
    return parsed


def assert_no_logged_errors(case: SynchronousTestCase) -> None:
    """Fail this example (so hypothesis shrinks it) on any error logged
    while it ran; trial would otherwise fail the whole test only at its end."""
    errors = case.flushLoggedErrors()
    case.assertEqual([e.getTraceback() for e in errors], [])


def is_json_object(raw: bytes) -> bool:
    """Whether ``raw`` happens to be a JSON object (random bytes may be)."""
    try:
        return isinstance(json.loads(raw), dict)
    except (ValueError, RecursionError):
        return False
