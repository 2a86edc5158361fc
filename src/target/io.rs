//! The HTTP I/O thread: every request to a target is written, and its answer read, on one
//! thread of the process's own, beside the engine's.
//!
//! Why: the engine runs on one thread (see `src/main.rs`), and on it an answer waited until
//! every task ahead of it had run: a batch being mapped, other answers being recorded. Against
//! a target that answers in 5 ms, a request then held its slot of the target's concurrency
//! about 0.9 ms longer than the target took (`cargo bench --bench sync`, traced with `perf`:
//! answers arrive together and the next requests were written only after all of them had been
//! handled). Here the exchange runs where nothing else does, and a slot is freed as soon as its
//! answer is read.

use std::future::Future;
use std::sync::OnceLock;

use tokio_util::task::AbortOnDropHandle;

/// The runtime of the I/O thread, started on first use; None when it could not be started
/// (then exchanges run on the caller's runtime, as before).
fn runtime() -> Option<&'static tokio::runtime::Handle> {
    static IO: OnceLock<Option<tokio::runtime::Handle>> = OnceLock::new();
    IO.get_or_init(|| match start() {
        Ok(handle) => Some(handle),
        Err(e) => {
            tracing::warn!(error = %e, "cannot start the HTTP I/O thread; requests run on the engine's thread");
            None
        }
    })
    .as_ref()
}

fn start() -> std::io::Result<tokio::runtime::Handle> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let handle = rt.handle().clone();
    std::thread::Builder::new()
        .name("scimsync-http".into())
        // The runtime lives as long as the process: connections in the clients' pools belong
        // to it.
        .spawn(move || rt.block_on(std::future::pending::<()>()))?;
    Ok(handle)
}

/// Runs an exchange on the I/O thread and waits for it. Dropping the returned future stops the
/// exchange (a cancelled sync leaves nothing running). Err: the exchange panicked.
pub(crate) async fn exchange<F, T>(fut: F) -> Result<T, String>
where
    F: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    match runtime() {
        Some(rt) => AbortOnDropHandle::new(rt.spawn(fut))
            .await
            .map_err(|e| format!("HTTP exchange failed: {e}")),
        None => Ok(fut.await),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_exchange_runs_on_the_io_thread() {
        let name = exchange(async { std::thread::current().name().map(str::to_string) })
            .await
            .expect("exchange");
        assert_eq!(name.as_deref(), Some("scimsync-http"));
    }

    #[tokio::test]
    async fn dropping_the_wait_stops_the_exchange() {
        let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
        let (gone_tx, gone_rx) = tokio::sync::oneshot::channel::<()>();
        let wait = exchange(async move {
            // Dropped with the task: the receiver then sees the channel closed.
            let _gone = gone_tx;
            let _ = started_tx.send(());
            std::future::pending::<()>().await;
        });
        let waiting = tokio::spawn(wait);
        started_rx.await.expect("the exchange started");
        waiting.abort();
        let gone = tokio::time::timeout(std::time::Duration::from_secs(10), gone_rx).await;
        assert!(
            matches!(gone, Ok(Err(_))),
            "the exchange was stopped, not left running"
        );
    }
}
