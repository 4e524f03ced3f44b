//! The mesh: libp2p over QUIC, carrying framed messages between admitted
//! peers. It knows no documents.
//!
//! One tokio task owns the libp2p swarm (QUIC, identify, ping, mDNS, relay
//! server on anchors and relay client everywhere, DCUtR, AutoNAT,
//! connection limits). Its owner talks to it through [`Mesh`] (commands)
//! and [`Events`]:
//!
//! - **Hello and admission.** When identify tells us which process is at
//!   the other end (its incarnation, a random id per process start), we
//!   send our hello bytes on `/shoal/hello/1`. The remote's hello reaches the
//!   owner as [`Event::Hello`]; the owner answers [`Mesh::admit`] or
//!   [`Mesh::reject`]. Nothing is sent to a peer before it is admitted, and
//!   frames a peer sends before its admission are held (bounded) and only
//!   delivered once it is admitted. A peer that says nothing within the
//!   hello timeout is cut off.
//! - **Sessions.** An admitted peer has one session until its last
//!   connection closes, a stream to it fails, or a new incarnation of it
//!   shows up (a restarted process, while our old QUIC connection to it is
//!   not yet timed out): then [`Event::Down`], and a new hello starts the
//!   next session. The owner restarts its sync per session.
//! - **Redialing** is ours: every known peer (bootstrap addresses, mDNS,
//!   peers added by the owner) is redialed with jittered exponential
//!   backoff while it is not connected. For the first two minutes after
//!   an admitted peer is lost the backoff stays at most half a second (a cut
//!   link that returns is back in sync within ~1 s + a few RTT); after that
//!   it grows to the configured maximum (a week-long partition costs a
//!   dial attempt every 30 s, not every second).
//! - **Requests** (`/shoal/enroll/1`): one frame each way, allowed before
//!   admission; the only thing an unknown peer may ask for.
//! - **Backpressure.** Incoming: each sync stream has a reader task that
//!   reads one frame, then waits for room in a channel of 8 messages to
//!   the mesh task, which takes from it only while the owner's event
//!   channel (8 events) has room. An owner that stops calling
//!   [`Events::next`] therefore stops the reading of sync streams, and
//!   QUIC flow control slows the senders. What the mesh then holds for the
//!   owner is at most 8 + 8 + 1 frames plus one per sync stream being
//!   read (normally one per admitted peer), each at most `max_frame`
//!   (4 MiB): 68 MiB plus 4 MiB per peer, however fast the peers send.
//!   Frames held before admission add at most `2 × max_frame` per peer
//!   waiting for admission, as before. Outgoing: [`Mesh::send`]
//!   never waits; what is queued to one peer and not yet written to its
//!   stream is bounded by `max_queued` bytes (32 MiB). A send that would
//!   go over the bound makes the peer a slow consumer: its session ends
//!   there ([`Event::Down`]), it is disconnected with that reason, and
//!   nothing more is written in that session. A frame is never dropped
//!   from a session that goes on: the peer receives a prefix of what was
//!   sent in a session, and the next session starts from a digest, so
//!   nothing is lost.
//! - **Decisions** (sessions, admission, held frames, redial backoff)
//!   live in a sans-IO state machine (`session.rs`), fed with `now` and
//!   unit-tested without QUIC; the mesh task owns the swarm and carries
//!   out what it decides.

#![warn(missing_docs)]

pub mod frame;
mod session;
pub mod udp;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
pub use libp2p::StreamProtocol;
use libp2p::core::ConnectedPoint;
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Swarm, autonat, connection_limits, dcutr, identify, mdns, noise};
use libp2p::{ping, relay, yamux};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use session::{INCARNATION, Output, Sessions, Settings};

pub use libp2p::{Multiaddr, PeerId, Stream};

/// Certificates are exchanged on this protocol right after connecting.
pub const HELLO: StreamProtocol = StreamProtocol::new("/shoal/hello/1");
/// Sync frames between admitted peers.
pub const SYNC: StreamProtocol = StreamProtocol::new("/shoal/sync/1");
/// Enrollment: a token and a fresh key in, a certificate out.
pub const ENROLL: StreamProtocol = StreamProtocol::new("/shoal/enroll/1");
/// Liveness probe: one byte echoed (nothing about documents).
pub const PROBE: StreamProtocol = StreamProtocol::new("/shoal/probe/1");
/// Artifacts: verified groups of blobs (ADR 0009).
pub const BLOB: StreamProtocol = StreamProtocol::new("/shoal/blob/1");
/// Data up from the edge: signed batches of readings and app records
/// (issue 15; the `uplink` crate).
pub const DATA: StreamProtocol = StreamProtocol::new("/shoal/data/1");

/// Anchor replicas' audit trails (timeline and security log): a pull of
/// what the asker lacks, one request and one answer (issue 17).
pub const AUDIT: StreamProtocol = StreamProtocol::new("/shoal/audit/1");

/// Largest hello or request frame.
pub const MAX_SMALL_FRAME: usize = 64 << 10;

/// Events the owner has not taken yet, at most. With sync frames of up to
/// `max_frame` (4 MiB by default) this holds at most 32 MiB; see the
/// module docs for the whole bound.
const EVENT_QUEUE: usize = 8;
/// Frames and requests read from streams and not yet handed on, at most
/// (again at most 32 MiB with 4 MiB frames).
const INBOUND_QUEUE: usize = 8;

/// Mesh settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// The Ed25519 secret key of this peer (its peer id and its Shoal key).
    pub secret: [u8; 32],
    /// Addresses to listen on (`/ip4/0.0.0.0/udp/0/quic-v1`).
    pub listen: Vec<Multiaddr>,
    /// Peers to keep connected to, each address ending in `/p2p/<id>`.
    pub peers: Vec<Multiaddr>,
    /// Discover peers on the local network with mDNS.
    pub mdns: bool,
    /// Serve circuit relay v2 (anchors), with limits raised for sync traffic.
    pub relay_server: bool,
    /// Largest sync frame sent or accepted.
    pub max_frame: usize,
    /// A peer that has not said hello (or was not admitted) by then is cut off.
    pub hello_timeout: Duration,
    /// QUIC keep-alive interval.
    pub keep_alive: Duration,
    /// QUIC idle timeout: a connection that hears nothing for this long is dead.
    pub idle_timeout: Duration,
    /// A dial that has not completed its QUIC handshake by then has failed.
    pub handshake_timeout: Duration,
    /// This long after we sent a peer sync frames, we check that it still
    /// answers (one byte each way on `/shoal/probe/1`)...
    pub probe_after: Duration,
    /// ...and a peer that does not answer within this is cut off and
    /// redialed: the link failed while we had something to say.
    pub probe_timeout: Duration,
    /// Redial backoff: first and largest delay.
    pub backoff: (Duration, Duration),
    /// Right after losing an admitted peer: redial at least this often, for
    /// this long.
    pub fast_redial: (Duration, Duration),
    /// Protocols whose requests this peer answers ([`Event::Request`]).
    pub serve: Vec<StreamProtocol>,
    /// Protocols whose inbound streams are handed to the owner whole
    /// ([`Event::Stream`]): answers of many frames, written as they are
    /// read from disk (`/shoal/blob/1`).
    pub serve_streams: Vec<StreamProtocol>,
    /// Bytes queued to a peer and not yet written to its stream, at most:
    /// a send that would go over ends the peer's session and cuts it off
    /// (a slow consumer).
    pub max_queued: usize,
    /// Receive buffer asked for each listening UDP socket, in bytes as the
    /// kernel counts them (`SO_RCVBUF`); 0 leaves the system's default.
    /// See [`udp`].
    pub udp_receive_buffer: usize,
}

