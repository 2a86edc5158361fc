-- Directory, change events, per-target sync state and run records (PostgreSQL).
-- Timestamps are Unix milliseconds and JSON is TEXT, as on SQLite, so one set of queries
-- serves both databases.

CREATE TABLE users (
    id              TEXT PRIMARY KEY,
    username        TEXT NOT NULL UNIQUE,
    email           TEXT,
    name            TEXT,
    given_name      TEXT,
    family_name     TEXT,
    active          BOOLEAN NOT NULL DEFAULT TRUE,
    service_account BOOLEAN NOT NULL DEFAULT FALSE,
    attributes      TEXT NOT NULL DEFAULT '{}',
    content_hash    TEXT NOT NULL,
    updated_at      BIGINT NOT NULL
);

CREATE TABLE groups (
    id           TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    attributes   TEXT NOT NULL DEFAULT '{}',
    content_hash TEXT NOT NULL,
    updated_at   BIGINT NOT NULL
);

CREATE TABLE memberships (
    group_id TEXT NOT NULL REFERENCES groups(id) ON DELETE CASCADE,
    user_id  TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    PRIMARY KEY (group_id, user_id)
);
CREATE INDEX memberships_user ON memberships(user_id);

CREATE TABLE change_events (
    seq        BIGSERIAL PRIMARY KEY,
    kind       TEXT NOT NULL,
    object_id  TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

-- Written by triggers so that an event commits in the same transaction as its change.
CREATE FUNCTION scimsync_change_event() RETURNS trigger AS $$
DECLARE
    obj TEXT;
BEGIN
    IF TG_TABLE_NAME = 'memberships' THEN
        obj := CASE WHEN TG_OP = 'DELETE' THEN OLD.group_id ELSE NEW.group_id END;
    ELSE
        obj := CASE WHEN TG_OP = 'DELETE' THEN OLD.id ELSE NEW.id END;
    END IF;
    INSERT INTO change_events(kind, object_id, created_at)
    VALUES (TG_ARGV[0], obj, (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT);
    PERFORM pg_notify('scimsync_events', TG_ARGV[0]);
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER users_events AFTER INSERT OR UPDATE OR DELETE ON users
    FOR EACH ROW EXECUTE FUNCTION scimsync_change_event('user');
CREATE TRIGGER groups_events AFTER INSERT OR UPDATE OR DELETE ON groups
    FOR EACH ROW EXECUTE FUNCTION scimsync_change_event('group');
CREATE TRIGGER memberships_events AFTER INSERT OR DELETE ON memberships
    FOR EACH ROW EXECUTE FUNCTION scimsync_change_event('group');

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
    attempts      BIGINT NOT NULL DEFAULT 0,
    updated_at    BIGINT NOT NULL,
    PRIMARY KEY (target, kind, local_id)
);

CREATE TABLE runs (
    id          BIGSERIAL PRIMARY KEY,
    target      TEXT NOT NULL,
    trigger     TEXT NOT NULL,
    dry_run     BOOLEAN NOT NULL DEFAULT FALSE,
    started_at  BIGINT NOT NULL,
    finished_at BIGINT,
    status      TEXT NOT NULL,
    created     BIGINT NOT NULL DEFAULT 0,
    updated     BIGINT NOT NULL DEFAULT 0,
    unchanged   BIGINT NOT NULL DEFAULT 0,
    deleted     BIGINT NOT NULL DEFAULT 0,
    skipped     BIGINT NOT NULL DEFAULT 0,
    failed      BIGINT NOT NULL DEFAULT 0,
    requests    BIGINT NOT NULL DEFAULT 0,
    detail      TEXT
);
CREATE INDEX runs_target ON runs(target, id);
