//! What a Shoal node and a Shoal anchor share: the daemon core.
//!
//! [`core::Core`] decides everything a daemon decides — admission of peers
//! at the hello, which changes are committed before which frames leave,
//! when sync states and the peer list are saved, when a node reconciles and
//! writes its report, what goes to the timeline and the security log — from
//! events and the time it is given, and answers with [`core::Action`]s. It
//! owns no socket, no file and no clock: the edge node's driver (`node`),
//! the anchor's (`cloud-anchor`) and the simulator (`simulations`) carry
//! out its actions, each with its own I/O, so what the simulator tests is
//! what ships.
//!
//! - [`core`]: the core, its events and actions.
//! - [`hello`]: what peers say on `/shoal/hello/1`, and the admission check.

pub mod core;
pub mod hello;

pub use crate::core::{Action, Arrival, Core, Now, Settings};
