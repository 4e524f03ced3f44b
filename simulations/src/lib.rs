//! Simulations of a Shoal fleet.
//!
//! - [`sim`] and [`scenario`]: the deterministic partition simulator over
//!   the real sync engine (`shoal sim run`).
//! - [`tour`]: a scripted walk through the foundation (signed documents,
//!   offline edits, bundles, conflicts).
//! - [`udp_link`]: a user-space UDP link with delay, jitter, loss and cuts,
//!   for real processes speaking real QUIC (the kernel here has no netem).
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
