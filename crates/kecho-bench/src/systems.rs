//! The systems compared in one run: kecho, raw TCP, and with the `peers` feature NATS and Zenoh.

use anyhow::Result;

use crate::pipe::{AnyRx, AnyTx};
use crate::BenchArgs;

/// A system under measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum System {
    /// kecho itself.
    Kecho,
    /// A plain TCP socket: the floor.
    RawTcp,
    /// NATS through a local nats-server.
    #[cfg(feature = "peers")]
    Nats,
    /// Zenoh in peer mode over loopback TCP.
    #[cfg(feature = "peers")]
    Zenoh,
}

impl System {
    /// Display name.
    pub fn name(self) -> &'static str {
        match self {
            System::Kecho => "kecho",
            System::RawTcp => "raw TCP",
            #[cfg(feature = "peers")]
            System::Nats => "NATS",
            #[cfg(feature = "peers")]
            System::Zenoh => "Zenoh",
        }
    }
}

/// The systems available in this run, and what the peers need (a nats-server process).
pub struct Systems {
    /// In the order measured.
    pub list: Vec<System>,
    /// Why a peer is missing, if one is.
    pub notes: Vec<String>,
    #[cfg(feature = "peers")]
    peers: crate::peers::Peers,
}

impl Systems {
    /// Starts what the peers need. Must be called inside a runtime.
    pub async fn start(args: &BenchArgs) -> Self {
        let mut list = vec![System::Kecho];
        let mut notes = Vec::new();
        if args.no_peers {
            return Systems {
                list,
                notes,
                #[cfg(feature = "peers")]
                peers: crate::peers::Peers::none(),
            };
        }
        list.push(System::RawTcp);
        #[cfg(feature = "peers")]
        let peers = {
            let p = crate::peers::Peers::start().await;
            if p.nats_available() {
                list.push(System::Nats);
            }
            list.push(System::Zenoh);
            notes.extend(p.notes.iter().cloned());
            p
        };
        #[cfg(not(feature = "peers"))]
        notes.push("NATS and Zenoh not measured: built without the `peers` feature (scripts/bench-peers.sh).".into());
        Systems {
            list,
            notes,
            #[cfg(feature = "peers")]
            peers,
        }
    }

    /// Two directions between two endpoints: (A->B sender, A's receiver, B->A sender, B's receiver).
    pub async fn pair(&self, s: System) -> Result<(AnyTx, AnyRx, AnyTx, AnyRx)> {
        match s {
            System::Kecho => crate::pipe::kecho_pair().await,
            System::RawTcp => crate::rawtcp::pair().await,
            #[cfg(feature = "peers")]
            System::Nats => self.peers.nats_pair().await,
            #[cfg(feature = "peers")]
            System::Zenoh => self.peers.zenoh_pair().await,
        }
    }

    /// `sources` senders and `sinks` receivers; see [`crate::pipe::kecho_topology`].
    pub async fn topology(
        &self,
        s: System,
        sources: usize,
        sinks: usize,
        size: usize,
    ) -> Result<(Vec<AnyTx>, Vec<AnyRx>, u64)> {
        match s {
            System::Kecho => crate::pipe::kecho_topology(sources, sinks, size).await,
            System::RawTcp => crate::rawtcp::topology(sources, sinks).await,
            #[cfg(feature = "peers")]
            System::Nats => self.peers.nats_topology(sources, sinks).await,
            #[cfg(feature = "peers")]
            System::Zenoh => self.peers.zenoh_topology(sources, sinks).await,
        }
    }

    /// Stops what [`Systems::start`] started.
    pub async fn stop(self) {
        #[cfg(feature = "peers")]
        self.peers.stop().await;
    }
}
