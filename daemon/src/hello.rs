//! What a peer says on `/shoal/hello/1`: its fleet and its certificate.
//! Admission checks that the certificate is the fleet root's, unrevoked,
//! and for the very key the peer proved in its transport handshake.

use crdt_state::{Certificate, PublicKey, Trust};
use serde::{Deserialize, Serialize};

/// The largest hello accepted (a certificate is a few hundred bytes).
pub const MAX_HELLO: usize = 64 << 10;

/// The hello message (JSON).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    /// Format version (1).
    pub v: u32,
    /// The fleet root key.
    pub fleet: PublicKey,
    /// The peer's certificate.
    pub cert: Certificate,
}

/// Encodes our hello.
pub fn encode(fleet: PublicKey, cert: &Certificate) -> Vec<u8> {
    serde_json::to_vec(&Hello {
        v: 1,
        fleet,
        cert: cert.clone(),
    })
    .unwrap_or_default()
}

/// Decides on a peer's hello: its certificate if it may join. `proves`
/// says whether the connection's handshake proved a key (on the mesh: the
/// key a peer id embeds).
pub fn check(
    trust: &Trust,
    proves: &dyn Fn(&PublicKey) -> bool,
    bytes: &[u8],
) -> Result<Certificate, String> {
    if bytes.len() > MAX_HELLO {
        return Err(format!("hello of {} bytes is too large", bytes.len()));
    }
    let hello: Hello =
        serde_json::from_slice(bytes).map_err(|e| format!("malformed hello: {e}"))?;
    if hello.v != 1 {
        return Err(format!("hello version {} is not supported", hello.v));
    }
    if hello.fleet != trust.root() {
        return Err(format!(
            "belongs to fleet {}, not {}",
            hello.fleet.short(),
            trust.root().short()
        ));
    }
    // One the trust holds was checked when it was added: a reconnection
    // costs no signature check.
    trust
        .check(&hello.cert)
        .map_err(|e| format!("certificate of {:?}: {e}", hello.cert.name))?;
    if hello.cert.role == crdt_state::Role::Issuer {
        return Err(format!(
            "{:?} is an issuer's certificate: issuers certify nodes, they are no peers",
            hello.cert.name
        ));
    }
    if !proves(&hello.cert.key) {
        return Err(format!(
            "certificate of {:?} is for another key than the connection's",
            hello.cert.name
        ));
    }
    if trust.is_revoked(&hello.cert.key) {
        return Err(format!("certificate of {:?} is revoked", hello.cert.name));
    }
    Ok(hello.cert)
}

/// Decides on a hello on the mesh: the key a connection proved is the one
/// its libp2p peer id embeds.
#[cfg(feature = "driver")]
pub fn check_on_mesh(
    trust: &Trust,
    peer: &mesh::PeerId,
    bytes: &[u8],
) -> Result<Certificate, String> {
    let proven = mesh::key_of(peer);
    check(trust, &|k| Some(k.0) == proven, bytes)
}
