"""Configuration of the standalone server.

Keys follow Synapse's names where the concept exists.  Loading is pure: it
takes the parsed YAML mapping and the directory relative paths resolve
against, and returns a frozen :class:`Config` or raises :class:`ConfigError`
naming the offending key.  Unknown keys are reported as warnings, never
silently dropped.  Files named by the configuration (signing key, TLS
certificate, CA list, log configuration, shared-secret file) are read at
start-up by :mod:`devicelist_plugin.standalone.startup`, which reports
problems the same way.

Every key, its default and its meaning are in :data:`KEY_DOCS`, the source
of the README's table; the tests check that every key is documented there
and written, commented, by ``generate-config``.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import yaml

from devicelist_plugin.core.backoff import BackoffPolicy
from devicelist_plugin.core.parse import ParseError, validate_server_name
from devicelist_plugin.federation.ipfilter import IPRangeConfigError, IPRangeFilter
from devicelist_plugin.federation.keyring import (
    TrustedKeyServer,
    TrustedKeyServersError,
    parse_trusted_key_servers,
)
from devicelist_plugin.federation.signing_keys import (
    OldSigningKeysError,
    OldVerifyKey,
    parse_old_signing_keys,
)

DATABASE_ENGINES = ("sqlite3", "psycopg2")
DEFAULT_SQLITE_FILE = "devicelist.db"

SECOND_MS = 1000
MINUTE_MS = 60 * SECOND_MS
HOUR_MS = 60 * MINUTE_MS
DAY_MS = 24 * HOUR_MS
WEEK_MS = 7 * DAY_MS
YEAR_MS = 365 * DAY_MS

#: Listener resources this version serves.  (Part of the composition of
#: :mod:`devicelist_plugin.standalone.site`, which has one mount function per name.)
SERVED_RESOURCE_NAMES: tuple[str, ...] = ("federation", "client", "keys", "admin", "metrics")
#: Resource names Synapse (or a later version of this plugin) knows that this
#: version does not serve: accepted with a warning, so a Synapse listener
#: definition can be reused.
IGNORED_RESOURCE_NAMES: tuple[str, ...] = (
    "media",
    "openid",
    "replication",
    "static",
    "health",
    "consent",
    "webclient",
)
#: Listener types of Synapse that are not served here (warned about and skipped).
IGNORED_LISTENER_TYPES: tuple[str, ...] = ("manhole", "metrics", "replication")

#: Where listeners bind when ``bind_addresses`` is not given: loopback only.
#: (Synapse binds every interface, ``['::', '0.0.0.0']``; list the addresses
#: to expose explicitly.)
DEFAULT_BIND_ADDRESSES: tuple[str, ...] = ("127.0.0.1",)

DEFAULT_KEY_REFRESH_INTERVAL_MS = DAY_MS
DEFAULT_BCRYPT_ROUNDS = 12
DEFAULT_RESYNC_GRACE_MS = 2 * SECOND_MS
DEFAULT_RESYNC_TIMEOUT_MS = 30 * SECOND_MS
DEFAULT_MAX_REMOTE_DEVICES_PER_USER = 50_000

_BLOCKLIST_SPELLINGS = ("ip_range_blocklist", "ip_range_blacklist", "federation_ip_range_blacklist")
_ALLOWLIST_SPELLINGS = ("ip_range_allowlist", "ip_range_whitelist")
_FEDERATION_KEYS = (
    "destination_min_retry_interval",
    "destination_retry_multiplier",
    "destination_max_retry_interval",
)

KNOWN_KEYS = frozenset(
    {
        "server_name",
        "database",
        "signing_key_path",
        "old_signing_keys",
        "key_refresh_interval",
        "trusted_key_servers",
        "listeners",
        "tls_certificate_path",
        "tls_private_key_path",
        "federation_verify_certificates",
        "federation_custom_ca_list",
        *_BLOCKLIST_SPELLINGS,
        *_ALLOWLIST_SPELLINGS,
        "registration_shared_secret",
        "registration_shared_secret_path",
        "allow_device_name_lookup_over_federation",
        "federation",
        "log_config",
        "bcrypt_rounds",
        "device_list_resync_grace",
        "device_list_resync_timeout",
        "max_remote_devices_per_user",
    }
)


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
class ListenerConfig:
    """One ``listeners`` entry of ``type: http``.

    :ivar port: the TCP port (0: one the OS chooses, for tests).
    :ivar bind_addresses: IP addresses to listen on.
    :ivar tls: serve HTTPS with ``tls_certificate_path`` / ``tls_private_key_path``.
    :ivar x_forwarded: take the client address from ``X-Forwarded-For``
        (behind a reverse proxy).
    :ivar resources: the resource names served, each once, in order.
    """

    port: int
    bind_addresses: tuple[str, ...] = DEFAULT_BIND_ADDRESSES
    tls: bool = False
    x_forwarded: bool = False
    resources: tuple[str, ...] = ("federation", "client")


@dataclass(frozen=True)
class Config:
    """The validated configuration; see :data:`KEY_DOCS` for each key.

    Durations are in milliseconds (``*_ms``); paths are absolute.
    """

    server_name: str
    database: DatabaseConfig
    signing_key_path: Optional[str] = None
    old_signing_keys: tuple[OldVerifyKey, ...] = ()
    key_refresh_interval_ms: int = DEFAULT_KEY_REFRESH_INTERVAL_MS
    trusted_key_servers: tuple[TrustedKeyServer, ...] = ()
    listeners: tuple[ListenerConfig, ...] = ()
    tls_certificate_path: Optional[str] = None
    tls_private_key_path: Optional[str] = None
    federation_verify_certificates: bool = True
    federation_custom_ca_list: tuple[str, ...] = ()
    ip_range_filter: IPRangeFilter = field(default_factory=IPRangeFilter, compare=False)
    registration_shared_secret: Optional[str] = field(default=None, repr=False)
    registration_shared_secret_path: Optional[str] = None
    allow_device_name_lookup_over_federation: bool = False
    retry_policy: BackoffPolicy = BackoffPolicy()
    log_config: Optional[str] = None
    bcrypt_rounds: int = DEFAULT_BCRYPT_ROUNDS
    device_list_resync_grace_ms: int = DEFAULT_RESYNC_GRACE_MS
    device_list_resync_timeout_ms: int = DEFAULT_RESYNC_TIMEOUT_MS
    max_remote_devices_per_user: int = DEFAULT_MAX_REMOTE_DEVICES_PER_USER
    warnings: tuple[str, ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class KeyDoc:
    """One configuration key for the documentation: its default and meaning."""

    key: str
    default: str
    description: str


#: Every key in the order the README and the generated configuration list them.
KEY_DOCS: tuple[KeyDoc, ...] = (
    KeyDoc("server_name", "(required)", "This server's name, e.g. example.org or localhost:8448."),
    KeyDoc(
        "signing_key_path",
        "<config dir>/<server_name>.signing.key",
        "The Synapse-format signing key file ('ed25519 <version> <seed>' a line; the "
        "first key signs). Generated with mode 0600 when missing.",
    ),
    KeyDoc(
        "old_signing_keys",
        "{}",
        "Retired keys still published: {'ed25519:<version>': {key: <base64>, expired_ts: <ms>}}.",
    ),
    KeyDoc(
        "key_refresh_interval",
        "1d",
        "How long other servers may cache our key response (its valid_until_ts).",
    ),
    KeyDoc(
        "trusted_key_servers",
        "[]",
        "Notaries asked for remote keys after the server itself: [{server_name, verify_keys: "
        "{'ed25519:<version>': <base64>}}]. The notary's keys are required. (Synapse defaults "
        "to matrix.org; here no notary is trusted unless listed.)",
    ),
    KeyDoc(
        "listeners",
        "[]",
        "HTTP listeners: [{port, bind_addresses, type: http, tls, x_forwarded, resources: "
        "[{names: [federation, client, keys]}]}]. bind_addresses defaults to ['127.0.0.1'] "
        "(loopback only; Synapse's default is every interface). 'federation' serves "
        "/_matrix/federation and /_matrix/key; 'keys' only /_matrix/key; 'client' serves "
        "/_matrix/client and /_synapse/admin/v1/register.",
    ),
    KeyDoc(
        "tls_certificate_path",
        "none",
        "PEM certificate (and chain) served by listeners with tls: true.",
    ),
    KeyDoc("tls_private_key_path", "none", "PEM private key of tls_certificate_path."),
    KeyDoc(
        "federation_verify_certificates",
        "true",
        "Verify other servers' TLS certificates. Turn off only on test networks.",
    ),
    KeyDoc(
        "federation_custom_ca_list",
        "none",
        "PEM files of the only CAs trusted for outbound federation (instead of the platform's).",
    ),
    KeyDoc(
        "ip_range_blocklist",
        "private, loopback, link-local, ... (Synapse's list)",
        "Addresses outbound federation never connects to. Also read as ip_range_blacklist "
        "and federation_ip_range_blacklist (all spellings given are combined).",
    ),
    KeyDoc(
        "ip_range_allowlist",
        "[]",
        "Exceptions to the blocklist (e.g. 127.0.0.0/8 for a loopback test network). Also "
        "read as ip_range_whitelist.",
    ),
    KeyDoc(
        "database",
        "{name: sqlite3, args: {database: devicelist.db}}",
        "sqlite3 (args.database: a file, relative to the config dir) or psycopg2 (args: "
        "psycopg2.connect arguments, plus cp_min / cp_max for the pool).",
    ),
    KeyDoc(
        "registration_shared_secret",
        "none (shared-secret registration disabled)",
        "Secret for /_synapse/admin/v1/register (Synapse's register_new_matrix_user).",
    ),
    KeyDoc(
        "registration_shared_secret_path",
        "none",
        "A file holding the registration shared secret (instead of registration_shared_secret).",
    ),
    KeyDoc(
        "allow_device_name_lookup_over_federation",
        "false",
        "Show device display names to other servers.",
    ),
    KeyDoc(
        "federation.destination_min_retry_interval",
        "10m",
        "First retry delay after a remote server failed.",
    ),
    KeyDoc(
        "federation.destination_retry_multiplier",
        "2",
        "Growth of the retry delay per failed attempt.",
    ),
    KeyDoc(
        "federation.destination_max_retry_interval",
        "1w",
        "Longest retry delay.",
    ),
    KeyDoc(
        "log_config",
        "none (twistd's log: stdout with -n, else twistd.log)",
        "A Python logging configuration file (YAML, logging.config.dictConfig schema, as "
        "Synapse's <server_name>.log.config); when set, all log events go through it.",
    ),
    KeyDoc(
        "bcrypt_rounds",
        "12",
        "bcrypt cost of stored password hashes (4 to 31).",
    ),
    KeyDoc(
        "device_list_resync_grace",
        "2s",
        "How long an EDU whose prev_id is unknown is held (its predecessor may be late) "
        "before the user is resynced.",
    ),
    KeyDoc(
        "device_list_resync_timeout",
        "30s",
        "Timeout of a GET /user/devices resync request.",
    ),
    KeyDoc(
        "max_remote_devices_per_user",
        "50000",
        "A resync answer listing more devices than this is refused and logged; the user "
        "stays stale and is retried with backoff.",
    ),
)

# ---------------------------------------------------------------------------
# value parsers


_DURATION_RE = re.compile(r"^\s*(\d+)\s*(ms|s|m|h|d|w|y)?\s*$")
_DURATION_UNITS = {
    None: 1,
    "ms": 1,
    "s": SECOND_MS,
    "m": MINUTE_MS,
    "h": HOUR_MS,
    "d": DAY_MS,
    "w": WEEK_MS,
    "y": YEAR_MS,
}


def parse_duration(value: object, key: str, *, allow_zero: bool = False) -> int:
    """Synapse's durations: milliseconds as an integer, or a string of an
    integer with a unit: ``ms``, ``s``, ``m``, ``h``, ``d``, ``w``, ``y``
    (``"10m"``, ``"1d"``; no unit: milliseconds).  Returns milliseconds."""
    if isinstance(value, bool):
        raise ConfigError(key, f"expected a duration such as '10m' or 600000, not {value!r}")
    if isinstance(value, int):
        ms = value
    elif isinstance(value, str):
        match = _DURATION_RE.match(value)
        if match is None:
            raise ConfigError(
                key,
                f"expected a duration such as '30s', '10m', '1d' or milliseconds, not {value!r}",
            )
        ms = int(match.group(1)) * _DURATION_UNITS[match.group(2)]
    else:
        raise ConfigError(key, f"expected a duration such as '10m' or 600000, not {value!r}")
    if ms < 0 or (ms == 0 and not allow_zero):
        raise ConfigError(key, f"must be {'at least 0' if allow_zero else 'positive'}, not {value!r}")
    return ms


def _bool(raw: Mapping[Any, Any], key: str, default: bool, where: Optional[str] = None) -> bool:
    value = raw.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ConfigError(where or key, f"expected true or false, not {value!r}")
    return value


def _int(value: object, key: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(key, f"expected an integer, not {value!r}")
    if not low <= value <= high:
        raise ConfigError(key, f"must be between {low} and {high}, not {value}")
    return value


def _path(value: object, key: str, base_dir: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(key, "expected a file path")
    return os.path.normpath(os.path.join(base_dir, os.path.expanduser(value)))


def _optional_path(raw: Mapping[Any, Any], key: str, base_dir: str) -> Optional[str]:
    value = raw.get(key)
    return None if value is None else _path(value, key, base_dir)


# ---------------------------------------------------------------------------
# the whole file


def parse_config(raw: object, base_dir: str) -> Config:
    """Validate a parsed configuration mapping; relative paths are relative to ``base_dir``."""
    if not isinstance(raw, Mapping):
        raise ConfigError("<top level>", "the configuration must be a YAML mapping")
    warnings = [
        f"unknown configuration key {key!r} ignored"
        for key in sorted(str(k) for k in raw)
        if key not in KNOWN_KEYS
    ]
    server_name = raw.get("server_name")
    if not isinstance(server_name, str):
        raise ConfigError("server_name", "required, a string such as 'example.org'")
    try:
        validate_server_name(server_name)
    except ParseError as e:
        raise ConfigError("server_name", e.message) from None

    signing_key_path = _path(
        raw.get("signing_key_path", f"{server_name}.signing.key"), "signing_key_path", base_dir
    )
    try:
        old_keys = tuple(parse_old_signing_keys(raw.get("old_signing_keys")))
    except OldSigningKeysError as e:
        raise _located(str(e), "old_signing_keys") from None
    try:
        notaries = tuple(parse_trusted_key_servers(raw.get("trusted_key_servers")))
    except TrustedKeyServersError as e:
        raise _located(str(e), "trusted_key_servers") from None

    tls_certificate_path = _optional_path(raw, "tls_certificate_path", base_dir)
    tls_private_key_path = _optional_path(raw, "tls_private_key_path", base_dir)
    listeners = _parse_listeners(raw.get("listeners"), warnings)
    for index, listener in enumerate(listeners):
        if listener.tls and (tls_certificate_path is None or tls_private_key_path is None):
            raise ConfigError(
                f"listeners[{index}].tls",
                "needs tls_certificate_path and tls_private_key_path",
            )

    ca_list = raw.get("federation_custom_ca_list")
    if ca_list is None:
        ca_paths: tuple[str, ...] = ()
    elif isinstance(ca_list, list) and ca_list:
        ca_paths = tuple(
            _path(p, f"federation_custom_ca_list[{i}]", base_dir) for i, p in enumerate(ca_list)
        )
    else:
        raise ConfigError("federation_custom_ca_list", "expected a non-empty list of PEM file paths")

    secret = raw.get("registration_shared_secret")
    if secret is not None and (not isinstance(secret, str) or not secret):
        raise ConfigError("registration_shared_secret", "expected a non-empty string")
    secret_path = _optional_path(raw, "registration_shared_secret_path", base_dir)
    if secret is not None and secret_path is not None:
        raise ConfigError(
            "registration_shared_secret_path",
            "give either registration_shared_secret or registration_shared_secret_path, not both",
        )

    log_config = _optional_path(raw, "log_config", base_dir)
    bcrypt_rounds = _int(raw.get("bcrypt_rounds", DEFAULT_BCRYPT_ROUNDS), "bcrypt_rounds", 4, 31)
    max_devices = _int(
        raw.get("max_remote_devices_per_user", DEFAULT_MAX_REMOTE_DEVICES_PER_USER),
        "max_remote_devices_per_user",
        1,
        10**9,
    )

    return Config(
        server_name=server_name,
        database=_parse_database(raw.get("database"), base_dir),
        signing_key_path=signing_key_path,
        old_signing_keys=old_keys,
        key_refresh_interval_ms=parse_duration(
            raw.get("key_refresh_interval", DEFAULT_KEY_REFRESH_INTERVAL_MS), "key_refresh_interval"
        ),
        trusted_key_servers=notaries,
        listeners=listeners,
        tls_certificate_path=tls_certificate_path,
        tls_private_key_path=tls_private_key_path,
        federation_verify_certificates=_bool(raw, "federation_verify_certificates", True),
        federation_custom_ca_list=ca_paths,
        ip_range_filter=_parse_ip_ranges(raw),
        registration_shared_secret=secret,
        registration_shared_secret_path=secret_path,
        allow_device_name_lookup_over_federation=_bool(
            raw, "allow_device_name_lookup_over_federation", False
        ),
        retry_policy=_parse_federation(raw.get("federation"), warnings),
        log_config=log_config,
        bcrypt_rounds=bcrypt_rounds,
        device_list_resync_grace_ms=parse_duration(
            raw.get("device_list_resync_grace", DEFAULT_RESYNC_GRACE_MS),
            "device_list_resync_grace",
            allow_zero=True,
        ),
        device_list_resync_timeout_ms=parse_duration(
            raw.get("device_list_resync_timeout", DEFAULT_RESYNC_TIMEOUT_MS),
            "device_list_resync_timeout",
        ),
        max_remote_devices_per_user=max_devices,
        warnings=tuple(warnings),
    )


def _located(message: str, key: str) -> ConfigError:
    """A :class:`ConfigError` from a parser's message ``"<where>: <what>"``
    whose ``<where>`` starts with ``key`` (``trusted_key_servers[0].server_name``)."""
    where, sep, what = message.partition(": ")
    if sep and where.startswith(key):
        return ConfigError(where, what)
    return ConfigError(key, message)


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
    if args is None:
        args = {}
    if not isinstance(args, Mapping):
        raise ConfigError("database.args", "must be a mapping")
    args = dict(args)
    if name == "sqlite3":
        path = args.get("database", DEFAULT_SQLITE_FILE)
        if not isinstance(path, str) or not path:
            raise ConfigError("database.args.database", "must be a file path")
        args["database"] = path if path == ":memory:" else os.path.join(base_dir, path)
    else:
        for pool_key in ("cp_min", "cp_max"):
            if pool_key in args:
                _int(args[pool_key], f"database.args.{pool_key}", 1, 1000)
        if args.get("cp_min", 1) > args.get("cp_max", 5):
            raise ConfigError("database.args.cp_min", "must not exceed cp_max")
    return DatabaseConfig(name=name, args=args)


def _parse_listeners(raw: object, warnings: list[str]) -> tuple[ListenerConfig, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError("listeners", "expected a list of listener definitions")
    listeners: list[ListenerConfig] = []
    for index, entry in enumerate(raw):
        where = f"listeners[{index}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(where, "expected a mapping with port, type and resources")
        kind = entry.get("type", "http")
        if kind in IGNORED_LISTENER_TYPES:
            warnings.append(f"{where}: listeners of type {kind!r} are not served; ignored")
            continue
        if kind != "http":
            raise ConfigError(f"{where}.type", f"must be 'http', not {kind!r}")
        if "port" not in entry:
            raise ConfigError(f"{where}.port", "required")
        port = _int(entry["port"], f"{where}.port", 0, 65535)
        listeners.append(
            ListenerConfig(
                port=port,
                bind_addresses=_parse_bind_addresses(entry, where),
                tls=_bool(entry, "tls", False, f"{where}.tls"),
                x_forwarded=_bool(entry, "x_forwarded", False, f"{where}.x_forwarded"),
                resources=_parse_resources(entry.get("resources"), where, warnings),
            )
        )
    return tuple(listeners)


def _parse_bind_addresses(entry: Mapping[Any, Any], where: str) -> tuple[str, ...]:
    if "bind_addresses" in entry:
        key = f"{where}.bind_addresses"
        addresses = entry["bind_addresses"]
        if not isinstance(addresses, list) or not addresses:
            raise ConfigError(key, "expected a non-empty list of IP addresses")
    elif "bind_address" in entry:
        # Synapse's older single-address spelling
        key = f"{where}.bind_address"
        addresses = [entry["bind_address"]]
    else:
        return DEFAULT_BIND_ADDRESSES
    result: list[str] = []
    for i, address in enumerate(addresses):
        if not isinstance(address, str):
            raise ConfigError(f"{key}[{i}]", f"expected an IP address, not {address!r}")
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise ConfigError(f"{key}[{i}]", f"{address!r} is not an IP address") from None
        if address not in result:
            result.append(address)
    return tuple(result)


def _parse_resources(raw: object, where: str, warnings: list[str]) -> tuple[str, ...]:
    key = f"{where}.resources"
    if not isinstance(raw, list) or not raw:
        raise ConfigError(key, "expected a non-empty list of {names: [...]}")
    names: list[str] = []
    for i, resource in enumerate(raw):
        if not isinstance(resource, Mapping) or not isinstance(resource.get("names"), list):
            raise ConfigError(f"{key}[{i}].names", "expected a list of resource names")
        for j, name in enumerate(resource["names"]):
            name_key = f"{key}[{i}].names[{j}]"
            if name in SERVED_RESOURCE_NAMES:
                if name not in names:
                    names.append(name)
            elif name in IGNORED_RESOURCE_NAMES:
                warnings.append(f"{name_key}: resource {name!r} is not served; ignored")
            else:
                raise ConfigError(
                    name_key,
                    f"unknown resource {name!r}; served: {', '.join(SERVED_RESOURCE_NAMES)}",
                )
    return tuple(names)


def _parse_ip_ranges(raw: Mapping[Any, Any]) -> IPRangeFilter:
    def combined(spellings: Sequence[str]) -> tuple[Optional[list[object]], str]:
        given = [s for s in spellings if raw.get(s) is not None]
        if not given:
            return None, spellings[0]
        entries: list[object] = []
        for spelling in given:
            value = raw[spelling]
            if not isinstance(value, list):
                raise ConfigError(spelling, "expected a list of IP ranges such as '10.0.0.0/8'")
            entries.extend(value)
        return entries, given[0]

    blocklist, block_key = combined(_BLOCKLIST_SPELLINGS)
    allowlist, allow_key = combined(_ALLOWLIST_SPELLINGS)
    try:
        return IPRangeFilter.from_config(
            blocklist, allowlist, blocklist_option=block_key, allowlist_option=allow_key
        )
    except IPRangeConfigError as e:
        where = e.option if e.index is None else f"{e.option}[{e.index}]"
        raise ConfigError(where, e.reason) from None


def _parse_federation(raw: object, warnings: list[str]) -> BackoffPolicy:
    if raw is None:
        return BackoffPolicy()
    if not isinstance(raw, Mapping):
        raise ConfigError("federation", "expected a mapping")
    for key in sorted(str(k) for k in raw):
        if key not in _FEDERATION_KEYS:
            warnings.append(f"unknown configuration key 'federation.{key}' ignored")
    defaults = BackoffPolicy()
    min_key, mult_key, max_key = (f"federation.{k}" for k in _FEDERATION_KEYS)
    min_ms = parse_duration(
        raw.get("destination_min_retry_interval", int(defaults.min_interval * 1000)), min_key
    )
    max_ms = parse_duration(
        raw.get("destination_max_retry_interval", int(defaults.max_interval * 1000)), max_key
    )
    multiplier = raw.get("destination_retry_multiplier", defaults.multiplier)
    if isinstance(multiplier, bool) or not isinstance(multiplier, (int, float)):
        raise ConfigError(mult_key, f"expected a number, not {multiplier!r}")
    if not 1 <= multiplier <= 1000:
        raise ConfigError(mult_key, f"must be between 1 and 1000, not {multiplier!r}")
    if max_ms < min_ms:
        raise ConfigError(max_key, f"must be at least {min_key}")
    return BackoffPolicy(
        min_interval=min_ms / 1000, multiplier=float(multiplier), max_interval=max_ms / 1000
    )


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
