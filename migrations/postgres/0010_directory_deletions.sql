-- A full sync's orphan check (every sync state whose directory object is gone: an anti-join of
-- the whole state with the directory) was a third of a no-op full sync of 100,000 users. An
-- object leaves the directory only by DELETE, TRUNCATE or a changed id: each statement that
-- may do that bumps a counter for its kind, and a target records the counter it read before a
-- check that found nothing. While the counter stands, the check can find nothing either.

CREATE TABLE directory_deletions (
    kind TEXT PRIMARY KEY,
    n    BIGINT NOT NULL
);

CREATE TABLE orphan_checks (
    target     TEXT NOT NULL,
    kind       TEXT NOT NULL,
    deletions  BIGINT NOT NULL,
    checked_at BIGINT NOT NULL,
    PRIMARY KEY (target, kind)
);

-- Once per statement, in the statement's transaction: the counter's row lock orders the
-- transactions that bump it, so a reader that sees the new count sees the deletion too.
CREATE FUNCTION scimsync_directory_deletion() RETURNS trigger AS $$
BEGIN
    INSERT INTO directory_deletions (kind, n) VALUES (TG_ARGV[0], 1)
    ON CONFLICT (kind) DO UPDATE SET n = directory_deletions.n + 1;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER users_deletions AFTER DELETE OR UPDATE OF id OR TRUNCATE ON users
    FOR EACH STATEMENT EXECUTE FUNCTION scimsync_directory_deletion('user');
CREATE TRIGGER groups_deletions AFTER DELETE OR UPDATE OF id OR TRUNCATE ON groups
    FOR EACH STATEMENT EXECUTE FUNCTION scimsync_directory_deletion('group');
