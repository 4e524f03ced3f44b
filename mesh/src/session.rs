//! Sessions, admission and redialing: the mesh's decisions, sans-IO.
//!
//! [`Sessions`] knows, per peer, its connections, which process is at the
//! other end (its incarnation), where its hello and its admission stand,
//! the frames it sent before admission, and when a configured peer is
//! redialed. It does no I/O and reads no clock: the swarm task feeds it
//! what happened (with `now` as a value) and carries out what
//! [`Sessions::poll_output`] returns (say hello, dial, disconnect, write a
//! frame, hand an event to the owner).
//!
//! A peer's life here: connected → hello exchanged (ours sent, theirs
//! handed to the owner) → admitted or rejected → its session ends when its
//! last connection closes, a new incarnation of it shows up, or it is cut
//! off as a slow consumer. Every session has a number; stream tasks and
//! writer tasks are tagged with the number of the session they belong to,
//! and what they report about an ended session is ignored.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use libp2p::swarm::ConnectionId;
use libp2p::{Multiaddr, PeerId};

use crate::{hex, peer_of, splitmix};

/// Bytes of the incarnation id that starts every hello frame.
pub(crate) const INCARNATION: usize = 16;

/// A refused peer's connections are closed on sight for this long.
const BAN: Duration = Duration::from_secs(60);
/// A refused peer's connection is closed this long after the refusal, so
/// that our own hello, already on its way, still reaches it (it then refuses
/// us with its own reason instead of seeing a connection lost mid-hello).
const REFUSE_GRACE: Duration = Duration::from_millis(500);
/// At most this many refused peers are remembered.
const MAX_BANNED: usize = 65_536;
/// At most this many addresses are kept per known peer.
const MAX_ADDRS: usize = 8;

/// The settings the decisions need (a part of [`crate::Config`]).
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    /// A peer not admitted by then is cut off.
    pub hello_timeout: Duration,
    /// Bytes held from a peer before its admission; more cuts it off.
    pub max_held: usize,
    /// Bytes queued to a peer and not yet written; more cuts it off.
    pub max_queued: usize,
    /// Redial backoff: first and largest delay.
    pub backoff: (Duration, Duration),
    /// After losing an admitted peer: redial at least this often, this long.
    pub fast_redial: (Duration, Duration),
    /// A peer sent frames this long ago is probed.
    pub probe_after: Duration,
}

impl Settings {
    pub(crate) fn of(c: &crate::Config) -> Settings {
        Settings {
            hello_timeout: c.hello_timeout,
            max_held: c.max_frame.saturating_mul(2),
            max_queued: c.max_queued,
            backoff: c.backoff,
            fast_redial: c.fast_redial,
            probe_after: c.probe_after,
        }
    }
}

/// What the driver must do, in order.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Output {
    /// Send our hello to the peer.
    SendHello(PeerId),
    /// Hand the peer's hello to the owner.
    Hello {
        peer: PeerId,
        addr: Multiaddr,
        hello: Vec<u8>,
    },
    /// Hand a frame of an admitted peer to the owner.
    Frame { peer: PeerId, bytes: Vec<u8> },
    /// Tell the owner the peer's session ended (its writer goes with it).
    Down { peer: PeerId },
    /// Queue a frame on the peer's sync stream for this session.
    Write {
        peer: PeerId,
        session: u64,
        bytes: Vec<u8>,
    },
    /// Check that the peer still answers.
    Probe { peer: PeerId, session: u64 },
    /// Dial the peer at these addresses.
    Dial { peer: PeerId, addrs: Vec<Multiaddr> },
    /// Close every connection to the peer.
    Disconnect(PeerId),
    /// Close one connection.
    Close(ConnectionId),
}

/// Where a peer's admission stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Its hello has not reached the owner yet.
    Unheard,
    /// The owner has its hello; waiting for admit or reject.
    Asked,
    /// Admitted: frames flow both ways.
    Admitted,
    /// Refused: nothing flows, nothing is held, it is on its way out.
    Refused,
}

struct Session {
    /// Its open connections, with their addresses.
    conns: HashMap<ConnectionId, Multiaddr>,
    /// The remote process, from identify (or its first hello).
    incarnation: Option<String>,
    /// A hello whose incarnation identify has not confirmed yet.
    early_hello: Option<([u8; INCARNATION], Vec<u8>)>,
    /// Our hello went out for this session.
    hello_sent: bool,
    phase: Phase,
    /// This session's number (a new one when a session ends).
    no: u64,
    /// Frames received before admission, in order.
    held: Vec<Vec<u8>>,
    held_bytes: usize,
    /// Since when the current session waits for admission.
    since: Instant,
    /// When to check that the peer still answers (set by sending).
    probe_at: Option<Instant>,
    probing: bool,
}

struct Known {
    addrs: Vec<Multiaddr>,
    backoff: Duration,
    next: Instant,
    /// When an admitted session with it ended.
    lost_at: Option<Instant>,
}

