-- devicelist-plugin schema, version 5: room memberships for the standalone server.
--
-- A host with its own room state implements MembershipSource over it; the
-- standalone server keeps the memberships it is told about (admin API) here.

CREATE TABLE room_memberships (
    room_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    server_name TEXT NOT NULL,
    PRIMARY KEY (room_id, user_id)
);

CREATE INDEX room_memberships_user ON room_memberships (user_id);
CREATE INDEX room_memberships_server ON room_memberships (server_name);
