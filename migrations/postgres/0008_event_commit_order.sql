-- Change events are consumed in an order that commits cannot overtake. A sequence number is
-- drawn when the event is written, not when its transaction commits: a transaction holding
-- seq 100 may commit after one holding seq 101, and a consumer that had moved past 101 would
-- never read 100. Each event now records its transaction id, and consumers read events in
-- (tx, seq) order only below the oldest transaction still running, which can no longer add any.
-- Events written before this migration keep tx 0: they committed long ago.
ALTER TABLE change_events ADD COLUMN tx BIGINT NOT NULL DEFAULT 0;
ALTER TABLE change_events ALTER COLUMN tx SET DEFAULT (pg_current_xact_id()::text::bigint);
CREATE INDEX change_events_order ON change_events (tx, seq);

-- A position is (tx, seq): positions saved before this migration are (0, seq), which still
-- means "every old event up to seq", and every new event comes after them.
ALTER TABLE event_cursors ADD COLUMN last_tx BIGINT NOT NULL DEFAULT 0;

-- Where the event stream stood when a run was created: every event before it had committed,
-- so the run's batches read its change. A consumer starting for the first time while the run
-- goes starts here, not at the stream's end (a batch worked before a later event may have
-- read the object before that change).
ALTER TABLE runs ADD COLUMN events_tx BIGINT;
ALTER TABLE runs ADD COLUMN events_seq BIGINT;
