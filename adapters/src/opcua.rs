//! OPC UA (binary, security mode None, anonymous) through the maintained
//! `async-opcua` client: read and write variables by node id, browse.
//! Values travel as [`Scalar`]s; a server's refusal (`BadTypeMismatch`,
//! `BadUserAccessDenied`, …) is reported with its status name. Every call
//! has the device's timeout; a timed-out or broken session is dropped and
//! made again on the next call.
//!
//! Its [`FieldAdapter`]: the resources of a plan read in one request by
//! node id, values scaled with the profile (`crdt_state::fleet::device::scaled`),
//! setpoints unscaled, written as the resource's raw type and read back.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crdt_state::fleet::device::{self, DeviceProfileSpec, Resource, Value, ValueType};
use opcua::client::{ClientBuilder, IdentityToken, Session};
use opcua::types::{
    AttributeId, BrowseDescription, BrowseDirection, BrowseResultMask, DataValue,
    EndpointDescription, MessageSecurityMode, NodeId, NumericRange, ReadValueId, ReferenceTypeId,
    TimestampsToReturn, UserTokenPolicy, Variant, WriteValue,
};
use tokio::time::timeout;

use crate::{DeviceError, FieldAdapter, Polled, SetpointError};

/// A value as OPC UA carries it, in the shapes a profile can name.
#[derive(Clone, Debug, PartialEq)]
pub enum Scalar {
    /// Boolean.
    Bool(bool),
    /// Any signed or unsigned integer that fits i64.
    Int(i64),
    /// Float or Double.
    Float(f64),
    /// String.
    Text(String),
}

/// The OPC UA type to write a value as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Boolean.
    Boolean,
    /// Int16.
    Int16,
    /// UInt16.
    UInt16,
    /// Int32.
    Int32,
    /// UInt32.
    UInt32,
    /// Int64.
    Int64,
    /// UInt64.
    UInt64,
    /// Float.
    Float,
    /// Double.
    Double,
    /// String.
    String,
}

fn scalar(v: &Variant) -> Result<Scalar, String> {
    Ok(match v {
        Variant::Boolean(b) => Scalar::Bool(*b),
        Variant::SByte(x) => Scalar::Int(i64::from(*x)),
        Variant::Byte(x) => Scalar::Int(i64::from(*x)),
        Variant::Int16(x) => Scalar::Int(i64::from(*x)),
        Variant::UInt16(x) => Scalar::Int(i64::from(*x)),
        Variant::Int32(x) => Scalar::Int(i64::from(*x)),
        Variant::UInt32(x) => Scalar::Int(i64::from(*x)),
        Variant::Int64(x) => Scalar::Int(*x),
        Variant::UInt64(x) => {
            Scalar::Int(i64::try_from(*x).map_err(|_| format!("{x} exceeds i64"))?)
        }
        Variant::Float(x) => Scalar::Float(f64::from(*x)),
        Variant::Double(x) => Scalar::Float(*x),
        Variant::String(s) => Scalar::Text(s.value().clone().unwrap_or_default()),
        Variant::Empty => return Err("the variable holds no value".into()),
        other => return Err(format!("unsupported value type {:?}", other.type_id())),
    })
}

fn variant(v: &Scalar, kind: Kind) -> Result<Variant, String> {
    let int = |v: &Scalar| -> Result<i64, String> {
        match v {
            Scalar::Int(i) => Ok(*i),
            Scalar::Float(f) if f.fract() == 0.0 => Ok(*f as i64),
            other => Err(format!("{other:?} is not an integer")),
        }
    };
    let num = |v: &Scalar| -> Result<f64, String> {
        match v {
            Scalar::Int(i) => Ok(*i as f64),
            Scalar::Float(f) => Ok(*f),
            other => Err(format!("{other:?} is not a number")),
        }
    };
    let fit = |e: std::num::TryFromIntError| e.to_string();
    Ok(match kind {
        Kind::Boolean => match v {
            Scalar::Bool(b) => Variant::Boolean(*b),
            other => return Err(format!("{other:?} is not a bool")),
        },
        Kind::Int16 => Variant::Int16(i16::try_from(int(v)?).map_err(fit)?),
        Kind::UInt16 => Variant::UInt16(u16::try_from(int(v)?).map_err(fit)?),
        Kind::Int32 => Variant::Int32(i32::try_from(int(v)?).map_err(fit)?),
        Kind::UInt32 => Variant::UInt32(u32::try_from(int(v)?).map_err(fit)?),
        Kind::Int64 => Variant::Int64(int(v)?),
        Kind::UInt64 => Variant::UInt64(u64::try_from(int(v)?).map_err(fit)?),
        Kind::Float => Variant::Float(num(v)? as f32),
        Kind::Double => Variant::Double(num(v)?),
        Kind::String => match v {
            Scalar::Text(s) => Variant::String(s.clone().into()),
            other => return Err(format!("{other:?} is not text")),
        },
    })
}

