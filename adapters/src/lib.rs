//! Field adapters: how a node talks to the equipment in its cabinet.
//!
//! One [`FieldAdapter`] trait, the seam between the node's one polling loop
//! and a protocol: plan the reads of a set of resources once, poll a plan
//! (every resource gets its value or why not), write a setpoint and read it
//! back. Two implementations: [`modbus::Modbus`], over TCP and RTU (serial,
//! through `tokio-serial`; no libudev), which merges neighbouring registers
//! into requests and decodes them with the register codec of
//! `crdt_state::fleet::device`; and [`opcua::OpcUa`], which reads and writes
//! variables by node id (OPC UA has no tables). The device model (profiles,
//! resources, the Modbus [`Table`], values, the codec) is `crdt-state`'s,
//! defined once there; this crate adds the I/O and does not depend on
//! `mesh`.
//!
//! ```no_run
//! use adapters::FieldAdapter;
//! use adapters::modbus::{Modbus, Target};
//!
//! # async fn f(profile: crdt_state::fleet::device::DeviceProfileSpec) {
//! let target = Target::Tcp { host: "10.0.0.7".into(), port: 502 };
//! let mut dev = Modbus::new(target, 1, std::time::Duration::from_secs(1));
//! let all: Vec<usize> = (0..profile.resources.len()).collect();
//! if let Some(plan) = dev.plan(&profile, &all) {
//!     let polled = dev.poll(&profile, &plan).await;
//!     println!("{:?} (failure: {:?})", polled.values, polled.error);
//! }
//! # }
//! ```
//!
//! tokio-modbus has no timeouts of its own: every call here has one, and a
//! call that timed out or failed on the transport drops the connection, so
//! the next call reconnects (a late answer can never be taken for the
//! answer to a later request). Modbus exceptions (illegal address, busy,
//! device failure) are answers, not failures: the connection stays.

pub mod modbus;
pub mod opcua;

use std::future::Future;
use std::time::Duration;

pub use crdt_state::fleet::device::Table;
use crdt_state::fleet::device::{DeviceProfileSpec, Resource, Value};

/// What a read returns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Words {
    /// Registers.
    Registers(Vec<u16>),
    /// Bits.
    Bits(Vec<bool>),
}

/// Why a device call failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// No answer in time (the connection is dropped and remade).
    #[error("no answer within {} ms", .0.as_millis())]
    Timeout(Duration),
    /// The device answered with a Modbus exception.
    #[error("Modbus exception {code:#04x} ({})", exception_name(*.code))]
    Exception {
        /// The exception code.
        code: u8,
    },
    /// It could not be reached.
    #[error("cannot connect: {0}")]
    Connect(String),
    /// The transport failed mid-call.
    #[error("transport: {0}")]
    Io(String),
    /// A request the protocol cannot carry.
    #[error("{0}")]
    Invalid(String),
    /// The device refused the request (an OPC UA bad status).
    #[error("refused: {0}")]
    Refused(String),
}

impl DeviceError {
    /// Whether the device itself answered (it is online).
    pub fn device_answered(&self) -> bool {
        matches!(
            self,
            DeviceError::Exception { .. } | DeviceError::Refused(_)
        )
    }
}

/// Words for people for a Modbus exception code.
pub fn exception_name(code: u8) -> &'static str {
    match code {
        0x01 => "illegal function",
        0x02 => "illegal data address",
        0x03 => "illegal data value",
        0x04 => "server device failure",
        0x05 => "acknowledge",
        0x06 => "server device busy",
        0x08 => "memory parity error",
        0x0A => "gateway path unavailable",
        0x0B => "gateway target device failed to respond",
        _ => "unknown exception",
    }
}

/// Why a setpoint was not applied.
#[derive(Debug, thiserror::Error)]
pub enum SetpointError {
    /// Refused before or after the device call: no such resource,
    /// read-only, outside its limits, a value its type cannot hold, an
    /// answer that does not decode.
    #[error("{0}")]
    Refused(String),
    /// The device call failed, or the device refused it.
    #[error("{0}")]
    Device(DeviceError),
    /// The device took the write but reads back another value.
    #[error("read back {0:?}, not the value written")]
    Mismatch(Value),
}

