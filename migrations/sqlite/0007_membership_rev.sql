-- A group's revision also changes with its memberships, as on PostgreSQL (where keys then
-- tell a group's members unchanged without looking them up). The membership's event stays
-- the one event: the revision's own UPDATE of the group does not count as a change (see
-- 0006).
DROP TRIGGER memberships_ins;
DROP TRIGGER memberships_del;

CREATE TRIGGER memberships_ins AFTER INSERT ON memberships BEGIN
    INSERT INTO change_events(kind, object_id, created_at)
    VALUES ('group', NEW.group_id, CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER));
    UPDATE groups SET rev = (SELECT max(seq) FROM change_events) WHERE id = NEW.group_id;
END;
CREATE TRIGGER memberships_del AFTER DELETE ON memberships BEGIN
    INSERT INTO change_events(kind, object_id, created_at)
    VALUES ('group', OLD.group_id, CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER));
    UPDATE groups SET rev = (SELECT max(seq) FROM change_events) WHERE id = OLD.group_id;
END;
