//! TLS for the two HTTP surfaces (ADR 0014): the anchor's operator API and
//! UI, and a node's site API on the substation LAN.
//!
//! - **The anchor** serves a certificate an operator supplies (any CA), or
//!   one issued by the fleet's TLS CA (`shoal fleet tls-cert`): an ECDSA
//!   P-256 CA made next to the fleet root the first time, whose certificate
//!   operators give their browsers and their CLI (`--ca`). Browsers do not
//!   take Ed25519 certificates, so this CA is not the root key itself.
//! - **A node's site API** serves a certificate for the node's own Ed25519
//!   key, made at start, that carries the node's Shoal certificate in a
//!   subject alternative name (`urn:shoal:cert:<hex>`). An engineer's CLI
//!   accepts it when that certificate checks against the fleet root of the
//!   engineer's identity and names a node of the engineer's site, and the
//!   handshake proves the key ([`NodeVerifier`]). Names, addresses and
//!   validity dates are not checked: LAN addresses change, and Shoal never
//!   trusts a substation's clock (its certificates carry no expiry).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use crdt_state::{Certificate, Identity, PublicKey, Role};
pub use rustls::ServerConfig;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};

/// A handshake that has not finished by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; further connections wait to be accepted.
const HANDSHAKES_AT_ONCE: usize = 256;
/// The fleet TLS CA's certificate and key, beside the fleet root.
pub const CA_CERT_FILE: &str = "tls-ca.pem";
/// See [`CA_CERT_FILE`].
pub const CA_KEY_FILE: &str = "tls-ca.key";
/// Days a server certificate from the fleet CA is valid (browsers refuse
/// longer ones).
pub const SERVER_CERT_DAYS: i64 = 397;
/// How a site API's certificate names its Shoal certificate.
const SHOAL_CERT_URN: &str = "urn:shoal:cert:";

/// The crypto every TLS surface and client here uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate chain and its key, as a server presents them.
pub struct Credentials {
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's key.
    pub key: PrivateKeyDer<'static>,
}

impl Credentials {
    /// Reads PEM files: the chain (leaf first) and its private key.
    pub fn read(cert: &Path, key: &Path) -> anyhow::Result<Credentials> {
        let chain = CertificateDer::pem_file_iter(cert)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| anyhow!("{}: not PEM certificates: {e}", cert.display()))?;
        if chain.is_empty() {
            bail!("{}: holds no certificate", cert.display());
        }
        let key = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| anyhow!("{}: not a PEM private key: {e}", key.display()))?;
        Ok(Credentials { chain, key })
    }

    /// The chain as PEM.
    pub fn chain_pem(&self) -> String {
        self.chain.iter().map(|c| pem("CERTIFICATE", c)).collect()
    }

    /// A server configuration for HTTP/1.1 over TLS 1.2 or 1.3.
    pub fn server_config(&self) -> anyhow::Result<Arc<ServerConfig>> {
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .context("the certificate and the key do not go together")?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// A certificate for `identity`'s own Ed25519 key that carries its
    /// Shoal certificate (what a site API presents; see the module docs).
    pub fn for_identity(identity: &Identity) -> anyhow::Result<Credentials> {
        Credentials::for_key(&identity.secret_bytes(), &identity.cert)
    }

    fn for_key(secret: &[u8; 32], shoal: &Certificate) -> anyhow::Result<Credentials> {
        let pkcs8 = ed25519_pkcs8(secret);
        let key = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
            &PrivatePkcs8KeyDer::from(pkcs8.clone()),
            &rcgen::PKCS_ED25519,
        )?;
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, shoal.name.clone());
        let urn = format!(
            "{SHOAL_CERT_URN}{}",
            hex::encode(shoal.to_json().as_bytes())
        );
        params.subject_alt_names = vec![rcgen::SanType::URI(urn.try_into()?)];
        // Dates are required by X.509 and ignored by [`NodeVerifier`].
        params.not_before = rcgen::date_time_ymd(2000, 1, 1);
        params.not_after = rcgen::date_time_ymd(9999, 12, 31);
        // A serial from the key, and Ed25519's deterministic signature: the
        // same certificate at every start, so an app (or a pod's spec) that
        // holds it keeps trusting the node across its restarts.
        {
            use sha2::Digest;
            let digest = sha2::Sha256::digest(shoal.key.0);
            let mut serial = digest[..16].to_vec();
            serial[0] &= 0x7f;
            params.serial_number = Some(rcgen::SerialNumber::from(serial));
        }
        let cert = params.self_signed(&key)?;
        Ok(Credentials {
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8)),
        })
    }
}

