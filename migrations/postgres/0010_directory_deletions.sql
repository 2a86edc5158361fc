-- A full sync's orphan check (every sync state whose directory object is gone: an anti-join of
-- the whole state with the directory) was a third of a no-op full sync of 100,000 users. An
-- object leaves the directory only by DELETE, TRUNCATE or a changed id: each statement that
-- may do that adds a row here in its transaction, and a target records the sum it read before
-- a check that found nothing. While the sum stands, the check can find nothing either.
--
-- Rows are only added (a counter row would be locked by every deleting transaction until it
-- commits: hosts' deletions would wait on each other, and could deadlock); a sum read sees
-- exactly the deletions committed, whatever order their transactions commit in. Readers fold
-- the rows into one now and then, in one transaction, which keeps the sum.
CREATE TABLE directory_deletions (
    kind TEXT NOT NULL,
    n    BIGINT NOT NULL
);

CREATE TABLE orphan_checks (
    target     TEXT NOT NULL,
    kind       TEXT NOT NULL,
    deletions  BIGINT NOT NULL,
    checked_at BIGINT NOT NULL,
    PRIMARY KEY (target, kind)
);

CREATE FUNCTION scimsync_directory_deletion() RETURNS trigger AS $$
BEGIN
    INSERT INTO directory_deletions (kind, n) VALUES (TG_ARGV[0], 1);
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

-- Once per statement (TRUNCATE has no row triggers).
CREATE TRIGGER users_deletions AFTER DELETE OR UPDATE OF id OR TRUNCATE ON users
    FOR EACH STATEMENT EXECUTE FUNCTION scimsync_directory_deletion('user');
CREATE TRIGGER groups_deletions AFTER DELETE OR UPDATE OF id OR TRUNCATE ON groups
    FOR EACH STATEMENT EXECUTE FUNCTION scimsync_directory_deletion('group');
