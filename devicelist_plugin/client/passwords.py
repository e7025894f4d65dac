"""Password hashing with bcrypt, off the reactor thread.

bcrypt at Synapse's default cost (12 rounds) takes a few hundred
milliseconds of CPU; every hash and check runs through a
:class:`~devicelist_plugin.local.handler.CpuRunner` (a worker thread in the
standalone server).  bcrypt reads at most 72 bytes of a password; longer
passwords are cut at 72 bytes explicitly (what bcrypt did silently before
version 5, so hashes stay compatible with Synapse's).
"""

from __future__ import annotations

import bcrypt
from twisted.internet.defer import Deferred

from devicelist_plugin.local.handler import CpuRunner, run_inline

__all__ = ["BCRYPT_MAX_PASSWORD_BYTES", "PasswordHasher"]

BCRYPT_MAX_PASSWORD_BYTES = 72


def _secret(password: str) -> bytes:
    return password.encode("utf-8")[:BCRYPT_MAX_PASSWORD_BYTES]


class PasswordHasher:
    """:param rounds: bcrypt's cost (``bcrypt_rounds``, 4 to 31)."""

    def __init__(self, rounds: int = 12, runner: CpuRunner = run_inline) -> None:
        if not 4 <= rounds <= 31:
            raise ValueError(f"bcrypt rounds must be between 4 and 31, not {rounds}")
        self.rounds = rounds
        self._runner = runner

    def hash(self, password: str) -> "Deferred[str]":
        """A new salted hash of ``password``."""

        def run() -> str:
            return bcrypt.hashpw(_secret(password), bcrypt.gensalt(self.rounds)).decode("ascii")

        return self._runner(run)

    def verify(self, password: str, password_hash: str) -> "Deferred[bool]":
        """Whether ``password`` matches ``password_hash`` (False for a malformed hash)."""

        def run() -> bool:
            try:
                return bcrypt.checkpw(_secret(password), password_hash.encode("ascii"))
            except (ValueError, UnicodeEncodeError):
                return False

        return self._runner(run)
