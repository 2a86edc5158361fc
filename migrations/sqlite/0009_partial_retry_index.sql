-- The retry index serves the look-ups of failed objects (due retries, `status`) and of those
-- leaving scope; every synced object was in it too, so each create added an entry for its
-- write-ahead record ('creating'), removed it and added one for 'synced'. Only the rows it
-- serves are in it now. (An OR, not IN: SQLite proves `status = 'failed'` implies an OR of
-- equalities, not an IN list.)
DROP INDEX sync_state_retry;
CREATE INDEX sync_state_retry ON sync_state(status, next_attempt_at)
    WHERE status = 'failed' OR status = 'leaving';
