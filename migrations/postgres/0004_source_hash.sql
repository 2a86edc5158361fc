-- The hash of the directory object, mapping scripts and target settings a resource was made
-- from: when it is unchanged, the object is neither mapped nor sent again.
ALTER TABLE sync_state ADD COLUMN source_hash TEXT;
