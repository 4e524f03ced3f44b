//! The edge node: what runs on a substation or a factory line.
//!
//! - [`daemon`]: `shoal node run`, the node's composition over the shared
//!   driver and core in the `daemon` crate.
//! - [`runtime`]: where the node's share runs (native processes, K3s).
//! - [`devices`]: polling field devices and writing their setpoints.
//! - [`site_api`]: the node's view, site edits and device routes on the LAN.
//! - [`device_cli`]: `shoal device …` against a node's site API.
//! - [`demo_app`]: the sample app `shoal demo` runs.
//!
//! The anchor is a sibling (`cloud-anchor`); neither depends on the other.

pub use ::daemon::say;

pub mod daemon;
pub mod demo_app;
pub mod device_cli;
pub mod devices;
pub mod runtime;
pub mod site_api;
