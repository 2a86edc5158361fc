-- The daemon: event positions per target, named leases, full-sync batch jobs, retry schedule.

CREATE TABLE event_cursors (
    target   TEXT PRIMARY KEY,
    last_seq BIGINT NOT NULL
);

-- A named lease (e.g. "events:slack"): one holder at a time, taken over once expired.
CREATE TABLE leases (
    name       TEXT PRIMARY KEY,
    holder     TEXT NOT NULL,
    expires_at BIGINT NOT NULL
);

-- One full-sync batch: users or groups with ids in (after_id, until_id], or deprovisioning.
-- Phase 0 (users) completes before phase 1 (groups) is claimed, and 1 before 2 (deprovision).
CREATE TABLE jobs (
    id          BIGSERIAL PRIMARY KEY,
    run_id      BIGINT NOT NULL REFERENCES runs(id),
    target      TEXT NOT NULL,
    phase       BIGINT NOT NULL,
    after_id    TEXT NOT NULL,
    until_id    TEXT,
    status      TEXT NOT NULL,
    holder      TEXT,
    lease_until BIGINT,
    attempts    BIGINT NOT NULL DEFAULT 0,
    result      TEXT
);
CREATE INDEX jobs_claim ON jobs(status, run_id, phase, id);

ALTER TABLE sync_state ADD COLUMN next_attempt_at BIGINT;
CREATE INDEX sync_state_retry ON sync_state(status, next_attempt_at);

-- At most one full sync per target runs at a time, across every process.
CREATE UNIQUE INDEX runs_one_running ON runs(target) WHERE status = 'running';
