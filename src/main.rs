//! The `scimsync` binary: everything lives in the library; see `scimsync::cli`.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    scimsync::cli::main().await
}
