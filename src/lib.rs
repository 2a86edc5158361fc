//! scimsync: an outbound SCIM 2.0 provisioning worker.
//!
//! Data flows directory (`store`) → `sync` engine (scope, `mapping`, `scim` validation, diff)
//! → `target` client → SCIM service provider. `sandbox` is a local service provider for trying
//! things out and for tests; `cli` is the binary's edge.

pub mod cli;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod directory;
pub mod mapping;
pub mod sandbox;
pub mod scim;
pub mod store;
pub mod sync;
pub mod target;
