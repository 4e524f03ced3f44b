//! The fleet's state: signed Automerge documents, the fleet model written in
//! them, and what a node keeps on its own disk.
//!
//! Three parts, each a module:
//!
//! - [`signed`]: the signed-CRDT core. Documents ([`signed::doc`]), identities
//!   and certificates ([`signed::identity`]), verification of every change
//!   against the fleet's certificates ([`signed::verify`]), the sans-IO sync
//!   engine ([`signed::sync`]) and its wire format ([`signed::wire`]), offline
//!   bundles ([`signed::bundle`]). It knows nothing of apps or nodes.
//! - [`fleet`]: what the documents mean. The model of apps, configs, nodes
//!   and sites ([`fleet::model`]), the YAML manifests operators write
//!   ([`fleet::manifest`]), which node runs what ([`fleet::placement`]),
//!   device profiles and the register codec ([`fleet::device`]).
//! - [`local`]: node-local storage. The redb store of documents, sync states
//!   and chunks ([`local::store`]), device readings ([`local::readings`]),
//!   and the data dir that ties a store to an identity ([`local::datadir`]).
//!
//! Every document is an Automerge map with one key per field; every change
//! is signed by its writer and verified against the fleet's certificates
//! before it is applied. This crate does no network I/O and reads no clock:
//! time is passed in.
//!
//! ```no_run
//! use crdt_state::{DataDir, fleet::manifest};
//! # fn main() -> Result<(), crdt_state::Error> {
//! let dir = std::path::Path::new("/tmp/fleet");
//! let mut fleet = DataDir::init(dir, "demo", 0)?;
//! let ms = manifest::parse("app.yaml", "apiVersion: shoal.dev/v1\nkind: Config\nmetadata: {name: c}\nspec: {data: {k: v}}\n")?;
//! fleet.apply(&ms, 0)?;
//! assert!(fleet.fleet()?.configs.contains_key("c"));
//! # Ok(()) }
//! ```

pub mod error;
#[doc(hidden)]
pub mod fuzz;
pub mod panics;

pub mod signed {
    //! The signed-CRDT core: documents, identities, verification, sync, the
    //! wire format and bundles.
    pub mod bundle;
    pub mod doc;
    pub mod identity;
    pub mod sync;
    pub mod verify;
    pub mod wire;
}

pub mod fleet {
    //! The fleet model written in the signed documents: entities,
    //! manifests, placement, device profiles.
    pub mod device;
    pub mod manifest;
    pub mod model;
    pub mod placement;
    pub mod rollout;
}

pub mod local {
    //! What a node keeps on its own disk: the store, readings, the data dir;
    //! what an anchor keeps of the data that came up (`landing`) and of
    //! what it saw (`audit`).
    pub mod audit;
    pub mod datadir;
    pub mod landing;
    pub mod readings;
    pub mod store;
}

pub use error::{Error, Result};
pub use local::datadir::DataDir;
pub use local::store::{Store, StoreConfig};
pub use signed::doc::{DocId, Document, SignedChange};
pub use signed::identity::{Certificate, Identity, PublicKey, Role};
pub use signed::verify::Trust;
