//! Simulations of a Shoal fleet: what a tester replays before it happens in
//! the field.
//!
//! - [`sim`] and [`scenario`]: the deterministic partition simulator over
//!   the shipped daemon core (`daemon::core::Core`, with the real sync
//!   engine inside) — `shoal sim run`.
//! - [`tour`]: a scripted walk through the foundation (signed documents,
//!   offline edits, bundles, conflicts).
//! - [`udp_link`]: a user-space UDP link with delay, jitter, loss and cuts,
//!   for real processes speaking real QUIC (the kernel here has no netem):
//!   test support for `shoal demo`, `tests/` and the mesh bench; the edge
//!   node does not depend on this crate.
//!
//! ```no_run
//! let dir = std::env::temp_dir().join("shoal-tour");
//! let mut out = Vec::new();
//! simulations::tour::run(&dir, &mut out).unwrap();
//! ```

pub mod scenario;
pub mod sim;
pub mod tour;
pub mod udp_link;
