//! The blob layer of two daemons over real meshes on loopback QUIC, in one
//! process: what a holder does when it serves as many streams of groups as
//! it will.
#![cfg(feature = "driver")]
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use blobs::BlobStore;
use blobs::wire::Request;
use daemon::blobs::Blobs;
use futures::AsyncWriteExt;
use mesh::{Config, Event, Events, Mesh, Multiaddr};
use tokio::sync::mpsc;

async fn start(n: u8) -> (Mesh, Events, Multiaddr) {
    let mut secret = [9u8; 32];
    secret[0] = n;
    let mut c = Config::new(secret);
    c.listen = vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap()];
    c.serve_streams = vec![mesh::BLOB];
    let (m, mut ev) = Mesh::start(c, vec![n]).unwrap();
    let addr = loop {
        if let Some(Event::Listening(a)) = ev.next().await {
            break a;
        }
    };
    let full = addr.with(mesh::multiaddr_p2p(m.peer_id()));
    (m, ev, full)
}

/// Connects `b` to `a` and has each admit the other.
async fn admit_both(a: &Mesh, a_ev: &mut Events, a_addr: Multiaddr, b: &Mesh, b_ev: &mut Events) {
    b.add_peer(a_addr);
    let mut admitted = 0;
    while admitted < 2 {
        tokio::select! {
            Some(Event::Hello { peer, .. }) = a_ev.next() => { a.admit(peer); admitted += 1; }
            Some(Event::Hello { peer, .. }) = b_ev.next() => { b.admit(peer); admitted += 1; }
        }
    }
}

/// A holder that serves one stream of groups at a time turns a second
/// away as busy; the node turned away leaves it alone for a few seconds
/// (`blobs::fetch::BUSY_MS`), asks again once the first stream closed, and
/// gets the whole blob, checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_holder_turns_a_stream_away_and_the_node_comes_back_later() {
    let tmp = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..3 * blobs::GROUP as usize + 5)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    let holder_store = BlobStore::open(&tmp.path().join("holder"), None).unwrap();
    let src = tmp.path().join("m.bin");
    std::fs::write(&src, &data).unwrap();
    let (hash, size) = holder_store.add_file(&src, None).unwrap();

    let (a, mut a_ev, a_addr) = start(1).await;
    let (b, mut b_ev, _) = start(2).await;
    let (c, mut c_ev, _) = start(3).await;
    admit_both(&a, &mut a_ev, a_addr.clone(), &b, &mut b_ev).await;
    admit_both(&a, &mut a_ev, a_addr, &c, &mut c_ev).await;

    let (a_tx, _a_rx) = mpsc::unbounded_channel();
    let mut holder = Blobs::new(holder_store, a_tx);
    holder.max_serving = 1;
    let holder = std::sync::Arc::new(holder);
    let serving = holder.clone();
    tokio::spawn(async move {
        while let Some(ev) = a_ev.next().await {
            if let Event::Stream { peer, stream, .. } = ev {
                serving.serve(true, peer, stream);
            }
        }
    });
    tokio::spawn(async move { while b_ev.next().await.is_some() {} });
    tokio::spawn(async move { while c_ev.next().await.is_some() {} });

    // b holds the one place: it asks for two groups and reads one.
    let mut stream = b.open(a.peer_id(), mesh::BLOB).await.unwrap();
    let run = Request::Groups {
        hash,
        size,
        from: 0,
        count: 2,
    };
    mesh::frame::write(&mut stream, &run.encode())
        .await
        .unwrap();
    let first = mesh::frame::read(&mut stream, blobs::wire::MAX_ANSWER)
        .await
        .unwrap()
        .expect("a group");
    assert!(first.len() > blobs::GROUP as usize);
    assert_eq!(holder.counters().serving.load(Ordering::Relaxed), 1);
    let mut held = Some(stream);

    // c wants the blob: its stream of groups is turned away.
    let c_store = BlobStore::open(&tmp.path().join("c"), None).unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut node = Blobs::new(c_store, tx);
    let started = Instant::now();
    node.want(hash, size);
    node.peer_up(&c, a.peer_id(), true);
    let mut closed = None;
    let mut ticks = tokio::time::interval(Duration::from_millis(100));
    loop {
        assert!(started.elapsed() < Duration::from_secs(40), "never done");
        let now = || started.elapsed().as_millis() as u64;
        tokio::select! {
            ev = rx.recv() => {
                let out = node.on_event(&c, now(), ev.expect("events"));
                if out.ready.contains(&hash) {
                    break;
                }
            }
            _ = ticks.tick() => node.tick(&c, now()),
        }
        if holder.counters().busy.load(Ordering::Relaxed) == 1
            && let Some(mut h) = held.take()
        {
            // Nothing of c's came while b held the place.
            assert_eq!(node.counters().received.load(Ordering::Relaxed), 0);
            // b lets go of its place.
            h.close().await.unwrap();
            closed = Some(Instant::now());
        }
    }
    let closed = closed.expect("c was turned away while b held the place");
    assert_eq!(
        holder.counters().busy.load(Ordering::Relaxed),
        1,
        "turned away once: c waited before it asked again"
    );
    // It waited: it came back no sooner than BUSY_MS after the refusal.
    assert!(
        closed.elapsed() + Duration::from_millis(200)
            >= Duration::from_millis(blobs::fetch::BUSY_MS),
        "back after {:?}",
        closed.elapsed()
    );
    assert_eq!(
        std::fs::read(node.store().path(&hash)).unwrap(),
        data,
        "the blob whole"
    );
    // c's stream closes once its fetch is done, and its place is free.
    let deadline = Instant::now() + Duration::from_secs(10);
    while holder.counters().serving.load(Ordering::Relaxed) != 0 {
        assert!(Instant::now() < deadline, "the place was never given back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
