//! The threads that run Modbus/TCP sessions, plain and TLS with their
//! handshakes: one single-threaded runtime per core.
//!
//! On the work-stealing runtime a session, and the upstream connection it
//! borrows, are woken on whichever worker polled the socket, and that worker
//! then wakes the other one to share the work. Those hand-overs cost a futex
//! wake and a context switch for about every tenth request. A session that
//! stays on one thread, and prefers upstream connections whose task lives
//! on the same thread, is woken by the thread that runs it.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

thread_local! {
    /// Index of the session thread that runs on this thread, if any.
    static CURRENT: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Returns the index of the session thread the caller runs on, or `None` on
/// any other thread. Upstream pools use it to lend a connection whose task
/// runs on the same thread.
pub fn current() -> Option<usize> {
    CURRENT.with(Cell::get)
}

struct Thread {
    handle: Handle,
    /// Taken by `stop`. Dropping the sender stops the thread as well.
    running: Mutex<Option<(oneshot::Sender<()>, JoinHandle<()>)>>,
}

/// A set of session threads that takes new sessions in turn. An empty set
/// spawns them on the caller's runtime.
#[derive(Default)]
pub struct SessionThreads {
    threads: Vec<Thread>,
    next: AtomicUsize,
}

impl SessionThreads {
    /// Starts `count` threads, each with its own runtime, I/O driver and
    /// timers.
    pub fn start(count: usize) -> io::Result<SessionThreads> {
        let mut threads = Vec::with_capacity(count);
        for index in 0..count {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .enable_time()
                .build()?;
            let handle = runtime.handle().clone();
            let (stop, stopped) = oneshot::channel();
            let thread = std::thread::Builder::new()
                .name(format!("sluice-session-{index}"))
                .spawn(move || {
                    CURRENT.with(|current| current.set(Some(index)));
                    // A dropped sender also stops the thread.
                    let _ = runtime.block_on(stopped);
                    // Sessions have drained by now. What is left, such as
                    // the tasks of upstream connections, is dropped, and a
                    // blocking task is not waited for.
                    runtime.shutdown_background();
                })?;
            threads.push(Thread {
                handle,
                running: Mutex::new(Some((stop, thread))),
            });
        }
        Ok(SessionThreads {
            threads,
            next: AtomicUsize::new(0),
        })
    }

    /// Returns one thread per core, or the count in `TOKIO_WORKER_THREADS`,
    /// the variable that also sizes the main runtime.
    pub fn default_count() -> usize {
        std::env::var("TOKIO_WORKER_THREADS")
            .ok()
            .and_then(|value| value.parse().ok())
            .filter(|&count| count > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from))
    }

    /// Runs `future` on the next thread in turn.
    pub fn spawn<F>(&self, future: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        if self.threads.is_empty() {
            tokio::spawn(future);
            return;
        }
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.threads.len();
        self.threads[index].handle.spawn(future);
    }

    /// Stops every thread and waits for it to end. It blocks the caller. Call
    /// it once the sessions have drained and the upstream pools have shut
    /// down, and not from a session thread.
    pub fn stop(&self) {
        for thread in &self.threads {
            let running = thread
                .running
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .take();
            let Some((stop, thread)) = running else {
                continue;
            };
            let _ = stop.send(());
            if thread.join().is_err() {
                tracing::error!("a session thread panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_take_sessions_in_turn() {
        let threads = SessionThreads::start(2).unwrap();
        let (sender, receiver) = std::sync::mpsc::channel();
        for _ in 0..4 {
            let sender = sender.clone();
            threads.spawn(async move {
                sender.send(current()).unwrap();
            });
        }
        let mut seen: Vec<Option<usize>> = receiver.iter().take(4).collect();
        seen.sort();
        assert_eq!(seen, vec![Some(0), Some(0), Some(1), Some(1)]);
        assert_eq!(current(), None);
        threads.stop();
    }

    #[tokio::test]
    async fn empty_set_spawns_on_caller_runtime() {
        let threads = SessionThreads::default();
        let (sender, receiver) = oneshot::channel();
        threads.spawn(async move {
            sender.send(current()).unwrap();
        });
        assert_eq!(receiver.await.unwrap(), None);
    }
}
