//! Content-addressed blobs: the large files Shoal carries to the edge
//! (AI models, firmware, datasets), named by their BLAKE3 hash.
//!
//! - [`tree`]: BLAKE3 cut at 16 KiB groups; every group is checked before
//!   it is written.

pub mod tree;
