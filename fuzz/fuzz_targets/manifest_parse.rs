//! Manifests are typed by people and piped from scripts: any text must give
//! manifests or an error naming what is wrong, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = crdt_state::fleet::manifest::parse("fuzz.yaml", text);
    }
});
