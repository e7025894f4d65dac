"""The files a configuration names, read once at start-up.

:func:`load_startup_files` runs when ``twistd devicelist`` parses its options,
so that a missing or malformed file stops start-up with a
:class:`~devicelist_plugin.standalone.config.ConfigError` naming the key,
before anything listens:

- ``signing_key_path``: every key of the file (the first signs); a missing
  file is generated with mode 0600, as Synapse does;
- ``tls_certificate_path`` / ``tls_private_key_path`` (when a listener has
  ``tls: true``): the certificate, its chain, and a key that matches it;
- ``federation_custom_ca_list``: the CA certificates;
- ``registration_shared_secret_path``: the secret;
- ``log_config``: a YAML mapping of Python's logging schema (``version: 1``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import yaml
from OpenSSL import SSL, crypto
from signedjson.types import SigningKey
from twisted.internet import ssl

from devicelist_plugin.federation.agent import FederationTLSPolicy, TLSConfigError
from devicelist_plugin.federation.signing_keys import (
    SigningKeyFileError,
    key_id,
    load_or_generate_signing_key,
    load_signing_keys,
)
from devicelist_plugin.standalone.config import Config, ConfigError

__all__ = ["StartupFiles", "load_startup_files", "load_tls_server_options"]

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)


@dataclass(frozen=True)
class StartupFiles:
    """What :func:`load_startup_files` read.

    :ivar tls_server_options: the TLS context of listeners with ``tls: true``
        (``None`` when none has).
    :ivar log_config: the parsed ``log_config`` file.
    """

    signing_keys: tuple[SigningKey, ...]
    tls_policy: FederationTLSPolicy
    tls_server_options: Optional[ssl.CertificateOptions] = None
    registration_shared_secret: Optional[str] = field(default=None, repr=False)
    log_config: Optional[Mapping[str, Any]] = None


def _read(path: str, key: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(key, f"cannot read {path}: {e.strerror}") from None


def load_signing_key_file(path: str) -> tuple[SigningKey, ...]:
    """Every key of ``path``, or one new key written there if it is missing."""
    try:
        if os.path.exists(path):
            return tuple(load_signing_keys(path))
        return (load_or_generate_signing_key(path),)
    except SigningKeyFileError as e:
        raise ConfigError("signing_key_path", str(e)) from None


def load_tls_server_options(certificate_path: str, private_key_path: str) -> ssl.CertificateOptions:
    """The server-side TLS context of a PEM certificate (its chain following
    it in the file) and its PEM private key.

    :raise ConfigError: naming ``tls_certificate_path`` or ``tls_private_key_path``.
    """
    blocks = _PEM_CERTIFICATE.findall(_read(certificate_path, "tls_certificate_path"))
    if not blocks:
        raise ConfigError("tls_certificate_path", f"{certificate_path} holds no PEM certificate")
    try:
        chain = [crypto.load_certificate(crypto.FILETYPE_PEM, block) for block in blocks]
    except crypto.Error as e:
        raise ConfigError("tls_certificate_path", f"{certificate_path}: invalid certificate ({e})") from None
    try:
        key = crypto.load_privatekey(
            crypto.FILETYPE_PEM, _read(private_key_path, "tls_private_key_path")
        )
    except crypto.Error as e:
        raise ConfigError("tls_private_key_path", f"{private_key_path}: invalid private key ({e})") from None
    options = ssl.CertificateOptions(privateKey=key, certificate=chain[0], extraCertChain=chain[1:])
    try:
        options.getContext()
    except SSL.Error:
        raise ConfigError(
            "tls_private_key_path", f"{private_key_path} is not the key of {certificate_path}"
        ) from None
    return options


def _load_log_config(path: str) -> Mapping[str, Any]:
    try:
        parsed = yaml.safe_load(_read(path, "log_config"))
    except yaml.YAMLError as e:
        raise ConfigError("log_config", f"{path} is not valid YAML: {e}") from None
    if not isinstance(parsed, Mapping) or parsed.get("version") != 1:
        raise ConfigError(
            "log_config",
            f"{path} must be a Python logging configuration (a mapping with version: 1)",
        )
    return parsed


def load_startup_files(config: Config) -> StartupFiles:
    """Read (or, for the signing key, create) the files ``config`` names."""
    if config.signing_key_path is None:
        raise ConfigError("signing_key_path", "required")
    signing_keys = load_signing_key_file(config.signing_key_path)
    current = {key_id(k) for k in signing_keys}
    for old in config.old_signing_keys:
        if old.key_id in current:
            raise ConfigError(
                "old_signing_keys", f"{old.key_id} is also a key of {config.signing_key_path}"
            )

    tls_server_options = None
    if any(listener.tls for listener in config.listeners):
        assert config.tls_certificate_path is not None and config.tls_private_key_path is not None
        tls_server_options = load_tls_server_options(
            config.tls_certificate_path, config.tls_private_key_path
        )

    try:
        tls_policy = FederationTLSPolicy.from_config(
            config.federation_verify_certificates, config.federation_custom_ca_list or None
        )
    except TLSConfigError as e:
        raise ConfigError("federation_custom_ca_list", str(e)) from None

    secret = config.registration_shared_secret
    if config.registration_shared_secret_path is not None:
        raw = _read(config.registration_shared_secret_path, "registration_shared_secret_path")
        secret = raw.decode("utf-8", "replace").strip()
        if not secret:
            raise ConfigError(
                "registration_shared_secret_path",
                f"{config.registration_shared_secret_path} is empty",
            )

    return StartupFiles(
        signing_keys=signing_keys,
        tls_policy=tls_policy,
        tls_server_options=tls_server_options,
        registration_shared_secret=secret,
        log_config=None if config.log_config is None else _load_log_config(config.log_config),
    )
