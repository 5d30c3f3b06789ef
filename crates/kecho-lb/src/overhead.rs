//! Where a node spends time on load balancing, after the paper's Figs. 8b and 9: load monitoring and submission,
//! handling of load events, filtering (OUT and IN), and submitting forwarded requests.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Time spent (nanoseconds of wall-clock time in the code concerned) and events counted, per node.
#[derive(Debug, Default)]
pub struct Overhead {
    /// Sampling load and submitting reports.
    pub monitor_ns: AtomicU64,
    /// Handling arriving load reports (decoding, updating the table).
    pub handling_ns: AtomicU64,
    /// The OUT-filter choosing servers for forwarded requests.
    pub out_filter_ns: AtomicU64,
    /// The IN-filter discarding duplicate responses.
    pub in_filter_ns: AtomicU64,
    /// Submitting forwarded requests, responses and cancel events on the data channel.
    pub forward_ns: AtomicU64,
    /// Load reports published.
    pub reports: AtomicU64,
}

/// A copy of the counters.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct OverheadSnapshot {
    /// See [`Overhead::monitor_ns`].
    pub monitor_ns: u64,
    /// See [`Overhead::handling_ns`].
    pub handling_ns: u64,
    /// See [`Overhead::out_filter_ns`].
    pub out_filter_ns: u64,
    /// See [`Overhead::in_filter_ns`].
    pub in_filter_ns: u64,
    /// See [`Overhead::forward_ns`].
    pub forward_ns: u64,
    /// See [`Overhead::reports`].
    pub reports: u64,
}

impl Overhead {
    fn add(counter: &AtomicU64, d: Duration) {
        counter.fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }
    /// Adds monitoring time.
    pub fn add_monitor(&self, d: Duration) {
        Self::add(&self.monitor_ns, d)
    }
    /// Adds event-handling time.
    pub fn add_handling(&self, d: Duration) {
        Self::add(&self.handling_ns, d)
    }
    /// Adds OUT-filter time.
    pub fn add_out_filter(&self, d: Duration) {
        Self::add(&self.out_filter_ns, d)
    }
    /// Adds IN-filter time.
    pub fn add_in_filter(&self, d: Duration) {
        Self::add(&self.in_filter_ns, d)
    }
    /// Adds forwarding time.
    pub fn add_forward(&self, d: Duration) {
        Self::add(&self.forward_ns, d)
    }
    /// The counters now.
    pub fn snapshot(&self) -> OverheadSnapshot {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        OverheadSnapshot {
            monitor_ns: l(&self.monitor_ns),
            handling_ns: l(&self.handling_ns),
            out_filter_ns: l(&self.out_filter_ns),
            in_filter_ns: l(&self.in_filter_ns),
            forward_ns: l(&self.forward_ns),
            reports: l(&self.reports),
        }
    }
}

impl std::ops::AddAssign for OverheadSnapshot {
    fn add_assign(&mut self, o: Self) {
        self.monitor_ns += o.monitor_ns;
        self.handling_ns += o.handling_ns;
        self.out_filter_ns += o.out_filter_ns;
        self.in_filter_ns += o.in_filter_ns;
        self.forward_ns += o.forward_ns;
        self.reports += o.reports;
    }
}
