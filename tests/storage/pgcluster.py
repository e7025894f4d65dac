"""PostgreSQL for the tests: a throwaway cluster, or the server named by an env var.

``DEVICELIST_TEST_POSTGRES_DSN`` (libpq DSN of a role allowed to create
databases) makes the tests use that server.  Otherwise the first test that
asks starts a private cluster for the whole test run: ``initdb`` into a
temporary directory, ``pg_ctl start`` on a Unix socket in that directory (no
TCP listener), and at process exit ``pg_ctl -m fast stop`` and removal of the
directory.  PostgreSQL refuses to run as root, so as root every server
command runs as the ``postgres`` user through ``runuser``.

Every test gets a fresh database (:meth:`PostgresServer.create_database`).

When PostgreSQL cannot be had, the tests are skipped with the reason -- except
under ``CI=true``, where that is an error: CI must never quietly skip the
PostgreSQL half of the suite.
"""

from __future__ import annotations

import atexit
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from typing import Callable, Optional

from twisted.trial.unittest import SkipTest

ENV_DSN = "DEVICELIST_TEST_POSTGRES_DSN"
# Speed over durability: the cluster is thrown away.
_SERVER_OPTIONS = (
    "-c listen_addresses='' -c fsync=off -c synchronous_commit=off "
    "-c full_page_writes=off -c max_connections=200"
)


class PostgresServer:
    """A server the tests may create and drop databases on."""

    def __init__(self, admin_dsn: str) -> None:
        self.admin_dsn = admin_dsn

    def _admin_execute(self, sql: str) -> None:
        import psycopg2

        conn = psycopg2.connect(self.admin_dsn)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(sql)
        finally:
            conn.close()

    def create_database(self) -> tuple[str, str]:
        """Create an empty database; return (name, dsn)."""
        from psycopg2.extensions import make_dsn

        name = f"devicelist_test_{uuid.uuid4().hex[:16]}"
        self._admin_execute(f"CREATE DATABASE \"{name}\" TEMPLATE template0 ENCODING 'UTF8'")
        return name, make_dsn(self.admin_dsn, dbname=name)

    def drop_database(self, name: str) -> None:
        self._admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class _Cluster:
    """A private cluster in a temporary directory."""

    def __init__(self, initdb: str, pg_ctl: str, server_options: str = _SERVER_OPTIONS) -> None:
        self.initdb = initdb
        self.pg_ctl = pg_ctl
        self.server_options = server_options
        self.as_postgres = os.geteuid() == 0
        self.base = tempfile.mkdtemp(prefix="devicelist-pg-")
        self.data = os.path.join(self.base, "data")
        self.log = os.path.join(self.base, "server.log")
        self.port = _free_port()
        self.started = False

    def _run(self, *argv: str) -> None:
        command = list(argv)
        if self.as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            log = ""
            if os.path.exists(self.log):
                with open(self.log, encoding="utf-8", errors="replace") as f:
                    log = f.read()[-2000:]
            raise RuntimeError(
                f"{' '.join(command)} failed ({result.returncode}):\n"
                f"{result.stdout}{result.stderr}{log}"
            )

    def start(self) -> str:
        if self.as_postgres:
            import pwd

            entry = pwd.getpwnam("postgres")
            os.chown(self.base, entry.pw_uid, entry.pw_gid)
        initdb_options = ["-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync"]
        self._run(self.initdb, "-D", self.data, *initdb_options)
        server_options = f"-k {self.base} -p {self.port} {self.server_options}"
        self._run(
            self.pg_ctl,
            "-D",
            self.data,
            "-l",
            self.log,
            "-w",
            "-t",
            "60",
            "-o",
            server_options,
            "start",
        )
        self.started = True
        return f"host={self.base} port={self.port} user=postgres dbname=postgres"

    def stop(self) -> None:
        try:
            if self.started:
                self._run(self.pg_ctl, "-D", self.data, "-m", "fast", "-w", "stop")
                self.started = False
        finally:
            shutil.rmtree(self.base, ignore_errors=True)


def _free_port() -> int:
    # Only names the socket file (there is no TCP listener), but take one the
    # OS hands out so that nothing else on the machine can collide with it.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _find(name: str) -> Optional[str]:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    return candidates[0] if candidates else None


def start_cluster(server_options: str) -> tuple[PostgresServer, Callable[[], None]]:
    """A private cluster (Unix socket only) started with ``server_options``
    (``-c name=value ...``), and the function that stops and removes it; for
    the benchmarks, which want the server's durable defaults."""
    initdb, pg_ctl = _find("initdb"), _find("pg_ctl")
    if initdb is None or pg_ctl is None:
        raise RuntimeError("initdb/pg_ctl not found (apt-get install postgresql)")
    cluster = _Cluster(initdb, pg_ctl, server_options)
    try:
        return PostgresServer(cluster.start()), cluster.stop
    except BaseException:
        cluster.stop()
        raise


_server: Optional[PostgresServer] = None
_unavailable: Optional[str] = None


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _give_up(reason: str) -> PostgresServer:
    global _unavailable
    _unavailable = reason
    if _in_ci():
        raise RuntimeError(f"PostgreSQL tests cannot run under CI=true: {reason}")
    raise SkipTest(f"PostgreSQL unavailable: {reason}")


def get_server() -> PostgresServer:
    """The server for this test run (started on first use)."""
    global _server
    if _server is not None:
        return _server
    if _unavailable is not None:
        return _give_up(_unavailable)
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        return _give_up("psycopg2 is not installed (pip install psycopg2-binary)")
    dsn = os.environ.get(ENV_DSN)
    if dsn:
        _server = PostgresServer(dsn)
        return _server
    initdb, pg_ctl = _find("initdb"), _find("pg_ctl")
    if initdb is None or pg_ctl is None:
        return _give_up(f"initdb/pg_ctl not found (apt-get install postgresql, or set {ENV_DSN})")
    cluster = _Cluster(initdb, pg_ctl)
    try:
        admin_dsn = cluster.start()
    except Exception as e:
        cluster.stop()
        return _give_up(f"could not start a throwaway cluster: {e}")
    atexit.register(cluster.stop)
    _server = PostgresServer(admin_dsn)
    return _server
