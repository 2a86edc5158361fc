//! The `scimsync` binary: everything lives in the library; see `scimsync::cli`.

// One thread runs all of scimsync's I/O: the work is waiting on targets and the database, and
// a single-threaded scheduler spends about a third less CPU per object than a multi-threaded
// one (no wake-ups across threads; measured with `cargo bench --bench sync`). More throughput
// comes from more processes sharing a PostgreSQL database.
#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    scimsync::cli::main().await
}
