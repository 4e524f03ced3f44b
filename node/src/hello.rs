//! The hello on the mesh: [`daemon::hello`] with the key a connection
//! proved being the one its libp2p peer id embeds.

use crdt_state::{Certificate, Trust};

pub use daemon::hello::{Hello, encode};

/// Decides on a peer's hello on the mesh: its certificate if it may join.
pub fn check(trust: &Trust, peer: &mesh::PeerId, bytes: &[u8]) -> Result<Certificate, String> {
    daemon::hello::check(trust, &|k| mesh::peer_id_of(&k.0) == Some(*peer), bytes)
}
