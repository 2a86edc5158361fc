-- The daemon: event positions per target, named leases, full-sync batch jobs, retry schedule.

CREATE TABLE event_cursors (
    target   TEXT PRIMARY KEY NOT NULL,
    last_seq INTEGER NOT NULL
);

-- A named lease (e.g. "events:slack"): one holder at a time, taken over once expired.
CREATE TABLE leases (
    name       TEXT PRIMARY KEY NOT NULL,
    holder     TEXT NOT NULL,
    expires_at INTEGER NOT NULL
);

-- One full-sync batch: users or groups with ids in (after_id, until_id], or deprovisioning.
-- Phase 0 (users) completes before phase 1 (groups) is claimed, and 1 before 2 (deprovision).
CREATE TABLE jobs (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id      INTEGER NOT NULL REFERENCES runs(id),
    target      TEXT NOT NULL,
    phase       INTEGER NOT NULL,
    after_id    TEXT NOT NULL,
    until_id    TEXT,
    status      TEXT NOT NULL,
    holder      TEXT,
    lease_until INTEGER,
    attempts    INTEGER NOT NULL DEFAULT 0,
    result      TEXT
);
CREATE INDEX jobs_claim ON jobs(status, run_id, phase, id);

ALTER TABLE sync_state ADD COLUMN next_attempt_at INTEGER;
CREATE INDEX sync_state_retry ON sync_state(status, next_attempt_at);

-- At most one full sync per target runs at a time, across every process.
CREATE UNIQUE INDEX runs_one_running ON runs(target) WHERE status = 'running';
