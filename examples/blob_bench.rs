//! Artifact transfer figures (issue 14), in one process over two real
//! meshes on loopback QUIC:
//!
//! `cargo run --release --example blob_bench -- throughput [MiB] [runs] [two-processes]`
//!
//! - **plain**: one stream on the same mesh stack, the holder writing the
//!   bytes in 1 MiB writes and the reader discarding them: what the stack
//!   carries with nothing else to do.
//! - **blob**: the shipped path (`daemon::blobs::Blobs` on both sides, the
//!   fetch scheduler, the wire, the stores): the node asks what the holder
//!   has, fetches and checks the group hashes, then streams the groups,
//!   checking and writing each one before it reads the next, and finally
//!   syncs the file and publishes it. Timed from `want` to whole; the time
//!   to the last group written (before the final sync) is shown too.
//!
//! Both sides run in the same run, alternately, so the ratio is fair on a
//! noisy machine. With `two-processes`, the holder is a process of its own
//! (this program run again as `serve`), with its own runtime, as an anchor
//! and a node are in the field; the CPU counted is then both processes'. It also prints the bytes on the wire per byte of blob
//! (the cost of verification: group hashes, frame headers, requests).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use blobs::BlobStore;
use daemon::blobs::{Blobs, Event as BlobEvent};
use futures::{AsyncReadExt, AsyncWriteExt};
use mesh::{Config, Event, Events, Mesh, Multiaddr, StreamProtocol};
use tokio::sync::mpsc;

const PLAIN: StreamProtocol = StreamProtocol::new("/shoal-bench/plain/1");

fn secret(n: u8) -> [u8; 32] {
    let mut s = [7u8; 32];
    s[0] = n;
    s
}

async fn start(n: u8) -> (Mesh, Events, Multiaddr) {
    let mut c = Config::new(secret(n));
    c.listen = vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap()];
    c.serve_streams = vec![mesh::BLOB, PLAIN];
    let (m, mut ev) = Mesh::start(c, vec![n]).unwrap();
    let addr = loop {
        if let Some(Event::Listening(a)) = ev.next().await {
            break a;
        }
    };
    let full = addr.with(mesh::multiaddr_p2p(m.peer_id()));
    (m, ev, full)
}

/// Pseudo-random bytes written to `path` in 1 MiB pieces.
fn make_file(path: &Path, size: u64) {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        for b in buf.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
}

/// CPU seconds this process (or process `pid`) has used (user and system,
/// all threads), from `/proc/…/stat` (clock ticks of 1/100 s).
fn cpu_seconds(pid: Option<u32>) -> f64 {
    let path = pid.map_or("/proc/self/stat".to_string(), |p| format!("/proc/{p}/stat"));
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Fields 14 and 15 of the line; 12 and 13 after the name.
    (tick(11) + tick(12)) / 100.0
}

