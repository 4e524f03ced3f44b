//! The cloud anchor's operator surface: the HTTP API, the web UI, metrics
//! and operator tokens.
//!
//! The anchor's mesh role (holding every document, enrollment, relay) is
//! the daemon in `node`; it owns a [`view::View`], publishes
//! [`view::Snapshot`]s that [`api`] serves, and carries out the
//! [`api::Command`]s the API sends it. This crate touches no store and no
//! network but its own HTTP listener.

pub mod api;
pub mod client;
pub mod tokens;
pub mod view;

pub use api::{Answer, ApiError, Command, Demo, Incoming, Server};
pub use view::{Snapshot, View};
