//! The edge node daemon.
//!
//! Not built yet. `shoal node run` will open the store, join the mesh,
//! compute the node's share (`crdt_state::placement::share`), reconcile it to
//! a runtime (native processes by default, or K3s) and report back into the
//! node's own document. It composes `crdt-state`, `mesh` and `adapters`.
