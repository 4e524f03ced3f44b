//! The mesh alone, several in one process over real QUIC on loopback: the
//! hello, admission, held frames, rejection, limits and restarts.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use mesh::{Config, Event, Events, Mesh, Multiaddr, PeerId};

fn secret(n: u8) -> [u8; 32] {
    let mut s = [0u8; 32];
    s[0] = n;
    s[31] = 0x5a;
    s
}

fn config(n: u8) -> Config {
    let mut c = Config::new(secret(n));
    c.listen = vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap()];
    c.hello_timeout = Duration::from_secs(2);
    c
}

async fn next(events: &mut Events) -> Event {
    tokio::time::timeout(Duration::from_secs(15), events.next())
        .await
        .expect("an event within 15 s")
        .expect("mesh running")
}

/// Starts a mesh and returns its full address (with /p2p).
async fn start(c: Config, hello: &[u8]) -> (Mesh, Events, Multiaddr) {
    let (m, mut ev) = Mesh::start(c, hello.to_vec()).unwrap();
    let addr = loop {
        if let Event::Listening(a) = next(&mut ev).await {
            break a;
        }
    };
    let full = addr.with(mesh::multiaddr_p2p(m.peer_id()));
    (m, ev, full)
}

/// Waits for the hello of `peer` and returns it; other events are ignored.
async fn hello_from(events: &mut Events, peer: PeerId) -> Vec<u8> {
    loop {
        if let Event::Hello { peer: p, hello, .. } = next(events).await
            && p == peer
        {
            return hello;
        }
    }
}

async fn frame_from(events: &mut Events, peer: PeerId) -> Vec<u8> {
    loop {
        match next(events).await {
            Event::Frame { peer: p, bytes } if p == peer => return bytes,
            _ => {}
        }
    }
}

