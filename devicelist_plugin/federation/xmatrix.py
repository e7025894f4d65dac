"""``Authorization: X-Matrix`` headers: parse, build, verify.

Pure functions: no reactor, no clock, no I/O.  The signed object is the
canonical JSON of ``{method, uri, origin, destination, content?}`` (Matrix
server-server API, "Request Authentication"), signed and verified with
:mod:`signedjson`.

Parsing follows RFC 9110's ``credentials = auth-scheme [ 1*SP #auth-param ]``:
the scheme and the parameter names are case-insensitive, parameters come in
any order, values are quoted strings (with backslash escapes) or unquoted,
whitespace around ``=`` and ``,`` and empty list elements are tolerated, and
unknown parameters are ignored.  Unquoted values are read more leniently than
RFC 9110's ``token``: any run of characters other than whitespace, ``,`` and
``"``, because the values that matter (``example.org:8448``,
``ed25519:abc``, base64 with ``+`` and ``/``) are not tokens yet are sent
unquoted by some implementations.

:func:`parse_xmatrix_header` returns ``None`` for a header of another scheme
(it is not ours to judge) and raises :class:`XMatrixParseError`, with the
reason, for an X-Matrix header that is malformed or lacks ``origin``, ``key``
or ``sig``.  A known parameter given twice is malformed: which one to believe
would be a guess.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from signedjson.sign import SignatureVerifyException, sign_json, verify_signed_json
from signedjson.types import SigningKey, VerifyKey

from devicelist_plugin.core.models import JsonDict

SCHEME = "X-Matrix"

# RFC 9110 tchar
_TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_WS = " \t"
_KNOWN_PARAMS = ("origin", "destination", "key", "sig")


class XMatrixParseError(ValueError):
    """An X-Matrix ``Authorization`` header is malformed; the message says how."""


class XMatrixVerifyError(Exception):
    """An X-Matrix signature does not verify for this request; the message says why."""


@dataclass(frozen=True)
class XMatrixAuth:
    """The parameters of one ``Authorization: X-Matrix`` header."""

    origin: str
    destination: str | None
    key: str
    sig: str


def _text(value: str | bytes, what: str) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("ascii")
        except UnicodeDecodeError:
            raise ValueError(f"{what} is not ASCII: {value!r}") from None
    return value


# What every server sends: the scheme, one space, name="value" pairs
# (values without quotes or backslashes) separated by bare commas.
_SIMPLE_HEADER = re.compile(r'[ \t]*X-Matrix (?:[A-Za-z]+="[^"\\]*",)*[A-Za-z]+="[^"\\]*"[ \t]*')
_SIMPLE_PARAM = re.compile(r'([A-Za-z]+)="([^"\\]*)"')


def _parse_simple(text: str) -> XMatrixAuth | None:
    """The parameters of a header of the simple shape with each known
    parameter at most once and ``origin``, ``key`` and ``sig`` non-empty;
    ``None`` for anything else (left to the full parser)."""
    if _SIMPLE_HEADER.fullmatch(text) is None:
        return None
    params: dict[str, str] = {}
    for name, param_value in _SIMPLE_PARAM.findall(text):
        name = name.lower()
        if name in _KNOWN_PARAMS:
            if name in params or not param_value:
                return None
            params[name] = param_value
    if "origin" not in params or "key" not in params or "sig" not in params:
        return None
    return XMatrixAuth(
        origin=params["origin"],
        destination=params.get("destination"),
        key=params["key"],
        sig=params["sig"],
    )


def parse_xmatrix_header(value: bytes | str) -> XMatrixAuth | None:
    """Parse one ``Authorization`` header value.

    :return: the parameters, or ``None`` when the header is not of the
        X-Matrix scheme.
    :raise XMatrixParseError: an X-Matrix header that is malformed or misses
        ``origin``, ``key`` or ``sig``.
    """
    if isinstance(value, bytes):
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            text = None
    else:
        text = value
    if text is not None:
        simple = _parse_simple(text)
        if simple is not None:
            return simple
    return _parse_full(value)


def _parse_full(value: bytes | str) -> XMatrixAuth | None:
    """:func:`parse_xmatrix_header` for any header, character by character."""
    if isinstance(value, bytes):
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            # Not ours to judge unless it claims to be X-Matrix.
            if value.lstrip(b" \t")[: len(SCHEME)].lower() == SCHEME.lower().encode():
                raise XMatrixParseError("header is not valid UTF-8") from None
            return None
    else:
        text = value
    text = text.strip(_WS)

    pos = 0
    while pos < len(text) and text[pos] in _TCHAR:
        pos += 1
    if text[:pos].lower() != SCHEME.lower():
        return None
    if pos < len(text) and text[pos] not in _WS:
        raise XMatrixParseError(f"expected a space after the scheme at position {pos}")

    params: dict[str, str] = {}
    n = len(text)
    while True:
        # OWS and empty list elements
        while pos < n and (text[pos] in _WS or text[pos] == ","):
            pos += 1
        if pos >= n:
            break
        start = pos
        while pos < n and text[pos] in _TCHAR:
            pos += 1
        if pos == start:
            raise XMatrixParseError(f"expected a parameter name at position {pos}")
        name = text[start:pos].lower()
        while pos < n and text[pos] in _WS:
            pos += 1
        if pos >= n or text[pos] != "=":
            raise XMatrixParseError(f"expected '=' after parameter {name!r}")
        pos += 1
        while pos < n and text[pos] in _WS:
            pos += 1
        if pos < n and text[pos] == '"':
            pos += 1
            chars: list[str] = []
            while True:
                if pos >= n:
                    raise XMatrixParseError(f"unterminated quoted value for {name!r}")
                c = text[pos]
                if c == '"':
                    pos += 1
                    break
                if c == "\\":
                    if pos + 1 >= n:
                        raise XMatrixParseError(f"unterminated quoted value for {name!r}")
                    chars.append(text[pos + 1])
                    pos += 2
                    continue
                chars.append(c)
                pos += 1
            param_value = "".join(chars)
        else:
            start = pos
            while pos < n and text[pos] not in _WS and text[pos] not in ',"':
                pos += 1
            if pos == start:
                raise XMatrixParseError(f"expected a value for {name!r}")
            param_value = text[start:pos]
        while pos < n and text[pos] in _WS:
            pos += 1
        if pos < n and text[pos] != ",":
            raise XMatrixParseError(f"expected ',' after the value of {name!r}")
        if name in _KNOWN_PARAMS:
            if name in params:
                raise XMatrixParseError(f"parameter {name!r} given twice")
            params[name] = param_value

    missing = [p for p in ("origin", "key", "sig") if not params.get(p)]
    if missing:
        raise XMatrixParseError("missing or empty " + ", ".join(missing))
    destination = params.get("destination")
    if destination == "":
        raise XMatrixParseError("empty destination")
    return XMatrixAuth(
        origin=params["origin"],
        destination=destination,
        key=params["key"],
        sig=params["sig"],
    )


def request_json_for_signing(
    method: str | bytes,
    uri: str | bytes,
    origin: str,
    destination: str | None,
    content: object | None,
) -> JsonDict:
    """The object whose signature an X-Matrix header carries.

    ``uri`` is the path and query string exactly as sent; ``content`` is
    included only when not ``None`` (there is a request body), and
    ``destination`` only when not ``None``.
    """
    request: JsonDict = {
        "method": _text(method, "method"),
        "uri": _text(uri, "uri"),
        "origin": origin,
    }
    if destination is not None:
        request["destination"] = destination
    if content is not None:
        request["content"] = content
    return request


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def build_authorization_header(
    signing_key: SigningKey,
    origin: str,
    destination: str,
    method: str | bytes,
    uri: str | bytes,
    content: object | None,
) -> bytes:
    """Sign a request and return its ``Authorization`` header value:
    ``X-Matrix origin="...",destination="...",key="ed25519:...",sig="..."``.
    """
    signed = sign_json(
        request_json_for_signing(method, uri, origin, destination, content),
        origin,
        signing_key,
    )
    key_id = f"{signing_key.alg}:{signing_key.version}"
    sig = signed["signatures"][origin][key_id]
    header = (
        f"{SCHEME} origin={_quote(origin)},destination={_quote(destination)},"
        f"key={_quote(key_id)},sig={_quote(sig)}"
    )
    return header.encode("utf-8")


def verify_request_signature(
    auth: XMatrixAuth,
    verify_key: VerifyKey,
    method: str | bytes,
    uri: str | bytes,
    destination_expected: str,
    content: object | None,
) -> None:
    """Check that ``auth`` signs this request for ``destination_expected``.

    The signed object always carries our own name as ``destination`` (senders
    have always signed it, even before the header parameter existed); a
    ``destination`` parameter, when sent, must equal it.  ``verify_key`` must
    be the key ``auth.key`` names (its ``alg:version``).

    :raise XMatrixVerifyError: with the reason.
    """
    if auth.destination is not None and auth.destination != destination_expected:
        raise XMatrixVerifyError(
            f"destination {auth.destination!r} in the X-Matrix header is not this server"
        )
    key_id = f"{verify_key.alg}:{verify_key.version}"
    if key_id != auth.key:
        raise XMatrixVerifyError(f"key {auth.key!r} does not match verify key {key_id!r}")
    try:
        signed = request_json_for_signing(method, uri, auth.origin, destination_expected, content)
    except ValueError as e:
        raise XMatrixVerifyError(str(e)) from None
    signed["signatures"] = {auth.origin: {auth.key: auth.sig}}
    try:
        verify_signed_json(signed, auth.origin, verify_key)
    except SignatureVerifyException:
        raise XMatrixVerifyError(f"invalid signature from {auth.origin} with key {auth.key}") from None
    except Exception as e:
        # content that cannot be canonically encoded cannot carry a valid signature
        raise XMatrixVerifyError(f"request cannot be verified: {type(e).__name__}") from None
