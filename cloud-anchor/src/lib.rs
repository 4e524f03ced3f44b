//! The cloud anchor: what runs in the cloud and steers the fleet.
//!
//! - [`daemon`]: `shoal anchor run`, the anchor's composition over the
//!   shared driver and core in the `daemon` crate: it holds every document,
//!   answers enrollment, serves circuit relay, owns a [`view::View`] and
//!   publishes [`view::Snapshot`]s that [`api`] serves, and carries out the
//!   commands the API sends it (`daemon::command`).
//! - [`api`]: the operator HTTP API, the web UI and metrics.
//! - [`export`]: what came up from the nodes, copied to PostgreSQL.
//! - [`view`]: the read model the API answers from.
//! - [`series`]: a series that came up from a node, shaped for a chart.
//! - [`tokens`]: operator tokens.
//! - [`keys`]: invitations for operators' browser keys (ADR 0015).
//! - [`client`]: the CLI's side of the API (`--anchor URL`).
//! - [`replica`]: seeding anchor replicas' data dirs.
//!
//! The edge node is a sibling (`node`); neither depends on the other.

pub mod api;
pub mod client;
pub mod daemon;
pub mod export;
pub mod keys;
pub mod replica;
pub mod series;
pub mod tokens;
pub mod view;

pub use api::{ApiError, Demo, Server};
pub use view::{Snapshot, View};