/// Every peer's session, admission and redial state.
pub(crate) struct Sessions {
    settings: Settings,
    me: PeerId,
    sessions: HashMap<PeerId, Session>,
    known: HashMap<PeerId, Known>,
    /// Peers refused at admission, with when they may try again.
    banned: HashMap<PeerId, Instant>,
    /// Refused peers whose connection closes at the given time.
    closing: Vec<(PeerId, Instant)>,
    next_no: u64,
    rng: u64,
    /// Our hello is empty: we say nothing (an enrolling peer).
    quiet: bool,
    out: VecDeque<Output>,
}

impl Sessions {
    /// No peers yet; `seed` drives the redial jitter.
    pub(crate) fn new(settings: Settings, me: PeerId, seed: u64) -> Sessions {
        Sessions {
            settings,
            me,
            sessions: HashMap::new(),
            known: HashMap::new(),
            banned: HashMap::new(),
            closing: Vec::new(),
            next_no: 1,
            rng: seed,
            quiet: false,
            out: VecDeque::new(),
        }
    }

    /// The next thing to do.
    pub(crate) fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    fn new_no(&mut self) -> u64 {
        let n = self.next_no;
        self.next_no += 1;
        n
    }

    fn jitter(&mut self, d: Duration) -> Duration {
        self.rng = splitmix(self.rng);
        // ±25 %.
        let f = 0.75 + (self.rng % 1000) as f64 / 2000.0;
        d.mul_f64(f)
    }

    /// Keeps a peer connected (redialed while it is not).
    pub(crate) fn add_peer(&mut self, addr: Multiaddr, now: Instant) -> Result<(), String> {
        let peer =
            peer_of(&addr).ok_or_else(|| format!("peer address {addr} must end in /p2p/<id>"))?;
        if peer == self.me {
            return Ok(());
        }
        let first = self.settings.backoff.0;
        let k = self.known.entry(peer).or_insert_with(|| Known {
            addrs: Vec::new(),
            backoff: first,
            next: now,
            lost_at: None,
        });
        if !k.addrs.contains(&addr) {
            k.addrs.push(addr);
            if k.addrs.len() > MAX_ADDRS {
                k.addrs.remove(0);
            }
        }
        Ok(())
    }

    /// A connection was established. `false`: the peer is refused and the
    /// connection is being closed.
    pub(crate) fn connected(
        &mut self,
        peer: PeerId,
        conn: ConnectionId,
        addr: Multiaddr,
        now: Instant,
    ) -> bool {
        tracing::debug!(%peer, %addr, "connected");
        if let Some(until) = self.banned.get(&peer) {
            if *until > now {
                tracing::debug!(%peer, %addr, "refused peer reconnected; closing");
                self.out.push_back(Output::Close(conn));
                return false;
            }
            self.banned.remove(&peer);
        }
        if !self.sessions.contains_key(&peer) {
            let no = self.new_no();
            self.sessions.insert(
                peer,
                Session {
                    conns: HashMap::new(),
                    incarnation: None,
                    early_hello: None,
                    hello_sent: false,
                    phase: Phase::Unheard,
                    no,
                    held: Vec::new(),
                    held_bytes: 0,
                    since: now,
                    probe_at: None,
                    probing: false,
                },
            );
        }
        let Some(s) = self.sessions.get_mut(&peer) else {
            return true;
        };
        s.conns.insert(conn, addr);
        // A fresh session: say hello now rather than after identify (one
        // round trip sooner). With older connections present, wait for
        // identify to tell whether the peer restarted.
        if s.conns.len() == 1 && !s.hello_sent {
            self.say_hello(peer);
        }
        true
    }

    /// A connection closed; `remaining` connections to the peer are left.
    pub(crate) fn closed(
        &mut self,
        peer: PeerId,
        conn: ConnectionId,
        remaining: u32,
        now: Instant,
    ) {
        if let Some(s) = self.sessions.get_mut(&peer) {
            s.conns.remove(&conn);
        }
        if remaining == 0 {
            self.closing.retain(|(p, _)| *p != peer);
            self.end_session(peer, true, now);
            if self.known.contains_key(&peer) {
                self.backoff(peer, now);
            }
        }
    }

    /// Identify told us the agent of the process at the other end of `conn`.
    pub(crate) fn identified(
        &mut self,
        peer: PeerId,
        conn: ConnectionId,
        agent: &str,
        now: Instant,
    ) {
        let Some(inc) = agent.strip_prefix("shoal/") else {
            let addr = self.addr_of(&peer);
            tracing::warn!(%peer, %addr, %agent, "not a Shoal peer; disconnecting");
            self.out.push_back(Output::Disconnect(peer));
            return;
        };
        let Some(s) = self.sessions.get_mut(&peer) else {
            return;
        };
        match &s.incarnation {
            Some(old) if old == inc => {
                // The same process on another connection. A session that
                // ended while this connection was being set up has not
                // said hello yet.
                if !s.hello_sent {
                    self.say_hello(peer);
                }
                return;
            }
            Some(_) => {
                // A restarted process: our other connections lead to the
                // old one. Close them and start a new session.
                tracing::info!(%peer, "peer restarted; replacing its old connections");
                let stale: Vec<ConnectionId> =
                    s.conns.keys().filter(|c| **c != conn).copied().collect();
                for c in stale {
                    // Forgotten now, so that the new session's address
                    // is the new connection's.
                    s.conns.remove(&c);
                    self.out.push_back(Output::Close(c));
                }
                self.end_session(peer, false, now);
            }
            None => {}
        }
        let Some(s) = self.sessions.get_mut(&peer) else {
            return;
        };
        s.incarnation = Some(inc.to_string());
        s.since = now;
        let early = s.early_hello.take();
        if !s.hello_sent {
            self.say_hello(peer);
        }
        if let Some((hinc, hello)) = early
            && hex(&hinc) == inc
        {
            self.ask(peer, hello);
        }
    }

