//! Panics inside dependencies, turned into errors.
//!
//! Automerge's decoder and redb have panicked on crafted or corrupt input.
//! [`catch`] runs such a call and returns the panic as an error message;
//! while it runs, the hook installed by [`install_hook`] stays silent, so a
//! caught panic does not print a backtrace over the one-line error the
//! caller reports. Panics anywhere else still reach the previous hook.

use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Once;

thread_local! {
    static QUIET: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f`; a panic becomes `Err(message)`.
pub fn catch<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    let was = QUIET.with(|q| q.replace(true));
    let r = catch_unwind(AssertUnwindSafe(f));
    QUIET.with(|q| q.set(was));
    r.map_err(|p| {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".into())
    })
}

/// Installs (once) a panic hook that is silent for panics [`catch`] handles
/// and defers to the previous hook for all others.
pub fn install_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(Cell::get) {
                previous(info);
            }
        }));
    });
}
