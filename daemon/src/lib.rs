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
//! - [`render`]: the tables and YAML/JSON the CLI prints, here or from an
//!   anchor.
//!
//! With the `driver` feature (the node and the anchor; not the simulator):
//!
//! - [`driver`]: the mesh, the store and the control socket around a core.
//! - [`artifact`]: `shoal artifact push|import` into a data dir's blobs.
//! - [`blobs`]: `/shoal/blob/1` served from the blob store, and the
//!   fetches of the blobs this daemon wants.
//! - [`command`]: the one command surface: every request from the control
//!   socket, the operator API and the site API, who may make it, and its
//!   one handler.
//! - [`control`]: CLI verbs on a data dir, directly or over the socket.
//! - [`data_up`]: `/shoal/data/1`: a node's stream of its outbox to an
//!   anchor, an anchor's landing of what its nodes send.
//! - [`enroll`]: tokens, `/shoal/enroll/1` (both ends), offline node
//!   bundles, the peer and address files.

/// Prints a line on standard output, ignoring a closed stdout (a daemon
/// whose reader went away must keep running, not panic).
#[macro_export]
macro_rules! say {
    () => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout());
    }};
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

pub mod core;
pub mod data;
pub mod gates;
pub mod hello;
pub mod render;

#[cfg(feature = "driver")]
pub mod artifact;
#[cfg(feature = "driver")]
pub mod blobs;
#[cfg(feature = "driver")]
pub mod command;
#[cfg(feature = "driver")]
pub mod control;
#[cfg(feature = "driver")]
pub mod data_up;
#[cfg(feature = "driver")]
pub mod driver;
#[cfg(feature = "driver")]
pub mod enroll;
#[cfg(feature = "driver")]
pub mod tls;

pub use crate::core::{Action, Arrival, Core, Now, Settings};