/// PKCS#8 (RFC 8410) of an Ed25519 secret.
fn ed25519_pkcs8(secret: &[u8; 32]) -> Vec<u8> {
    let mut der = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    der.extend_from_slice(secret);
    der
}

/// A TCP listener that hands axum connections whose TLS handshake is done.
/// Handshakes run in their own tasks with a deadline, so a client that
/// opens a connection and says nothing holds up no one.
pub struct TlsListener {
    rx: mpsc::Receiver<(tokio_rustls::server::TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Starts accepting on `tcp` (inside a tokio runtime).
    pub fn new(tcp: TcpListener, config: Arc<ServerConfig>) -> std::io::Result<TlsListener> {
        let local = tcp.local_addr()?;
        let (tx, rx) = mpsc::channel(64);
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let permits = Arc::new(Semaphore::new(HANDSHAKES_AT_ONCE));
        tokio::spawn(async move {
            loop {
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    return;
                };
                let (stream, addr) = match tcp.accept().await {
                    Ok(s) => s,
                    Err(e) => {
                        // Out of file descriptors and the like: back off
                        // rather than spin, as axum's own listener does.
                        tracing::warn!(error = %e, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                if tx.is_closed() {
                    return;
                }
                // A handshake is several small writes each way: with Nagle's
                // algorithm on, each exchange waited for a delayed ACK
                // (44 ms a request, measured).
                let _ = stream.set_nodelay(true);
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, addr)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%addr, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%addr, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener { rx, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(conn) => conn,
            // The accepting task is gone only when the runtime stops.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}

/// The fleet TLS CA in `dir` (where the fleet root is), made the first
/// time: its certificate's PEM and an issuer that signs with it.
fn fleet_ca(dir: &Path, root: &PublicKey) -> anyhow::Result<(String, rcgen::KeyPair)> {
    let key_path = dir.join(CA_KEY_FILE);
    let cert_path = dir.join(CA_CERT_FILE);
    if key_path.exists() {
        let key = rcgen::KeyPair::from_pem(
            &std::fs::read_to_string(&key_path)
                .with_context(|| format!("reading {}", key_path.display()))?,
        )
        .map_err(|e| anyhow!("{}: {e}", key_path.display()))?;
        let pem = std::fs::read_to_string(&cert_path)
            .with_context(|| format!("reading {}", cert_path.display()))?;
        return Ok((pem, key));
    }
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let cert = ca_params(root).self_signed(&key)?;
    crdt_state::signed::identity::write_private(&key_path, key.serialize_pem().as_bytes())?;
    std::fs::write(&cert_path, cert.pem())
        .with_context(|| format!("writing {}", cert_path.display()))?;
    Ok((cert.pem(), key))
}

/// The CA's certificate fields: the same every time for a fleet, so the
/// issuer made again from the key matches the certificate given out.
fn ca_params(root: &PublicKey) -> rcgen::CertificateParams {
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("Shoal fleet {} TLS CA", root.short()),
    );
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "Shoal");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = rcgen::date_time_ymd(2025, 1, 1);
    params.not_after = rcgen::date_time_ymd(2125, 1, 1);
    params
}

/// A server certificate (ECDSA P-256) for `names` (DNS names or IP
/// addresses) from the fleet TLS CA in `dir`, valid from yesterday for
/// [`SERVER_CERT_DAYS`]: the chain's PEM (leaf, then the CA) and the key's.
pub fn issue_server_cert(
    dir: &Path,
    root: &PublicKey,
    names: &[String],
    now: i64,
) -> anyhow::Result<(String, String)> {
    let first = names
        .first()
        .ok_or_else(|| anyhow!("a server certificate needs a name (--name)"))?;
    let (ca_pem, ca_key) = fleet_ca(dir, root)?;
    let ca = ca_params(root).self_signed(&ca_key)?;
    let mut params = rcgen::CertificateParams::new(names.to_vec())
        .map_err(|e| anyhow!("names {names:?}: {e}"))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, first.clone());
    params.is_ca = rcgen::IsCa::NoCa;
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.not_before = day(now - 86_400)?;
    params.not_after = day(now + SERVER_CERT_DAYS * 86_400)?;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let cert = params.signed_by(&key, &ca, &ca_key)?;
    Ok((format!("{}{ca_pem}", cert.pem()), key.serialize_pem()))
}

/// The pin of the first certificate in a PEM chain: base64 of the SHA-256
/// of its public key (`curl --pinnedpubkey sha256//<pin>`, Chromium's
/// `--ignore-certificate-errors-spki-list`).
pub fn spki_pin(chain_pem: &str) -> anyhow::Result<String> {
    use sha2::Digest;
    let der = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .next()
        .ok_or_else(|| anyhow!("no PEM certificate"))?
        .map_err(|e| anyhow!("not a PEM certificate: {e}"))?;
    let (_, x509) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| anyhow!("not an X.509 certificate: {e}"))?;
    Ok(base64(&sha2::Sha256::digest(x509.public_key().raw)))
}

/// One PEM block.
fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Standard base64 with padding.
fn base64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn day(unix: i64) -> anyhow::Result<time::OffsetDateTime> {
    time::OffsetDateTime::from_unix_timestamp(unix).map_err(|e| anyhow!("a date: {e}"))
}

/// Accepts a site API's certificate when it carries a Shoal node
/// certificate of this fleet for its own key, of the site given (see the
/// module docs); the handshake's signature proves the key.
#[derive(Debug)]
pub struct NodeVerifier {
    root: PublicKey,
    site: Option<String>,
    provider: Arc<CryptoProvider>,
}

impl NodeVerifier {
    /// For a fleet root, and (when given) only nodes of `site`.
    pub fn new(root: PublicKey, site: Option<String>) -> NodeVerifier {
        NodeVerifier {
            root,
            site,
            provider: provider(),
        }
    }

    /// The node certificate a site API's TLS certificate carries, checked
    /// against the fleet root, the certificate's key and the site.
    pub fn check(&self, der: &[u8]) -> Result<Certificate, String> {
        let (_, x509) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("not an X.509 certificate: {e}"))?;
        let spki = x509.public_key();
        if spki.algorithm.algorithm.to_id_string() != "1.3.101.112" {
            return Err("its key is not an Ed25519 key: not a Shoal site API".into());
        }
        let key =
            PublicKey::from_slice(&spki.subject_public_key.data).map_err(|e| e.to_string())?;
        let urn = x509
            .subject_alternative_name()
            .map_err(|e| format!("its subject alternative names: {e}"))?
            .and_then(|san| {
                san.value.general_names.iter().find_map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(u) => u.strip_prefix(SHOAL_CERT_URN),
                    _ => None,
                })
            })
            .ok_or("it carries no Shoal certificate: not a Shoal site API")?;
        let json = hex::decode(urn).map_err(|_| "its Shoal certificate is not hex")?;
        let cert = Certificate::from_json(&json).map_err(|e| e.to_string())?;
        cert.verify(&self.root).map_err(|e| e.to_string())?;
        if cert.key != key {
            return Err(format!(
                "it carries the certificate of {} for another key",
                cert.name
            ));
        }
        if cert.role != Role::Node {
            return Err(format!("{} is a {}, not a node", cert.name, cert.role));
        }
        if let Some(site) = &self.site
            && cert.site.as_deref() != Some(site.as_str())
        {
            return Err(format!(
                "{} is a node of site {}, not of {site}",
                cert.name,
                cert.site.as_deref().unwrap_or("?")
            ));
        }
        Ok(cert)
    }
}

impl ServerCertVerifier for NodeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|_| ServerCertVerified::assertion())
            .map_err(|e| rustls::Error::General(format!("the site API's certificate: {e}")))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Largest answer a [`request`] reads.
