-- devicelist-plugin schema, version 4: the inbound updater's state.
--
-- Per-device stream ids.  With clustered senders two writers may change one
-- device concurrently and their EDUs may arrive in either order; an update
-- replaces a cached device only if its stream id is higher
-- (core.inbound.supersedes).  Devices taken from a snapshot count as at the
-- snapshot's stream id.  A deleted device is remembered with its stream id
-- until the next snapshot, so a late update from before the deletion cannot
-- bring it back.

ALTER TABLE remote_devices ADD COLUMN stream_id BIGINT;

CREATE TABLE remote_deleted_devices (
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    stream_id BIGINT NOT NULL,
    PRIMARY KEY (user_id, device_id)
);

-- Per-user resync backoff, for errors that concern one user (the remote
-- answers 4xx for it, a malformed or oversized list): the next attempt is not
-- made before resync_retry_ts.  Server-wide failures back off per destination
-- instead (outbound_destinations, shared with the sender).
ALTER TABLE remote_sync_state ADD COLUMN resync_attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE remote_sync_state ADD COLUMN resync_retry_ts BIGINT;

-- m.device_list_update EDUs taken from /send transactions and not yet
-- decided on, or held (their prev_id may still arrive), or received while
-- a resync ran (re-run against the snapshot).  A transaction is answered 200
-- only once its EDUs are here, so a crash never loses one.  One row per
-- (user, stream id): stream ids are unique per user, a copy is a replay.
CREATE TABLE remote_device_inbox (
    user_id TEXT NOT NULL,
    stream_id BIGINT NOT NULL,
    content_json TEXT NOT NULL,
    received_ts BIGINT NOT NULL,
    PRIMARY KEY (user_id, stream_id)
);
