-- devicelist-plugin schema, version 2: served /user/devices snapshots.
--
-- When a destination fetches a local user's full list (GET /user/devices),
-- the answer's stream_id becomes that destination's unreferenced id for the
-- user (the next EDU names it as prev_id).  snapshot_stream_id remembers it
-- so that the acknowledgement of a transaction that was in flight while the
-- snapshot was served, which carries older ids, cannot replace it
-- (ack_sent); it is cleared once an acknowledged EDU reaches it.

ALTER TABLE outbound_unreferenced ADD COLUMN snapshot_stream_id BIGINT;