    /// Whether our hello is empty (then we say nothing, as an enrolling
    /// peer does).
    pub(crate) fn set_quiet(&mut self, quiet: bool) {
        self.quiet = quiet;
    }

    fn say_hello(&mut self, peer: PeerId) {
        if self.quiet {
            return;
        }
        if let Some(s) = self.sessions.get_mut(&peer) {
            s.hello_sent = true;
        }
        self.out.push_back(Output::SendHello(peer));
    }

    /// The peer's hello arrived.
    pub(crate) fn hello_in(&mut self, peer: PeerId, inc: [u8; INCARNATION], hello: Vec<u8>) {
        let Some(s) = self.sessions.get_mut(&peer) else {
            return;
        };
        if s.incarnation.is_none() && s.conns.len() == 1 {
            // The first process we meet on a single connection: its hello
            // names its incarnation; identify will agree.
            s.incarnation = Some(hex(&inc));
            self.ask(peer, hello);
        } else if s.incarnation.as_deref() == Some(hex(&inc).as_str()) {
            self.ask(peer, hello);
        } else {
            // Identify has not told us about this process yet.
            s.early_hello = Some((inc, hello));
        }
    }

    fn ask(&mut self, peer: PeerId, hello: Vec<u8>) {
        let Some(addr) = self.first_addr(&peer) else {
            return;
        };
        let Some(s) = self.sessions.get_mut(&peer) else {
            return;
        };
        if s.phase != Phase::Unheard {
            return;
        }
        s.phase = Phase::Asked;
        self.out.push_back(Output::Hello { peer, addr, hello });
    }

    /// The number of the peer's current session (to tag a stream with).
    pub(crate) fn session_of(&self, peer: &PeerId) -> Option<u64> {
        self.sessions.get(peer).map(|s| s.no)
    }

    /// A sync frame arrived on a stream of session `session`.
    pub(crate) fn frame_in(&mut self, peer: PeerId, session: u64, bytes: Vec<u8>) {
        let max_held = self.settings.max_held;
        let Some(s) = self.sessions.get_mut(&peer) else {
            return;
        };
        if s.no != session {
            tracing::debug!(%peer, "frame of an ended session dropped");
            return;
        }
        match s.phase {
            Phase::Admitted => self.out.push_back(Output::Frame { peer, bytes }),
            Phase::Refused => {}
            Phase::Unheard | Phase::Asked => {
                s.held_bytes += bytes.len();
                if s.held_bytes > max_held {
                    s.phase = Phase::Refused;
                    s.held.clear();
                    s.held_bytes = 0;
                    let addr = self.addr_of(&peer);
                    tracing::warn!(%peer, %addr, "peer sent too much before admission; disconnecting");
                    self.out.push_back(Output::Disconnect(peer));
                    return;
                }
                s.held.push(bytes);
            }
        }
    }

    /// The owner admits a peer whose hello it was handed.
    pub(crate) fn admit(&mut self, peer: PeerId) {
        let first = self.settings.backoff.0;
        if let Some(k) = self.known.get_mut(&peer) {
            k.backoff = first;
        }
        let Some(s) = self.sessions.get_mut(&peer) else {
            return;
        };
        if s.phase != Phase::Asked {
            return;
        }
        s.phase = Phase::Admitted;
        s.held_bytes = 0;
        for bytes in std::mem::take(&mut s.held) {
            self.out.push_back(Output::Frame { peer, bytes });
        }
    }

    /// The owner refuses a peer: cut off, forgotten, its reconnections
    /// closed for a minute.
    pub(crate) fn reject(&mut self, peer: PeerId, reason: &str, now: Instant) {
        let addr = self.addr_of(&peer);
        tracing::warn!(%peer, %addr, %reason, "peer refused admission; disconnecting");
        self.known.remove(&peer);
        if let Some(s) = self.sessions.get_mut(&peer)
            && s.phase != Phase::Admitted
        {
            s.phase = Phase::Refused;
            s.held.clear();
            s.held_bytes = 0;
        }
        // A refused peer's redials cost us a handshake each, nothing more.
        self.banned.retain(|_, until| *until > now);
        if self.banned.len() < MAX_BANNED {
            self.banned.insert(peer, now + BAN);
        }
        // Nothing passes in either direction from now on (the phase is
        // Refused); the connection itself closes after a short grace.
        self.closing.retain(|(p, _)| *p != peer);
        self.closing.push((peer, now + REFUSE_GRACE));
    }

