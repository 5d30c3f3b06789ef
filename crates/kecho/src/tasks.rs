//! The node's tasks: where they run, and stopping them all at once.

use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;
use tokio::task::AbortHandle;

/// Every task a node started, so that stopping the node stops them; and whether it is stopped.
pub(crate) struct Tasks {
    /// The runtime the node started on: its tasks run there even when the call that needs one comes from another
    /// thread (a `Source` dropped on a plain thread must still be able to dial to announce its departure).
    runtime: tokio::runtime::Handle,
    running: Mutex<Vec<AbortHandle>>,
    closed: AtomicBool,
}

impl Tasks {
    /// Tasks on the current runtime (panics outside one, as `tokio::spawn` would: callers are async).
    pub(crate) fn new() -> Self {
        Tasks {
            runtime: tokio::runtime::Handle::current(),
            running: Mutex::new(Vec::new()),
            closed: AtomicBool::new(false),
        }
    }

    /// Spawns a task that dies with the node.
    pub(crate) fn spawn<F>(&self, fut: F) -> AbortHandle
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let h = self.runtime.spawn(fut).abort_handle();
        let mut running = self.running.lock();
        running.retain(|t| !t.is_finished());
        running.push(h.clone());
        h
    }

    /// Marks the node stopped and aborts every task.
    pub(crate) fn stop(&self) {
        self.closed.store(true, Ordering::Release);
        for t in self.running.lock().drain(..) {
            t.abort();
        }
    }

    /// True once the node is stopped.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}
