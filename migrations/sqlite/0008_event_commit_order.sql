-- SQLite has one writer at a time, so events commit in sequence order and a position is
-- (0, seq); the column keeps one cursor shape for both databases (see the PostgreSQL
-- migration of the same name).
ALTER TABLE event_cursors ADD COLUMN last_tx INTEGER NOT NULL DEFAULT 0;

-- Where the event stream stood when a run was created (see the PostgreSQL migration).
ALTER TABLE runs ADD COLUMN events_tx INTEGER;
ALTER TABLE runs ADD COLUMN events_seq INTEGER;
