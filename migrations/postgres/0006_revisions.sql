-- A revision per directory row, changed by the database on every write however it is made
-- (import, or a host writing the tables), and recorded with each resource sent: a full sync
-- then tells an unchanged object from the row alone, in the scan, without reading it out.
-- Drawn from one sequence: unique over time, so a row deleted and inserted again never
-- repeats an old revision.
CREATE SEQUENCE directory_rev;
ALTER TABLE users ADD COLUMN rev BIGINT NOT NULL DEFAULT 0;
ALTER TABLE groups ADD COLUMN rev BIGINT NOT NULL DEFAULT 0;

-- "<scripts and target settings fingerprint>:<rev>" the last resource sent was made from.
ALTER TABLE sync_state ADD COLUMN source_key TEXT;

CREATE FUNCTION scimsync_new_rev() RETURNS trigger AS $$
BEGIN
    NEW.rev := nextval('directory_rev');
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER users_rev BEFORE INSERT OR UPDATE ON users
    FOR EACH ROW EXECUTE FUNCTION scimsync_new_rev();
CREATE TRIGGER groups_rev BEFORE INSERT OR UPDATE ON groups
    FOR EACH ROW EXECUTE FUNCTION scimsync_new_rev();
