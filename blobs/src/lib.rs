//! Content-addressed blobs: the large files Shoal carries to the edge
//! (AI models, firmware, datasets), named by their BLAKE3 hash.
//!
//! - [`tree`]: BLAKE3 cut at 16 KiB groups; every group is checked before
//!   it is written.
//! - [`store`]: whole and partial blobs on disk, resumed after a crash by
//!   hashing what reached the file; a quota.
//! - [`wire`]: the bounded requests and answers of `/shoal/blob/1`.
//! - [`fetch`]: which groups to ask of which peer (sans-IO).

pub mod fetch;
pub mod store;
pub mod tree;
pub mod wire;

pub use store::{BlobStore, Hash, Partial};
pub use tree::{Cvs, GROUP};

/// Pseudo-random bytes for tests (xorshift): no two groups alike.
#[cfg(test)]
pub(crate) fn test_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ seed;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
