-- What was learned about a target (ServiceProviderConfig, ResourceTypes, refused methods),
-- shared by every worker; valid only while the target's settings keep the same fingerprint.
CREATE TABLE target_cache (
    target      TEXT NOT NULL,
    key         TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    value       TEXT NOT NULL,
    fetched_at  BIGINT NOT NULL,
    PRIMARY KEY (target, key)
);
