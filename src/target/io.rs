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
use std::pin::Pin;
use std::sync::OnceLock;

use tokio::sync::{mpsc, oneshot};

/// An exchange handed to the I/O thread, with its answer's way back.
type Job = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The I/O thread's queue of exchanges, started on first use; None when it could not be
/// started (then exchanges run on the caller's runtime, as before).
fn queue() -> Option<&'static mpsc::UnboundedSender<Job>> {
    static IO: OnceLock<Option<mpsc::UnboundedSender<Job>>> = OnceLock::new();
    IO.get_or_init(|| match start() {
        Ok(queue) => Some(queue),
        Err(e) => {
            tracing::warn!(error = %e, "cannot start the HTTP I/O thread; requests run on the engine's thread");
            None
        }
    })
    .as_ref()
}

/// Why a queue and not `Handle::spawn`: spawning onto a runtime from another thread writes to
/// its eventfd every time (tokio's current-thread scheduler wakes its driver unconditionally),
/// a system call per request on the engine's thread and a wake-up on this one. The queue wakes
/// the I/O thread only when it waits for work: requests queued while it runs cost nothing more.
fn start() -> std::io::Result<mpsc::UnboundedSender<Job>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (queue, mut jobs) = mpsc::unbounded_channel::<Job>();
    std::thread::Builder::new()
        .name("scimsync-http".into())
        // The runtime lives as long as the process: connections in the clients' pools belong
        // to it.
        .spawn(move || {
            rt.block_on(async move {
                while let Some(job) = jobs.recv().await {
                    // Spawned from this thread: no wake-up needed.
                    tokio::spawn(job);
                }
            })
        })?;
    Ok(queue)
}

/// Runs an exchange on the I/O thread and waits for it. Dropping the returned future stops the
/// exchange (a cancelled sync leaves nothing running). Err: the exchange panicked.
pub(crate) async fn exchange<F, T>(fut: F) -> Result<T, String>
where
    F: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let Some(queue) = queue() else {
        return Ok(fut.await);
    };
    let (mut answer, answered) = oneshot::channel();
    let job: Job = Box::pin(async move {
        // The waiter gone (the answer's receiver dropped) stops the exchange. Looked at first,
        // so a job whose waiter left before it ran never starts.
        let v = tokio::select! {
            biased;
            () = answer.closed() => return,
            v = fut => v,
        };
        let _ = answer.send(v);
    });
    if queue.send(job).is_err() {
        return Err("HTTP exchange failed: the I/O thread is gone".into());
    }
    // A panic drops the answer's sender unsent.
    answered
        .await
        .map_err(|_| "HTTP exchange failed: the exchange panicked".to_string())
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
    async fn a_panicking_exchange_is_an_error_not_a_hang() {
        let failed = exchange(async {
            if std::thread::current().name() == Some("scimsync-http") {
                panic!("deliberate");
            }
        })
        .await;
        assert_eq!(
            failed,
            Err("HTTP exchange failed: the exchange panicked".to_string())
        );
        // The thread goes on taking exchanges.
        assert_eq!(exchange(async { 7 }).await, Ok(7));
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
