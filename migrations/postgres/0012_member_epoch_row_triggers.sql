-- The member epoch's triggers (0007, 0011) ran once per statement over its transition tables:
-- every state write copied its old and new rows (the resource sent included) into them and
-- compared the two sets, also when no remote id moved (a create's write-ahead record, a
-- key). In a first sync they were 40% of the state statements' time. Now they are row
-- triggers whose WHEN clause, evaluated by the server without calling a function, passes
-- only a row whose offered remote id moved, and only the first such row of a transaction per
-- target: the bump commits with the transaction, so one is enough. The transaction-local
-- setting `scimsync.member_epoch_bumped` (the target last bumped) says which; it goes with
-- the transaction, or with a rolled-back savepoint. The update's trigger runs before the
-- row is written, so that the setting already holds for the batch's next rows (an after
-- trigger's WHEN is evaluated as each row is written and its function only at the statement's
-- end); the insert's runs after it, because an upsert fires an insert's before triggers
-- for its proposed row even when it ends as an update that moves nothing.
DROP TRIGGER sync_state_epoch_ins ON sync_state;
DROP TRIGGER sync_state_epoch_upd ON sync_state;
DROP TRIGGER sync_state_epoch_del ON sync_state;
DROP FUNCTION scimsync_member_epoch();

CREATE FUNCTION scimsync_member_epoch_bump() RETURNS trigger AS $$
DECLARE
    my_stripe SMALLINT := (pg_backend_pid() % 16)::SMALLINT;
    t TEXT := CASE WHEN TG_OP = 'DELETE' THEN OLD.target ELSE NEW.target END;
BEGIN
    INSERT INTO member_epochs (target, stripe, epoch) VALUES (t, my_stripe, 1)
    ON CONFLICT ON CONSTRAINT member_epochs_pkey DO UPDATE SET epoch = member_epochs.epoch + 1;
    PERFORM set_config('scimsync.member_epoch_bumped', t, true);
    -- A row moved to another target leaves that one's members too.
    IF TG_OP = 'UPDATE' AND OLD.target IS DISTINCT FROM NEW.target THEN
        INSERT INTO member_epochs (target, stripe, epoch) VALUES (OLD.target, my_stripe, 1)
        ON CONFLICT ON CONSTRAINT member_epochs_pkey
        DO UPDATE SET epoch = member_epochs.epoch + 1;
    END IF;
    IF TG_OP = 'DELETE' THEN
        RETURN OLD;
    END IF;
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

-- The remote id a row offers as a member: none while leaving.
CREATE TRIGGER sync_state_epoch_ins AFTER INSERT ON sync_state FOR EACH ROW
WHEN (NEW.kind = 'user' AND NEW.remote_id IS NOT NULL AND NEW.status <> 'leaving'
      AND current_setting('scimsync.member_epoch_bumped', true) IS DISTINCT FROM NEW.target)
EXECUTE FUNCTION scimsync_member_epoch_bump();

CREATE TRIGGER sync_state_epoch_upd BEFORE UPDATE ON sync_state FOR EACH ROW
WHEN ((OLD.kind = 'user' OR NEW.kind = 'user')
      AND (NEW.target IS DISTINCT FROM OLD.target
           OR ((NEW.kind IS DISTINCT FROM OLD.kind
                OR NEW.local_id IS DISTINCT FROM OLD.local_id
                OR (CASE WHEN NEW.status = 'leaving' THEN NULL ELSE NEW.remote_id END)
                   IS DISTINCT FROM (CASE WHEN OLD.status = 'leaving' THEN NULL ELSE OLD.remote_id END))
               AND current_setting('scimsync.member_epoch_bumped', true)
                   IS DISTINCT FROM NEW.target)))
EXECUTE FUNCTION scimsync_member_epoch_bump();

CREATE TRIGGER sync_state_epoch_del BEFORE DELETE ON sync_state FOR EACH ROW
WHEN (OLD.kind = 'user' AND OLD.remote_id IS NOT NULL AND OLD.status <> 'leaving'
      AND current_setting('scimsync.member_epoch_bumped', true) IS DISTINCT FROM OLD.target)
EXECUTE FUNCTION scimsync_member_epoch_bump();
