//! The OPC UA adapter against a real asyncua server (PyPI, pinned in
//! scripts/test.sh): browse, read, write, a type mismatch, a read-only
//! variable, a server that goes away.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use adapters::DeviceError;
use adapters::opcua::{Kind, OpcUa, Scalar, node_id};

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn python() -> String {
    std::env::var("SHOAL_PYTHON").unwrap_or_else(|_| {
        let venv = format!(
            "{}/.cache/shoal/venv/bin/python",
            std::env::var("HOME").unwrap_or_default()
        );
        assert!(
            Path::new(&venv).exists(),
            "no Python with asyncua: run ./scripts/test.sh (it makes {venv}) or set SHOAL_PYTHON"
        );
        venv
    })
}

fn server(port: u16) -> Proc {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/sim/opcua_sim.py");
    let p = Proc(
        Command::new(python())
            .arg(script)
            .arg(port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "the OPC UA server did not listen"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    p
}

#[tokio::test]
async fn browse_read_write_and_refusals() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let srv = server(port);
    let pki = tempfile::tempdir().unwrap();
    let mut c = OpcUa::new(
        &format!("opc.tcp://127.0.0.1:{port}/shoal/"),
        Duration::from_secs(2),
        pki.path().to_path_buf(),
    );
    let objects = node_id("i=85").unwrap();
    let children = c.browse(&objects).await.unwrap();
    assert!(
        children.iter().any(|(id, _)| id == "ns=2;s=Device1"),
        "{children:?}"
    );
    let device = c.browse(&node_id("ns=2;s=Device1").unwrap()).await.unwrap();
    assert_eq!(device.len(), 3, "{device:?}");

    let ids = [
        "ns=2;s=Setpoint",
        "ns=2;s=Counter",
        "ns=2;s=Label",
        "ns=2;s=Nothing",
    ]
    .map(|s| node_id(s).unwrap());
    let v = c.read(&ids).await.unwrap();
    assert_eq!(v[0], Ok(Scalar::Float(1.5)));
    assert!(matches!(v[1], Ok(Scalar::Int(_))));
    assert_eq!(v[2], Ok(Scalar::Text("pump-1".into())));
    assert!(
        v[3].as_ref().unwrap_err().contains("BadNodeIdUnknown"),
        "{:?}",
        v[3]
    );

    c.write(&ids[0], &Scalar::Float(42.5), Kind::Double)
        .await
        .unwrap();
    assert_eq!(c.read(&ids[..1]).await.unwrap()[0], Ok(Scalar::Float(42.5)));
    let e = c
        .write(&ids[0], &Scalar::Int(7), Kind::Int32)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, DeviceError::Refused(m) if m.contains("BadTypeMismatch")),
        "{e}"
    );
    let e = c
        .write(&ids[1], &Scalar::Int(7), Kind::Int32)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, DeviceError::Refused(m) if m.contains("BadUserAccessDenied") || m.contains("BadNotWritable")),
        "{e}"
    );
    assert!(e.device_answered());
    let e = c
        .write(&ids[0], &Scalar::Text("x".into()), Kind::Double)
        .await
        .unwrap_err();
    assert!(matches!(e, DeviceError::Invalid(_)), "{e}");

    // The server goes away: a clear transport error, not a hang.
    drop(srv);
    let t = Instant::now();
    let e = c.read(&ids[..1]).await.unwrap_err();
    assert!(!e.device_answered(), "{e}");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
}
