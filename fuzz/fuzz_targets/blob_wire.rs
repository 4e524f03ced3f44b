//! Bytes on `/shoal/blob/1`: any input decodes to a request or an answer
//! within the bounds, or to an error, never a panic; what decodes encodes
//! back to the same bytes; an answer never holds more groups or hashes
//! than its request asked for. The stream of frames a fetcher reads
//! through its buffer (`mesh::frame::Buffered`), fed in pieces of any
//! size, gives the frames the plain decoder finds, and an error that
//! stays one.
#![no_main]
use libfuzzer_sys::fuzz_target;

use blobs::wire::{Answer, MAX_GROUPS, Request};
use blobs::{GROUP, Hash};

/// Frames of `bytes` read through a buffer of `capacity`, `piece` bytes
/// at a time; the error, if one came.
fn buffered(bytes: &[u8], capacity: usize, piece: usize, max: usize) -> (Vec<Vec<u8>>, bool) {
    let mut r = mesh::frame::Buffered::new(capacity);
    let (mut frames, mut fed) = (Vec::new(), 0);
    loop {
        match r.frame(max) {
            Ok(Some(f)) => {
                assert!(f.len() <= max);
                frames.push(f.to_vec());
                continue;
            }
            Ok(None) => {}
            Err(_) => {
                // An error stays one.
                assert!(r.frame(max).is_err() && r.room(max).is_err());
                return (frames, true);
            }
        }
        if fed == bytes.len() {
            return (frames, false);
        }
        let room = match r.room(max) {
            Ok(room) => room,
            Err(_) => return (frames, true),
        };
        assert!(!room.is_empty());
        let n = room.len().min(piece).min(bytes.len() - fed);
        room[..n].copy_from_slice(&bytes[fed..fed + n]);
        r.filled(n);
        fed += n;
    }
}

fuzz_target!(|data: &[u8]| {
    if let Some((&shape, rest)) = data.split_first() {
        let (capacity, piece) = (usize::from(shape & 0x0f) * 8, usize::from(shape >> 4) + 1);
        let (frames, failed) = buffered(rest, capacity, piece, 512);
        match mesh::frame::decode(rest, 512) {
            Ok((whole, _)) => {
                assert!(!failed);
                assert_eq!(frames, whole);
            }
            Err(_) => assert!(failed),
        }
    }
    if let Ok(req) = Request::decode(data) {
        assert_eq!(req.encode(), data);
        if let Request::Groups { count, .. } = req {
            assert!(count >= 1 && count <= MAX_GROUPS);
        }
    }
    let hash = Hash([3u8; 32]);
    let size = 10 * GROUP + 77;
    for req in [
        Request::Have { hash, size },
        Request::Cvs {
            hash,
            size,
            from: 2,
            count: 3,
        },
        Request::Groups {
            hash,
            size,
            from: 9,
            count: 2,
        },
    ] {
        // The borrowing parse of group answers takes exactly what the full
        // decoder takes, with the same bytes.
        match (blobs::wire::groups_in(&req, data), Answer::decode(&req, data)) {
            (Ok(Some(d)), Ok(Answer::Groups { data: g, .. })) => assert_eq!(d, &g[..]),
            (Ok(Some(_)), _) | (Err(_), Ok(_)) | (Ok(None), Ok(Answer::Groups { .. })) => {
                panic!("groups_in and decode disagree")
            }
            _ => {}
        }
        if let Ok(a) = Answer::decode(&req, data) {
            assert_eq!(Answer::decode(&req, &a.encode()).ok(), Some(a.clone()));
            match (&req, &a) {
                (Request::Cvs { count, .. }, Answer::Cvs(v)) => assert_eq!(v.len(), *count as usize),
                (Request::Groups { .. }, Answer::Groups { data, .. }) => {
                    assert_eq!(data.len() as u64, GROUP + 77)
                }
                _ => {}
            }
        }
    }
});
