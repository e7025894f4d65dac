-- devicelist-plugin schema, version 5: room memberships and outbound chain resets.
--
-- A host with its own room state implements MembershipSource over it; the
-- standalone server keeps the memberships it is told about (admin API) here
-- (devicelist_plugin/membership_store.py).  server_name is the user id's
-- server part ('' for a malformed id), kept for the joins below.

CREATE TABLE room_memberships (
    room_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    server_name TEXT NOT NULL,
    PRIMARY KEY (room_id, user_id)
);

CREATE INDEX room_memberships_user ON room_memberships (user_id);
CREATE INDEX room_memberships_server ON room_memberships (server_name);

-- A destination whose prev_id chain for a local user must start again from
-- [] (the receiver then resyncs): the destination newly shares a room with
-- the user (it may hold an old chain that missed changes made while it did
-- not), or its pending updates of the user were dropped because it has been
-- unreachable too long (devicelist_plugin/replication/sender.py).  The
-- sender applies a reset only while no transaction is in flight to the
-- destination: it queues the user's latest device change and records its id
-- in stream_id (NULL until then); every EDU of the user goes out with
-- prev_id [] until a transaction carrying one at or above stream_id is
-- persisted, which deletes the reset in the same database transaction.
CREATE TABLE outbound_chain_resets (
    destination TEXT NOT NULL,
    user_id TEXT NOT NULL,
    stream_id BIGINT,
    PRIMARY KEY (destination, user_id)
);

-- Which destinations to wake after a change of a user.
CREATE INDEX outbound_pending_user ON outbound_pending (user_id, destination);
