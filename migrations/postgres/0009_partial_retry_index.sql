-- The retry index serves the look-ups of failed objects (due retries, `status`) and of those
-- leaving scope; every synced object was in it too, so each create added an entry for its
-- write-ahead record ('creating') and another for 'synced'. Only the rows it serves are in it
-- now (see the SQLite migration of the same name).
DROP INDEX sync_state_retry;
CREATE INDEX sync_state_retry ON sync_state(status, next_attempt_at)
    WHERE status = 'failed' OR status = 'leaving';
