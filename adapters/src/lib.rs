//! Field adapters: Modbus TCP/RTU and OPC UA.
//!
//! Not built yet. Devices described by profiles (EdgeX/KubeEdge style),
//! polled on schedules into a bounded local readings store, with setpoints
//! written from desired state. Does not depend on `crdt-state` or `mesh`.
