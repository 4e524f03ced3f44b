//! The anchor's HTTP API: JSON bodies (login, apply, resolve, demo edits),
//! the Authorization header and session cookie, path segments.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    cloud_anchor::api::fuzz::request_parts(data);
});
