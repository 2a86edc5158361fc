-- A no-op full sync on PostgreSQL spent most of its time looking up each group member's
-- state (2,000 index lookups a batch of groups) to learn that no member's remote id moved.
-- Instead, a group's key also records the target's member epoch, which changes with every
-- change to any user's remote id on that target; while the epoch and the group's revision
-- stand, its members' remote ids are the ones recorded.

-- One counter per target, bumped in the transaction that changes a user's remote id there
-- (or makes it leave or come back): its row lock orders those transactions, so a reader sees
-- a new epoch exactly when it sees the change (a sequence could not promise that).
CREATE TABLE member_epochs (
    target TEXT PRIMARY KEY,
    epoch  BIGINT NOT NULL
);

-- Once per statement: the first sync's outcomes of a batch of 100 users bump it once.
CREATE FUNCTION scimsync_member_epoch() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO member_epochs (target, epoch)
        SELECT DISTINCT target, 1 FROM new_rows
        WHERE kind = 'user' AND remote_id IS NOT NULL AND status <> 'leaving'
        ON CONFLICT (target) DO UPDATE SET epoch = member_epochs.epoch + 1;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO member_epochs (target, epoch)
        SELECT DISTINCT target, 1 FROM old_rows
        WHERE kind = 'user' AND remote_id IS NOT NULL AND status <> 'leaving'
        ON CONFLICT (target) DO UPDATE SET epoch = member_epochs.epoch + 1;
    ELSE
        -- The rows whose (target, user, remote id a member offers) is not as before.
        INSERT INTO member_epochs (target, epoch)
        SELECT DISTINCT target, 1 FROM (
            (SELECT target, local_id,
                    CASE WHEN status = 'leaving' THEN NULL ELSE remote_id END AS rid
             FROM new_rows WHERE kind = 'user'
             EXCEPT
             SELECT target, local_id,
                    CASE WHEN status = 'leaving' THEN NULL ELSE remote_id END
             FROM old_rows WHERE kind = 'user')
            UNION
            (SELECT target, local_id,
                    CASE WHEN status = 'leaving' THEN NULL ELSE remote_id END
             FROM old_rows WHERE kind = 'user'
             EXCEPT
             SELECT target, local_id,
                    CASE WHEN status = 'leaving' THEN NULL ELSE remote_id END
             FROM new_rows WHERE kind = 'user')
        ) moved
        ON CONFLICT (target) DO UPDATE SET epoch = member_epochs.epoch + 1;
    END IF;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER sync_state_epoch_ins AFTER INSERT ON sync_state
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION scimsync_member_epoch();
CREATE TRIGGER sync_state_epoch_upd AFTER UPDATE ON sync_state
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION scimsync_member_epoch();
CREATE TRIGGER sync_state_epoch_del AFTER DELETE ON sync_state
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION scimsync_member_epoch();

-- A group's revision also changes with its memberships (the group's own update trigger
-- writes the change event, so this replaces the membership's event, not adds one).
-- (`rev = 0` only makes an update: the groups_rev trigger draws the new revision.) Once per
-- group and transaction: a group this transaction already wrote (its row version's xmin is
-- this transaction) has its new revision and event, and both become visible with this change;
-- an import adding 20 members updates the group once, not 20 times.
CREATE FUNCTION scimsync_membership_rev() RETURNS trigger AS $$
BEGIN
    UPDATE groups SET rev = 0
    WHERE id = CASE WHEN TG_OP = 'DELETE' THEN OLD.group_id ELSE NEW.group_id END
      AND xmin::text::bigint <> txid_current() % 4294967296;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

DROP TRIGGER memberships_events ON memberships;
CREATE TRIGGER memberships_rev AFTER INSERT OR DELETE ON memberships
    FOR EACH ROW EXECUTE FUNCTION scimsync_membership_rev();