    /// Cuts a peer off (the owner's wish, or a peer that broke a rule).
    pub(crate) fn disconnect(&mut self, peer: PeerId, reason: &str) {
        let addr = self.addr_of(&peer);
        tracing::warn!(%peer, %addr, %reason, "disconnecting peer");
        self.out.push_back(Output::Disconnect(peer));
    }

    /// The owner sends a frame; `queued` bytes are already waiting in the
    /// peer's writer (0 if it has none).
    ///
    /// A frame that would take the queue over its bound is not queued:
    /// the peer is a slow consumer, and its session ends here (the owner
    /// hears `Down` now, and nothing more is written in this session), so
    /// the peer never sees a session with a frame missing.
    pub(crate) fn send(&mut self, peer: PeerId, bytes: Vec<u8>, queued: usize, now: Instant) {
        let max_queued = self.settings.max_queued;
        let probe_after = self.settings.probe_after;
        let Some(s) = self.sessions.get_mut(&peer) else {
            return;
        };
        if s.phase != Phase::Admitted {
            tracing::debug!(%peer, "not admitted; frame dropped");
            return;
        }
        let total = queued.saturating_add(bytes.len());
        if total > max_queued {
            let addr = self.addr_of(&peer);
            tracing::warn!(%peer, %addr, queued, frame = bytes.len(), max_queued,
                "peer too slow: send queue full; ending its session and disconnecting");
            self.end_session(peer, false, now);
            self.out.push_back(Output::Disconnect(peer));
            return;
        }
        self.out.push_back(Output::Write {
            peer,
            session: s.no,
            bytes,
        });
        if s.probe_at.is_none() && !s.probing {
            s.probe_at = Some(now + probe_after);
        }
    }

    /// The owner sent the peer something on a stream of its own: probe it
    /// as after a frame.
    pub(crate) fn check(&mut self, peer: PeerId, now: Instant) {
        let probe_after = self.settings.probe_after;
        if let Some(s) = self.sessions.get_mut(&peer)
            && s.phase == Phase::Admitted
            && s.probe_at.is_none()
            && !s.probing
        {
            s.probe_at = Some(now + probe_after);
        }
    }

    /// The sync stream of session `session` failed.
    pub(crate) fn writer_failed(&mut self, peer: PeerId, session: u64, reason: &str) {
        if self
            .sessions
            .get(&peer)
            .is_some_and(|s| s.no == session && s.phase == Phase::Admitted)
        {
            tracing::info!(%peer, %reason, "sync stream failed; restarting the session");
            self.out.push_back(Output::Disconnect(peer));
        }
    }

    /// A probe of session `session` came back.
    pub(crate) fn probed(&mut self, peer: PeerId, session: u64, result: Result<(), String>) {
        let Some(s) = self.sessions.get_mut(&peer) else {
            return;
        };
        if s.no != session || s.phase != Phase::Admitted {
            return;
        }
        s.probing = false;
        if let Err(reason) = result {
            tracing::info!(%peer, %reason, "peer stopped answering; ending the session");
            self.out.push_back(Output::Disconnect(peer));
        }
    }

