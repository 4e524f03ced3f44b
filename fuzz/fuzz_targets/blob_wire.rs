//! Bytes on `/shoal/blob/1`: any input decodes to a request or an answer
//! within the bounds, or to an error, never a panic; what decodes encodes
//! back to the same bytes; an answer never holds more groups or hashes
//! than its request asked for.
#![no_main]
use libfuzzer_sys::fuzz_target;

use blobs::wire::{Answer, MAX_GROUPS, Request};
use blobs::{GROUP, Hash};

fuzz_target!(|data: &[u8]| {
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
