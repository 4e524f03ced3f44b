//! Runtimes: where a node's share of the work runs.
//!
//! The daemon computes the node's share (`crdt_state::fleet::placement::share`)
//! and hands it to a [`Runtime`] on every change and on a timer; the
//! runtime makes what runs match and tells how each workload stands. Reports
//! go into the node's own document only when they change.

pub mod kube;
pub mod native;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;

use crdt_state::fleet::model::WorkloadReport;
use crdt_state::fleet::placement::Workload;

/// A place workloads run.
pub trait Runtime: Send {
    /// Makes what runs match `desired` (start, restart with a new spec,
    /// stop what is no longer desired). Returns at once; the work goes on
    /// in the background.
    fn reconcile(&mut self, desired: &[Workload]);

    /// How each workload stands now.
    fn status(&self) -> BTreeMap<String, WorkloadReport>;

    /// Stops every workload that should not outlive the node, and waits.
    fn shutdown(&mut self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}