/// Parses `ns=2;s=Name` (and the other OPC UA node id forms).
pub fn node_id(text: &str) -> Result<NodeId, DeviceError> {
    text.parse::<NodeId>()
        .map_err(|e| DeviceError::Invalid(format!("node id {text:?}: {e}")))
}

/// One OPC UA server.
pub struct OpcUa {
    endpoint: String,
    limit: Duration,
    pki: PathBuf,
    session: Option<(
        Arc<Session>,
        tokio::task::JoinHandle<opcua::types::StatusCode>,
    )>,
}

impl std::fmt::Debug for OpcUa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpcUa")
            .field("endpoint", &self.endpoint)
            .field("connected", &self.session.is_some())
            .finish()
    }
}

impl OpcUa {
    /// A server at `endpoint` (`opc.tcp://…`); `pki` is a directory the
    /// client may write (it keeps rejected and trusted certificates there).
    pub fn new(endpoint: &str, limit: Duration, pki: PathBuf) -> OpcUa {
        OpcUa {
            endpoint: endpoint.to_string(),
            limit,
            pki,
            session: None,
        }
    }

    async fn connect(
        endpoint: String,
        limit: Duration,
        pki: PathBuf,
    ) -> Result<
        (
            Arc<Session>,
            tokio::task::JoinHandle<opcua::types::StatusCode>,
        ),
        DeviceError,
    > {
        let mut client = ClientBuilder::new()
            .application_name("shoal")
            .application_uri("urn:shoal:node")
            .pki_dir(pki)
            .create_sample_keypair(false)
            .trust_server_certs(true)
            .session_retry_limit(0)
            .request_timeout(limit)
            .client()
            .map_err(|e| DeviceError::Connect(format!("client configuration: {e:?}")))?;
        let ep: EndpointDescription = (
            endpoint.as_str(),
            "None",
            MessageSecurityMode::None,
            UserTokenPolicy::anonymous(),
        )
            .into();
        let (session, event_loop) = match timeout(
            limit,
            client.connect_to_matching_endpoint(ep, IdentityToken::Anonymous),
        )
        .await
        {
            Err(_) => return Err(DeviceError::Timeout(limit)),
            Ok(Err(e)) => return Err(DeviceError::Connect(format!("{endpoint}: {e}"))),
            Ok(Ok(x)) => x,
        };
        let handle = event_loop.spawn();
        match timeout(limit, session.wait_for_connection()).await {
            Ok(true) => Ok((session, handle)),
            Ok(false) => {
                handle.abort();
                Err(DeviceError::Connect(format!("{endpoint}: no session")))
            }
            Err(_) => {
                handle.abort();
                Err(DeviceError::Timeout(limit))
            }
        }
    }

    async fn session(&mut self) -> Result<Arc<Session>, DeviceError> {
        if let Some((s, h)) = &self.session
            && !h.is_finished()
        {
            return Ok(s.clone());
        }
        let (s, h) = Self::connect(self.endpoint.clone(), self.limit, self.pki.clone()).await?;
        self.session = Some((s.clone(), h));
        Ok(s)
    }

    fn drop_session(&mut self) {
        if let Some((_, h)) = self.session.take() {
            h.abort();
        }
    }

    /// Reads variables; each gets its value or the server's status.
    pub async fn read(
        &mut self,
        ids: &[NodeId],
    ) -> Result<Vec<Result<Scalar, String>>, DeviceError> {
        let session = self.session().await?;
        let req: Vec<ReadValueId> = ids.iter().cloned().map(ReadValueId::from).collect();
        let r = timeout(
            self.limit,
            session.read(&req, TimestampsToReturn::Neither, 0.0),
        )
        .await;
        let values = match r {
            Err(_) => {
                self.drop_session();
                return Err(DeviceError::Timeout(self.limit));
            }
            Ok(Err(e)) => {
                self.drop_session();
                return Err(DeviceError::Io(e.to_string()));
            }
            Ok(Ok(v)) => v,
        };
        Ok(values
            .iter()
            .map(|dv| match (&dv.status, &dv.value) {
                (Some(st), _) if !st.is_good() => Err(format!("OPC UA {st}")),
                (_, Some(v)) => scalar(v),
                (_, None) => Err("no value".into()),
            })
            .collect())
    }

