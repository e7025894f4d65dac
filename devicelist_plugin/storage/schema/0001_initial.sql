-- devicelist-plugin schema, version 1.
--
-- Written once for SQLite and PostgreSQL; ${NAME} is replaced by the
-- dialect (see devicelist_plugin/storage/engines.py).  Statements end with a
-- semicolon at the end of a line.  JSON is stored as text.

------------------------------------------------------------------------------
-- Local users' devices and keys
------------------------------------------------------------------------------

CREATE TABLE local_devices (
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    display_name TEXT,
    created_ts BIGINT NOT NULL,
    last_seen_ts BIGINT,
    PRIMARY KEY (user_id, device_id)
);

-- The DeviceKeys object a client uploaded for its device.
CREATE TABLE local_device_keys (
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    keys_json TEXT NOT NULL,
    updated_ts BIGINT NOT NULL,
    PRIMARY KEY (user_id, device_id),
    FOREIGN KEY (user_id, device_id) REFERENCES local_devices (user_id, device_id) ON DELETE CASCADE
);

-- One-time keys; ``seq`` is the upload order (claimed oldest first).
CREATE TABLE local_one_time_keys (
    seq ${BIGSERIAL_PRIMARY_KEY},
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    algorithm TEXT NOT NULL,
    key_id TEXT NOT NULL,
    key_json TEXT NOT NULL,
    UNIQUE (user_id, device_id, algorithm, key_id),
    FOREIGN KEY (user_id, device_id) REFERENCES local_devices (user_id, device_id) ON DELETE CASCADE
);

CREATE INDEX local_one_time_keys_claim ON local_one_time_keys (user_id, device_id, algorithm, seq);

-- One fallback key per device and algorithm; handed out when the one-time
-- keys run out, marked used rather than deleted.
CREATE TABLE local_fallback_keys (
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    algorithm TEXT NOT NULL,
    key_id TEXT NOT NULL,
    key_json TEXT NOT NULL,
    used BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (user_id, device_id, algorithm),
    FOREIGN KEY (user_id, device_id) REFERENCES local_devices (user_id, device_id) ON DELETE CASCADE
);

CREATE TABLE local_cross_signing_keys (
    user_id TEXT NOT NULL,
    usage TEXT NOT NULL CHECK (usage IN ('master', 'self_signing', 'user_signing')),
    key_json TEXT NOT NULL,
    updated_ts BIGINT NOT NULL,
    PRIMARY KEY (user_id, usage)
);

-- Signatures uploaded by local users (POST /keys/signatures/upload).
-- target_id is a device id or the key id of a cross-signing key.
CREATE TABLE local_cross_signing_signatures (
    signer_user_id TEXT NOT NULL,
    signer_key_id TEXT NOT NULL,
    target_user_id TEXT NOT NULL,
    target_id TEXT NOT NULL,
    signature TEXT NOT NULL,
    PRIMARY KEY (target_user_id, target_id, signer_user_id, signer_key_id)
);

------------------------------------------------------------------------------
-- The local device-list stream
------------------------------------------------------------------------------

-- Per local user, the last stream id allocated.  Allocating is
-- "UPDATE ... SET pos = pos + 1 RETURNING pos" inside the changing
-- transaction: the row lock serialises a user's writers, so ids are strictly
-- increasing and committed in order.
CREATE TABLE local_stream_positions (
    user_id TEXT NOT NULL PRIMARY KEY,
    pos BIGINT NOT NULL
);

CREATE TABLE local_device_stream (
    user_id TEXT NOT NULL,
    stream_id BIGINT NOT NULL,
    -- NULL for a change of the user's cross-signing keys
    device_id TEXT,
    kind TEXT NOT NULL CHECK (kind IN ('device', 'signing_key')),
    ts BIGINT NOT NULL,
    PRIMARY KEY (user_id, stream_id)
);

CREATE INDEX local_device_stream_device ON local_device_stream (user_id, device_id, stream_id);

