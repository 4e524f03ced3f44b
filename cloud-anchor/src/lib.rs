//! The cloud anchor: an always-on peer with the same engine and store.
//!
//! Not built yet. It will add the operator HTTP API and web UI, the relay
//! server for nodes behind NAT, and Prometheus metrics.
