-- devicelist-plugin schema, version 7: a remote user's known stream ids in
-- its sync row.
--
-- The window of stream ids applied since the last snapshot (at most 100
-- per user) was a table of one row per id.  Every applied EDU read the
-- window twice and rewrote part of it, a hundred rows fetched each time:
-- most of the inbound path's database time.  It is now one column of
-- remote_sync_state: the ids in decimal, comma-separated, in any order
-- ('' when none).

ALTER TABLE remote_sync_state ADD COLUMN known_stream_ids TEXT NOT NULL DEFAULT '';

UPDATE remote_sync_state SET known_stream_ids = COALESCE((
    SELECT ${STRING_AGG}(CAST(k.stream_id AS TEXT), ',')
    FROM remote_known_stream_ids k WHERE k.user_id = remote_sync_state.user_id
), '');

DROP TABLE remote_known_stream_ids;
