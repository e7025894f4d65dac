-- devicelist-plugin schema, version 3: the retry attempt number.
--
-- Backoff is a pure function of the attempt number (core/backoff.py), so the
-- number of consecutive failures is kept with the rest of a destination's
-- retry state and survives a restart.

ALTER TABLE outbound_destinations ADD COLUMN retry_attempts INTEGER NOT NULL DEFAULT 0;
