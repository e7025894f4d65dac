"""``twistd devicelist``: options and the service tree.

This is the only module that touches the global reactor, and only inside
:func:`makeService`, which twistd calls once it has installed its reactor.

Two ways to run:

``--config FILE``
    everything from the YAML file (see :mod:`.config`; ``python -m
    devicelist_plugin generate-config`` writes one).
``--server-name NAME [--data-dir DIR] [--port P] [--bind ADDR]``
    no file: the signing key (generated when missing) and the SQLite
    database in ``DIR``, and one plain-HTTP listener on ``ADDR:P``
    (127.0.0.1:8008 by default) serving the federation and client
    endpoints, for a TLS-terminating reverse proxy in front.  Shared-secret
    registration is off.

Either way the configuration and the files it names are checked while the
options are parsed: a bad value stops start-up with a usage error naming
the key.
"""

from __future__ import annotations

import ipaddress
import os
from typing import Optional

from twisted.application.service import IService
from twisted.python import usage

from devicelist_plugin.core.parse import ParseError, validate_server_name
from devicelist_plugin.standalone.config import (
    DEFAULT_SQLITE_FILE,
    Config,
    ConfigError,
    DatabaseConfig,
    ListenerConfig,
    load_config_file,
)
from devicelist_plugin.standalone.logs import apply_log_config
from devicelist_plugin.standalone.service import StandaloneService
from devicelist_plugin.standalone.startup import StartupFiles, load_startup_files

DEFAULT_HTTP_PORT = 8008


def server_name_config(server_name: str, data_dir: str, port: int, bind: str) -> Config:
    """The configuration of ``--server-name`` mode (see the module docstring)."""
    data_dir = os.path.abspath(data_dir)
    return Config(
        server_name=server_name,
        database=DatabaseConfig(
            name="sqlite3", args={"database": os.path.join(data_dir, DEFAULT_SQLITE_FILE)}
        ),
        signing_key_path=os.path.join(data_dir, f"{server_name}.signing.key"),
        listeners=(
            ListenerConfig(port=port, bind_addresses=(bind,), resources=("federation", "client")),
        ),
    )


class Options(usage.Options):
    """Command-line options of ``twistd devicelist``."""

    synopsis = "[--config FILE | --server-name NAME [--data-dir DIR] [--port P] [--bind ADDR]]"
    longdesc = (
        "Runs devicelist-plugin as a standalone server.  Either give a YAML "
        "configuration file with --config (python -m devicelist_plugin "
        "generate-config writes one), or a --server-name to run with the "
        "embedded default: an SQLite database and the signing key in "
        "--data-dir, and plain HTTP on --bind:--port for a reverse proxy."
    )
    optParameters = [
        ["config", "c", None, "Path of the YAML configuration file."],
        ["server-name", None, None, "This server's name, e.g. example.org (without --config)."],
        ["data-dir", None, "devicelist-data", "Directory for the database and signing key (without --config)."],
        ["port", None, str(DEFAULT_HTTP_PORT), "HTTP port (without --config)."],
        ["bind", None, "127.0.0.1", "Address to listen on (without --config)."],
    ]

    config: Optional[Config] = None
    files: Optional[StartupFiles] = None

    def postOptions(self) -> None:
        try:
            self.config = self._load_config()
            self.files = load_startup_files(self.config)
        except ConfigError as e:
            raise usage.UsageError(f"configuration error: {e}") from None

    def _load_config(self) -> Config:
        config_path = self["config"]
        if config_path is not None:
            if self["server-name"] is not None:
                raise usage.UsageError("give either --config or --server-name, not both")
            return load_config_file(config_path)
        server_name = self["server-name"]
        if server_name is None:
            raise usage.UsageError("--config or --server-name is required")
        try:
            validate_server_name(server_name)
        except ParseError as e:
            raise usage.UsageError(f"--server-name: {e.message}") from None
        try:
            port = int(self["port"])
        except ValueError:
            port = -1
        if not 0 <= port <= 65535:
            raise usage.UsageError(f"--port: expected a port number, not {self['port']!r}")
        try:
            ipaddress.ip_address(self["bind"])
        except ValueError:
            raise usage.UsageError(f"--bind: {self['bind']!r} is not an IP address") from None
        data_dir = os.path.abspath(self["data-dir"])
        try:
            os.makedirs(data_dir, exist_ok=True)
        except OSError as e:
            raise usage.UsageError(f"--data-dir: cannot create {data_dir}: {e.strerror}") from None
        return server_name_config(server_name, data_dir, port, self["bind"])


def makeService(options: Options) -> IService:
    """Build the service tree from validated options."""
    from twisted.internet import reactor

    config, files = options.config, options.files
    if config is None or files is None:
        raise usage.UsageError("options were not validated")
    log_observer = None
    if files.log_config is not None:
        try:
            log_observer = apply_log_config(files.log_config)
        except (ValueError, TypeError, AttributeError, ImportError) as e:
            raise usage.UsageError(f"configuration error: log_config: {e}") from None
    return StandaloneService(reactor, config, files, log_observer=log_observer)
