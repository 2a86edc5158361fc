//! One integration-test binary (fast linking): scenarios against the sandbox on SQLite and
//! PostgreSQL, import, the CLI, and interop with a third-party SCIM server.

mod bulk;
mod cli;
mod client;
mod daemon;
mod harness;
mod import;
mod interop;
mod mapping;
mod resilience;
mod revisions;
mod sandbox;
mod scenarios;
mod targets;
mod tls;