    /// Writes one variable as `kind`; the server's refusal is an error
    /// naming its status.
    pub async fn write(
        &mut self,
        id: &NodeId,
        value: &Scalar,
        kind: Kind,
    ) -> Result<(), DeviceError> {
        let v = variant(value, kind).map_err(DeviceError::Invalid)?;
        let session = self.session().await?;
        let req = [WriteValue {
            node_id: id.clone(),
            attribute_id: AttributeId::Value as u32,
            index_range: NumericRange::None,
            value: DataValue::value_only(v),
        }];
        match timeout(self.limit, session.write(&req)).await {
            Err(_) => {
                self.drop_session();
                Err(DeviceError::Timeout(self.limit))
            }
            Ok(Err(e)) => {
                self.drop_session();
                Err(DeviceError::Io(e.to_string()))
            }
            Ok(Ok(st)) => match st.first() {
                Some(s) if s.is_good() => Ok(()),
                Some(s) => Err(DeviceError::Refused(format!("OPC UA {s}"))),
                None => Err(DeviceError::Io("no write result".into())),
            },
        }
    }

    /// The children of a node: (node id, browse name).
    pub async fn browse(&mut self, id: &NodeId) -> Result<Vec<(String, String)>, DeviceError> {
        let session = self.session().await?;
        let req = [BrowseDescription {
            node_id: id.clone(),
            browse_direction: BrowseDirection::Forward,
            reference_type_id: ReferenceTypeId::HierarchicalReferences.into(),
            include_subtypes: true,
            node_class_mask: 0,
            result_mask: BrowseResultMask::All as u32,
        }];
        let r = match timeout(self.limit, session.browse(&req, 1000, None)).await {
            Err(_) => {
                self.drop_session();
                return Err(DeviceError::Timeout(self.limit));
            }
            Ok(Err(e)) => {
                self.drop_session();
                return Err(DeviceError::Io(e.to_string()));
            }
            Ok(Ok(r)) => r,
        };
        Ok(r.iter()
            .flat_map(|b| b.references.iter().flatten())
            .map(|rd| (rd.node_id.node_id.to_string(), rd.browse_name.to_string()))
            .collect())
    }
}

impl Drop for OpcUa {
    fn drop(&mut self) {
        self.drop_session();
    }
}

/// The raw value a setpoint asks the server for (scale and offset undone).
fn unscaled(r: &Resource, v: &serde_json::Value) -> Result<Scalar, String> {
    match v {
        serde_json::Value::Bool(b) => Ok(Scalar::Bool(*b)),
        serde_json::Value::String(s) => Ok(Scalar::Text(s.clone())),
        serde_json::Value::Number(n) => {
            let x = n.as_f64().ok_or("not a number")?;
            let raw = device::unscale(r, x);
            Ok(match r.raw() {
                ValueType::Float32 | ValueType::Float64 => Scalar::Float(raw),
                _ => Scalar::Int(raw.round() as i64),
            })
        }
        other => Err(format!("{other} is not a scalar")),
    }
}

/// The OPC UA type a resource's raw type is written as.
fn kind(t: ValueType) -> Kind {
    match t {
        ValueType::Bool => Kind::Boolean,
        ValueType::Int16 => Kind::Int16,
        ValueType::Uint16 => Kind::UInt16,
        ValueType::Int32 => Kind::Int32,
        ValueType::Uint32 => Kind::UInt32,
        ValueType::Int64 => Kind::Int64,
        ValueType::Uint64 => Kind::UInt64,
        ValueType::Float32 => Kind::Float,
        ValueType::Float64 => Kind::Double,
        ValueType::String => Kind::String,
    }
}

/// A value read from the server as the resource reports it.
fn from_scalar(r: &Resource, v: Scalar) -> Result<Value, String> {
    let raw = match v {
        Scalar::Bool(b) => Value::Bool(b),
        Scalar::Int(i) => Value::Int(i),
        Scalar::Float(f) => Value::Float(f),
        Scalar::Text(t) => Value::Text(t),
    };
    let text_wanted = r.value_type == ValueType::String;
    if text_wanted != matches!(raw, Value::Text(_)) {
        return Err(format!(
            "{}: type mismatch: the profile says {:?}, the server holds {raw:?}",
            r.name, r.value_type
        ));
    }
    Ok(device::scaled(r, raw))
}

/// The variables a poll reads, their node ids parsed once.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Resources (indexes) read, with their node ids.
    read: Vec<(usize, NodeId)>,
    /// Resources whose node id does not parse, with why.
    bad: Vec<(usize, String)>,
}

impl FieldAdapter for OpcUa {
    type Plan = Plan;

