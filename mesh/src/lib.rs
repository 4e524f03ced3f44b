//! The mesh: libp2p over QUIC between Shoal peers.
//!
//! Not built yet. It will carry framed bytes on named protocols
//! (`/shoal/hello/1` certificate exchange, `/shoal/sync/1` sync envelopes,
//! `/shoal/blob/1` artifact ranges), discover peers (mDNS on the substation
//! LAN, bootstrap addresses for anchors), relay through anchors and redial
//! with backoff. It knows no documents and does not depend on `crdt-state`.
