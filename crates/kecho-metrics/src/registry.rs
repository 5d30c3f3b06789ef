//! A registry server's metrics, read through its own client once a second.

use std::sync::Arc;
use std::time::Duration;

use kecho::RegistryClient;
use parking_lot::Mutex;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// Registers the metrics of the registry reached by `client` into `registry`, refreshed every `every` by a task on
/// the current runtime that ends with the returned collector's last handle:
///
/// | metric | labels | what |
/// |---|---|---|
/// | `kecho_registry_up` | | 1 if the last listing succeeded |
/// | `kecho_registry_list_failures_total` | | listings that failed |
/// | `kecho_registry_channels` | | channels registered |
/// | `kecho_registry_channel_sources`, `kecho_registry_channel_sinks` | `channel` | as last reported by the contact |
/// | `kecho_registry_channel_lease_remaining_seconds` | `channel` | until the contact's lease expires |
pub fn register_registry(registry: &mut Registry, client: RegistryClient, every: Duration) -> RegistryCollector {
    let collector = RegistryCollector { state: Arc::new(Mutex::new(State::default())) };
    registry.register_collector(Box::new(collector.clone()));
    let weak = Arc::downgrade(&collector.state);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let result = client.list().await;
            let Some(state) = weak.upgrade() else { return };
            let mut s = state.lock();
            match result {
                Ok(list) => {
                    s.entries = list.into_iter().map(|e| (e.name, e.sources, e.sinks, e.expires_in_ms)).collect();
                    s.up = true;
                }
                Err(e) => {
                    tracing::debug!("registry listing failed: {e}");
                    s.up = false;
                    s.failures += 1;
                }
            }
        }
    });
    collector
}

#[derive(Debug, Default)]
struct State {
    up: bool,
    failures: u64,
    /// Name, sources, sinks, lease milliseconds left.
    entries: Vec<(String, u32, u32, u64)>,
}

/// The registry's metrics as of the last listing; see [`register_registry`]. Cheap to clone.
#[derive(Clone, Debug)]
pub struct RegistryCollector {
    state: Arc<Mutex<State>>,
}

impl Collector for RegistryCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.state.lock();
        let g = MetricType::Gauge;
        let m =
            enc.encode_descriptor("kecho_registry_up", "1 if the last listing of the registry succeeded", None, g)?;
        ConstGauge::new(i64::from(s.up)).encode(m)?;
        let m = enc.encode_descriptor(
            "kecho_registry_list_failures",
            "Listings of the registry that failed",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(s.failures).encode(m)?;
        let m = enc.encode_descriptor("kecho_registry_channels", "Channels registered", None, g)?;
        ConstGauge::new(s.entries.len() as i64).encode(m)?;
        let per = [
            ("kecho_registry_channel_sources", "Sources in the channel, as last reported by its contact"),
            ("kecho_registry_channel_sinks", "Sinks in the channel, as last reported by its contact"),
            ("kecho_registry_channel_lease_remaining_seconds", "Seconds until the contact's lease expires"),
        ];
        for (i, (name, help)) in per.into_iter().enumerate() {
            let mut m = enc.encode_descriptor(name, help, None, g)?;
            for (ch, sources, sinks, lease) in &s.entries {
                let labels = [("channel", ch.as_str())];
                let fam = m.encode_family(&labels)?;
                match i {
                    0 => ConstGauge::new(i64::from(*sources)).encode(fam)?,
                    1 => ConstGauge::new(i64::from(*sinks)).encode(fam)?,
                    _ => ConstGauge::new(*lease as f64 / 1000.0).encode(fam)?,
                }
            }
        }
        Ok(())
    }
}