impl Config {
    /// Defaults for a peer with this secret key.
    pub fn new(secret: [u8; 32]) -> Self {
        Config {
            secret,
            listen: Vec::new(),
            peers: Vec::new(),
            mdns: false,
            relay_server: false,
            max_frame: 4 << 20,
            hello_timeout: Duration::from_secs(10),
            // Idle links cost little: a QUIC keep-alive every 25 s (under
            // the 30 s UDP timeout of the stingiest NATs) and a 60 s idle
            // timeout (two lost keep-alives on a flaky radio link do not
            // end the session). A link that fails while we have something
            // to say is caught sooner by the probe (see `probe_after`).
            keep_alive: Duration::from_secs(25),
            idle_timeout: Duration::from_secs(60),
            handshake_timeout: Duration::from_secs(3),
            probe_after: Duration::from_secs(2),
            probe_timeout: Duration::from_secs(4),
            backoff: (Duration::from_millis(250), Duration::from_secs(30)),
            fast_redial: (Duration::from_millis(500), Duration::from_secs(120)),
            serve: Vec::new(),
            serve_streams: Vec::new(),
            max_queued: 32 << 20,
            // 8 MiB as the kernel counts it (about 4 MiB of datagrams):
            // 13 ms of a 300 MB/s transfer, 30 ms of a gigabit link.
            udp_receive_buffer: 8 << 20,
        }
    }
}

/// The peer id of an Ed25519 public key.
pub fn peer_id_of(public_key: &[u8; 32]) -> Option<PeerId> {
    let pk = libp2p::identity::ed25519::PublicKey::try_from_bytes(public_key).ok()?;
    Some(libp2p::identity::PublicKey::from(pk).to_peer_id())
}

/// The Ed25519 public key a peer id embeds; `None` for a peer id that is
/// a hash of its key (keys longer than 42 bytes) or not an Ed25519 key.
pub fn key_of(peer: &PeerId) -> Option<[u8; 32]> {
    // An identity multihash (code 0) holds the protobuf-encoded key itself.
    let mh = peer.as_ref();
    if mh.code() != 0 {
        return None;
    }
    let pk = libp2p::identity::PublicKey::try_decode_protobuf(mh.digest()).ok()?;
    Some(pk.try_into_ed25519().ok()?.to_bytes())
}

/// The peer id at the end of an address (`…/p2p/<id>`).
pub fn peer_of(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter().last().and_then(|p| match p {
        Protocol::P2p(id) => Some(id),
        _ => None,
    })
}

/// Errors starting the mesh or making requests.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad configuration (key, address).
    #[error("{0}")]
    Config(String),
    /// The mesh task has stopped.
    #[error("the mesh has stopped")]
    Stopped,
    /// A request failed.
    #[error("request to {peer} failed: {reason}")]
    Request {
        /// The peer.
        peer: PeerId,
        /// Why.
        reason: String,
    },
}

/// What the mesh tells its owner.
#[derive(Debug)]
pub enum Event {
    /// Listening on an address.
    Listening(Multiaddr),
    /// A peer said hello: answer [`Mesh::admit`] or [`Mesh::reject`].
    Hello {
        /// The peer.
        peer: PeerId,
        /// The address of its connection.
        addr: Multiaddr,
        /// What it sent.
        hello: Vec<u8>,
    },
    /// A sync frame from an admitted peer.
    Frame {
        /// The peer.
        peer: PeerId,
        /// The frame.
        bytes: Vec<u8>,
    },
    /// An admitted peer's session ended.
    Down {
        /// The peer.
        peer: PeerId,
    },
    /// A peer opened a stream on a protocol of [`Config::serve_streams`]:
    /// the owner reads the request and writes the answer (dropping the
    /// stream closes it).
    Stream {
        /// The peer.
        peer: PeerId,
        /// The protocol.
        protocol: StreamProtocol,
        /// The stream.
        stream: Stream,
    },
    /// A request on a served protocol; answer on `reply` (dropping it
    /// closes the stream without an answer).
    Request {
        /// The peer.
        peer: PeerId,
        /// The address of its connection.
        addr: Multiaddr,
        /// The protocol.
        protocol: StreamProtocol,
        /// The request frame.
        bytes: Vec<u8>,
        /// Where the answer goes.
        reply: oneshot::Sender<Vec<u8>>,
    },
}

/// The owner's receiving end. Bounded: an owner that stops calling
/// [`Events::next`] stops the reading of sync streams (see the module docs).
pub struct Events(mpsc::Receiver<Event>);

impl Events {
    /// The next event; `None` once the mesh stopped.
    pub async fn next(&mut self) -> Option<Event> {
        self.0.recv().await
    }
}

enum Command {
    Send(PeerId, Vec<u8>),
    Admit(PeerId),
    Reject(PeerId, String),
    Disconnect(PeerId, String),
    AddPeer(Multiaddr),
    SetHello(Vec<u8>),
    ListenVia(PeerId),
    Check(PeerId),
    Request {
        addr: Multiaddr,
        protocol: StreamProtocol,
        bytes: Vec<u8>,
        reply: oneshot::Sender<Result<Vec<u8>, Error>>,
    },
    Status(oneshot::Sender<Status>),
    Shutdown(oneshot::Sender<()>),
}

/// A snapshot of the mesh.
#[derive(Clone, Debug, Default)]
pub struct Status {
    /// Addresses we listen on.
    pub listening: Vec<Multiaddr>,
    /// Admitted peers, with the address of a connection.
    pub admitted: Vec<(PeerId, Multiaddr)>,
    /// Connected peers (admitted or not).
    pub connected: usize,
}

