"""``python -m devicelist_plugin generate-config``: a ready-to-run data directory.

:func:`generate_config` writes into the data directory:

==============================  =====  ============================================
file                            mode   what
==============================  =====  ============================================
``devicelist.yaml``             0600   the configuration, every key commented (it
                                       holds the registration shared secret)
``<server_name>.signing.key``   0600   a new ed25519 signing key (Synapse's format)
``<server_name>.tls.crt``       0644   a self-signed certificate for the server
                                       name's host (CN and subjectAltName), for
                                       test setups: replace it for production
``<server_name>.tls.key``       0600   its private key (RSA 2048)
``<server_name>.log.config``    0644   Python logging to stderr at INFO
==============================  =====  ============================================

The configuration has two listeners: TLS on ``port`` (default: the server
name's port, else 8448) on the ``bind`` addresses serving ``federation`` and
``client``, and plain HTTP on 127.0.0.1:``client_port`` (default 8008) serving
``client``, ``admin`` and ``metrics`` (the listener Synapse's
``register_new_matrix_user -c devicelist.yaml`` looks for).  ``test_network`` turns certificate
verification off and allows loopback addresses for outbound federation, for
several servers on one machine.

Nothing is overwritten: if any of the files exists, nothing is written and
:class:`GenerateError` says which.  A failure half-way removes what was
written.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import secrets
from dataclasses import dataclass
from typing import Optional, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from devicelist_plugin.core.parse import ParseError, parse_server_name
from devicelist_plugin.federation.signing_keys import SigningKeyFileError, load_or_generate_signing_key

__all__ = [
    "CONFIG_FILE_NAME",
    "DEFAULT_CLIENT_PORT",
    "DEFAULT_FEDERATION_PORT",
    "GenerateError",
    "GeneratedFiles",
    "generate_config",
    "self_signed_certificate",
]

CONFIG_FILE_NAME = "devicelist.yaml"
DEFAULT_FEDERATION_PORT = 8448
DEFAULT_CLIENT_PORT = 8008
CERTIFICATE_DAYS = 3650

LOG_CONFIG = """\
# Python logging configuration of devicelist-plugin (logging.config.dictConfig
# schema, as Synapse's <server_name>.log.config).  Loggers are named after the
# module that logs, e.g. devicelist_plugin.client.api or twisted.web.server.
version: 1
formatters:
  precise:
    format: '%(asctime)s - %(name)s - %(levelname)s - %(message)s'
handlers:
  console:
    class: logging.StreamHandler
    formatter: precise
    stream: ext://sys.stderr
loggers:
  # twistd's access log, one line per HTTP request: WARNING silences it
  twisted.python.log:
    level: INFO
root:
  level: INFO
  handlers: [console]
