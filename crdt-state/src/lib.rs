//! The fleet's state: Shoal's model on Automerge, signed changes, the redb
//! store and offline bundles.
//!
//! Every document is an Automerge map with one key per field; every change
//! is signed by its writer and verified against the fleet's certificates
//! before it is applied. This crate does no network I/O and reads no clock:
//! time is passed in.
//!
//! ```no_run
//! use crdt_state::{DataDir, manifest};
//! # fn main() -> Result<(), crdt_state::Error> {
//! let dir = std::path::Path::new("/tmp/fleet");
//! let mut fleet = DataDir::init(dir, "demo", 0)?;
//! let ms = manifest::parse("app.yaml", "apiVersion: shoal.dev/v1\nkind: Config\nmetadata: {name: c}\nspec: {data: {k: v}}\n")?;
//! fleet.apply(&ms, 0)?;
//! assert!(fleet.fleet()?.configs.contains_key("c"));
//! # Ok(()) }
//! ```

pub mod bundle;
pub mod datadir;
pub mod device;
pub mod doc;
pub mod error;
pub mod identity;
pub mod manifest;
pub mod model;
pub mod panics;
pub mod placement;
pub mod readings;
pub mod render;
pub mod store;
pub mod sync;
pub mod verify;
pub mod wire;

pub use datadir::DataDir;
pub use doc::{DocId, Document, SignedChange};
pub use error::{Error, Result};
pub use identity::{Certificate, Identity, PublicKey, Role};
pub use store::{Store, StoreConfig};
pub use verify::Trust;