------------------------------------------------------------------------------
-- Outbound: per-destination pending updates and sender state
------------------------------------------------------------------------------

-- Collapsed per (destination, user, device) to the latest stream id, so the
-- table grows with destinations x changed devices, not with changes.
-- device_id is '' for a pending signing-key update (kind 'signing_key').
CREATE TABLE outbound_pending (
    destination TEXT NOT NULL,
    user_id TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('device', 'signing_key')),
    device_id TEXT NOT NULL,
    stream_id BIGINT NOT NULL,
    queued_ts BIGINT NOT NULL,
    PRIMARY KEY (destination, user_id, kind, device_id)
);

CREATE INDEX outbound_pending_order ON outbound_pending (destination, stream_id);

-- Stream ids sent to the destination that no later EDU has referenced yet
-- (the next EDU's prev_id), as a JSON list of integers.
CREATE TABLE outbound_unreferenced (
    destination TEXT NOT NULL,
    user_id TEXT NOT NULL,
    stream_ids_json TEXT NOT NULL,
    PRIMARY KEY (destination, user_id)
);

CREATE TABLE outbound_destinations (
    destination TEXT NOT NULL PRIMARY KEY,
    -- the transaction being sent, kept until the destination answers 200
    inflight_txn_id TEXT,
    inflight_payload_json TEXT,
    failure_ts BIGINT,
    retry_last_ts BIGINT,
    retry_interval_ms BIGINT NOT NULL DEFAULT 0
);

------------------------------------------------------------------------------
-- The remote cache
------------------------------------------------------------------------------

CREATE TABLE remote_devices (
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    display_name TEXT,
    keys_json TEXT,
    PRIMARY KEY (user_id, device_id)
);

CREATE TABLE remote_cross_signing_keys (
    user_id TEXT NOT NULL,
    usage TEXT NOT NULL CHECK (usage IN ('master', 'self_signing', 'user_signing')),
    key_json TEXT NOT NULL,
    PRIMARY KEY (user_id, usage)
);

-- Stale iff stale_generation > cleared_generation.
CREATE TABLE remote_sync_state (
    user_id TEXT NOT NULL PRIMARY KEY,
    snapshot_stream_id BIGINT,
    stale_generation BIGINT NOT NULL DEFAULT 0,
    cleared_generation BIGINT NOT NULL DEFAULT 0,
    stale_reason TEXT,
    stale_since_ts BIGINT,
    last_resync_ts BIGINT
);

CREATE INDEX remote_sync_state_stale ON remote_sync_state (stale_since_ts)
    WHERE stale_generation > cleared_generation;

-- Stream ids of the EDUs applied since the last snapshot (a trimmed window).
CREATE TABLE remote_known_stream_ids (
    user_id TEXT NOT NULL,
    stream_id BIGINT NOT NULL,
    PRIMARY KEY (user_id, stream_id)
);

------------------------------------------------------------------------------
-- Remote server keys
------------------------------------------------------------------------------

CREATE TABLE server_keys (
    server_name TEXT NOT NULL,
    key_id TEXT NOT NULL,
    verify_key TEXT NOT NULL,
    valid_until_ts BIGINT NOT NULL,
    expired_ts BIGINT,
    fetched_ts BIGINT NOT NULL,
    key_json TEXT NOT NULL,
    PRIMARY KEY (server_name, key_id)
);

-- Short negative cache of failed key fetches.
CREATE TABLE server_key_fetch_failures (
    server_name TEXT NOT NULL PRIMARY KEY,
    failed_ts BIGINT NOT NULL,
    error TEXT NOT NULL
);

------------------------------------------------------------------------------
-- Inbound federation transactions already processed
------------------------------------------------------------------------------

CREATE TABLE received_transactions (
    origin TEXT NOT NULL,
    txn_id TEXT NOT NULL,
    response_json TEXT NOT NULL,
    received_ts BIGINT NOT NULL,
    PRIMARY KEY (origin, txn_id)
);

CREATE INDEX received_transactions_ts ON received_transactions (received_ts);
