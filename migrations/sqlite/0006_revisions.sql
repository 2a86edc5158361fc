-- A revision per directory row, changed by the database on every write however it is made
-- (import, or a host writing the tables), and recorded with each resource sent: a full sync
-- then tells an unchanged object from the row alone, in the scan, without reading it out.
-- The value is the sequence number of the row's latest change event: unique over time, so a
-- row deleted and inserted again never repeats an old revision.
ALTER TABLE users ADD COLUMN rev INTEGER NOT NULL DEFAULT 0;
ALTER TABLE groups ADD COLUMN rev INTEGER NOT NULL DEFAULT 0;

-- "<scripts and target settings fingerprint>:<rev>" the last resource sent was made from.
ALTER TABLE sync_state ADD COLUMN source_key TEXT;

-- The event and the new revision in one trigger. The revision's own UPDATE must not count as
-- a change: without recursive triggers it cannot fire the trigger it runs in; with them, the
-- WHEN clause stops it (its new rev is the latest event's sequence number). A host that sets
-- rev itself to anything else still gets its event and a new revision.
DROP TRIGGER users_ins;
DROP TRIGGER users_upd;
DROP TRIGGER groups_ins;
DROP TRIGGER groups_upd;

CREATE TRIGGER users_ins AFTER INSERT ON users BEGIN
    INSERT INTO change_events(kind, object_id, created_at)
    VALUES ('user', NEW.id, CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER));
    UPDATE users SET rev = (SELECT max(seq) FROM change_events) WHERE rowid = NEW.rowid;
END;
CREATE TRIGGER users_upd AFTER UPDATE ON users
WHEN NEW.rev IS OLD.rev OR NEW.rev IS NOT (SELECT max(seq) FROM change_events) BEGIN
    INSERT INTO change_events(kind, object_id, created_at)
    VALUES ('user', NEW.id, CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER));
    UPDATE users SET rev = (SELECT max(seq) FROM change_events) WHERE rowid = NEW.rowid;
END;
CREATE TRIGGER groups_ins AFTER INSERT ON groups BEGIN
    INSERT INTO change_events(kind, object_id, created_at)
    VALUES ('group', NEW.id, CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER));
    UPDATE groups SET rev = (SELECT max(seq) FROM change_events) WHERE rowid = NEW.rowid;
END;
CREATE TRIGGER groups_upd AFTER UPDATE ON groups
WHEN NEW.rev IS OLD.rev OR NEW.rev IS NOT (SELECT max(seq) FROM change_events) BEGIN
    INSERT INTO change_events(kind, object_id, created_at)
    VALUES ('group', NEW.id, CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER));
    UPDATE groups SET rev = (SELECT max(seq) FROM change_events) WHERE rowid = NEW.rowid;
END;