    fn protocol(&self) -> &'static str {
        "opcua"
    }

    fn plan(&self, profile: &DeviceProfileSpec, members: &[usize]) -> Option<Plan> {
        let mut plan = Plan {
            read: Vec::new(),
            bad: Vec::new(),
        };
        for &i in members {
            let Some(text) = profile.resources.get(i).and_then(|r| r.node_id.as_deref()) else {
                continue;
            };
            match node_id(text) {
                Ok(id) => plan.read.push((i, id)),
                Err(e) => plan.bad.push((i, e.to_string())),
            }
        }
        (!plan.read.is_empty() || !plan.bad.is_empty()).then_some(plan)
    }

    async fn poll(&mut self, profile: &DeviceProfileSpec, plan: &Plan) -> Polled {
        let mut out = Polled::default();
        for (i, e) in &plan.bad {
            out.values
                .push((profile.resources[*i].name.clone(), Err(e.clone())));
        }
        let ids: Vec<NodeId> = plan.read.iter().map(|(_, id)| id.clone()).collect();
        match self.read(&ids).await {
            Ok(results) => {
                for ((i, _), v) in plan.read.iter().zip(results) {
                    let r = &profile.resources[*i];
                    out.values
                        .push((r.name.clone(), v.and_then(|v| from_scalar(r, v))));
                }
            }
            Err(e) => {
                for (i, _) in &plan.read {
                    out.values
                        .push((profile.resources[*i].name.clone(), Err(e.to_string())));
                }
                out.error = Some(e);
            }
        }
        out
    }

    /// Checks access and limits, writes the unscaled value as the
    /// resource's raw type, and reports the value read back (the server's
    /// refusal, `BadTypeMismatch` say, names its status).
    async fn write_setpoint(
        &mut self,
        r: &Resource,
        v: &serde_json::Value,
    ) -> Result<Value, SetpointError> {
        device::setpoint_allowed(r, v).map_err(SetpointError::Refused)?;
        let id = node_id(r.node_id.as_deref().unwrap_or(""))
            .map_err(|e| SetpointError::Refused(e.to_string()))?;
        let raw = unscaled(r, v).map_err(SetpointError::Refused)?;
        self.write(&id, &raw, kind(r.raw()))
            .await
            .map_err(SetpointError::device)?;
        let back = self.read(&[id]).await.map_err(SetpointError::device)?;
        let value = back
            .into_iter()
            .next()
            .ok_or_else(|| SetpointError::Refused("no value read back".into()))?
            .map_err(SetpointError::Refused)?;
        from_scalar(r, value).map_err(SetpointError::Refused)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resource(json: serde_json::Value) -> Result<Resource, serde_json::Error> {
        serde_json::from_value(json)
    }

    #[test]
    fn setpoints_unscale_and_readings_scale_with_the_profile() -> Result<(), serde_json::Error> {
        let r = resource(serde_json::json!({
            "name": "temp", "nodeId": "ns=2;s=T", "rawType": "int16",
            "valueType": "float64", "scale": 0.1, "valueOffset": -40.0,
        }))?;
        // 22.5 = raw × 0.1 − 40 → raw 625, written as an Int16.
        assert_eq!(unscaled(&r, &serde_json::json!(22.5)), Ok(Scalar::Int(625)));
        assert_eq!(kind(r.raw()), Kind::Int16);
        assert_eq!(from_scalar(&r, Scalar::Int(625)), Ok(Value::Float(22.5)));
        assert!(
            from_scalar(&r, Scalar::Text("x".into()))
                .is_err_and(|e| e.contains("temp: type mismatch"))
        );
        let plain = resource(serde_json::json!({
            "name": "sp", "nodeId": "ns=2;s=S", "valueType": "float64",
        }))?;
        assert_eq!(
            unscaled(&plain, &serde_json::json!(1.5)),
            Ok(Scalar::Float(1.5))
        );
        assert!(unscaled(&plain, &serde_json::json!([1])).is_err());
        Ok(())
    }

    #[test]
    fn a_plan_keeps_node_ids_that_do_not_parse_as_errors() -> Result<(), serde_json::Error> {
        let profile: DeviceProfileSpec = serde_json::from_value(serde_json::json!({
            "resources": [
                {"name": "a", "nodeId": "ns=2;s=A", "valueType": "int32"},
                {"name": "m", "table": "coils", "valueType": "bool"},
                {"name": "b", "nodeId": "not a node id", "valueType": "int32"},
            ]
        }))?;
        let ua = OpcUa::new(
            "opc.tcp://127.0.0.1:1/",
            Duration::from_secs(1),
            PathBuf::new(),
        );
        let plan = ua.plan(&profile, &[0, 1, 2]);
        let (read, bad) = plan
            .map(|p| (p.read.iter().map(|(i, _)| *i).collect::<Vec<_>>(), p.bad))
            .unwrap_or_default();
        assert_eq!(read, vec![0]);
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].0, 2);
        assert!(
            ua.plan(&profile, &[1]).is_none(),
            "a Modbus resource is not OPC UA's"
        );
        Ok(())
    }
}
