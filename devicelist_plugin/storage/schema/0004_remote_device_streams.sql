-- devicelist-plugin schema, version 4: per-device stream ids in the remote cache.
--
-- With clustered senders two writers may change one device concurrently and
-- their EDUs may arrive in either order; an update replaces a cached device
-- only if its stream id is higher (core.inbound.supersedes).  Devices taken
-- from a snapshot count as at the snapshot's stream id.  A deleted device is
-- remembered with its stream id until the next snapshot, so a late update from
-- before the deletion cannot bring it back.

ALTER TABLE remote_devices ADD COLUMN stream_id BIGINT;

CREATE TABLE remote_deleted_devices (
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    stream_id BIGINT NOT NULL,
    PRIMARY KEY (user_id, device_id)
);
