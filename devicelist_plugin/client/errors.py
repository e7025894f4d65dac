"""Error codes of the client-server API, and the user-interactive auth answer.

Every error is a :class:`~devicelist_plugin.federation.errors.MatrixError`
(one mapping to JSON, in :mod:`devicelist_plugin.federation.resource`); the
codes here are the ones only client-server endpoints use.
"""

from __future__ import annotations

from typing import Any, Mapping

from devicelist_plugin.core.models import JsonDict
from devicelist_plugin.federation.errors import MatrixError

M_MISSING_TOKEN = "M_MISSING_TOKEN"
M_UNKNOWN_TOKEN = "M_UNKNOWN_TOKEN"
M_USER_IN_USE = "M_USER_IN_USE"
M_INVALID_USERNAME = "M_INVALID_USERNAME"


class InteractiveAuthRequired(MatrixError):
    """401 with the user-interactive auth state (``flows``, ``params``,
    ``session``, and after a failed attempt ``completed``, ``errcode`` and
    ``error``).  The first answer of an endpoint that needs it carries no
    ``errcode``, as in the spec and Synapse."""

    def __init__(self, body: Mapping[str, Any], errcode: str = "", msg: str = "") -> None:
        super().__init__(401, errcode, msg or "User-interactive authentication required", body)
        self._with_error = bool(errcode)

    def to_json(self) -> JsonDict:
        body = dict(self.extra)
        if self._with_error:
            body["errcode"] = self.errcode
            body["error"] = self.msg
        return body