const GIB: f64 = (1u64 << 30) as f64;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("serve") {
        return serve_role(&args[1..]).await;
    }
    if args.first().map(String::as_str) != Some("throughput") {
        eprintln!("usage: blob_bench throughput [MiB] [runs] [two-processes]");
        std::process::exit(2);
    }
    let mib: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(1024);
    let runs: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(3);
    let two = args.get(3).map(String::as_str) == Some("two-processes");
    // For profiling one side alone: `BLOB_BENCH_ONLY=plain` or `=blob`.
    let only = std::env::var("BLOB_BENCH_ONLY").unwrap_or_default();
    let size = mib << 20;
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("model.bin");
    make_file(&src, size);
    let holder_dir = tmp.path().join("holder");
    let holder_store = BlobStore::open(&holder_dir, None).unwrap();
    let (hash, _) = holder_store.add_file(&src, None).unwrap();
    std::fs::remove_file(&src).unwrap();

    let (b, mut b_ev, _) = start(2).await;
    let holder = if two {
        drop(holder_store);
        Holder::child(&holder_dir, size, &b, &mut b_ev).await
    } else {
        Holder::in_process(holder_store, &b, &mut b_ev, size).await
    };
    let a_peer = holder.peer;
    let child_pid = holder.child.as_ref().map(|c| c.id());
    // CPU of the processes in the transfer.
    let cpu_seconds = || cpu_seconds(None) + child_pid.map_or(0.0, |p| cpu_seconds(Some(p)));
    tokio::spawn(async move { while b_ev.next().await.is_some() {} });
    let mut plain = Vec::new();
    let mut blob = Vec::new();
    let mut to_last_group = Vec::new();
    let mut wire = 0.0;
    for run in 0..runs {
        // Plain stream.
        let (mbs, plain_cores) = if only == "blob" {
            (f64::NAN, f64::NAN)
        } else {
            plain_run(a_peer, &b, size, &cpu_seconds).await
        };
        plain.push(mbs);

        // The blob, into a fresh store.
        if only == "plain" {
            println!(
                "run {run}: plain {mbs:.0} MB/s; cores busy {plain_cores:.2}; CPU s per GiB {:.2}",
                plain_cores * GIB / (mbs * 1e6)
            );
            continue;
        }
        let dir = tmp.path().join(format!("node{run}"));
        let store = BlobStore::open(&dir, None).unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut node = Blobs::new(store, tx);
        let served_before = holder.served_wire();
        let cpu = cpu_seconds();
        let t = Instant::now();
        node.want(hash, size);
        node.peer_up(&b, a_peer, true);
        let mut last_group = None;
        let mut held = 0u64;
        let groups = size.div_ceil(blobs::GROUP);
        loop {
            let ev = tokio::time::timeout(Duration::from_secs(60), rx.recv())
                .await
                .expect("progress within 60 s")
                .expect("events");
            if let BlobEvent::Written { groups: g, .. } = &ev {
                held += g.iter().filter(|(_, ok)| *ok == Some(true)).count() as u64;
                if held == groups && last_group.is_none() {
                    last_group = Some(t.elapsed().as_secs_f64());
                }
            }
            let out = node.on_event(&b, t.elapsed().as_millis() as u64, ev);
            if out.ready.contains(&hash) {
                break;
            }
        }
        let d = t.elapsed().as_secs_f64();
        let blob_cores = (cpu_seconds() - cpu) / d;
        blob.push(size as f64 / d / 1e6);
        to_last_group.push(size as f64 / last_group.unwrap_or(d) / 1e6);
        // Counted at the holder: in process only.
        let served = holder.served_wire().zip(served_before).map(|(a, b)| a - b);
        let asked = node.counters().asked_wire.load(Ordering::Relaxed);
        wire = served.map_or(f64::NAN, |s| (s + asked) as f64 / size as f64);
        assert_eq!(node.counters().received.load(Ordering::Relaxed), size);
        println!(
            "run {run}: plain {:.0} MB/s, blob {:.0} MB/s = {:.0}% (to the last group written {:.0} MB/s), wire/size {:.5}; cores busy: plain {plain_cores:.2}, blob {blob_cores:.2}; CPU s per GiB: plain {:.2}, blob {:.2}",
            plain[run],
            blob[run],
            100.0 * blob[run] / plain[run],
            to_last_group[run],
            wire,
            plain_cores * GIB / (plain[run] * 1e6),
            blob_cores * GIB / (blob[run] * 1e6),
        );
        drop(node);
        std::fs::remove_dir_all(&dir).unwrap();
    }
    let (p, bl, lg) = (
        median(&mut plain),
        median(&mut blob),
        median(&mut to_last_group),
    );
    println!(
        "{mib} MiB over loopback QUIC, {runs} runs, medians: plain stream {p:.0} MB/s; artifact (verified, written, synced) {bl:.0} MB/s = {:.0}% of plain; to the last group written {lg:.0} MB/s = {:.0}%; bytes on the wire per byte of artifact {wire:.5} (+{:.2}%)",
        100.0 * bl / p,
        100.0 * lg / p,
        100.0 * (wire - 1.0)
    );
}

/// The holding end: a mesh in this process, or a child process.
struct Holder {
    peer: mesh::PeerId,
    blobs: Option<std::sync::Arc<Blobs>>,
    child: Option<std::process::Child>,
    _mesh: Option<Mesh>,
}