disable_existing_loggers: false
"""


class GenerateError(Exception):
    """The files cannot be generated; nothing was written."""


@dataclass(frozen=True)
class GeneratedFiles:
    """The paths written."""

    config: str
    signing_key: str
    tls_certificate: str
    tls_private_key: str
    log_config: str

    @property
    def all(self) -> tuple[str, ...]:
        return (
            self.config,
            self.signing_key,
            self.tls_certificate,
            self.tls_private_key,
            self.log_config,
        )


def planned_files(server_name: str, data_dir: str) -> GeneratedFiles:
    """Where :func:`generate_config` writes."""
    data_dir = os.path.abspath(data_dir)
    return GeneratedFiles(
        config=os.path.join(data_dir, CONFIG_FILE_NAME),
        signing_key=os.path.join(data_dir, f"{server_name}.signing.key"),
        tls_certificate=os.path.join(data_dir, f"{server_name}.tls.crt"),
        tls_private_key=os.path.join(data_dir, f"{server_name}.tls.key"),
        log_config=os.path.join(data_dir, f"{server_name}.log.config"),
    )


def self_signed_certificate(host: str, days: int = CERTIFICATE_DAYS) -> tuple[bytes, bytes]:
    """A self-signed certificate for ``host`` (a DNS name or an IP address,
    IPv6 possibly bracketed) and its private key, both PEM."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    try:
        san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(bare))
    except ValueError:
        san = x509.DNSName(bare)
    # a common name is at most 64 characters; the subjectAltName is what counts
    name = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, bare)] if len(bare) <= 64 else []
    )
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([san]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem


def _quote(value: str) -> str:
    # a JSON string is a valid YAML double-quoted scalar
    return json.dumps(value)


def render_config(
    server_name: str,
    files: GeneratedFiles,
    *,
    port: int,
    bind_addresses: Sequence[str],
    client_port: int,
    registration_shared_secret: str,
    test_network: bool = False,
) -> str:
    """The commented YAML configuration (paths relative to its directory)."""
    name = os.path.basename
    binds = ", ".join(_quote(a) for a in bind_addresses)
    verify = "false" if test_network else "true"
    allowlist = '["127.0.0.0/8", "::1/128"]' if test_network else "[]"
    return f"""\
# devicelist-plugin configuration, written by
#   python -m devicelist_plugin generate-config
# Keys follow Synapse's names.  Relative paths are relative to this file's
# directory.  Durations are milliseconds or a number with a unit: 30s, 10m, 1d.
# Run with:  twistd -n devicelist --config {name(files.config)}

# This server's name: the part after the ':' of its users' ids.  It cannot
# change once other servers know it.
server_name: {_quote(server_name)}

# The signing key file, Synapse's format ('ed25519 <version> <seed>' a line;
# the first key signs).  Keep it secret and keep it: other servers cache it.
signing_key_path: {_quote(name(files.signing_key))}

# Keys no longer in signing_key_path but still published until they expire:
#   "ed25519:<version>": {{key: <unpadded base64 public key>, expired_ts: <ms>}}
old_signing_keys: {{}}

# How long other servers may cache our key response (valid_until_ts).
key_refresh_interval: 1d

# Notaries asked for other servers' keys when a server cannot be asked
# itself.  Their keys are required:
#   - server_name: notary.example
#     verify_keys: {{"ed25519:auto": "<unpadded base64 public key>"}}
trusted_key_servers: []

# HTTP listeners.  resources: federation (/_matrix/federation and
# /_matrix/key), keys (/_matrix/key only), client (/_matrix/client and
# Synapse's /_synapse/admin/v1/register), admin (/_devicelist/admin, admin
# users' access tokens), metrics (/_devicelist/metrics, Prometheus).  bind_addresses defaults to
# ['127.0.0.1']; list the addresses to expose, e.g. ['::', '0.0.0.0'].
# x_forwarded: take client addresses from X-Forwarded-For (reverse proxy).
listeners:
  # federation (and clients) over TLS
  - port: {port}
    bind_addresses: [{binds}]
    type: http
    tls: true
    x_forwarded: false
    resources:
      - names: [federation, client]
  # plain HTTP on loopback for local clients, tools (Synapse's
  # register_new_matrix_user -c {name(files.config)}), the admin API and metrics
  - port: {client_port}
    bind_addresses: ["127.0.0.1"]
    type: http
    tls: false
    x_forwarded: false
    resources:
      - names: [client, admin, metrics]

# The PEM certificate (followed by its chain) of TLS listeners.  The
# generated one is self-signed: fine for tests, not for federating with
# servers that verify certificates.
tls_certificate_path: {_quote(name(files.tls_certificate))}

# The PEM private key of tls_certificate_path.
tls_private_key_path: {_quote(name(files.tls_private_key))}

# Verify other servers' certificates.  Turn off only on test networks.
federation_verify_certificates: {verify}

# PEM files of the only CAs trusted for outbound federation, instead of the
# platform's, e.g. ["/etc/ssl/my-ca.pem"].  null: the platform's.
federation_custom_ca_list: null

# Addresses outbound federation never connects to.  null: Synapse's default
# list (loopback, private, link-local, CGNAT, multicast, reserved).  Also
# read as ip_range_blacklist.
ip_range_blocklist: null

# Exceptions to the blocklist, e.g. ["127.0.0.0/8", "::1/128"] for servers
# on one machine.  Also read as ip_range_whitelist.
ip_range_allowlist: {allowlist}

# The database: sqlite3 (args.database: a file) or psycopg2 (args: the
# arguments of psycopg2.connect, e.g. dbname, user, password, host, plus
# cp_min / cp_max for the connection pool).
database:
  name: sqlite3
  args:
    database: devicelist.db

# The secret of shared-secret registration (Synapse's
# /_synapse/admin/v1/register, used by register_new_matrix_user).  Remove it
# to turn registration off.
registration_shared_secret: {_quote(registration_shared_secret)}

# Or a file holding the secret, instead of registration_shared_secret.
registration_shared_secret_path: null

# Show device display names to other servers (Synapse's default: no).
allow_device_name_lookup_over_federation: false

# Retries of a remote server that failed: the first after the minimum, then
# growing by the multiplier, at most the maximum (jitter x0.8 to x1.4).
federation:
  destination_min_retry_interval: 10m
  destination_retry_multiplier: 2
  destination_max_retry_interval: 1w

# Python logging configuration (Synapse's log_config).  null: twistd's log
# (stdout with -n, else twistd.log).
log_config: {_quote(name(files.log_config))}

# bcrypt cost of stored password hashes.
bcrypt_rounds: 12

# An update whose prev_id is unknown is held this long (its predecessor may
# be late) before the user's device list is fetched again.
device_list_resync_grace: 2s

# Timeout of fetching a remote user's device list.
device_list_resync_timeout: 30s

# A remote user's device list with more devices than this is refused (and
# logged); the user stays stale and is retried with backoff.
max_remote_devices_per_user: 50000
"""


def _write_new(path: str, data: bytes, mode: int) -> None:
    """Create ``path`` (it must not exist) with ``mode`` and ``data``; on
    failure nothing is left behind."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)


def generate_config(
    server_name: str,
    data_dir: str,
    *,
    port: Optional[int] = None,
    bind_addresses: Sequence[str] = ("127.0.0.1",),
    client_port: int = DEFAULT_CLIENT_PORT,
    test_network: bool = False,
) -> GeneratedFiles:
    """Write the files of the module docstring into ``data_dir`` (created if
    missing); return their paths.

    :raise GenerateError: a bad argument, or a file exists (nothing written).
    """
    try:
        host, name_port = parse_server_name(server_name)
    except ParseError as e:
        raise GenerateError(f"--server-name: {e.message}") from None
    if port is None:
        port = name_port if name_port is not None else DEFAULT_FEDERATION_PORT
    for option, value in (("--port", port), ("--client-port", client_port)):
        if not 0 <= value <= 65535:
            raise GenerateError(f"{option}: {value} is not a port number")
    if port == client_port and port != 0:
        raise GenerateError(f"--port and --client-port are both {port}")
    if not bind_addresses:
        raise GenerateError("--bind: at least one address is needed")
    for address in bind_addresses:
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise GenerateError(f"--bind: {address!r} is not an IP address") from None

    files = planned_files(server_name, data_dir)
    existing = [path for path in files.all if os.path.lexists(path)]
    if existing:
        raise GenerateError(
            "refusing to overwrite existing files (nothing was written): " + ", ".join(existing)
        )

    certificate, tls_key = self_signed_certificate(host)
    config = render_config(
        server_name,
        files,
        port=port,
        bind_addresses=bind_addresses,
        client_port=client_port,
        registration_shared_secret=secrets.token_urlsafe(32),
        test_network=test_network,
    )
    try:
        os.makedirs(os.path.dirname(files.config), exist_ok=True)
    except OSError as e:
        raise GenerateError(f"--data-dir: cannot create {data_dir}: {e.strerror}") from None
    written: list[str] = []
    try:
        load_or_generate_signing_key(files.signing_key)
        written.append(files.signing_key)
        for path, data, mode in (
            (files.tls_certificate, certificate, 0o644),
            (files.tls_private_key, tls_key, 0o600),
            (files.log_config, LOG_CONFIG.encode("utf-8"), 0o644),
            (files.config, config.encode("utf-8"), 0o600),
        ):
            _write_new(path, data, mode)
            written.append(path)
    except (OSError, SigningKeyFileError) as e:
        for path in written:
            try:
                os.unlink(path)
            except OSError:
                pass
        raise GenerateError(f"cannot write into {data_dir}: {e}") from None
    return files
