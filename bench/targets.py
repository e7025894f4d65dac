"""The two servers under test, behind one small interface.

:class:`Target` wraps an ``interop`` server process (ours or Synapse) with
what the side-by-side scenarios need beyond the client-server API both
speak: putting remote users in a room with a local user, the database's
size on disk, the process's memory, and seeding a user with many devices
directly into the database (setup, not measured).
"""

from __future__ import annotations

import glob
import json
import os
import sqlite3
from typing import Any, Optional, Sequence

from signedjson.key import encode_verify_key_base64, generate_signing_key, get_verify_key
from signedjson.sign import sign_json
from signedjson.types import SigningKey

from interop.common import MatrixServerProcess
from interop.devicelist import DevicelistServer
from interop.join import join_room
from interop.synapse import SynapseServer

PASSWORD = "bench-password"
V3 = "/_matrix/client/v3"


def signed_device_keys(user_id: str, device_id: str) -> dict[str, Any]:
    """Device keys as a client uploads them, self-signed by the device's
    ed25519 key."""
    key = generate_signing_key(device_id)
    keys: dict[str, Any] = {
        "user_id": user_id,
        "device_id": device_id,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": {
            f"curve25519:{device_id}": encode_verify_key_base64(
                get_verify_key(generate_signing_key("c"))
            ),
            f"ed25519:{device_id}": encode_verify_key_base64(get_verify_key(key)),
        },
    }
    signed: dict[str, Any] = sign_json(keys, user_id, key)
    return signed


