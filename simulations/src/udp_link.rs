//! A user-space UDP link for real-process tests: forwards datagrams between
//! clients and one upstream address after a delay, with jitter and random
//! loss, and can be cut and restored. The kernel here has no netem, so this
//! is how real QUIC between real processes sees latency and loss (on
//! loopback, or from the root namespace between network namespaces).
//!
//! Each client address gets its own upstream socket, so the upstream sees
//! one peer per client (as through a NAT). Bytes and datagrams are counted
//! per direction for cost measurements.

use std::collections::{BinaryHeap, HashMap};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Delay, jitter and loss of a link (each direction).
#[derive(Clone, Copy, Debug, Default)]
pub struct LinkConfig {
    /// One-way delay.
    pub delay: Duration,
    /// Uniform jitter added to the delay, in `[0, jitter]`.
    pub jitter: Duration,
    /// Fraction of datagrams dropped, 0.0..=1.0.
    pub loss: f64,
}

/// Traffic counters (payload bytes, without IP/UDP headers).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Client → upstream datagrams forwarded.
    pub up_packets: u64,
    /// Client → upstream bytes forwarded.
    pub up_bytes: u64,
    /// Upstream → client datagrams forwarded.
    pub down_packets: u64,
    /// Upstream → client bytes forwarded.
    pub down_bytes: u64,
}

#[derive(PartialEq, Eq)]
struct Pending {
    due: Instant,
    seq: u64,
    up: bool,
    client: SocketAddr,
    bytes: Vec<u8>,
}

impl Ord for Pending {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other.due.cmp(&self.due).then(other.seq.cmp(&self.seq))
    }
}

impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

struct Shared {
    config: Mutex<LinkConfig>,
    cut: AtomicBool,
    stop: AtomicBool,
    queue: Mutex<(BinaryHeap<Pending>, u64, u64)>,
    wake: Condvar,
    clients: Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>,
    up_packets: AtomicU64,
    up_bytes: AtomicU64,
    down_packets: AtomicU64,
    down_bytes: AtomicU64,
}

impl Shared {
    /// Queues a datagram, or drops it (cut, loss). Returns nothing: a
    /// dropped datagram is simply gone, as on a real link.
    fn schedule(&self, up: bool, client: SocketAddr, bytes: Vec<u8>) {
        if self.cut.load(Ordering::Relaxed) {
            return;
        }
        let config = *self.config.lock().unwrap_or_else(|e| e.into_inner());
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        q.2 = xorshift(q.2);
        let r = (q.2 >> 11) as f64 / (1u64 << 53) as f64;
        if r < config.loss {
            return;
        }
        q.2 = xorshift(q.2);
        let jitter = if config.jitter.is_zero() {
            Duration::ZERO
        } else {
            Duration::from_nanos(q.2 % (config.jitter.as_nanos() as u64 + 1))
        };
        q.1 += 1;
        let seq = q.1;
        q.0.push(Pending {
            due: Instant::now() + config.delay + jitter,
            seq,
            up,
            client,
            bytes,
        });
        self.wake.notify_one();
    }
}

