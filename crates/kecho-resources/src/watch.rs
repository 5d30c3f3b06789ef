//! A node's own cluster view, kept by a task from the agents' reports on `kecho.resources`.

use std::sync::Arc;
use std::time::Duration;

use kecho::{Channel, Node, Overflow, SinkOptions};
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::expr::Requirement;
use crate::negotiate::{explain, Miss};
use crate::types::Amounts;
use crate::view::{ClusterView, Report, ViewEntry};
use crate::wire;

/// A cluster view held by this node. Cheap to clone; the task stops when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct View {
    state: Arc<Mutex<ClusterView>>,
    changed: watch::Receiver<u64>,
    _task: Arc<Guard>,
}

#[derive(Debug)]
struct Guard(tokio::task::JoinHandle<()>);

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl View {
    /// Opens `kecho.resources` on `node` and starts following reports.
    pub async fn start(node: &Node) -> Result<View> {
        let ch = node.channel(wire::CHANNEL).await?;
        Self::start_on(&ch)
    }

    /// Starts following reports on an open channel.
    pub fn start_on(channel: &Channel) -> Result<View> {
        let mut sink = channel.sink(
            SinkOptions::new().types([wire::REPORT, wire::BYE]).capacity(16_384).overflow(Overflow::DropOldest),
        )?;
        let state = Arc::new(Mutex::new(ClusterView::new()));
        let (tx, rx) = watch::channel(0u64);
        let st = state.clone();
        let task = tokio::spawn(async move {
            let mut generation = 0u64;
            loop {
                let next = st.lock().next_expiry().map(Instant::from_std);
                let far = Instant::now() + Duration::from_secs(3600);
                let changed = tokio::select! {
                    ev = sink.recv() => match ev {
                        Ok(ev) => {
                            let now = Instant::now().into_std();
                            match ev.ty() {
                                wire::REPORT => match Report::from_attrs(ev.attrs()) {
                                    Ok(r) => st.lock().apply(r, now) != crate::view::Applied::Stale,
                                    Err(e) => {
                                        tracing::debug!(error = %e, "malformed report ignored");
                                        false
                                    }
                                },
                                wire::BYE => match (wire::str_attr(ev.attrs(), "agent"), wire::epoch_of(ev.attrs(), "epoch")) {
                                    (Ok(a), Ok(e)) => st.lock().remove(a, e),
                                    _ => false,
                                },
                                _ => false,
                            }
                        }
                        Err(kecho::RecvError::Closed) => return,
                        // Lost reports are soft state: the next one repairs the view.
                        Err(_) => false,
                    },
                    _ = tokio::time::sleep_until(next.unwrap_or(far)) => {
                        !st.lock().expire(Instant::now().into_std()).is_empty()
                    }
                };
                if changed {
                    generation += 1;
                    if tx.send(generation).is_err() {
                        return;
                    }
                }
            }
        });
        Ok(View { state, changed: rx, _task: Arc::new(Guard(task)) })
    }

    /// A copy of the view now (expired reports removed).
    pub fn snapshot(&self) -> ClusterView {
        let mut s = self.state.lock();
        s.expire(Instant::now().into_std());
        s.clone()
    }

    /// Runs `f` on the view now (expired reports removed), without copying it.
    pub(crate) fn with<R>(&self, f: impl FnOnce(&mut ClusterView) -> R) -> R {
        let mut s = self.state.lock();
        s.expire(Instant::now().into_std());
        f(&mut s)
    }

    /// Takes in what an agent's answer said is free (see [`ClusterView::learn`]); answers without it are ignored.
    pub(crate) fn learn_from(&self, answer: &kecho::Attrs) {
        let (Ok(agent), Ok(epoch), Ok(lv)) =
            (wire::str_attr(answer, "agent"), wire::epoch_of(answer, "lv_epoch"), wire::int_attr(answer, "lv"))
        else {
            return;
        };
        let Some(Ok(free)) = wire::opt_str(answer, "free_now").map(str::parse::<Amounts>) else { return };
        self.state.lock().learn(agent, epoch, u64::try_from(lv).unwrap_or(0), &free);
    }

    /// See [`ClusterView::credit`].
    pub(crate) fn credit(&self, agent: &str, epoch: u64, amounts: &Amounts) {
        self.state.lock().credit(agent, epoch, amounts);
    }

    /// Waits until the view changes (an agent joined, reported, left or timed out).
    pub async fn changed(&mut self) -> Result<()> {
        self.changed.changed().await.map_err(|_| Error::Stopped)
    }

    /// Waits until `pred` holds for the view, up to `timeout`.
    pub async fn wait_until(&mut self, timeout: Duration, mut pred: impl FnMut(&ClusterView) -> bool) -> Result<()> {
        let end = Instant::now() + timeout;
        loop {
            if pred(&self.snapshot()) {
                return Ok(());
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() || tokio::time::timeout(left, self.changed()).await.is_err() {
                return if pred(&self.snapshot()) {
                    Ok(())
                } else {
                    Err(Error::Timeout { what: "the cluster view".into(), ms: timeout.as_millis() as u64 })
                };
            }
        }
    }

    /// Discovery (2K's trader): the agents that could serve these amounts under `require` by the view, or the reason
    /// none could. `require` is CEL over agents' attributes; a malformed one gets its position.
    pub fn discover(&self, amounts: &Amounts, require: Option<&str>) -> Result<Vec<ViewEntry>> {
        let req = require.map(Requirement::compile).transpose()?;
        let snap = self.snapshot();
        let (yes, no) = snap.candidates(amounts, req.as_ref());
        if yes.is_empty() {
            let no: Vec<(&str, Miss)> = no;
            return Err(Error::Unsatisfied { reason: explain(amounts, req.as_ref(), no.iter().map(|(a, m)| (*a, m))) });
        }
        Ok(yes.into_iter().cloned().collect())
    }
}
