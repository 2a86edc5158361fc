-- A full sync's orphan check (every sync state whose directory object is gone: an anti-join of
-- the whole state with the directory) can be skipped while nothing left the directory. An
-- object leaves it only by DELETE or a changed id: each adds a row here, and a target records
-- the sum it read before a check that found nothing. While the sum stands, the check can find
-- nothing either. As on PostgreSQL (its 0010), rows are only added, and readers fold them
-- into one now and then, in one transaction, which keeps the sum.

CREATE TABLE directory_deletions (
    kind TEXT NOT NULL,
    n    INTEGER NOT NULL
);

CREATE TABLE orphan_checks (
    target     TEXT NOT NULL,
    kind       TEXT NOT NULL,
    deletions  INTEGER NOT NULL,
    checked_at INTEGER NOT NULL,
    PRIMARY KEY (target, kind)
);

CREATE TRIGGER users_deletions AFTER DELETE ON users
BEGIN
    INSERT INTO directory_deletions (kind, n) VALUES ('user', 1);
END;

CREATE TRIGGER users_id_changes AFTER UPDATE OF id ON users WHEN OLD.id IS NOT NEW.id
BEGIN
    INSERT INTO directory_deletions (kind, n) VALUES ('user', 1);
END;

CREATE TRIGGER groups_deletions AFTER DELETE ON groups
BEGIN
    INSERT INTO directory_deletions (kind, n) VALUES ('group', 1);
END;

CREATE TRIGGER groups_id_changes AFTER UPDATE OF id ON groups WHEN OLD.id IS NOT NEW.id
BEGIN
    INSERT INTO directory_deletions (kind, n) VALUES ('group', 1);
END;
