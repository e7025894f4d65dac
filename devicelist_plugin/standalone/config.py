"""Configuration of the standalone server.

Keys follow Synapse's names where the concept exists.  Loading is pure: it
takes the parsed YAML mapping and the directory relative paths resolve
against, and returns a frozen :class:`Config` or raises :class:`ConfigError`
naming the offending key.  Unknown keys are reported as warnings, never
silently dropped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import yaml

from devicelist_plugin.core.parse import ParseError, validate_server_name

KNOWN_KEYS = frozenset({"server_name", "database"})
DATABASE_ENGINES = ("sqlite3", "psycopg2")
DEFAULT_SQLITE_FILE = "devicelist.db"


class ConfigError(ValueError):
    """A configuration value is missing or wrong; ``key`` names it."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


@dataclass(frozen=True)
class DatabaseConfig:
    """``database``: ``name`` is ``sqlite3`` (default) or ``psycopg2``."""

    name: str
    args: Mapping[str, Any]


@dataclass(frozen=True)
class Config:
    server_name: str
    database: DatabaseConfig
    warnings: tuple[str, ...] = field(default=(), compare=False)


def parse_config(raw: object, base_dir: str) -> Config:
    """Validate a parsed configuration mapping."""
    if not isinstance(raw, Mapping):
        raise ConfigError("<top level>", "the configuration must be a YAML mapping")
    warnings = tuple(
        f"unknown configuration key {key!r} ignored"
        for key in sorted(str(k) for k in raw)
        if key not in KNOWN_KEYS
    )
    server_name = raw.get("server_name")
    if not isinstance(server_name, str):
        raise ConfigError("server_name", "required, a string such as 'example.org'")
    try:
        validate_server_name(server_name)
    except ParseError as e:
        raise ConfigError("server_name", e.message) from None
    return Config(
        server_name=server_name,
        database=_parse_database(raw.get("database"), base_dir),
        warnings=warnings,
    )


def _parse_database(raw: object, base_dir: str) -> DatabaseConfig:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError("database", "must be a mapping with 'name' and 'args'")
    name = raw.get("name", "sqlite3")
    if name not in DATABASE_ENGINES:
        raise ConfigError(
            "database.name", f"must be one of {', '.join(DATABASE_ENGINES)}, not {name!r}"
        )
    args = raw.get("args", {})
    if not isinstance(args, Mapping):
        raise ConfigError("database.args", "must be a mapping")
    args = dict(args)
    if name == "sqlite3":
        path = args.get("database", DEFAULT_SQLITE_FILE)
        if not isinstance(path, str) or not path:
            raise ConfigError("database.args.database", "must be a file path")
        args["database"] = path if path == ":memory:" else os.path.join(base_dir, path)
    return DatabaseConfig(name=name, args=args)


def load_config_file(path: str) -> Config:
    """Read and validate a YAML configuration file."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError("--config", f"cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError("--config", f"{path} is not valid YAML: {e}") from None
    return parse_config(raw, os.path.dirname(os.path.abspath(path)))
