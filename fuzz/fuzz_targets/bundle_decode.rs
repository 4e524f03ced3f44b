//! Bundle files come from USB sticks and other people: decoding any bytes
//! must give a bundle or an error, never a panic or a huge allocation.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(b) = crdt_state::signed::bundle::Bundle::decode(data) {
        // What decodes must encode back to the same bytes.
        if let Some(root) = b.root {
            assert_eq!(b.encode(root), data);
        }
    }
});