impl Holder {
    /// A second mesh in this process, answering the blob and plain streams.
    async fn in_process(store: BlobStore, b: &Mesh, b_ev: &mut Events, size: u64) -> Holder {
        let (a, mut a_ev, a_addr) = start(1).await;
        b.add_peer(a_addr);
        // Both admit each other.
        let mut admitted = 0;
        while admitted < 2 {
            tokio::select! {
                Some(Event::Hello { peer, .. }) = a_ev.next() => { a.admit(peer); admitted += 1; }
                Some(Event::Hello { peer, .. }) = b_ev.next() => { b.admit(peer); admitted += 1; }
            }
        }
        // The holder's blob events are of no interest.
        let (a_tx, _a_rx) = mpsc::unbounded_channel();
        let blobs = std::sync::Arc::new(Blobs::new(store, a_tx));
        let serving = blobs.clone();
        tokio::spawn(async move {
            while let Some(ev) = a_ev.next().await {
                serve_event(&serving, ev, size);
            }
        });
        Holder {
            peer: a.peer_id(),
            blobs: Some(blobs),
            child: None,
            _mesh: Some(a),
        }
    }

    /// This program run again as `serve` over the holder's store.
    async fn child(dir: &Path, size: u64, b: &Mesh, b_ev: &mut Events) -> Holder {
        use std::io::BufRead;
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .arg("serve")
            .arg(dir)
            .arg(size.to_string())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr: Multiaddr = line.trim().parse().unwrap();
        let peer = mesh::peer_of(&addr).unwrap();
        b.add_peer(addr);
        loop {
            if let Some(Event::Hello { peer: p, .. }) = b_ev.next().await
                && p == peer
            {
                b.admit(p);
                break;
            }
        }
        Holder {
            peer,
            blobs: None,
            child: Some(child),
            _mesh: None,
        }
    }

    /// Bytes written to the holder's streams so far (in process only).
    fn served_wire(&self) -> Option<u64> {
        self.blobs
            .as_ref()
            .map(|b| b.counters().served_wire.load(Ordering::Relaxed))
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Answers a stream opened to the holder.
fn serve_event(blobs: &Blobs, ev: Event, size: u64) {
    if let Event::Stream {
        peer,
        protocol,
        stream,
    } = ev
    {
        if protocol == mesh::BLOB {
            blobs.serve(true, peer, stream);
        } else {
            tokio::spawn(plain_serve(stream, size));
        }
    }
}

/// `serve DIR SIZE`: the holder as a process of its own. Prints its
/// address, admits whoever says hello, answers until killed.
async fn serve_role(args: &[String]) {
    let store = BlobStore::open(Path::new(&args[0]), None).unwrap();
    let size: u64 = args[1].parse().unwrap();
    let (a, mut a_ev, a_addr) = start(1).await;
    println!("{a_addr}");
    let (tx, _rx) = mpsc::unbounded_channel();
    let blobs = Blobs::new(store, tx);
    while let Some(ev) = a_ev.next().await {
        if let Event::Hello { peer, .. } = &ev {
            a.admit(*peer);
        }
        serve_event(&blobs, ev, size);
    }
}

/// One plain stream of `size` bytes from `a` to `b`: MB/s and cores busy.
async fn plain_run(
    a: mesh::PeerId,
    b: &Mesh,
    size: u64,
    cpu_seconds: &impl Fn() -> f64,
) -> (f64, f64) {
    let cpu = cpu_seconds();
    let t = Instant::now();
    let mut s = b.open(a, PLAIN).await.unwrap();
    s.write_all(&[1]).await.unwrap();
    s.flush().await.unwrap();
    let mut buf = vec![0u8; 1 << 16];
    let mut got = 0u64;
    loop {
        let n = s.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    assert_eq!(got, size);
    let p = t.elapsed().as_secs_f64();
    (size as f64 / p / 1e6, (cpu_seconds() - cpu) / p)
}

/// Writes `size` bytes in 1 MiB writes after the reader's one byte.
async fn plain_serve(mut s: mesh::Stream, size: u64) {
    let mut one = [0u8; 1];
    if s.read_exact(&mut one).await.is_err() {
        return;
    }
    let buf = vec![0x5au8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        if s.write_all(&buf[..n]).await.is_err() {
            return;
        }
        left -= n as u64;
    }
    let _ = s.close().await;
}
