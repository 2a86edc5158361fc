-- The member epoch, as on PostgreSQL (its 0007): a no-op full sync on SQLite spent most of
-- its groups' time looking up each member's state (200,000 lookups for 10,000 groups of 20)
-- to learn that no member's remote id moved. A group's key also records the target's member
-- epoch, which changes with every change to the remote id a user offers as a member there;
-- while the epoch and the group's revision stand, its members' remote ids are the ones
-- recorded.

CREATE TABLE member_epochs (
    target TEXT PRIMARY KEY,
    epoch  INTEGER NOT NULL
);

-- SQLite has row triggers only: each bumps the epoch when the remote id a user offers moves
-- (set, changed, cleared, leaving or back), not on the other state writes. Writers take turns
-- (one at a time), so a reader sees a new epoch exactly when it sees the change. The update
-- trigger is only run by statements that set one of its columns (not by a key's or a
-- write-ahead record's update): a trigger's program runs for every row it is run for, even
-- when its WHEN clause is false.
CREATE TRIGGER sync_state_epoch_ins AFTER INSERT ON sync_state
WHEN NEW.kind = 'user' AND NEW.remote_id IS NOT NULL AND NEW.status <> 'leaving'
BEGIN
    INSERT INTO member_epochs (target, epoch) VALUES (NEW.target, 1)
    ON CONFLICT (target) DO UPDATE SET epoch = epoch + 1;
END;

CREATE TRIGGER sync_state_epoch_upd
AFTER UPDATE OF target, kind, local_id, remote_id, status ON sync_state
WHEN (OLD.kind = 'user' OR NEW.kind = 'user')
 AND (NEW.target IS NOT OLD.target OR NEW.kind IS NOT OLD.kind
      OR NEW.local_id IS NOT OLD.local_id
      OR (CASE WHEN NEW.status = 'leaving' THEN NULL ELSE NEW.remote_id END)
         IS NOT (CASE WHEN OLD.status = 'leaving' THEN NULL ELSE OLD.remote_id END))
BEGIN
    INSERT INTO member_epochs (target, epoch) VALUES (NEW.target, 1)
    ON CONFLICT (target) DO UPDATE SET epoch = epoch + 1;
    INSERT INTO member_epochs (target, epoch) SELECT OLD.target, 1 WHERE OLD.target IS NOT NEW.target
    ON CONFLICT (target) DO UPDATE SET epoch = epoch + 1;
END;

CREATE TRIGGER sync_state_epoch_del AFTER DELETE ON sync_state
WHEN OLD.kind = 'user' AND OLD.remote_id IS NOT NULL AND OLD.status <> 'leaving'
BEGIN
    INSERT INTO member_epochs (target, epoch) VALUES (OLD.target, 1)
    ON CONFLICT (target) DO UPDATE SET epoch = epoch + 1;
END;
