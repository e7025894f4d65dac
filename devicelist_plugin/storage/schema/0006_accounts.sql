-- devicelist-plugin schema, version 6: accounts of the standalone server.
--
-- A host embedding the plugin has its own accounts; the standalone server
-- keeps its users and access tokens here (devicelist_plugin/storage/accounts.py).

-- user_id is the full, lower-cased @localpart:server_name.
CREATE TABLE users (
    user_id TEXT NOT NULL PRIMARY KEY,
    -- bcrypt; NULL: the user cannot log in with a password
    password_hash TEXT,
    admin BOOLEAN NOT NULL DEFAULT FALSE,
    -- Synapse's user types ('bot', 'support'), NULL for a regular user
    user_type TEXT,
    created_ts BIGINT NOT NULL
);

-- Access tokens are stored as the hex SHA-256 of the token, never in clear.
-- Each belongs to one device: deleting the device (logout, DELETE
-- /devices/{deviceId}) deletes its tokens in the same transaction.
CREATE TABLE access_tokens (
    token_hash TEXT NOT NULL PRIMARY KEY,
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    created_ts BIGINT NOT NULL,
    FOREIGN KEY (user_id) REFERENCES users (user_id) ON DELETE CASCADE,
    FOREIGN KEY (user_id, device_id) REFERENCES local_devices (user_id, device_id) ON DELETE CASCADE
);

CREATE INDEX access_tokens_device ON access_tokens (user_id, device_id);
