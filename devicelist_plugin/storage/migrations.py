"""Versioned schema migrations, applied at start-up in one transaction.

The migrations are the files ``schema/NNNN_name.sql`` of this package, applied
in order of ``NNNN`` (1, 2, 3, ... without gaps).  ``schema_version`` holds one
row per applied migration; the database's version is the largest.  A
database whose version is larger than the newest migration shipped here was
written by a newer plugin and is refused (:class:`SchemaTooNewError`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from typing import Optional, Sequence

from devicelist_plugin.storage.engines import Txn
from devicelist_plugin.storage.errors import SchemaError, SchemaTooNewError

_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    # SQL with ${NAME} dialect substitutions, statements ending in ";"
    sql: str


def load_migrations() -> tuple[Migration, ...]:
    """The migrations shipped with the package, in order."""
    found = []
    for entry in resources.files("devicelist_plugin.storage").joinpath("schema").iterdir():
        match = _FILE_NAME.match(entry.name)
        if match is None:
            continue
        found.append(Migration(int(match.group(1)), match.group(2), entry.read_text("utf-8")))
    return check_migrations(found)


def check_migrations(migrations: Sequence[Migration]) -> tuple[Migration, ...]:
    """Sort migrations and check that they are numbered 1, 2, 3... without gaps."""
    ordered = tuple(sorted(migrations, key=lambda m: m.version))
    for expected, migration in enumerate(ordered, start=1):
        if migration.version != expected:
            raise SchemaError(
                f"schema migrations must be numbered 1, 2, 3, ... without gaps or "
                f"duplicates; found {[m.version for m in ordered]}"
            )
    return ordered


def split_statements(sql: str) -> list[str]:
    """Drop ``--`` comment lines and split at semicolons that end a line."""
    lines = [line for line in sql.splitlines() if not line.lstrip().startswith("--")]
    statements, current = [], []
    for line in lines:
        current.append(line)
        if line.rstrip().endswith(";"):
            statement = "\n".join(current).strip().rstrip(";").strip()
            if statement:
                statements.append(statement)
            current = []
    rest = "\n".join(current).strip()
    if rest:
        statements.append(rest)
    return statements


def ensure_version_table(txn: Txn) -> None:
    txn.execute(
        "CREATE TABLE IF NOT EXISTS schema_version ("
        " version INTEGER NOT NULL PRIMARY KEY,"
        " name TEXT NOT NULL)"
    )


def current_version(txn: Txn) -> int:
    """The schema version of the database (0 when nothing was applied)."""
    row = txn.query_one("SELECT MAX(version) FROM schema_version")
    return int(row[0]) if row and row[0] is not None else 0


def migrate(txn: Txn, migrations: Optional[Sequence[Migration]] = None) -> int:
    """Bring the schema up to date; return the resulting version.

    Runs inside the caller's transaction, so a migration that fails leaves
    the database as it was.  Running it again is a no-op.
    """
    ordered = load_migrations() if migrations is None else check_migrations(migrations)
    known = ordered[-1].version if ordered else 0
    txn.dialect.check_server(txn)
    txn.dialect.lock_for_migration(txn)
    ensure_version_table(txn)
    version = current_version(txn)
    if version > known:
        raise SchemaTooNewError(version, known)
    for migration in ordered:
        if migration.version <= version:
            continue
        for statement in split_statements(migration.sql):
            txn.execute(txn.dialect.render_schema(statement))
        txn.execute(
            "INSERT INTO schema_version (version, name) VALUES (?, ?)",
            (migration.version, migration.name),
        )
        version = migration.version
    return version