/// The owner's sending end (cheap to clone).
#[derive(Clone)]
pub struct Mesh {
    tx: mpsc::UnboundedSender<Command>,
    peer_id: PeerId,
    control: libp2p_stream::Control,
}

impl Mesh {
    /// Starts the mesh task. `hello` is what we say to every peer (empty:
    /// say nothing, as an enrolling peer does).
    pub fn start(config: Config, hello: Vec<u8>) -> Result<(Mesh, Events), Error> {
        let mut secret = config.secret;
        let keypair = Keypair::ed25519_from_bytes(&mut secret)
            .map_err(|e| Error::Config(format!("bad key: {e}")))?;
        let peer_id = keypair.public().to_peer_id();
        let mut incarnation = [0u8; INCARNATION];
        fill_random(&mut incarnation);
        let mut swarm = build_swarm(keypair, &config, &incarnation)?;
        for addr in &config.listen {
            swarm
                .listen_on(addr.clone())
                .map_err(|e| Error::Config(format!("cannot listen on {addr}: {e}")))?;
        }
        // Commands stay unbounded: `Mesh`'s methods are synchronous and
        // must never wait, each command is small or is a frame the owner
        // chose to send, and the mesh task takes them every time it runs
        // and never waits for anything while handling one. The bound on
        // what may pile up for a slow peer is `max_queued` (see `send`).
        let (tx, rx) = mpsc::unbounded_channel();
        let (ev_tx, ev_rx) = mpsc::channel(EVENT_QUEUE);
        let mut task = Task::new(swarm, config, hello, ev_tx, incarnation)?;
        let control = task.control.clone();
        let now = Instant::now();
        for addr in task.config.peers.clone() {
            task.sessions.add_peer(addr, now).map_err(Error::Config)?;
        }
        tokio::spawn(
            task.run(rx)
                .instrument(tracing::info_span!("mesh", me = %peer_id)),
        );
        Ok((
            Mesh {
                tx,
                peer_id,
                control,
            },
            Events(ev_rx),
        ))
    }

    /// This peer's id.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    fn cmd(&self, c: Command) {
        let _ = self.tx.send(c);
    }

    /// Sends a sync frame to an admitted peer (dropped otherwise). Never
    /// waits: the frame is queued to the peer's stream. A peer whose queue
    /// would go over `max_queued` bytes is a slow consumer: its session
    /// ends there ([`Event::Down`]) and it is disconnected, so it never
    /// sees a session with a frame missing.
    pub fn send(&self, peer: PeerId, bytes: Vec<u8>) {
        self.cmd(Command::Send(peer, bytes));
    }

    /// We sent an admitted peer something on a stream of our own (a data
    /// batch): check, as after a sync frame, that it still answers, and
    /// cut it off (to be redialed) if it does not, so a peer that died
    /// without closing is noticed in seconds, not at the idle timeout.
    pub fn check(&self, peer: PeerId) {
        self.cmd(Command::Check(peer));
    }

    /// Admits a peer that said hello.
    pub fn admit(&self, peer: PeerId) {
        self.cmd(Command::Admit(peer));
    }

    /// Refuses a peer: logged with its address, cut off, not redialed.
    pub fn reject(&self, peer: PeerId, reason: impl Into<String>) {
        self.cmd(Command::Reject(peer, reason.into()));
    }

    /// Cuts a peer off (its session ends; it is redialed later if known).
    pub fn disconnect(&self, peer: PeerId, reason: impl Into<String>) {
        self.cmd(Command::Disconnect(peer, reason.into()));
    }

    /// Keeps a peer connected (address ending in `/p2p/<id>`).
    pub fn add_peer(&self, addr: Multiaddr) {
        self.cmd(Command::AddPeer(addr));
    }

    /// Changes what we say in later hellos.
    pub fn set_hello(&self, hello: Vec<u8>) {
        self.cmd(Command::SetHello(hello));
    }

    /// Makes this peer reachable through a relay it is connected to.
    pub fn listen_via(&self, relay: PeerId) {
        self.cmd(Command::ListenVia(relay));
    }

    /// One request and its answer on `protocol`, to the peer at `addr`
    /// (ending in `/p2p/<id>`); no hello needed.
    pub async fn request(
        &self,
        addr: Multiaddr,
        protocol: StreamProtocol,
        bytes: Vec<u8>,
    ) -> Result<Vec<u8>, Error> {
        let (reply, rx) = oneshot::channel();
        self.cmd(Command::Request {
            addr,
            protocol,
            bytes,
            reply,
        });
        rx.await.map_err(|_| Error::Stopped)?
    }

    /// Opens a stream on `protocol` to a peer this mesh is connected to (a
    /// protocol the peer serves whole: [`Config::serve_streams`]), within
    /// 10 s.
    pub async fn open(&self, peer: PeerId, protocol: StreamProtocol) -> Result<Stream, Error> {
        let mut control = self.control.clone();
        match tokio::time::timeout(
            Duration::from_secs(10),
            control.open_stream(peer, protocol.clone()),
        )
        .await
        {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => Err(Error::Request {
                peer,
                reason: format!("{protocol}: {e}"),
            }),
            Err(_) => Err(Error::Request {
                peer,
                reason: format!("{protocol}: no stream within 10 s"),
            }),
        }
    }

    /// Closes every connection (so peers notice at once, not after their
    /// idle timeout) and stops the mesh; waits at most a second.
    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        self.cmd(Command::Shutdown(tx));
        let _ = tokio::time::timeout(Duration::from_secs(1), rx).await;
    }

    /// The mesh's state now.
    pub async fn status(&self) -> Result<Status, Error> {
        let (tx, rx) = oneshot::channel();
        self.cmd(Command::Status(tx));
        rx.await.map_err(|_| Error::Stopped)
    }
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    limits: connection_limits::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    mdns: Toggle<mdns::tokio::Behaviour>,
    relay: Toggle<relay::Behaviour>,
    relay_client: relay::client::Behaviour,
    dcutr: dcutr::Behaviour,
    autonat: autonat::Behaviour,
    stream: libp2p_stream::Behaviour,
}