def rss_kb(pid: Optional[int]) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` (peak) of a process, in kB."""
    out = {"rss_kb": 0, "peak_rss_kb": 0}
    if pid is None:
        return out
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                out["rss_kb"] = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                out["peak_rss_kb"] = int(line.split()[1])
    return out


def cpu_seconds(pid: Optional[int]) -> float:
    """User plus system CPU time a process has used."""
    if pid is None:
        return 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class PostgresDatabase:
    """A database of the benchmark's PostgreSQL cluster for one server: its
    ``database`` configuration section (the same shape for both servers)
    and its size."""

    def __init__(self, dsn: str, name: str) -> None:
        from psycopg2.extensions import parse_dsn

        self.dsn = dsn
        self.name = name
        self.args: dict[str, Any] = dict(parse_dsn(dsn))

    def config(self) -> dict[str, Any]:
        args = {k: self.args[k] for k in ("host", "port", "user") if k in self.args}
        return {"name": "psycopg2",
                "args": {**args, "database": self.name, "cp_min": 5, "cp_max": 10}}

    def connect(self) -> Any:
        import psycopg2

        return psycopg2.connect(self.dsn)

    def size(self) -> int:
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT pg_database_size(current_database())")
                return int(cur.fetchone()[0])
        finally:
            conn.close()


def database_config(database: Optional[PostgresDatabase]) -> Optional[dict[str, Any]]:
    """``extra_config`` for a server on ``database`` (None: its SQLite default)."""
    return None if database is None else {"database": database.config()}


class Target:
    """One server under test (on SQLite, or on ``database``)."""

    label = ""

    def __init__(self, server: MatrixServerProcess,
                 database: Optional[PostgresDatabase] = None) -> None:
        self.server = server
        self.database = database
        self.room_id = ""
        self.local_user = ""
        self.local_token = ""

    @property
    def server_name(self) -> str:
        return self.server.server_name

    @property
    def pid(self) -> Optional[int]:
        return self.server.pid

    def start(self) -> None:
        self.server.start(timeout=120)

    def stop(self) -> None:
        self.server.stop()

    def db_bytes(self) -> int:
        """The database's size: SQLite's files (with the WAL and shared
        memory), or ``pg_database_size``."""
        if self.database is not None:
            return self.database.size()
        return sum(os.path.getsize(p) for p in glob.glob(os.path.join(self.server.workdir, "*.db*")))

    def setup_room(self) -> None:
        """A local user and a room the remote users will share with it."""
        self.local_user, self.local_token = self.server.register("alice", PASSWORD)
        self.room_id = self._create_room()

    def _create_room(self) -> str:
        raise NotImplementedError

    def share(self, user_ids: Sequence[str], origin: str, key: SigningKey) -> None:
        """Put remote users (of ``origin``) in the room."""
        raise NotImplementedError

    def new_user(self, localpart: str, devices: int) -> tuple[str, list[tuple[str, str]]]:
        """A local user with ``devices`` logged-in devices with keys:
        ``(user_id, [(access_token, device_id)])``."""
        user_id, _ = self.server.register(localpart, PASSWORD)
        sessions = []
        for _ in range(devices):
            token, device_id = self.server.login(user_id, PASSWORD)
            self.upload_keys(token, user_id, device_id)
            sessions.append((token, device_id))
        return user_id, sessions

    def upload_keys(self, token: str, user_id: str, device_id: str) -> None:
        self.server.client_ok("POST", f"{V3}/keys/upload", token,
                              {"device_keys": signed_device_keys(user_id, device_id)})

    def query_keys(self, user_ids: Sequence[str]) -> dict[str, Any]:
        answer: dict[str, Any] = self.server.query_keys(self.local_token, user_ids)
        device_keys: dict[str, Any] = answer.get("device_keys", {})
        return device_keys

    def seed_devices(self, user_id: str, count: int, keys: Any) -> None:
        """Give a registered local user ``count`` more devices with keys,
        written into the database while the server is stopped."""
        raise NotImplementedError


class OursTarget(Target):
    label = "ours"
    server: DevicelistServer

    def __init__(self, workdir: str, database: Optional[PostgresDatabase] = None) -> None:
        super().__init__(DevicelistServer(workdir, extra_config=database_config(database)),
                         database)

    def _create_room(self) -> str:
        room_id = "!bench:" + self.server_name
        self.server.add_member(room_id, self.local_user)
        return room_id

    def share(self, user_ids: Sequence[str], origin: str, key: SigningKey) -> None:
        for user_id in user_ids:
            self.server.add_member(self.room_id, user_id)

    def seed_devices(self, user_id: str, count: int, keys: Any) -> None:
        from devicelist_plugin.storage import open_postgres_store, open_sqlite_store
        from devicelist_plugin.storage.codec import dumps
        from devicelist_plugin.storage.engines import Txn
        from twisted.internet import reactor

        path = os.path.join(self.server.workdir, "devicelist.db")
        devices = [(user_id, f"SEED{i:06d}", None, 1_700_000_000_000) for i in range(count)]
        rows = [(u, d, dumps(keys(u, d)), 1_700_000_000_000) for u, d, _, _ in devices]

        def txn(t: Txn) -> None:
            t.insert_many("local_devices", ("user_id", "device_id", "display_name", "created_ts"),
                          devices)
            t.insert_many("local_device_keys", ("user_id", "device_id", "keys_json", "updated_ts"),
                          rows)
            t.execute("UPDATE local_stream_positions SET pos = pos + 1 WHERE user_id = ?",
                      (user_id,))

        async def run() -> None:
            if self.database is not None:
                store = await open_postgres_store(self.database.dsn, reactor)
            else:
                store = await open_sqlite_store(path, reactor)
            try:
                await store.database.run("seed", txn)
            finally:
                await store.close()

        _run_on_reactor(run)


def _run_on_reactor(fn: Any) -> None:
    from twisted.internet import reactor
    from twisted.internet.defer import ensureDeferred
    from twisted.internet.threads import blockingCallFromThread

    r: Any = reactor
    blockingCallFromThread(r, lambda: ensureDeferred(fn()))


class SynapseTarget(Target):
    label = "synapse"
    server: SynapseServer

    def __init__(self, workdir: str, database: Optional[PostgresDatabase] = None) -> None:
        super().__init__(SynapseServer(workdir, extra_config=database_config(database)),
                         database)

    def _create_room(self) -> str:
        return self.server.create_room(self.local_token)

    def share(self, user_ids: Sequence[str], origin: str, key: SigningKey) -> None:
        for user_id in user_ids:
            join_room(self.server_name, self.room_id, user_id, origin, key)

    def seed_devices(self, user_id: str, count: int, keys: Any) -> None:
        if self.database is not None:
            db, mark = self.database.connect(), "%s"
        else:
            db, mark = sqlite3.connect(os.path.join(self.server.workdir, "homeserver.db")), "?"
        try:
            with db:
                cur = db.cursor()
                cur.executemany(
                    "INSERT INTO devices (user_id, device_id, display_name, hidden)"
                    f" VALUES ({mark}, {mark}, NULL, FALSE)",
                    [(user_id, f"SEED{i:06d}") for i in range(count)],
                )
                cur.executemany(
                    "INSERT INTO e2e_device_keys_json (user_id, device_id, ts_added_ms, key_json)"
                    f" VALUES ({mark}, {mark}, 1700000000000, {mark})",
                    [(user_id, f"SEED{i:06d}", json.dumps(keys(user_id, f"SEED{i:06d}")))
                     for i in range(count)],
                )
        finally:
            db.close()
