//! `POST /api/changes`: bundles of changes operators signed on their own
//! machines. Mutations of a valid one (and any bytes) must give a refusal
//! that leaves the fleet document as it was, or changes a certified writer
//! with authority signed — never a panic, never a smuggled change.
#![no_main]
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

static FIXTURE: OnceLock<crdt_state::fuzz::Fixture> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    crdt_state::panics::install_hook();
    let fx = FIXTURE.get_or_init(|| crdt_state::fuzz::fixture().expect("the fixture builds"));
    crdt_state::fuzz::signed_changes(fx, &crdt_state::fuzz::mutated(&fx.bundle, data));
});
