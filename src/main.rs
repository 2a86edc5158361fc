//! The `scimsync` binary: everything lives in the library; see `scimsync::cli`.

// mimalloc: allocation was a sixth of the engine's CPU per object with glibc's malloc
// (perf, `cargo bench --bench sync`); with mimalloc the first sync costs about a tenth less.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

// One thread runs the engine: the work is waiting on targets and the database, and a
// single-threaded scheduler spends about a third less CPU per object than a multi-threaded
// one (no wake-ups across threads; measured with `cargo bench --bench sync`). Requests to
// targets go out on a second thread (`target::io`). More throughput comes from more processes
// sharing a PostgreSQL database.
#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    scimsync::cli::main().await
}
