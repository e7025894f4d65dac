"""``twistd devicelist``: options and the service tree.

This is the only module that touches the global reactor, and only inside
:func:`makeService`, which twistd calls once it has installed its reactor.
"""

from __future__ import annotations

import os
from typing import Optional

from twisted.application.service import IService, MultiService
from twisted.python import usage

from devicelist_plugin.core.parse import ParseError, validate_server_name
from devicelist_plugin.standalone.config import (
    Config,
    ConfigError,
    DatabaseConfig,
    DEFAULT_SQLITE_FILE,
    load_config_file,
)
from devicelist_plugin.standalone.database import DatabaseService


class Options(usage.Options):
    """Command-line options of ``twistd devicelist``."""

    synopsis = "[--config FILE | --server-name NAME [--data-dir DIR]]"
    longdesc = (
        "Runs devicelist-plugin as a standalone server.  Either give a YAML "
        "configuration file with --config, or a --server-name to run with the "
        "embedded default: an SQLite database in --data-dir."
    )
    optParameters = [
        ["config", "c", None, "Path of the YAML configuration file."],
        ["server-name", None, None, "This server's name, e.g. example.org (without --config)."],
        ["data-dir", None, "devicelist-data", "Directory for the SQLite database (without --config)."],
    ]

    config: Optional[Config] = None

    def postOptions(self) -> None:
        config_path = self["config"]
        if config_path is not None:
            if self["server-name"] is not None:
                raise usage.UsageError("give either --config or --server-name, not both")
            try:
                self.config = load_config_file(config_path)
            except ConfigError as e:
                raise usage.UsageError(f"configuration error: {e}") from None
            return
        server_name = self["server-name"]
        if server_name is None:
            raise usage.UsageError("--config or --server-name is required")
        try:
            validate_server_name(server_name)
        except ParseError as e:
            raise usage.UsageError(f"--server-name: {e.message}") from None
        data_dir = os.path.abspath(self["data-dir"])
        self.config = Config(
            server_name=server_name,
            database=DatabaseConfig(
                name="sqlite3",
                args={"database": os.path.join(data_dir, DEFAULT_SQLITE_FILE)},
            ),
        )


def makeService(options: Options) -> IService:
    """Build the service tree from validated options."""
    from twisted.internet import reactor

    config = options.config
    if config is None:
        raise usage.UsageError("options were not validated")
    top = MultiService()
    database = DatabaseService(reactor, config)
    database.setName("database")
    database.setServiceParent(top)
    return top