fn xorshift(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

/// A running link. Dropping it stops its threads.
pub struct UdpLink {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl UdpLink {
    /// Listens on `listen` (port 0 for any) and forwards to `upstream`.
    pub fn start(
        listen: SocketAddr,
        upstream: SocketAddr,
        config: LinkConfig,
    ) -> std::io::Result<UdpLink> {
        let socket = Arc::new(UdpSocket::bind(listen)?);
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        let addr = socket.local_addr()?;
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            | 1;
        let shared = Arc::new(Shared {
            config: Mutex::new(config),
            cut: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            queue: Mutex::new((BinaryHeap::new(), 0, seed)),
            wake: Condvar::new(),
            clients: Mutex::new(HashMap::new()),
            up_packets: AtomicU64::new(0),
            up_bytes: AtomicU64::new(0),
            down_packets: AtomicU64::new(0),
            down_bytes: AtomicU64::new(0),
        });
        // Client side: receive, and make an upstream socket per client.
        {
            let shared = shared.clone();
            let socket = socket.clone();
            thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !shared.stop.load(Ordering::Relaxed) {
                    let Ok((n, client)) = socket.recv_from(&mut buf) else {
                        continue;
                    };
                    let known = shared
                        .clients
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .contains_key(&client);
                    if !known && let Ok(up) = new_upstream(&shared, upstream, client) {
                        shared
                            .clients
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(client, up);
                    }
                    shared.schedule(true, client, buf[..n].to_vec());
                }
            });
        }
        // Delivery.
        {
            let shared = shared.clone();
            thread::spawn(move || {
                loop {
                    let mut q = shared.queue.lock().unwrap_or_else(|e| e.into_inner());
                    if shared.stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let now = Instant::now();
                    match q.0.peek() {
                        Some(p) if p.due <= now => {
                            let Some(p) = q.0.pop() else { continue };
                            drop(q);
                            deliver(&shared, &socket, upstream, p);
                        }
                        Some(p) => {
                            let wait = p.due - now;
                            let _ = shared.wake.wait_timeout(q, wait);
                        }
                        None => {
                            let _ = shared.wake.wait_timeout(q, Duration::from_millis(50));
                        }
                    }
                }
            });
        }
        Ok(UdpLink { addr, shared })
    }

    /// The address clients send to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Cuts the link (everything dropped, both ways) or restores it.
    pub fn set_cut(&self, cut: bool) {
        self.shared.cut.store(cut, Ordering::Relaxed);
    }

    /// Changes delay, jitter and loss.
    pub fn set_config(&self, config: LinkConfig) {
        *self.shared.config.lock().unwrap_or_else(|e| e.into_inner()) = config;
    }

    /// Traffic forwarded so far.
    pub fn counters(&self) -> Counters {
        Counters {
            up_packets: self.shared.up_packets.load(Ordering::SeqCst),
            up_bytes: self.shared.up_bytes.load(Ordering::SeqCst),
            down_packets: self.shared.down_packets.load(Ordering::SeqCst),
            down_bytes: self.shared.down_bytes.load(Ordering::SeqCst),
        }
    }
}

impl Drop for UdpLink {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.wake.notify_all();
    }
}

fn new_upstream(
    shared: &Arc<Shared>,
    upstream: SocketAddr,
    client: SocketAddr,
) -> std::io::Result<Arc<UdpSocket>> {
    let bind: SocketAddr = if upstream.is_ipv4() {
        "0.0.0.0:0".parse().map_err(std::io::Error::other)?
    } else {
        "[::]:0".parse().map_err(std::io::Error::other)?
    };
    let up = Arc::new(UdpSocket::bind(bind)?);
    up.set_read_timeout(Some(Duration::from_millis(50)))?;
    let reader = up.clone();
    let shared = shared.clone();
    thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while !shared.stop.load(Ordering::Relaxed) {
            let Ok((n, from)) = reader.recv_from(&mut buf) else {
                continue;
            };
            if from == upstream {
                shared.schedule(false, client, buf[..n].to_vec());
            }
        }
    });
    Ok(up)
}

fn deliver(shared: &Shared, socket: &UdpSocket, upstream: SocketAddr, p: Pending) {
    // Counted before the send, so a reader that saw the datagram arrive
    // also sees it counted.
    let n = p.bytes.len() as u64;
    if p.up {
        let up = shared
            .clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&p.client)
            .cloned();
        if let Some(up) = up {
            shared.up_packets.fetch_add(1, Ordering::SeqCst);
            shared.up_bytes.fetch_add(n, Ordering::SeqCst);
            let _ = up.send_to(&p.bytes, upstream);
        }
    } else {
        shared.down_packets.fetch_add(1, Ordering::SeqCst);
        shared.down_bytes.fetch_add(n, Ordering::SeqCst);
        let _ = socket.send_to(&p.bytes, p.client);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwards_with_delay_both_ways_and_cuts() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let link = UdpLink::start(
            "127.0.0.1:0".parse().unwrap(),
            server.local_addr().unwrap(),
            LinkConfig {
                delay: Duration::from_millis(40),
                ..LinkConfig::default()
            },
        )
        .unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let t0 = Instant::now();
        client.send_to(b"ping", link.addr()).unwrap();
        let mut buf = [0u8; 16];
        let (n, from) = server.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"ping");
        server.send_to(b"pong", from).unwrap();
        let (n, _) = client.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"pong");
        assert!(
            t0.elapsed() >= Duration::from_millis(80),
            "{:?}",
            t0.elapsed()
        );
        assert_eq!(
            link.counters(),
            Counters {
                up_packets: 1,
                up_bytes: 4,
                down_packets: 1,
                down_bytes: 4
            }
        );
        link.set_cut(true);
        client.send_to(b"lost", link.addr()).unwrap();
        server
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        assert!(server.recv_from(&mut buf).is_err(), "a cut link delivered");
    }
}
