//! OPC UA (binary, security mode None, anonymous) through the maintained
//! `async-opcua` client: read and write variables by node id, browse.
//! Values travel as [`Scalar`]s; a server's refusal (`BadTypeMismatch`,
//! `BadUserAccessDenied`, …) is reported with its status name. Every call
//! has the device's timeout; a timed-out or broken session is dropped and
//! made again on the next call.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use opcua::client::{ClientBuilder, IdentityToken, Session};
use opcua::types::{
    AttributeId, BrowseDescription, BrowseDirection, BrowseResultMask, DataValue,
    EndpointDescription, MessageSecurityMode, NodeId, NumericRange, ReadValueId, ReferenceTypeId,
    TimestampsToReturn, UserTokenPolicy, Variant, WriteValue,
};
use tokio::time::timeout;

use crate::DeviceError;

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
