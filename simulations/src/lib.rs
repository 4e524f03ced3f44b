//! Simulations of a Shoal fleet.
//!
//! Today this crate holds the [`tour`]: a scripted walk through the
//! foundation (signed documents, offline edits, bundles, conflicts) that
//! `shoal demo` runs. The deterministic partition simulator over the sync
//! engine, and the real-process harness in network namespaces, will live
//! here too.
//!
//! ```no_run
//! let dir = std::env::temp_dir().join("shoal-tour");
//! let mut out = Vec::new();
//! simulations::tour::run(&dir, &mut out).unwrap();
//! ```

pub mod scenario;
pub mod sim;
pub mod tour;
