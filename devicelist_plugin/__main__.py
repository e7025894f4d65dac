"""``python -m devicelist_plugin``: command-line tools.

``generate-config --server-name NAME --data-dir DIR [--port P] [--client-port P]
[--bind ADDR ...] [--test-network]`` writes a configuration, a signing key, a
self-signed TLS certificate and a logging configuration into ``DIR`` (see
:mod:`devicelist_plugin.standalone.generate`); it refuses to overwrite any
file, exiting 1 with nothing written.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence, TextIO

from devicelist_plugin.standalone.generate import (
    DEFAULT_CLIENT_PORT,
    DEFAULT_FEDERATION_PORT,
    GenerateError,
    generate_config,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m devicelist_plugin")
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser(
        "generate-config",
        help="write a configuration, signing key and self-signed TLS certificate",
        description=(
            "Write devicelist.yaml (every key commented), <server_name>.signing.key, "
            "a self-signed <server_name>.tls.crt/.tls.key for test setups, "
            "<server_name>.log.config and a random registration shared secret into "
            "DIR.  Existing files are never overwritten."
        ),
    )
    generate.add_argument("--server-name", required=True, help="e.g. example.org or localhost:8448")
    generate.add_argument("--data-dir", required=True, help="where the files are written")
    generate.add_argument(
        "--port",
        type=int,
        default=None,
        help="TLS federation/client port (default: the server name's port, else "
        f"{DEFAULT_FEDERATION_PORT})",
    )
    generate.add_argument(
        "--client-port",
        type=int,
        default=DEFAULT_CLIENT_PORT,
        help=f"plain-HTTP client port on 127.0.0.1 (default {DEFAULT_CLIENT_PORT})",
    )
    generate.add_argument(
        "--bind",
        action="append",
        default=None,
        metavar="ADDR",
        help="address of the TLS listener (repeatable; default 127.0.0.1)",
    )
    generate.add_argument(
        "--test-network",
        action="store_true",
        help="do not verify other servers' certificates and allow loopback "
        "addresses: for several servers on one machine",
    )
    return parser


def main(
    argv: Optional[Sequence[str]] = None, stdout: TextIO = sys.stdout, stderr: TextIO = sys.stderr
) -> int:
    """Run a command; return the exit status."""
    args = _parser().parse_args(argv)
    if args.command == "generate-config":
        try:
            files = generate_config(
                args.server_name,
                args.data_dir,
                port=args.port,
                bind_addresses=tuple(args.bind or ("127.0.0.1",)),
                client_port=args.client_port,
                test_network=args.test_network,
            )
        except GenerateError as e:
            print(f"generate-config: {e}", file=stderr)
            return 1
        for path in files.all:
            print(f"wrote {path}", file=stdout)
        print(f"run with: twistd -n devicelist --config {files.config}", file=stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