impl SetpointError {
    /// Whether the device was not reached (the setpoint is tried again
    /// with the next round of polls; nothing is reported for it).
    pub fn unreachable(&self) -> bool {
        matches!(self, SetpointError::Device(e) if !e.device_answered())
    }

    /// A device call's failure; a request the protocol cannot carry is a
    /// refusal of the setpoint, not a device that did not answer.
    pub(crate) fn device(e: DeviceError) -> SetpointError {
        match e {
            DeviceError::Invalid(m) => SetpointError::Refused(m),
            e => SetpointError::Device(e),
        }
    }
}

/// What one poll of a plan gave.
#[derive(Debug, Default, PartialEq)]
pub struct Polled {
    /// Per resource (by name), its value or why it has none. A transport
    /// failure ends the poll: resources after it are left out.
    pub values: Vec<(String, Result<Value, String>)>,
    /// The last failure of a whole request, if any (a transport failure
    /// is always the last).
    pub error: Option<DeviceError>,
}

impl Polled {
    /// Whether the device was not reached: a transport failure and not a
    /// single value read.
    pub fn unreachable(&self) -> bool {
        self.error.as_ref().is_some_and(|e| !e.device_answered())
            && !self.values.iter().any(|(_, v)| v.is_ok())
    }
}

/// One device's protocol client, as the node's polling loop drives it.
///
/// Resources are indexes into the profile's `resources`. The loop groups
/// them by poll interval, asks for a plan per group once, polls the plans
/// on schedule and writes setpoints; reachability, backoff and missed polls
/// are the loop's, the same for every protocol.
pub trait FieldAdapter: Send {
    /// A planned read of some resources (made once, polled many times).
    type Plan: Send + Sync;

    /// The protocol's name, for logs.
    fn protocol(&self) -> &'static str;

    /// Plans reading `members` of `profile` together; None when this
    /// protocol reads none of them (a Modbus client skips resources with
    /// no table, an OPC UA client those with no node id).
    fn plan(&self, profile: &DeviceProfileSpec, members: &[usize]) -> Option<Self::Plan>;

    /// Reads a plan's resources.
    fn poll(
        &mut self,
        profile: &DeviceProfileSpec,
        plan: &Self::Plan,
    ) -> impl Future<Output = Polled> + Send;

    /// Checks `value` against `resource` (access, limits, type), writes it,
    /// and returns the value read back.
    fn write_setpoint(
        &mut self,
        resource: &Resource,
        value: &serde_json::Value,
    ) -> impl Future<Output = Result<Value, SetpointError>> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreachable_only_when_the_device_did_not_answer() {
        let refused = || Err("transport: reset".to_string());
        let cut = Polled {
            values: vec![("a".into(), refused())],
            error: Some(DeviceError::Io("reset".into())),
        };
        assert!(cut.unreachable());
        // A value read before the transport failed: it answered.
        let partial = Polled {
            values: vec![("a".into(), Ok(Value::Int(1))), ("b".into(), refused())],
            error: Some(DeviceError::Io("reset".into())),
        };
        assert!(!partial.unreachable());
        // An exception is an answer.
        let exception = Polled {
            values: vec![("a".into(), Err("Modbus exception 0x02".into()))],
            error: Some(DeviceError::Exception { code: 2 }),
        };
        assert!(!exception.unreachable());

        let timeout = SetpointError::device(DeviceError::Timeout(Duration::from_secs(1)));
        assert!(timeout.unreachable());
        assert!(
            !SetpointError::device(DeviceError::Refused("OPC UA BadTypeMismatch".into()))
                .unreachable()
        );
        // A value the protocol cannot carry is the setpoint's fault: reported, not retried.
        let invalid = SetpointError::device(DeviceError::Invalid("300 does not fit".into()));
        assert!(!invalid.unreachable());
        assert_eq!(invalid.to_string(), "300 does not fit");
    }
}
