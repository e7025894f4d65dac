"""The one error type of every HTTP endpoint, and its JSON form.

Handlers raise :class:`MatrixError`; :mod:`devicelist_plugin.federation.resource`
turns it into the response ``{"errcode": ..., "error": ...}`` with its HTTP
status code.  Anything else a handler raises becomes a 500 ``M_UNKNOWN`` with
the failure logged.  Errors received from a remote server must be wrapped in
a new :class:`MatrixError` of our own choosing, never re-raised as they came.
"""

from __future__ import annotations

from typing import Any, Mapping

from devicelist_plugin.core.models import JsonDict

M_UNAUTHORIZED = "M_UNAUTHORIZED"
M_FORBIDDEN = "M_FORBIDDEN"
M_BAD_JSON = "M_BAD_JSON"
M_NOT_JSON = "M_NOT_JSON"
M_UNKNOWN = "M_UNKNOWN"
M_UNRECOGNIZED = "M_UNRECOGNIZED"
M_INVALID_PARAM = "M_INVALID_PARAM"
M_NOT_FOUND = "M_NOT_FOUND"
M_TOO_LARGE = "M_TOO_LARGE"
M_MISSING_PARAM = "M_MISSING_PARAM"


class MatrixError(Exception):
    """An error answered to the client as ``{"errcode", "error"}``.

    :param code: the HTTP status code.
    :param errcode: the Matrix error code, e.g. :data:`M_FORBIDDEN`.
    :param msg: the human-readable ``error`` text.
    :param extra: further fields merged into the JSON body; they can never
        replace ``errcode`` or ``error``.
    """

    def __init__(
        self,
        code: int,
        errcode: str,
        msg: str,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(code, errcode, msg)
        self.code = code
        self.errcode = errcode
        self.msg = msg
        self.extra: JsonDict = dict(extra) if extra is not None else {}

    def to_json(self) -> JsonDict:
        """The response body."""
        body = dict(self.extra)
        body["errcode"] = self.errcode
        body["error"] = self.msg
        return body

    def __str__(self) -> str:
        return f"{self.code} {self.errcode}: {self.msg}"

    def __repr__(self) -> str:
        return f"MatrixError({self.code!r}, {self.errcode!r}, {self.msg!r})"