fn build_swarm(
    keypair: Keypair,
    config: &Config,
    incarnation: &[u8; INCARNATION],
) -> Result<Swarm<Behaviour>, Error> {
    let incarnation = hex(incarnation);
    let keep_alive = config.keep_alive;
    let idle_ms = config.idle_timeout.as_millis() as u32;
    let handshake = config.handshake_timeout;
    let mdns_on = config.mdns;
    let relay_on = config.relay_server;
    let swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_quic_config(move |mut c| {
            c.keep_alive_interval = keep_alive;
            c.max_idle_timeout = idle_ms;
            c.handshake_timeout = handshake;
            c
        })
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| Error::Config(format!("relay transport: {e}")))?
        .with_behaviour(|key, relay_client| {
            let me = key.public().to_peer_id();
            let limits = connection_limits::ConnectionLimits::default()
                .with_max_pending_incoming(Some(64))
                .with_max_pending_outgoing(Some(256))
                .with_max_established_per_peer(Some(4));
            let mdns = if mdns_on {
                Some(mdns::tokio::Behaviour::new(mdns::Config::default(), me)?)
            } else {
                None
            };
            let relay = relay_on.then(|| {
                let mut c = relay::Config {
                    max_reservations: 4096,
                    max_reservations_per_peer: 8,
                    max_circuits: 4096,
                    max_circuits_per_peer: 64,
                    max_circuit_duration: Duration::from_secs(24 * 3600),
                    max_circuit_bytes: 0,
                    ..Default::default()
                };
                c.reservation_rate_limiters.clear();
                c.circuit_src_rate_limiters.clear();
                relay::Behaviour::new(me, c)
            });
            Ok(Behaviour {
                limits: connection_limits::Behaviour::new(limits),
                identify: identify::Behaviour::new(
                    identify::Config::new("/shoal/1".into(), key.public())
                        .with_agent_version(format!("shoal/{incarnation}")),
                ),
                ping: ping::Behaviour::new(
                    // Round-trip times now and then; liveness is QUIC's
                    // keep-alive and our probe, so this costs next to nothing.
                    ping::Config::new().with_interval(Duration::from_secs(600)),
                ),
                mdns: Toggle::from(mdns),
                relay: Toggle::from(relay),
                relay_client,
                dcutr: dcutr::Behaviour::new(me),
                autonat: autonat::Behaviour::new(me, autonat::Config::default()),
                stream: libp2p_stream::Behaviour::new(),
            })
        })
        .map_err(|e| Error::Config(format!("mesh behaviour: {e}")))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(3600)))
        .build();
    Ok(swarm)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn fill_random(b: &mut [u8]) {
    // Process-unique, not secret: the time and the address of a local.
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
        ^ (std::process::id() as u64).rotate_left(32)
        ^ (b.as_ptr() as u64);
    let mut s = seed;
    for x in b.iter_mut() {
        s = splitmix(s);
        *x = s as u8;
    }
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// What stream tasks tell the mesh task. Small and rare (one per stream
/// or per probe), and the mesh task never waits for anything while it
/// drains them, so this channel is unbounded; the bulk traffic (sync
/// frames, requests) goes through [`Inbound`], which is bounded.
enum Internal {
    HelloIn(PeerId, [u8; INCARNATION], Vec<u8>),
    SyncStream(PeerId, libp2p::Stream),
    Misbehaved(PeerId, String),
    WriterFailed(PeerId, u64, String),
    Probed(PeerId, u64, Result<(), String>),
}

/// What stream reader tasks hand on towards the owner, through a channel
/// of [`INBOUND_QUEUE`] messages: a reader waits for room before reading
/// its next frame.
enum Inbound {
    Frame(PeerId, u64, Vec<u8>),
    Request(PeerId, StreamProtocol, Vec<u8>, oneshot::Sender<Vec<u8>>),
    Stream(PeerId, StreamProtocol, Stream),
}

/// A peer's sync stream writer: frames queued for it, and their bytes.
struct Writer {
    session: u64,
    tx: mpsc::UnboundedSender<Vec<u8>>,
    queued: Arc<AtomicUsize>,
}

struct PendingRequest {
    protocol: StreamProtocol,
    bytes: Vec<u8>,
    reply: oneshot::Sender<Result<Vec<u8>, Error>>,
}

struct Task {
    swarm: Swarm<Behaviour>,
    control: libp2p_stream::Control,
    config: Config,
    hello: Vec<u8>,
    sessions: Sessions,
    writers: HashMap<PeerId, Writer>,
    events: mpsc::Sender<Event>,
    /// Events the owner has no room for yet, oldest first. While any wait
    /// here, nothing is taken from `inbound_rx`, so what waits here is
    /// the few events the mesh makes itself (listening, hello, down), the
    /// held frames released by admissions, and at most one more frame.
    backlog: VecDeque<Event>,
    internal_tx: mpsc::UnboundedSender<Internal>,
    internal_rx: mpsc::UnboundedReceiver<Internal>,
    inbound_tx: mpsc::Sender<Inbound>,
    inbound_rx: mpsc::Receiver<Inbound>,
    requests: HashMap<PeerId, Vec<PendingRequest>>,
    listening: Vec<Multiaddr>,
    /// UDP ports whose sockets' receive buffers were sized.
    sized_ports: std::collections::HashSet<u16>,
    incarnation: [u8; INCARNATION],
    closing: Option<oneshot::Sender<()>>,
}

impl Task {
    fn new(
        swarm: Swarm<Behaviour>,
        config: Config,
        hello: Vec<u8>,
        events: mpsc::Sender<Event>,
        incarnation: [u8; INCARNATION],
    ) -> Result<Task, Error> {
        let mut control = swarm.behaviour().stream.new_control();
        let (internal_tx, internal_rx) = mpsc::unbounded_channel();
        let (inbound_tx, inbound_rx) = mpsc::channel(INBOUND_QUEUE);
        // Inbound streams: hello, sync and served request protocols.
        let mut hello_in = control
            .accept(HELLO)
            .map_err(|e| Error::Config(e.to_string()))?;
        let tx = internal_tx.clone();
        tokio::spawn(async move {
            while let Some((peer, mut stream)) = hello_in.next().await {
                let tx = tx.clone();
                tokio::spawn(
                    async move {
                        let read = tokio::time::timeout(
                            Duration::from_secs(10),
                            frame::read(&mut stream, MAX_SMALL_FRAME),
                        )
                        .await;
                        match read {
                            Ok(Ok(Some(body))) if body.len() >= INCARNATION => {
                                let mut inc = [0u8; INCARNATION];
                                inc.copy_from_slice(&body[..INCARNATION]);
                                let _ = tx.send(Internal::HelloIn(
                                    peer,
                                    inc,
                                    body[INCARNATION..].to_vec(),
                                ));
                            }
                            Ok(Ok(_)) => {
                                let _ = tx.send(Internal::Misbehaved(peer, "empty hello".into()));
                            }
                            Ok(Err(e)) => {
                                let _ = tx.send(Internal::Misbehaved(peer, format!("hello: {e}")));
                            }
                            Err(_) => {}
                        }
                    }
                    .instrument(tracing::debug_span!("hello_in", %peer)),
                );
            }
        });
        // Sync streams go to the mesh task, which tags each with the
        // session it belongs to and starts its reader.
        let mut sync_in = control
            .accept(SYNC)
            .map_err(|e| Error::Config(e.to_string()))?;
        let tx = internal_tx.clone();
        tokio::spawn(async move {
            while let Some((peer, stream)) = sync_in.next().await {
                if tx.send(Internal::SyncStream(peer, stream)).is_err() {
                    return;
                }
            }
        });
        let mut probes = control
            .accept(PROBE)
            .map_err(|e| Error::Config(e.to_string()))?;
        tokio::spawn(async move {
            while let Some((_, mut stream)) = probes.next().await {
                tokio::spawn(
                    async move {
                        use futures::{AsyncReadExt, AsyncWriteExt};
                        let mut b = [0u8; 1];
                        let echo = async {
                            stream.read_exact(&mut b).await?;
                            stream.write_all(&b).await?;
                            stream.close().await
                        };
                        let _ = tokio::time::timeout(Duration::from_secs(10), echo).await;
                    }
                    .instrument(tracing::debug_span!("probe_in")),
                );
            }
        });
        for protocol in config.serve.clone() {
            let mut incoming = control
                .accept(protocol.clone())
                .map_err(|e| Error::Config(e.to_string()))?;
            let tx = internal_tx.clone();
            let inbound = inbound_tx.clone();
            tokio::spawn(async move {
                while let Some((peer, mut stream)) = incoming.next().await {
                    let tx = tx.clone();
                    let inbound = inbound.clone();
                    let protocol = protocol.clone();
                    tokio::spawn(
                        async move {
                            let read = tokio::time::timeout(
                                Duration::from_secs(10),
                                frame::read(&mut stream, MAX_SMALL_FRAME),
                            )
                            .await;
                            let body = match read {
                                Ok(Ok(Some(b))) => b,
                                Ok(Err(e)) => {
                                    let _ = tx.send(Internal::Misbehaved(
                                        peer,
                                        format!("{protocol} request: {e}"),
                                    ));
                                    return;
                                }
                                _ => return,
                            };
                            let (reply, answer) = oneshot::channel();
                            // Waits while the owner is behind (the asker's
                            // own timeout bounds how long).
                            if inbound
                                .send(Inbound::Request(peer, protocol, body, reply))
                                .await
                                .is_err()
                            {
                                return;
                            }
                            if let Ok(Ok(bytes)) =
                                tokio::time::timeout(Duration::from_secs(30), answer).await
                            {
                                let _ = frame::write(&mut stream, &bytes).await;
                                let _ = futures::AsyncWriteExt::close(&mut stream).await;
                            }
                        }
                        .instrument(tracing::debug_span!("request_in", %peer)),
                    );
                }
            });
        }
        for protocol in config.serve_streams.clone() {
            let mut incoming = control
                .accept(protocol.clone())
                .map_err(|e| Error::Config(e.to_string()))?;
            let inbound = inbound_tx.clone();
            tokio::spawn(async move {
                while let Some((peer, stream)) = incoming.next().await {
                    // Waits while the owner is behind; the opener's own
                    // timeout bounds how long it waits for an answer.
                    if inbound
                        .send(Inbound::Stream(peer, protocol.clone(), stream))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
        let mut seed = [0u8; 8];
        fill_random(&mut seed);
        let me = *swarm.local_peer_id();
        let mut sessions = Sessions::new(Settings::of(&config), me, u64::from_le_bytes(seed));
        sessions.set_quiet(hello.is_empty());
        Ok(Task {
            swarm,
            control,
            config,
            hello,
            sessions,
            writers: HashMap::new(),
            events,
            backlog: VecDeque::new(),
            internal_tx,
            internal_rx,
            inbound_tx,
            inbound_rx,
            requests: HashMap::new(),
            listening: Vec::new(),
            sized_ports: Default::default(),
            incarnation,
            closing: None,
        })
    }

    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let room = self.events.clone();
            tokio::select! {
                ev = self.swarm.select_next_some() => self.on_swarm(ev),
                cmd = commands.recv() => match cmd {
                    Some(c) => self.on_command(c),
                    None => return,
                },
                Some(msg) = self.internal_rx.recv() => self.on_internal(msg),
                // Frames and requests only while the owner keeps up: else
                // they wait in the bounded channel, their readers wait for
                // room, and QUIC flow control slows the senders.
                Some(msg) = self.inbound_rx.recv(), if self.backlog.is_empty() => {
                    self.on_inbound(msg)
                }
                room = room.reserve_owned(), if !self.backlog.is_empty() => match room {
                    Ok(permit) => {
                        if let Some(e) = self.backlog.pop_front() {
                            permit.send(e);
                        }
                        self.flush();
                    }
                    // The owner dropped its `Events`: nobody is behind.
                    Err(_) => self.backlog.clear(),
                },
                _ = tick.tick() => {
                    self.sessions.tick(Instant::now());
                    self.drive();
                }
            }
            if self.closing.is_some() && self.swarm.connected_peers().next().is_none() {
                if let Some(tx) = self.closing.take() {
                    let _ = tx.send(());
                }
                return;
            }
        }
    }

    /// Hands an event to the owner, or queues it behind the ones waiting.
    fn emit(&mut self, e: Event) {
        if self.events.is_closed() {
            return;
        }
        if self.backlog.is_empty() {
            if let Err(mpsc::error::TrySendError::Full(e)) = self.events.try_send(e) {
                self.backlog.push_back(e);
            }
        } else {
            self.backlog.push_back(e);
        }
    }

    /// Moves waiting events to the owner while it has room.
    fn flush(&mut self) {
        while let Some(e) = self.backlog.pop_front() {
            match self.events.try_send(e) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(e)) => {
                    self.backlog.push_front(e);
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.backlog.clear();
                    return;
                }
            }
        }
    }

    /// Carries out what the session state machine decided.
    fn drive(&mut self) {
        while let Some(out) = self.sessions.poll_output() {
            match out {
                Output::SendHello(peer) => self.send_hello(peer),
                Output::Hello { peer, addr, hello } => {
                    self.emit(Event::Hello { peer, addr, hello })
                }
                Output::Frame { peer, bytes } => self.emit(Event::Frame { peer, bytes }),
                Output::Down { peer } => {
                    // Dropping the sender ends the writer once it has
                    // written what was queued before (a prefix of the
                    // session's frames; the connection goes anyway).
                    self.writers.remove(&peer);
                    self.emit(Event::Down { peer });
                }
                Output::Write {
                    peer,
                    session,
                    bytes,
                } => self.write(peer, session, bytes),
                Output::Probe { peer, session } => self.probe(peer, session),
                Output::Dial { peer, addrs } => {
                    // A dial in progress may be stuck in a handshake sent
                    // while the link was down; a fresh one gets through as
                    // soon as it is up.
                    let opts = DialOpts::peer_id(peer)
                        .addresses(addrs)
                        .condition(PeerCondition::Disconnected)
                        .build();
                    if let Err(e) = self.swarm.dial(opts) {
                        tracing::debug!(%peer, error = %e, "dial not started");
                    }
                }
                Output::Disconnect(peer) => {
                    let _ = self.swarm.disconnect_peer_id(peer);
                }
                Output::Close(conn) => {
                    self.swarm.close_connection(conn);
                }
            }
        }
    }

    /// Sizes the receive buffer of the UDP socket behind a new listening
    /// address, once per port (see [`udp`]).
    fn size_socket(&mut self, address: &Multiaddr) {
        let want = self.config.udp_receive_buffer;
        if want == 0 || address.iter().any(|p| p == Protocol::P2pCircuit) {
            return;
        }
        let Some(port) = address.iter().find_map(|p| match p {
            Protocol::Udp(port) => Some(port),
            _ => None,
        }) else {
            return;
        };
        if !self.sized_ports.insert(port) {
            return;
        }
        match udp::enlarge(port, want) {
            Ok(sockets) => {
                for s in sockets {
                    if s.enough {
                        tracing::debug!(port, bytes = s.bytes, "UDP receive buffer");
                    } else {
                        tracing::warn!(
                            port,
                            bytes = s.bytes,
                            wanted = want,
                            "UDP receive buffer smaller than wanted: fast transfers \
                             may lose datagrams; raise net.core.rmem_max to {} or \
                             give the process CAP_NET_ADMIN",
                            want / 2
                        );
                    }
                }
            }
            Err(e) => tracing::info!(
                port,
                error = %e,
                "UDP receive buffer left at the system's default"
            ),
        }
    }

    fn on_swarm(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        let now = Instant::now();
        match ev {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "listening");
                if self.config.relay_server && !address.iter().any(|p| p == Protocol::P2pCircuit) {
                    self.swarm.add_external_address(address.clone());
                }
                self.size_socket(&address);
                self.listening.push(address.clone());
                self.emit(Event::Listening(address));
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => {
                let addr = match &endpoint {
                    ConnectedPoint::Dialer { address, .. } => address.clone(),
                    ConnectedPoint::Listener { send_back_addr, .. } => send_back_addr.clone(),
                };
                let accepted = self.sessions.connected(peer_id, connection_id, addr, now);
                if accepted && let Some(reqs) = self.requests.remove(&peer_id) {
                    for r in reqs {
                        self.spawn_request(peer_id, r);
                    }
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                cause,
                ..
            } => {
                tracing::debug!(peer = %peer_id, ?cause, "connection closed");
                self.sessions
                    .closed(peer_id, connection_id, num_established, now);
            }
            SwarmEvent::OutgoingConnectionError {
                peer_id: Some(peer),
                error,
                ..
            } => {
                tracing::debug!(%peer, %error, "dial failed");
                if let Some(reqs) = self.requests.remove(&peer) {
                    for r in reqs {
                        let _ = r.reply.send(Err(Error::Request {
                            peer,
                            reason: error.to_string(),
                        }));
                    }
                }
            }
            SwarmEvent::IncomingConnectionError {
                send_back_addr,
                error,
                ..
            } => {
                tracing::debug!(addr = %send_back_addr, %error, "incoming connection failed");
            }
            SwarmEvent::Behaviour(b) => self.on_behaviour(b, now),
            _ => {}
        }
        self.drive();
    }

    fn on_behaviour(&mut self, ev: BehaviourEvent, now: Instant) {
        match ev {
            BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                connection_id,
                info,
            }) => {
                self.sessions
                    .identified(peer_id, connection_id, &info.agent_version, now);
            }
            BehaviourEvent::Mdns(mdns::Event::Discovered(found)) => {
                for (peer, addr) in found {
                    let addr = if peer_of(&addr) == Some(peer) {
                        addr
                    } else {
                        addr.with(Protocol::P2p(peer))
                    };
                    let _ = self.sessions.add_peer(addr, now);
                }
            }
            BehaviourEvent::RelayClient(e) => tracing::debug!(?e, "relay client"),
            BehaviourEvent::Relay(e) => tracing::debug!(?e, "relay"),
            BehaviourEvent::Dcutr(dcutr::Event {
                remote_peer_id,
                result,
            }) => match result {
                Ok(_) => {
                    tracing::info!(peer = %remote_peer_id, "direct connection through hole punching")
                }
                Err(e) => {
                    tracing::debug!(peer = %remote_peer_id, error = %e, "hole punching failed")
                }
            },
            _ => {}
        }
    }

    fn send_hello(&mut self, peer: PeerId) {
        if self.hello.is_empty() {
            return;
        }
        let mut body = Vec::with_capacity(INCARNATION + self.hello.len());
        body.extend_from_slice(&self.incarnation);
        body.extend_from_slice(&self.hello);
        let mut control = self.control.clone();
        tokio::spawn(
            async move {
                for attempt in 0..3u32 {
                    let sent = async {
                        let mut s = control
                            .open_stream(peer, HELLO)
                            .await
                            .map_err(|e| e.to_string())?;
                        frame::write(&mut s, &body)
                            .await
                            .map_err(|e| e.to_string())?;
                        futures::AsyncWriteExt::close(&mut s)
                            .await
                            .map_err(|e| e.to_string())
                    };
                    match tokio::time::timeout(Duration::from_secs(5), sent).await {
                        Ok(Ok(())) => return,
                        Ok(Err(e)) => tracing::debug!(%peer, attempt, error = %e, "hello not sent"),
                        Err(_) => tracing::debug!(%peer, attempt, "hello timed out"),
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            .instrument(tracing::debug_span!("hello_out", %peer)),
        );
    }

    fn on_command(&mut self, c: Command) {
        let now = Instant::now();
        match c {
            Command::Send(peer, bytes) => {
                let queued = self
                    .writers
                    .get(&peer)
                    .map_or(0, |w| w.queued.load(Ordering::Relaxed));
                self.sessions.send(peer, bytes, queued, now);
            }
            Command::Admit(peer) => self.sessions.admit(peer),
            Command::Check(peer) => self.sessions.check(peer, now),
            Command::Reject(peer, reason) => self.sessions.reject(peer, &reason, now),
            Command::Disconnect(peer, reason) => self.sessions.disconnect(peer, &reason),
            Command::AddPeer(addr) => {
                if let Err(e) = self.sessions.add_peer(addr, now) {
                    tracing::warn!(error = %e, "peer not added");
                }
            }
            Command::SetHello(h) => {
                self.sessions.set_quiet(h.is_empty());
                self.hello = h;
            }
            Command::ListenVia(relay) => {
                let Some(addr) = self
                    .sessions
                    .addrs(&relay)
                    .into_iter()
                    .find(|a| !is_relayed(a))
                else {
                    return;
                };
                let base: Multiaddr = addr
                    .iter()
                    .filter(|p| !matches!(p, Protocol::P2p(_)))
                    .collect();
                let circuit = base.with(Protocol::P2p(relay)).with(Protocol::P2pCircuit);
                if let Err(e) = self.swarm.listen_on(circuit.clone()) {
                    tracing::warn!(%circuit, error = %e, "cannot listen through relay");
                }
            }
            Command::Request {
                addr,
                protocol,
                bytes,
                reply,
            } => {
                let Some(peer) = peer_of(&addr) else {
                    let _ = reply.send(Err(Error::Config(format!(
                        "address {addr} must end in /p2p/<id>"
                    ))));
                    return;
                };
                let r = PendingRequest {
                    protocol,
                    bytes,
                    reply,
                };
                if self.swarm.is_connected(&peer) {
                    self.spawn_request(peer, r);
                    return;
                }
                let opts = DialOpts::peer_id(peer)
                    .addresses(vec![addr])
                    .condition(PeerCondition::DisconnectedAndNotDialing)
                    .build();
                if let Err(e) = self.swarm.dial(opts) {
                    let _ = r.reply.send(Err(Error::Request {
                        peer,
                        reason: e.to_string(),
                    }));
                    return;
                }
                self.requests.entry(peer).or_default().push(r);
            }
            Command::Shutdown(tx) => {
                self.sessions.forget_all();
                let peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
                for p in peers {
                    let _ = self.swarm.disconnect_peer_id(p);
                }
                self.closing = Some(tx);
            }
            Command::Status(tx) => {
                let _ = tx.send(Status {
                    listening: self.listening.clone(),
                    admitted: self.sessions.admitted(),
                    connected: self.sessions.connected_count(),
                });
            }
        }
        self.drive();
    }

    fn spawn_request(&mut self, peer: PeerId, r: PendingRequest) {
        let mut control = self.control.clone();
        tokio::spawn(
            async move {
                let result = async {
                    let mut s = control
                        .open_stream(peer, r.protocol.clone())
                        .await
                        .map_err(|e| e.to_string())?;
                    frame::write(&mut s, &r.bytes)
                        .await
                        .map_err(|e| e.to_string())?;
                    match frame::read(&mut s, MAX_SMALL_FRAME).await {
                        Ok(Some(b)) => Ok(b),
                        Ok(None) => Err("the peer closed the stream without an answer".to_string()),
                        Err(e) => Err(e.to_string()),
                    }
                };
                let result = match tokio::time::timeout(Duration::from_secs(30), result).await {
                    Ok(r) => r,
                    Err(_) => Err("no answer within 30 s".into()),
                };
                let _ = r
                    .reply
                    .send(result.map_err(|reason| Error::Request { peer, reason }));
            }
            .instrument(tracing::debug_span!("request", %peer)),
        );
    }

    /// Queues a frame on the peer's sync stream, opening it first if this
    /// session has none. The state machine has checked the bound.
    fn write(&mut self, peer: PeerId, session: u64, bytes: Vec<u8>) {
        if self.writers.get(&peer).is_none_or(|w| w.session != session) {
            let w = self.spawn_writer(peer, session);
            self.writers.insert(peer, w);
        }
        let Some(w) = self.writers.get(&peer) else {
            return;
        };
        w.queued.fetch_add(bytes.len(), Ordering::Relaxed);
        let _ = w.tx.send(bytes);
    }

    fn spawn_writer(&self, peer: PeerId, session: u64) -> Writer {
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let queued = Arc::new(AtomicUsize::new(0));
        let q = queued.clone();
        let mut control = self.control.clone();
        let internal = self.internal_tx.clone();
        tokio::spawn(
            async move {
                let opened =
                    tokio::time::timeout(Duration::from_secs(10), control.open_stream(peer, SYNC))
                        .await;
                let mut stream = match opened {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        let _ = internal.send(Internal::WriterFailed(peer, session, e.to_string()));
                        return;
                    }
                    Err(_) => {
                        let _ = internal.send(Internal::WriterFailed(
                            peer,
                            session,
                            "opening the sync stream timed out".into(),
                        ));
                        return;
                    }
                };
                // `frame::write` waits while QUIC flow control holds the
                // stream: a slow reader makes `queued` grow until the state
                // machine cuts it off.
                while let Some(bytes) = rx.recv().await {
                    q.fetch_sub(bytes.len(), Ordering::Relaxed);
                    if let Err(e) = frame::write(&mut stream, &bytes).await {
                        let _ = internal.send(Internal::WriterFailed(peer, session, e.to_string()));
                        return;
                    }
                }
                let _ = futures::AsyncWriteExt::close(&mut stream).await;
            }
            .instrument(tracing::debug_span!("sync_out", %peer, session)),
        );
        Writer {
            session,
            tx,
            queued,
        }
    }

    fn probe(&mut self, peer: PeerId, session: u64) {
        let mut control = self.control.clone();
        let internal = self.internal_tx.clone();
        let timeout = self.config.probe_timeout;
        tokio::spawn(
            async move {
                let probe = async {
                    use futures::{AsyncReadExt, AsyncWriteExt};
                    let mut st = control
                        .open_stream(peer, PROBE)
                        .await
                        .map_err(|e| e.to_string())?;
                    st.write_all(&[1]).await.map_err(|e| e.to_string())?;
                    st.flush().await.map_err(|e| e.to_string())?;
                    let mut b = [0u8; 1];
                    st.read_exact(&mut b).await.map_err(|e| e.to_string())?;
                    let _ = st.close().await;
                    Ok::<(), String>(())
                };
                let result = match tokio::time::timeout(timeout, probe).await {
                    Ok(r) => r,
                    Err(_) => Err(format!("no answer within {timeout:?}")),
                };
                let _ = internal.send(Internal::Probed(peer, session, result));
            }
            .instrument(tracing::debug_span!("probe", %peer, session)),
        );
    }

    /// Reads a sync stream of `session` frame by frame, each read only
    /// once the previous frame found room towards the owner.
    fn spawn_reader(&self, peer: PeerId, session: u64, mut stream: libp2p::Stream) {
        let inbound = self.inbound_tx.clone();
        let internal = self.internal_tx.clone();
        let max = self.config.max_frame;
        tokio::spawn(
            async move {
                loop {
                    match frame::read(&mut stream, max).await {
                        Ok(Some(body)) => {
                            if inbound
                                .send(Inbound::Frame(peer, session, body))
                                .await
                                .is_err()
                            {
                                return;
                            }
                        }
                        Ok(None) => return,
                        Err(e @ frame::FrameError::TooLarge { .. }) => {
                            let _ = internal.send(Internal::Misbehaved(peer, format!("sync: {e}")));
                            return;
                        }
                        Err(_) => return,
                    }
                }
            }
            .instrument(tracing::debug_span!("sync_in", %peer, session)),
        );
    }

    fn on_internal(&mut self, msg: Internal) {
        match msg {
            Internal::HelloIn(peer, inc, hello) => self.sessions.hello_in(peer, inc, hello),
            Internal::SyncStream(peer, stream) => match self.sessions.session_of(&peer) {
                Some(session) => self.spawn_reader(peer, session, stream),
                None => tracing::debug!(%peer, "sync stream from a peer without a session; closed"),
            },
            Internal::Misbehaved(peer, reason) => {
                self.sessions
                    .disconnect(peer, &format!("peer misbehaved: {reason}"));
            }
            Internal::Probed(peer, session, result) => self.sessions.probed(peer, session, result),
            Internal::WriterFailed(peer, session, reason) => {
                self.sessions.writer_failed(peer, session, &reason)
            }
        }
        self.drive();
    }

    fn on_inbound(&mut self, msg: Inbound) {
        match msg {
            Inbound::Frame(peer, session, bytes) => self.sessions.frame_in(peer, session, bytes),
            Inbound::Request(peer, protocol, bytes, reply) => {
                let addr = self
                    .sessions
                    .first_addr(&peer)
                    .unwrap_or_else(Multiaddr::empty);
                self.emit(Event::Request {
                    peer,
                    addr,
                    protocol,
                    bytes,
                    reply,
                });
            }
            Inbound::Stream(peer, protocol, stream) => {
                self.emit(Event::Stream {
                    peer,
                    protocol,
                    stream,
                });
            }
        }
        self.drive();
    }
}

/// The `/p2p/<id>` component for `peer`.
pub fn multiaddr_p2p(peer: PeerId) -> Protocol<'static> {
    Protocol::P2p(peer)
}

