//! Data up from the edge: what a node produces (device readings, records
//! its apps post) travels to an anchor in signed batches.
//!
//! - [`batch`]: the batch format: per series, the records' sequence
//!   numbers, times and values in columns (run-length deltas; numbers as
//!   scaled decimal deltas), signed by the node that produced them, decoded
//!   within fixed bounds.
//! - [`outbox`]: the node's side of the stream: what to read from its
//!   outbox next, live first, and what an answer settles.
//! - [`wire`]: `/shoal/data/1`, batches up and acknowledgements (the
//!   sequence numbers committed) or refusals down.
//!
//! The crate is sans-IO and depends on nothing of Shoal's: the caller signs
//! and verifies with the node's key (`crdt-state`), stores (redb, the
//! anchor's store, PostgreSQL) and moves the bytes (`mesh`).
#![forbid(unsafe_code)]

pub mod batch;
mod codec;
pub mod outbox;
pub mod wire;