    /// Time passed: redial known peers that are due, probe peers we sent
    /// to, cut off peers not admitted in time.
    pub(crate) fn tick(&mut self, now: Instant) {
        let mut keep = Vec::new();
        for (peer, at) in std::mem::take(&mut self.closing) {
            if at <= now {
                self.out.push_back(Output::Disconnect(peer));
            } else {
                keep.push((peer, at));
            }
        }
        self.closing = keep;
        let due: Vec<(PeerId, Vec<Multiaddr>)> = self
            .known
            .iter()
            .filter(|(p, k)| k.next <= now && !self.sessions.contains_key(p))
            .map(|(p, k)| (*p, k.addrs.clone()))
            .collect();
        for (peer, addrs) in due {
            self.out.push_back(Output::Dial { peer, addrs });
            self.backoff(peer, now);
        }
        let probes: Vec<PeerId> = self
            .sessions
            .iter()
            .filter(|(_, s)| {
                s.phase == Phase::Admitted && !s.probing && s.probe_at.is_some_and(|t| t <= now)
            })
            .map(|(p, _)| *p)
            .collect();
        for peer in probes {
            if let Some(s) = self.sessions.get_mut(&peer) {
                s.probe_at = None;
                s.probing = true;
                self.out.push_back(Output::Probe {
                    peer,
                    session: s.no,
                });
            }
        }
        let timeout = self.settings.hello_timeout;
        let late: Vec<PeerId> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.phase != Phase::Admitted && now.duration_since(s.since) > timeout)
            .map(|(p, _)| *p)
            .collect();
        for peer in late {
            let addr = self.addr_of(&peer);
            tracing::warn!(%peer, %addr, "peer did not complete hello in time; disconnecting");
            self.out.push_back(Output::Disconnect(peer));
            if let Some(s) = self.sessions.get_mut(&peer) {
                s.since = now;
            }
        }
    }

    /// Schedules the next dial of a known peer and doubles its backoff.
    fn backoff(&mut self, peer: PeerId, now: Instant) {
        let (fast, fast_for) = self.settings.fast_redial;
        let Some((b, lost_at)) = self.known.get(&peer).map(|k| (k.backoff, k.lost_at)) else {
            return;
        };
        let max = match lost_at {
            Some(t) if now.saturating_duration_since(t) < fast_for => fast,
            _ => self.settings.backoff.1,
        };
        let wait = self.jitter(b);
        if let Some(k) = self.known.get_mut(&peer) {
            k.next = now + wait;
            k.backoff = (b * 2).min(max);
        }
    }

    /// Ends a peer's session: the owner hears `Down` if it was admitted.
    fn end_session(&mut self, peer: PeerId, remove: bool, now: Instant) {
        let no = self.new_no();
        let Some(s) = self.sessions.get_mut(&peer) else {
            return;
        };
        let was_admitted = s.phase == Phase::Admitted;
        s.phase = Phase::Unheard;
        s.no = no;
        s.hello_sent = false;
        s.probe_at = None;
        s.probing = false;
        s.held.clear();
        s.held_bytes = 0;
        s.since = now;
        if remove {
            self.sessions.remove(&peer);
        }
        if was_admitted {
            let first = self.settings.backoff.0;
            if let Some(k) = self.known.get_mut(&peer) {
                k.lost_at = Some(now);
                k.backoff = first;
            }
            self.out.push_back(Output::Down { peer });
        }
    }

    /// Stops redialing anyone (shutting down).
    pub(crate) fn forget_all(&mut self) {
        self.known.clear();
    }

    /// The address of one of the peer's connections, if it has one.
    pub(crate) fn first_addr(&self, peer: &PeerId) -> Option<Multiaddr> {
        self.sessions
            .get(peer)
            .and_then(|s| s.conns.values().next().cloned())
    }

    /// The addresses of the peer's connections.
    pub(crate) fn addrs(&self, peer: &PeerId) -> Vec<Multiaddr> {
        self.sessions
            .get(peer)
            .map(|s| s.conns.values().cloned().collect())
            .unwrap_or_default()
    }

    /// For logs: an address of the peer, or `?`.
    pub(crate) fn addr_of(&self, peer: &PeerId) -> String {
        self.first_addr(peer)
            .map(|a| a.to_string())
            .unwrap_or_else(|| "?".into())
    }

    /// Admitted peers, each with the address of a connection.
    pub(crate) fn admitted(&self) -> Vec<(PeerId, Multiaddr)> {
        self.sessions
            .iter()
            .filter(|(_, s)| s.phase == Phase::Admitted)
            .filter_map(|(p, s)| s.conns.values().next().map(|a| (*p, a.clone())))
            .collect()
    }

    /// Connected peers (admitted or not).
    pub(crate) fn connected_count(&self) -> usize {
        self.sessions.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    fn settings() -> Settings {
        Settings {
            hello_timeout: Duration::from_secs(10),
            max_held: 1000,
            max_queued: 10_000,
            backoff: (Duration::from_millis(250), Duration::from_secs(30)),
            fast_redial: (Duration::from_millis(500), Duration::from_secs(120)),
            probe_after: Duration::from_secs(2),
        }
    }

    fn machine() -> Sessions {
        Sessions::new(settings(), PeerId::random(), 42)
    }

    fn addr(n: u8) -> Multiaddr {
        Multiaddr::empty()
            .with(libp2p::multiaddr::Protocol::Ip4([10, 0, 0, n].into()))
            .with(libp2p::multiaddr::Protocol::Udp(7411))
            .with(libp2p::multiaddr::Protocol::QuicV1)
    }

    fn conn(n: usize) -> ConnectionId {
        ConnectionId::new_unchecked(n)
    }

    fn drain(s: &mut Sessions) -> Vec<Output> {
        std::iter::from_fn(|| s.poll_output()).collect()
    }

    fn frames(out: &[Output]) -> Vec<Vec<u8>> {
        out.iter()
            .filter_map(|o| match o {
                Output::Frame { bytes, .. } => Some(bytes.clone()),
                _ => None,
            })
            .collect()
    }

    fn writes(out: &[Output]) -> usize {
        out.iter()
            .filter(|o| matches!(o, Output::Write { .. }))
            .count()
    }

    const INC: [u8; INCARNATION] = [1; INCARNATION];

    /// A peer connected on one connection whose hello reached the owner.
    fn asked(s: &mut Sessions, peer: PeerId, now: Instant) -> Vec<Output> {
        assert!(s.connected(peer, conn(1), addr(1), now));
        s.hello_in(peer, INC, b"hi".to_vec());
        drain(s)
    }

    fn admitted(s: &mut Sessions, peer: PeerId, now: Instant) -> u64 {
        asked(s, peer, now);
        s.admit(peer);
        drain(s);
        s.session_of(&peer).unwrap_or(0)
    }

    #[test]
    fn a_fresh_connection_says_hello_and_hands_the_peers_hello_on() {
        let mut s = machine();
        let p = PeerId::random();
        let out = asked(&mut s, p, Instant::now());
        assert_eq!(
            out,
            vec![
                Output::SendHello(p),
                Output::Hello {
                    peer: p,
                    addr: addr(1),
                    hello: b"hi".to_vec()
                }
            ]
        );
        // A second hello in the same session is not a second question.
        s.hello_in(p, INC, b"again".to_vec());
        assert_eq!(drain(&mut s), vec![]);
    }

    #[test]
    fn a_quiet_peer_says_no_hello() {
        let mut s = machine();
        s.set_quiet(true);
        let p = PeerId::random();
        assert!(s.connected(p, conn(1), addr(1), Instant::now()));
        assert_eq!(drain(&mut s), vec![]);
    }

    #[test]
    fn held_frames_wait_for_admission_and_come_out_in_order() {
        let mut s = machine();
        let p = PeerId::random();
        asked(&mut s, p, Instant::now());
        let no = s.session_of(&p).unwrap_or(0);
        for i in 0..5u8 {
            s.frame_in(p, no, vec![i; 10]);
        }
        assert_eq!(frames(&drain(&mut s)), Vec::<Vec<u8>>::new());
        s.admit(p);
        let want: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 10]).collect();
        assert_eq!(frames(&drain(&mut s)), want);
        // After admission frames go straight through, still in order.
        s.frame_in(p, no, vec![5; 10]);
        assert_eq!(frames(&drain(&mut s)), vec![vec![5; 10]]);
        // A second admit releases nothing twice.
        s.admit(p);
        assert_eq!(drain(&mut s), vec![]);
    }

    #[test]
    fn an_admit_before_the_hello_admits_nothing() {
        let mut s = machine();
        let p = PeerId::random();
        assert!(s.connected(p, conn(1), addr(1), Instant::now()));
        let no = s.session_of(&p).unwrap_or(0);
        s.admit(p);
        s.frame_in(p, no, b"early".to_vec());
        assert_eq!(frames(&drain(&mut s)), Vec::<Vec<u8>>::new());
        s.send(p, b"out".to_vec(), 0, Instant::now());
        assert_eq!(writes(&drain(&mut s)), 0);
    }

    #[test]
    fn a_rejected_peers_held_frames_are_never_delivered() {
        let mut s = machine();
        let p = PeerId::random();
        let t0 = Instant::now();
        asked(&mut s, p, t0);
        let no = s.session_of(&p).unwrap_or(0);
        s.frame_in(p, no, b"held".to_vec());
        s.reject(p, "not of this fleet", t0);
        // Closed after a grace that lets our own hello reach it.
        assert_eq!(drain(&mut s), vec![]);
        s.tick(t0 + REFUSE_GRACE);
        assert_eq!(drain(&mut s), vec![Output::Disconnect(p)]);
        // Neither a late admit nor later frames let anything through.
        s.frame_in(p, no, b"late".to_vec());
        s.admit(p);
        s.send(p, b"secret".to_vec(), 0, t0);
        assert_eq!(drain(&mut s), vec![]);
        // Its connection closes: no Down (it never had a session).
        s.closed(p, conn(1), 0, t0);
        assert_eq!(drain(&mut s), vec![]);
        // It redials: closed on sight for a minute, heard again after.
        assert!(!s.connected(p, conn(2), addr(1), t0 + 30 * SEC));
        assert_eq!(drain(&mut s), vec![Output::Close(conn(2))]);
        assert!(s.connected(p, conn(3), addr(1), t0 + 61 * SEC));
        assert_eq!(drain(&mut s), vec![Output::SendHello(p)]);
    }

    #[test]
    fn a_rejected_peer_is_not_redialed() {
        let mut s = machine();
        let p = PeerId::random();
        let t0 = Instant::now();
        s.add_peer(addr(1).with(libp2p::multiaddr::Protocol::P2p(p)), t0)
            .unwrap_or_default();
        s.tick(t0);
        assert!(matches!(drain(&mut s)[..], [Output::Dial { .. }]));
        asked(&mut s, p, t0);
        s.reject(p, "no", t0);
        s.closed(p, conn(1), 0, t0);
        drain(&mut s);
        for i in 1..100 {
            s.tick(t0 + i * SEC);
        }
        assert_eq!(drain(&mut s), vec![]);
    }

    #[test]
    fn too_much_before_admission_cuts_the_peer_off() {
        let mut s = machine();
        let p = PeerId::random();
        asked(&mut s, p, Instant::now());
        let no = s.session_of(&p).unwrap_or(0);
        s.frame_in(p, no, vec![0; 600]);
        assert_eq!(drain(&mut s), vec![]);
        s.frame_in(p, no, vec![1; 600]);
        assert_eq!(drain(&mut s), vec![Output::Disconnect(p)]);
        // What it sent is gone, even if the owner admits it now.
        s.admit(p);
        assert_eq!(frames(&drain(&mut s)), Vec::<Vec<u8>>::new());
    }

    #[test]
    fn a_peer_over_its_send_bound_is_cut_off_and_gets_nothing_more() {
        let mut s = machine();
        let p = PeerId::random();
        let now = Instant::now();
        let no = admitted(&mut s, p, now);
        // Up to the bound, frames are queued.
        s.send(p, vec![0; 100], 9_900, now);
        assert_eq!(
            drain(&mut s),
            vec![Output::Write {
                peer: p,
                session: no,
                bytes: vec![0; 100]
            }]
        );
        // One byte over: the session ends at once and the peer is cut off.
        s.send(p, vec![1; 101], 9_900, now);
        assert_eq!(
            drain(&mut s),
            vec![Output::Down { peer: p }, Output::Disconnect(p)]
        );
        // Nothing more is written in that session, however empty the
        // queue gets, and nothing more of it is delivered.
        s.send(p, vec![2; 10], 0, now);
        s.frame_in(p, no, b"old".to_vec());
        assert_eq!(drain(&mut s), vec![]);
        // Its connection closes: no second Down.
        s.closed(p, conn(1), 0, now);
        assert_eq!(drain(&mut s), vec![]);
    }

    #[test]
    fn a_new_incarnation_ends_the_session_and_its_old_frames() {
        let mut s = machine();
        let p = PeerId::random();
        let now = Instant::now();
        let old = admitted(&mut s, p, now);
        s.identified(p, conn(1), &format!("shoal/{}", hex(&INC)), now);
        assert_eq!(drain(&mut s), vec![]);
        // The restarted process comes on a second connection.
        assert!(s.connected(p, conn(2), addr(2), now));
        assert_eq!(drain(&mut s), vec![]);
        let inc2 = [2u8; INCARNATION];
        // Its hello may come before identify says who it is: kept.
        s.hello_in(p, inc2, b"new".to_vec());
        assert_eq!(drain(&mut s), vec![]);
        s.identified(p, conn(2), &format!("shoal/{}", hex(&inc2)), now);
        let out = drain(&mut s);
        assert_eq!(
            out,
            vec![
                Output::Close(conn(1)),
                Output::Down { peer: p },
                Output::SendHello(p),
                Output::Hello {
                    peer: p,
                    addr: addr(2),
                    hello: b"new".to_vec()
                },
            ]
        );
        // A frame of the old session, late, is dropped, even once the new
        // session is admitted.
        let new = s.session_of(&p).unwrap_or(0);
        assert_ne!(old, new);
        s.frame_in(p, old, b"stale".to_vec());
        s.admit(p);
        s.frame_in(p, new, b"fresh".to_vec());
        assert_eq!(frames(&drain(&mut s)), vec![b"fresh".to_vec()]);
    }

    #[test]
    fn a_peer_that_is_not_shoal_is_cut_off() {
        let mut s = machine();
        let p = PeerId::random();
        let now = Instant::now();
        assert!(s.connected(p, conn(1), addr(1), now));
        drain(&mut s);
        s.identified(p, conn(1), "rust-libp2p/0.57", now);
        assert_eq!(drain(&mut s), vec![Output::Disconnect(p)]);
    }

    #[test]
    fn a_peer_not_admitted_in_time_is_cut_off_once_per_timeout() {
        let mut s = machine();
        let p = PeerId::random();
        let q = PeerId::random();
        let t0 = Instant::now();
        asked(&mut s, p, t0);
        admitted(&mut s, q, t0);
        s.tick(t0 + 10 * SEC);
        assert_eq!(drain(&mut s), vec![]);
        s.tick(t0 + 11 * SEC);
        assert_eq!(drain(&mut s), vec![Output::Disconnect(p)]);
        s.tick(t0 + 12 * SEC);
        assert_eq!(drain(&mut s), vec![]);
    }

    #[test]
    fn a_peer_we_sent_to_is_probed_and_cut_off_if_silent() {
        let mut s = machine();
        let p = PeerId::random();
        let t0 = Instant::now();
        let no = admitted(&mut s, p, t0);
        s.tick(t0 + 5 * SEC);
        assert_eq!(drain(&mut s), vec![], "no probe before sending");
        s.send(p, b"x".to_vec(), 0, t0 + 5 * SEC);
        drain(&mut s);
        s.tick(t0 + 6 * SEC);
        assert_eq!(drain(&mut s), vec![]);
        s.tick(t0 + 7 * SEC);
        assert_eq!(
            drain(&mut s),
            vec![Output::Probe {
                peer: p,
                session: no
            }]
        );
        // An answer for another session means nothing.
        s.probed(p, no + 1000, Err("old".into()));
        assert_eq!(drain(&mut s), vec![]);
        s.probed(p, no, Err("no answer".into()));
        assert_eq!(drain(&mut s), vec![Output::Disconnect(p)]);
    }

    /// What the owner sent on a stream of its own (a data batch) is
    /// checked like a frame: a probe after `probe_after`, one at a time.
    #[test]
    fn a_peer_checked_is_probed_once() {
        let mut s = machine();
        let p = PeerId::random();
        let t0 = Instant::now();
        let no = admitted(&mut s, p, t0);
        s.check(p, t0 + SEC);
        s.check(p, t0 + 2 * SEC);
        s.tick(t0 + 2 * SEC);
        assert_eq!(drain(&mut s), vec![], "not before probe_after");
        s.tick(t0 + 3 * SEC);
        assert_eq!(
            drain(&mut s),
            vec![Output::Probe {
                peer: p,
                session: no
            }]
        );
        s.check(p, t0 + 3 * SEC);
        s.tick(t0 + 9 * SEC);
        assert_eq!(drain(&mut s), vec![], "not while a probe is out");
        // A peer not admitted is not probed.
        let q = PeerId::random();
        s.check(q, t0);
        s.tick(t0 + 10 * SEC);
        assert!(
            !drain(&mut s)
                .iter()
                .any(|o| matches!(o, Output::Probe { peer, .. } if *peer == q))
        );
    }

    /// Ticks every 10 ms from `from` for `span`; returns when each dial of
    /// `p` was asked for.
    fn dials(s: &mut Sessions, p: PeerId, from: Instant, span: Duration) -> Vec<Instant> {
        let mut at = Vec::new();
        let step = Duration::from_millis(10);
        let mut t = from;
        while t < from + span {
            s.tick(t);
            for o in drain(s) {
                if let Output::Dial { peer, .. } = o
                    && peer == p
                {
                    at.push(t);
                }
            }
            t += step;
        }
        at
    }

    fn gaps(at: &[Instant]) -> Vec<Duration> {
        at.windows(2).map(|w| w[1] - w[0]).collect()
    }

    #[test]
    fn redial_backoff_doubles_up_to_its_cap() {
        let mut s = machine();
        let p = PeerId::random();
        let t0 = Instant::now();
        let full = addr(1).with(libp2p::multiaddr::Protocol::P2p(p));
        s.add_peer(full.clone(), t0).unwrap_or_default();
        s.tick(t0);
        assert_eq!(
            drain(&mut s),
            vec![Output::Dial {
                peer: p,
                addrs: vec![full]
            }]
        );
        let at = dials(&mut s, p, t0, Duration::from_secs(600));
        let g = gaps(&at);
        assert!(g.len() > 10, "{g:?}");
        // 250 ms, 500 ms, ... 16 s, each ±25 %: every gap longer than the
        // one before while doubling...
        for w in g[..6].windows(2) {
            assert!(w[1] > w[0], "{g:?}");
        }
        // ...never over the 30 s cap (+25 % jitter, + one tick), and at
        // the cap in the end.
        let cap = Duration::from_secs(30);
        assert!(
            g.iter()
                .all(|d| *d <= cap.mul_f64(1.25) + Duration::from_millis(10)),
            "{g:?}"
        );
        assert!(
            g[g.len() - 3..].iter().all(|d| *d >= cap.mul_f64(0.75)),
            "{g:?}"
        );
    }

    #[test]
    fn a_connected_peer_is_not_redialed() {
        let mut s = machine();
        let p = PeerId::random();
        let t0 = Instant::now();
        s.add_peer(addr(1).with(libp2p::multiaddr::Protocol::P2p(p)), t0)
            .unwrap_or_default();
        assert!(s.connected(p, conn(1), addr(1), t0));
        drain(&mut s);
        assert!(dials(&mut s, p, t0, Duration::from_secs(60)).is_empty());
    }

    #[test]
    fn losing_an_admitted_peer_resets_the_backoff_and_redials_fast_for_a_while() {
        let mut s = machine();
        let p = PeerId::random();
        let t0 = Instant::now();
        s.add_peer(addr(1).with(libp2p::multiaddr::Protocol::P2p(p)), t0)
            .unwrap_or_default();
        // Unreachable for a minute: the backoff grows past 4 s.
        let before = dials(&mut s, p, t0, Duration::from_secs(60));
        assert!(gaps(&before).last().is_some_and(|d| *d > 4 * SEC));
        // It connects and is admitted, then the link goes.
        let t1 = t0 + 60 * SEC;
        admitted(&mut s, p, t1);
        s.closed(p, conn(1), 0, t1);
        assert_eq!(drain(&mut s), vec![Output::Down { peer: p }]);
        // For two minutes: redialed at least every 500 ms (+25 %), the
        // first within 250 ms (+25 %, + a tick).
        let fast = dials(&mut s, p, t1, Duration::from_secs(119));
        assert!(
            fast[0] - t1 <= Duration::from_millis(323),
            "{:?}",
            fast[0] - t1
        );
        assert!(
            gaps(&fast).iter().all(|d| *d <= Duration::from_millis(635)),
            "{:?}",
            gaps(&fast)
        );
        // Then the backoff grows again.
        let later = dials(&mut s, p, t1 + 121 * SEC, Duration::from_secs(120));
        assert!(
            gaps(&later).iter().any(|d| *d > 4 * SEC),
            "{:?}",
            gaps(&later)
        );
    }

    #[test]
    fn a_peers_own_address_and_bad_addresses_are_not_kept() {
        let me = PeerId::random();
        let mut s = Sessions::new(settings(), me, 1);
        let t0 = Instant::now();
        assert!(s.add_peer(addr(1), t0).is_err());
        assert!(
            s.add_peer(addr(1).with(libp2p::multiaddr::Protocol::P2p(me)), t0)
                .is_ok()
        );
        s.tick(t0);
        assert_eq!(drain(&mut s), vec![]);
    }
}