const MAX_ANSWER: usize = 64 << 20;

/// One blocking HTTP/1.1 request over TLS with `verifier` (the site API's
/// client; ureq takes no verifier of its own). `url` is `https://host:port`
/// plus a path. The answer's status, and its body to the end or, with
/// `lines`, line by line until `lines` returns false.
pub fn request(
    verifier: Arc<NodeVerifier>,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    mut lines: Option<&mut dyn FnMut(&str) -> bool>,
) -> anyhow::Result<(u16, Vec<u8>)> {
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| anyhow!("{url}: expected https://host:port/…"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let host = authority
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(authority)
        .trim_start_matches('[')
        .trim_end_matches(']');
    let server_name = ServerName::try_from(host.to_string())
        .map_err(|_| anyhow!("{url}: {host:?} is not a host name or address"))?;
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    let addr = if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:443")
    };
    let tcp = std::net::TcpStream::connect(&addr).map_err(|e| anyhow!("{url}: {e}"))?;
    tcp.set_nodelay(true)?;
    tcp.set_read_timeout(Some(Duration::from_secs(60)))?;
    tcp.set_write_timeout(Some(Duration::from_secs(60)))?;
    let conn = rustls::ClientConnection::new(Arc::new(config), server_name)
        .map_err(|e| anyhow!("{url}: {e}"))?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    tls.write_all(head.as_bytes())
        .and_then(|()| tls.write_all(body))
        .and_then(|()| tls.flush())
        .map_err(|e| anyhow!("{url}: {e}"))?;
    let mut reader = BufReader::new(tls);
    let mut status_line = String::new();
    reader
        .read_line(&mut status_line)
        .map_err(|e| anyhow!("{url}: {e}"))?;
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("{url}: not an HTTP answer: {status_line:?}"))?;
    let mut chunked = false;
    let mut length = None;
    loop {
        let mut line = String::new();
        reader
            .read_line(&mut line)
            .map_err(|e| anyhow!("{url}: {e}"))?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
                chunked = true;
            } else if k == "content-length" {
                length = v.parse::<usize>().ok();
            }
        }
    }
    let mut body: Box<dyn BufRead> = if chunked {
        Box::new(BufReader::new(Chunked {
            inner: reader,
            left: 0,
            done: false,
        }))
    } else {
        match length {
            Some(n) => Box::new(reader.take(n as u64)),
            None => Box::new(reader),
        }
    };
    if let Some(f) = lines.as_mut()
        && status == 200
    {
        let mut line = String::new();
        loop {
            line.clear();
            let n = body
                .read_line(&mut line)
                .map_err(|e| anyhow!("{url}: {e}"))?;
            if n == 0 || !f(line.trim_end()) {
                return Ok((status, Vec::new()));
            }
        }
    }
    let mut out = Vec::new();
    body.take(MAX_ANSWER as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| anyhow!("{url}: {e}"))?;
    if out.len() > MAX_ANSWER {
        bail!("{url}: the answer is larger than {MAX_ANSWER} bytes");
    }
    Ok((status, out))
}

