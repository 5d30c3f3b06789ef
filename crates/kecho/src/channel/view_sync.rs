//! Tree mode's anti-entropy of membership (docs/SCALE.md, "Membership in tree mode"). The overlay broadcasts each
//! member's snapshot once per version; a member that missed a broadcast (its process stalled on a loaded host past
//! the overlay's loss timer, a graft that failed, a joiner not yet in the overlay when the broadcast passed) would
//! never learn it, and a member taken for gone by a neighbour would stay dropped where its answer did not arrive.
//! So every [`SYNC_EVERY`] a node in tree mode sends one overlay neighbour, at random, the digest of its view
//! (`ChannelState::sync_with`: a count and an order-independent hash of (node, snapshot version)); where the digests
//! differ, the two exchange their lists of (node, version, departed) and then only what the other lacks. The
//! decisions are in `kecho_proto::membership` (simulated in `kecho-proto/tests/tree_membership_sim.rs`); this file
//! only times them.

use std::sync::Arc;
use std::time::Duration;

use super::ChannelInner;

/// How often a node in tree mode compares its view with a neighbour's.
pub(super) const SYNC_EVERY: Duration = Duration::from_secs(1);

impl ChannelInner {
    /// Sends a random overlay neighbour that is a member the digest of this node's view.
    pub(super) fn tree_sync(self: &Arc<Self>) {
        let mut neighbours = self.tree_neighbours();
        if neighbours.is_empty() {
            return;
        }
        let mut st = self.state.lock();
        neighbours.retain(|n| st.peers().contains_key(n));
        if neighbours.is_empty() {
            return;
        }
        let to = neighbours[rand::random::<usize>() % neighbours.len()];
        st.sync_with(to, crate::clock::now());
        drop(st);
        self.flush();
    }
}
