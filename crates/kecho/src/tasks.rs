//! The node's tasks: where they run, and stopping them all at once.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::Mutex;
use tokio::task::AbortHandle;

/// Every task a node started, so that stopping the node stops them; and whether it is stopped.
pub(crate) struct Tasks {
    /// The runtime the node started on: its tasks run there even when the call that needs one comes from another
    /// thread (a `Source` dropped on a plain thread must still be able to dial to announce its departure).
    runtime: tokio::runtime::Handle,
    running: Mutex<Vec<AbortHandle>>,
    closed: AtomicBool,
    /// Tasks asked for after the node stopped (refused).
    late: AtomicU64,
}

impl Tasks {
    /// Tasks on the current runtime (panics outside one, as `tokio::spawn` would: callers are async).
    pub(crate) fn new() -> Self {
        Tasks {
            runtime: tokio::runtime::Handle::current(),
            running: Mutex::new(Vec::new()),
            closed: AtomicBool::new(false),
            late: AtomicU64::new(0),
        }
    }

    /// Spawns a task that dies with the node. Once the node is stopped, nothing is spawned (the future is dropped
    /// unpolled and the handle is a finished task's): a task of the node that was running when it stopped (a reader
    /// delivering a frame, a dial finishing its handshake) runs on to its next await and may ask for more (a dial,
    /// a link's reader and writer), and a stopped node must do nothing more, as a crashed process would not.
    pub(crate) fn spawn<F>(&self, fut: F) -> AbortHandle
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        // `closed` is read under the lock `stop` drains under: a task is either drained by `stop` or not spawned.
        let mut running = self.running.lock();
        if self.closed.load(Ordering::Acquire) {
            drop(running);
            self.late.fetch_add(1, Ordering::Relaxed);
            drop(fut);
            return self.runtime.spawn(async {}).abort_handle();
        }
        let h = self.runtime.spawn(fut).abort_handle();
        running.retain(|t| !t.is_finished());
        running.push(h.clone());
        h
    }

    /// Marks the node stopped and aborts every task.
    pub(crate) fn stop(&self) {
        let mut running = self.running.lock();
        self.closed.store(true, Ordering::Release);
        for t in running.drain(..) {
            t.abort();
        }
    }

    /// Tasks asked for after the node stopped (each aborted before it ran).
    pub(crate) fn late(&self) -> u64 {
        self.late.load(Ordering::Relaxed)
    }

    /// True once the node is stopped.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// A stopped node runs nothing more: a task asked for after `stop` (by one of its tasks that was running when it
    /// stopped) is never polled. Before, it ran: a killed node's reader that was delivering a frame when the node
    /// was killed could dial and bring up a link nobody would ever close.
    #[tokio::test]
    async fn a_task_asked_for_after_the_node_stopped_never_runs() {
        let tasks = Tasks::new();
        let ran = Arc::new(AtomicBool::new(false));
        let before = ran.clone();
        let h = tasks.spawn(async move {
            tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
            before.store(true, Ordering::Release);
        });
        tasks.stop();
        let after = ran.clone();
        tasks.spawn(async move { after.store(true, Ordering::Release) });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!ran.load(Ordering::Acquire), "a task ran after the node stopped");
        assert!(h.is_finished(), "a running task was not aborted");
        assert_eq!(tasks.late(), 1);
    }
}