/// A chunked HTTP/1.1 body, decoded.
struct Chunked<R> {
    inner: R,
    left: usize,
    done: bool,
}

impl<R: BufRead> Read for Chunked<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            let mut size = String::new();
            if self.inner.read_line(&mut size)? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let size = size.trim();
            if size.is_empty() {
                // The CRLF that ends the previous chunk's data; the size
                // comes on the next line.
                return self.read(buf);
            }
            let hex = size.split(';').next().unwrap_or_default();
            self.left = usize::from_str_radix(hex, 16).map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, "a bad chunk size")
            })?;
            if self.left == 0 {
                self.done = true;
                return Ok(0);
            }
        }
        let want = buf.len().min(self.left);
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.left -= n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet() -> anyhow::Result<(ed25519_dalek::SigningKey, PublicKey)> {
        let root = crdt_state::signed::identity::generate_key()?;
        let public = PublicKey(root.verifying_key().to_bytes());
        Ok((root, public))
    }

    fn node(
        root: &ed25519_dalek::SigningKey,
        name: &str,
        role: Role,
        site: &str,
    ) -> anyhow::Result<Identity> {
        Ok(Identity::issue(
            root,
            crdt_state::signed::identity::generate_key()?,
            name,
            role,
            Some(site),
            0,
        )?)
    }

    /// A node's site API certificate checks for its own site and fleet
    /// only, and not when it carries another key's certificate or a
    /// certificate of another role.
    #[test]
    fn a_site_api_certificate_names_its_node() -> anyhow::Result<()> {
        let (root, public) = fleet()?;
        let n1 = node(&root, "n1", Role::Node, "north")?;
        let der = Credentials::for_identity(&n1)?.chain[0].to_vec();
        assert_eq!(
            Credentials::for_identity(&n1)?.chain[0].to_vec(),
            der,
            "the same certificate every time"
        );
        let cert = NodeVerifier::new(public, Some("north".into()))
            .check(&der)
            .map_err(|e| anyhow!(e))?;
        assert_eq!(cert.name, "n1");
        let e = NodeVerifier::new(public, Some("south".into()))
            .check(&der)
            .expect_err("another site");
        assert!(e.contains("not of south"), "{e}");
        let (_, other_root) = fleet()?;
        let e = NodeVerifier::new(other_root, None)
            .check(&der)
            .expect_err("another fleet");
        assert!(e.contains("root"), "{e}");
        let eng = node(&root, "eve", Role::SiteEngineer, "north")?;
        let der = Credentials::for_identity(&eng)?.chain[0].to_vec();
        let e = NodeVerifier::new(public, None)
            .check(&der)
            .expect_err("not a node");
        assert!(e.contains("not a node"), "{e}");
        // n1's certificate presented with another key.
        let thief = crdt_state::signed::identity::generate_key()?;
        let der = Credentials::for_key(&thief.to_bytes(), &n1.cert)?.chain[0].to_vec();
        let e = NodeVerifier::new(public, None)
            .check(&der)
            .expect_err("another key");
        assert!(e.contains("for another key"), "{e}");
        Ok(())
    }

    #[test]
    fn chunked_bodies_decode_across_chunks() -> anyhow::Result<()> {
        let wire = b"5\r\nhello\r\n7\r\n, world\r\n1;ext=1\r\n\n\r\n0\r\n\r\n";
        let mut out = String::new();
        Chunked {
            inner: &wire[..],
            left: 0,
            done: false,
        }
        .read_to_string(&mut out)?;
        assert_eq!(out, "hello, world\n");
        let cut = b"5\r\nhel";
        let mut out = Vec::new();
        assert!(
            Chunked {
                inner: &cut[..],
                left: 0,
                done: false,
            }
            .read_to_end(&mut out)
            .is_err(),
            "a body cut short is an error, not an end"
        );
        Ok(())
    }

    #[test]
    fn base64_as_rfc_4648_says() {
        for (raw, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(raw.as_bytes()), enc);
        }
    }

    /// The fleet CA issues a chain a rustls server takes; the same CA is
    /// used for the second certificate.
    #[test]
    fn the_fleet_ca_issues_server_certificates() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let (_, public) = fleet()?;
        let (chain, key) = issue_server_cert(
            dir.path(),
            &public,
            &["anchor.example".into(), "10.0.0.5".into()],
            1_790_000_000,
        )?;
        let ca = std::fs::read_to_string(dir.path().join(CA_CERT_FILE))?;
        assert!(chain.ends_with(&ca), "the chain ends with the CA");
        std::fs::write(dir.path().join("c.pem"), &chain)?;
        std::fs::write(dir.path().join("k.pem"), &key)?;
        let creds = Credentials::read(&dir.path().join("c.pem"), &dir.path().join("k.pem"))?;
        assert_eq!(creds.chain.len(), 2);
        creds.server_config()?;
        assert_eq!(spki_pin(&chain)?.len(), 44);
        assert_ne!(spki_pin(&chain)?, spki_pin(&ca)?);
        let (again, _) =
            issue_server_cert(dir.path(), &public, &["b.example".into()], 1_790_000_000)?;
        assert!(again.ends_with(&ca), "one CA per fleet");
        assert!(issue_server_cert(dir.path(), &public, &[], 0).is_err());
        Ok(())
    }
}
