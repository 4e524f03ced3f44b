//! The edge node daemon (and, for now, the anchor's): the store, the sync
//! engine and the mesh in one loop, enrollment, and the control socket
//! through which the CLI reaches a running daemon.
//!
//! - [`daemon`]: `shoal node run` / `shoal anchor run`.
//! - [`hello`]: what peers say on `/shoal/hello/1`, and admission.
//! - [`enroll`]: tokens, `/shoal/enroll/1`, offline node bundles.
//! - [`control`]: CLI verbs on a data dir, directly or over the socket.
//! - [`runtime`]: where the node's share runs (the native supervisor).
//! - [`site_api`]: the node's view and site edits for field engineers on the LAN.
//! - [`replica`]: seeding anchor replicas' data dirs.
//! - [`demo`], [`demo_app`]: `shoal demo` and its sample app.
//!
//! The anchor's HTTP API and UI live in `cloud-anchor`.

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

pub mod control;
pub mod daemon;
pub mod demo;
pub mod demo_app;
pub mod device_cli;
pub mod devices;
pub mod enroll;
pub mod hello;
pub mod replica;
pub mod runtime;
pub mod site_api;