/// Whether an address goes through a relay.
pub fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| p == Protocol::P2pCircuit)
}

/// Resolves a leading `/dns4/<host>`, `/dns6/<host>` or `/dns/<host>` to
/// an `/ip4` or `/ip6` address with the system resolver (the transport
/// itself has no DNS). Other addresses come back unchanged. Resolved once:
/// a peer that moves to another address is found again only when the
/// caller resolves again (at its next start).
pub fn resolve_dns(addr: &Multiaddr) -> Result<Multiaddr, String> {
    use std::net::ToSocketAddrs;
    let mut it = addr.iter();
    let (host, want_v4, want_v6) = match it.next() {
        Some(Protocol::Dns4(h)) => (h.to_string(), true, false),
        Some(Protocol::Dns6(h)) => (h.to_string(), false, true),
        Some(Protocol::Dns(h)) => (h.to_string(), true, true),
        _ => return Ok(addr.clone()),
    };
    let ips: Vec<std::net::IpAddr> = (host.as_str(), 0)
        .to_socket_addrs()
        .map_err(|e| format!("{addr}: cannot resolve {host}: {e}"))?
        .map(|a| a.ip())
        .filter(|ip| (ip.is_ipv4() && want_v4) || (ip.is_ipv6() && want_v6))
        .collect();
    let ip = ips
        .first()
        .ok_or_else(|| format!("{addr}: {host} has no matching address"))?;
    let mut out = Multiaddr::empty();
    out.push(match ip {
        std::net::IpAddr::V4(v4) => Protocol::Ip4(*v4),
        std::net::IpAddr::V6(v6) => Protocol::Ip6(*v6),
    });
    for p in it {
        out.push(p);
    }
    Ok(out)
}