async fn down(events: &mut Events, peer: PeerId) {
    loop {
        if let Event::Down { peer: p } = next(events).await
            && p == peer
        {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admitted_peers_exchange_frames_in_order_and_held_frames_wait() {
    let (a, mut ae, a_addr) = start(config(1), b"hello from a").await;
    let (b, mut be, _) = start(config(2), b"hello from b").await;
    b.add_peer(a_addr);
    assert_eq!(hello_from(&mut ae, b.peer_id()).await, b"hello from b");
    assert_eq!(hello_from(&mut be, a.peer_id()).await, b"hello from a");
    // b admits a and sends at once; a has not admitted b yet: held.
    b.admit(a.peer_id());
    for i in 0..50u32 {
        b.send(a.peer_id(), i.to_be_bytes().to_vec());
    }
    // Nothing of b's may reach a's owner before a admits b. On loopback the
    // 50 frames arrive within milliseconds, so 300 ms is ample time for a
    // leak to show.
    let leaked = tokio::time::timeout(Duration::from_millis(300), async {
        loop {
            match ae.next().await {
                Some(Event::Frame { peer, .. }) if peer == b.peer_id() => return true,
                None => return false,
                _ => {}
            }
        }
    })
    .await;
    assert!(
        leaked.is_err(),
        "a frame reached a's owner before a admitted b"
    );
    a.admit(b.peer_id());
    for i in 0..50u32 {
        assert_eq!(frame_from(&mut ae, b.peer_id()).await, i.to_be_bytes());
    }
    a.send(b.peer_id(), b"back".to_vec());
    assert_eq!(frame_from(&mut be, a.peer_id()).await, b"back");
    let st = a.status().await.unwrap();
    assert_eq!(st.admitted.len(), 1);
    assert_eq!(st.admitted[0].0, b.peer_id());
}

async fn wait_connected(a: &Mesh, want: usize, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if a.status().await.unwrap().connected == want {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_is_cut_off_after_the_hello_timeout() {
    let (a, _ae, a_addr) = start(config(3), b"a").await;
    // A peer that says nothing (as an enrolling peer would).
    let (silent, _se, _) = start(config(4), b"").await;
    silent.add_peer(a_addr);
    assert!(wait_connected(&a, 1, Duration::from_secs(10)).await);
    assert!(
        wait_connected(&a, 0, Duration::from_secs(5)).await,
        "a silent peer stayed connected past the 2 s hello timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_peer_gets_nothing_and_stays_out() {
    let (a, mut ae, a_addr) = start(config(5), b"a").await;
    let (rogue, mut re, _) = start(config(12), b"rogue").await;
    rogue.add_peer(a_addr);
    assert_eq!(hello_from(&mut ae, rogue.peer_id()).await, b"rogue");
    a.reject(rogue.peer_id(), "not of this fleet");
    a.send(rogue.peer_id(), b"secret".to_vec());
    assert!(wait_connected(&a, 0, Duration::from_secs(5)).await);
    // The rogue keeps redialing; it never gets a frame, a session or a
    // second hearing.
    let heard = tokio::time::timeout(Duration::from_secs(4), async {
        loop {
            match re.next().await {
                Some(Event::Frame { .. }) | None => return "frame",
                _ => {}
            }
        }
    });
    let asked_again = tokio::time::timeout(Duration::from_secs(4), async {
        loop {
            if let Some(Event::Hello { .. }) = ae.next().await {
                return "hello";
            }
        }
    });
    let (heard, asked_again) = tokio::join!(heard, asked_again);
    assert!(heard.is_err(), "a rejected peer received a frame");
    assert!(asked_again.is_err(), "a rejected peer was heard again");
    assert_eq!(a.status().await.unwrap().admitted.len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_frame_cuts_the_sender_off() {
    let mut c = config(6);
    c.max_frame = 1024;
    let (a, mut ae, a_addr) = start(c, b"a").await;
    let (b, mut be, _) = start(config(7), b"b").await;
    b.add_peer(a_addr);
    hello_from(&mut ae, b.peer_id()).await;
    hello_from(&mut be, a.peer_id()).await;
    a.admit(b.peer_id());
    b.admit(a.peer_id());
    b.send(a.peer_id(), vec![0u8; 100]);
    assert_eq!(frame_from(&mut ae, b.peer_id()).await.len(), 100);
    b.send(a.peer_id(), vec![0u8; 4096]);
    down(&mut ae, b.peer_id()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_peer_starts_a_new_session_at_once() {
    let (a, mut ae, a_addr) = start(config(8), b"a").await;
    let (b, be, _) = start(config(9), b"b1").await;
    b.add_peer(a_addr.clone());
    hello_from(&mut ae, b.peer_id()).await;
    a.admit(b.peer_id());
    // b vanishes without closing anything (as if killed)...
    drop(b);
    drop(be);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // ...and comes back with the same key: a replaces the old session
    // long before its 60 s idle timeout.
    let started = std::time::Instant::now();
    let (b2, mut be2, _) = start(config(9), b"b2").await;
    b2.add_peer(a_addr);
    loop {
        match next(&mut ae).await {
            Event::Down { peer } => assert_eq!(peer, b2.peer_id()),
            Event::Hello { peer, hello, .. } if peer == b2.peer_id() => {
                assert_eq!(hello, b"b2");
                break;
            }
            _ => {}
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    a.admit(b2.peer_id());
    hello_from(&mut be2, a.peer_id()).await;
    b2.admit(a.peer_id());
    a.send(b2.peer_id(), b"welcome back".to_vec());
    assert_eq!(frame_from(&mut be2, a.peer_id()).await, b"welcome back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_answered_before_admission() {
    let mut c = config(10);
    c.serve = vec![mesh::ENROLL];
    let (_a, mut ae, a_addr) = start(c, b"a").await;
    let (b, _be, _) = start(config(11), b"").await;
    let asker =
        tokio::spawn(async move { b.request(a_addr, mesh::ENROLL, b"token".to_vec()).await });
    loop {
        if let Event::Request {
            bytes,
            reply,
            protocol,
            ..
        } = next(&mut ae).await
        {
            assert_eq!(protocol, mesh::ENROLL);
            assert_eq!(bytes, b"token");
            reply.send(b"certificate".to_vec()).unwrap();
            break;
        }
    }
    assert_eq!(asker.await.unwrap().unwrap(), b"certificate");
}

/// `open` and `serve_streams`: a connected peer's stream on a protocol it
/// serves whole reaches its owner as a stream, which answers in many
/// frames; a protocol it does not serve cannot be opened, and the error
/// names the peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_served_stream_is_handed_to_the_owner_whole() {
    use futures::AsyncWriteExt;
    let mut c = config(12);
    c.serve_streams = vec![mesh::BLOB];
    let (a, mut ae, a_addr) = start(c, b"a").await;
    let (b, mut be, _) = start(config(13), b"b").await;
    b.add_peer(a_addr);
    let a_id = a.peer_id();
    let _ = hello_from(&mut be, a_id).await;
    b.admit(a_id);
    let asker = {
        let b = b.clone();
        tokio::spawn(async move {
            let mut s = b.open(a_id, mesh::BLOB).await.unwrap();
            mesh::frame::write(&mut s, b"groups").await.unwrap();
            let mut frames = Vec::new();
            while let Some(f) = mesh::frame::read(&mut s, 1 << 20).await.unwrap() {
                frames.push(f);
            }
            frames
        })
    };
    let mut stream = loop {
        if let Event::Stream {
            protocol, stream, ..
        } = next(&mut ae).await
        {
            assert_eq!(protocol, mesh::BLOB);
            break stream;
        }
    };
    let req = mesh::frame::read(&mut stream, 64).await.unwrap().unwrap();
    assert_eq!(req, b"groups");
    for i in 0..3u8 {
        mesh::frame::write(&mut stream, &vec![i; 16 << 10])
            .await
            .unwrap();
    }
    stream.close().await.unwrap();
    let frames = asker.await.unwrap();
    assert_eq!(frames.len(), 3);
    assert!(
        frames
            .iter()
            .enumerate()
            .all(|(i, f)| f.len() == 16 << 10 && f[0] == i as u8)
    );
    // b serves no stream protocol: a cannot open one to it.
    let e = a.open(b.peer_id(), mesh::BLOB).await.expect_err("refused");
    assert!(e.to_string().contains(&b.peer_id().to_string()), "{e}");
}

/// A numbered 256 KiB frame.
fn big_frame(i: u32) -> Vec<u8> {
    let mut v = vec![0u8; 256 << 10];
    v[..4].copy_from_slice(&i.to_be_bytes());
    v
}

fn number(bytes: &[u8]) -> u32 {
    u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}

/// Sends numbered frames `from..to` from `a` to `b`, one every 10 ms,
/// watching `a`'s events meanwhile; returns the number of the first frame
/// not sent if `a` lost `b` (its session with `b` ended).
async fn send_paced(a: &Mesh, ae: &mut Events, b: PeerId, from: u32, to: u32) -> Option<u32> {
    for i in from..to {
        a.send(b, big_frame(i));
        if let Ok(Some(Event::Down { peer })) =
            tokio::time::timeout(Duration::from_millis(10), ae.next()).await
            && peer == b
        {
            return Some(i + 1);
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_consumer_slows_the_sender_which_cuts_it_off_without_a_gap() {
    let mut ca = config(13);
    ca.max_queued = 2 << 20;
    let (a, mut ae, a_addr) = start(ca, b"a").await;
    let (b, mut be, _) = start(config(14), b"b").await;
    b.add_peer(a_addr);
    hello_from(&mut ae, b.peer_id()).await;
    hello_from(&mut be, a.peer_id()).await;
    a.admit(b.peer_id());
    b.admit(a.peer_id());
    let (ap, bp) = (a.peer_id(), b.peer_id());

    // While b's owner reads, 10 MiB at 25 MiB/s go through whole.
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        while got.len() < 40 {
            got.push(number(&frame_from(&mut be, ap).await));
        }
        (be, got)
    });
    assert_eq!(send_paced(&a, &mut ae, bp, 0, 40).await, None);
    let (mut be, got) = tokio::time::timeout(Duration::from_secs(20), reader)
        .await
        .expect("b read 40 frames")
        .unwrap();
    assert_eq!(got, (0..40).collect::<Vec<u32>>());

    // b's owner stops reading. Without backpressure b's mesh would read
    // all 100 MiB into memory and a would never fall behind. With it, b
    // stops reading the stream, QUIC stops a's writer, a's queue reaches
    // its 2 MiB and a ends the session.
    let cut = send_paced(&a, &mut ae, bp, 40, 440).await;
    let Some(sent) = cut else {
        panic!("a sent 100 MiB to a stalled consumer without falling behind");
    };

    // What b's owner finds when it reads again: frames in order with no
    // gap, then the end of the session, and fewer frames than were sent.
    let mut next_no = 40;
    loop {
        match next(&mut be).await {
            Event::Frame { peer, bytes } if peer == ap => {
                assert_eq!(number(&bytes), next_no, "a frame is missing");
                next_no += 1;
            }
            Event::Down { peer } if peer == ap => break,
            _ => {}
        }
    }
    assert!(next_no < sent, "b got {next_no} frames of {sent}");
}

/// The receive buffer of the UDP socket bound to `port`, as `ss` reports it
/// (`skmem:(…,rbN,…)` on the line after the socket's).
fn receive_buffer(port: u16) -> Option<u64> {
    let out = std::process::Command::new("ss")
        .args(["-u", "-a", "-m", "-n"])
        .output()
        .expect("ss (iproute2) runs");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let bound_here = line
            .split_whitespace()
            .nth(3)
            .is_some_and(|local| local.ends_with(&format!(":{port}")));
        if bound_here {
            let mem = lines.next()?;
            let rb = mem
                .split(['(', ',', ')'])
                .find_map(|f| f.strip_prefix("rb"))?;
            return rb.parse().ok();
        }
    }
    None
}

fn port_of(addr: &Multiaddr) -> u16 {
    addr.iter()
        .find_map(|p| match p {
            libp2p::multiaddr::Protocol::Udp(port) => Some(port),
            _ => None,
        })
        .expect("a UDP address")
}

/// The mesh asks for a large receive buffer on its listening socket (a
/// burst that overflows the default one is dropped, and QUIC halves its
/// window); with 0 it leaves the system's default. Needs root or a
/// `net.core.rmem_max` of at least 4 MiB (CI runs as root).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listening_sockets_get_the_receive_buffer_asked_for() {
    let (_a, _ae, a_addr) = start(config(41), b"a").await;
    let mut plain = config(42);
    plain.udp_receive_buffer = 0;
    let (_b, _be, b_addr) = start(plain, b"b").await;
    let sized = receive_buffer(port_of(&a_addr)).expect("a's socket listed by ss");
    assert!(
        sized >= 8 << 20,
        "a's receive buffer is {sized} bytes, asked for {}",
        8 << 20
    );
    let default: u64 = std::fs::read_to_string("/proc/sys/net/core/rmem_default")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let left = receive_buffer(port_of(&b_addr)).expect("b's socket listed by ss");
    assert_eq!(left, default, "b's buffer was left as the system sets it");
}
