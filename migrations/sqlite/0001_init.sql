-- Directory, change events, per-target sync state and run records (SQLite).
-- Timestamps are Unix milliseconds; JSON is stored as TEXT.

CREATE TABLE users (
    id              TEXT PRIMARY KEY NOT NULL,
    username        TEXT NOT NULL UNIQUE,
    email           TEXT,
    name            TEXT,
    given_name      TEXT,
    family_name     TEXT,
    active          INTEGER NOT NULL DEFAULT 1,
    service_account INTEGER NOT NULL DEFAULT 0,
    attributes      TEXT NOT NULL DEFAULT '{}',
    content_hash    TEXT NOT NULL,
    updated_at      INTEGER NOT NULL
);

CREATE TABLE groups (
    id           TEXT PRIMARY KEY NOT NULL,
    name         TEXT NOT NULL,
    attributes   TEXT NOT NULL DEFAULT '{}',
    content_hash TEXT NOT NULL,
    updated_at   INTEGER NOT NULL
);

CREATE TABLE memberships (
    group_id TEXT NOT NULL REFERENCES groups(id) ON DELETE CASCADE,
    user_id  TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    PRIMARY KEY (group_id, user_id)
);
CREATE INDEX memberships_user ON memberships(user_id);

CREATE TABLE change_events (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    kind       TEXT NOT NULL,
    object_id  TEXT NOT NULL,
    created_at INTEGER NOT NULL
);

-- Written by triggers so that an event commits in the same transaction as its change.
CREATE TRIGGER users_ins AFTER INSERT ON users BEGIN
    INSERT INTO change_events(kind, object_id, created_at)
    VALUES ('user', NEW.id, CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER));
END;
CREATE TRIGGER users_upd AFTER UPDATE ON users BEGIN
    INSERT INTO change_events(kind, object_id, created_at)
    VALUES ('user', NEW.id, CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER));
END;
CREATE TRIGGER users_del AFTER DELETE ON users BEGIN
    INSERT INTO change_events(kind, object_id, created_at)
    VALUES ('user', OLD.id, CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER));
END;
CREATE TRIGGER groups_ins AFTER INSERT ON groups BEGIN
    INSERT INTO change_events(kind, object_id, created_at)
    VALUES ('group', NEW.id, CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER));
END;
CREATE TRIGGER groups_upd AFTER UPDATE ON groups BEGIN
    INSERT INTO change_events(kind, object_id, created_at)
    VALUES ('group', NEW.id, CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER));
END;
CREATE TRIGGER groups_del AFTER DELETE ON groups BEGIN
    INSERT INTO change_events(kind, object_id, created_at)
    VALUES ('group', OLD.id, CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER));
END;
CREATE TRIGGER memberships_ins AFTER INSERT ON memberships BEGIN
    INSERT INTO change_events(kind, object_id, created_at)
    VALUES ('group', NEW.group_id, CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER));
END;
CREATE TRIGGER memberships_del AFTER DELETE ON memberships BEGIN
    INSERT INTO change_events(kind, object_id, created_at)
    VALUES ('group', OLD.group_id, CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER));
END;

-- What scimsync last did for one directory object on one target.
CREATE TABLE sync_state (
    target        TEXT NOT NULL,
    kind          TEXT NOT NULL,
    local_id      TEXT NOT NULL,
    remote_id     TEXT,
    resource_hash TEXT,
    last_resource TEXT,
    members       TEXT,
    status        TEXT NOT NULL,
    last_error    TEXT,
    attempts      INTEGER NOT NULL DEFAULT 0,
    updated_at    INTEGER NOT NULL,
    PRIMARY KEY (target, kind, local_id)
);

CREATE TABLE runs (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    target      TEXT NOT NULL,
    trigger     TEXT NOT NULL,
    dry_run     INTEGER NOT NULL DEFAULT 0,
    started_at  INTEGER NOT NULL,
    finished_at INTEGER,
    status      TEXT NOT NULL,
    created     INTEGER NOT NULL DEFAULT 0,
    updated     INTEGER NOT NULL DEFAULT 0,
    unchanged   INTEGER NOT NULL DEFAULT 0,
    deleted     INTEGER NOT NULL DEFAULT 0,
    skipped     INTEGER NOT NULL DEFAULT 0,
    failed      INTEGER NOT NULL DEFAULT 0,
    requests    INTEGER NOT NULL DEFAULT 0,
    detail      TEXT
);
CREATE INDEX runs_target ON runs(target, id);