#[cfg(test)]
mod key_tests {
    use super::*;

    #[test]
    fn key_of_gives_back_the_key_a_peer_id_embeds() -> Result<(), String> {
        let kp =
            libp2p::identity::Keypair::ed25519_from_bytes([7u8; 32]).map_err(|e| e.to_string())?;
        let k = kp
            .public()
            .try_into_ed25519()
            .map_err(|e| e.to_string())?
            .to_bytes();
        let id = peer_id_of(&k).ok_or("no peer id")?;
        assert_eq!(key_of(&id), Some(k));
        let other = peer_id_of(
            &libp2p::identity::Keypair::ed25519_from_bytes([8u8; 32])
                .map_err(|e| e.to_string())?
                .public()
                .try_into_ed25519()
                .map_err(|e| e.to_string())?
                .to_bytes(),
        )
        .ok_or("no peer id")?;
        assert_ne!(key_of(&other), Some(k));
        // A sha256 peer id (multihash code 0x12, 32 bytes) embeds no key.
        let mut bytes = vec![0x12, 0x20];
        bytes.extend_from_slice(&[0xab; 32]);
        let hashed = PeerId::from_bytes(&bytes).map_err(|e| e.to_string())?;
        assert_eq!(key_of(&hashed), None);
        Ok(())
    }
}

#[cfg(test)]
mod dns_tests {
    use super::*;

    #[test]
    fn dns_names_resolve_and_others_pass_through() {
        let a: Multiaddr = "/dns4/localhost/udp/7411/quic-v1".parse().unwrap();
        assert_eq!(
            resolve_dns(&a).unwrap().to_string(),
            "/ip4/127.0.0.1/udp/7411/quic-v1"
        );
        let b: Multiaddr = "/ip4/10.0.0.1/udp/1/quic-v1".parse().unwrap();
        assert_eq!(resolve_dns(&b).unwrap(), b);
        let c: Multiaddr = "/dns4/no-such-host.invalid/udp/1/quic-v1".parse().unwrap();
        assert!(
            resolve_dns(&c)
                .unwrap_err()
                .contains("no-such-host.invalid")
        );
    }
}
