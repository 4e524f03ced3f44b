//! The web UI's one front-end dependency: the official `@automerge/automerge`
//! package, at the version and integrity `ui/package-lock.json` pins,
//! fetched by `npm ci` into this build's `OUT_DIR` (never into the source
//! tree) and embedded in the anchor. The browser builds and signs an
//! operator's changes with it (ADR 0015).
//!
//! `SHOAL_AUTOMERGE_JS=/path/to/dist/iife/iife.js` uses a copy already on
//! disk instead (a machine without the npm registry).

use std::path::{Path, PathBuf};
use std::process::Command;

/// The package's single-file browser build (the WebAssembly inline).
const IIFE: &str = "node_modules/@automerge/automerge/dist/iife/iife.js";
/// A copy of the lock, written once `npm ci` of that lock finished.
const STAMP: &str = "installed-lock.json";

fn fail(msg: String) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(1)
}

fn same(a: &Path, b: &Path) -> bool {
    matches!((std::fs::read(a), std::fs::read(b)), (Ok(x), Ok(y)) if x == y)
}

fn main() {
    println!("cargo:rerun-if-env-changed=SHOAL_AUTOMERGE_JS");
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default());
    let pkg = manifest.join("ui/package.json");
    let lock = manifest.join("ui/package-lock.json");
    println!("cargo:rerun-if-changed={}", pkg.display());
    println!("cargo:rerun-if-changed={}", lock.display());
    let js = match std::env::var("SHOAL_AUTOMERGE_JS") {
        Ok(p) => PathBuf::from(p),
        Err(_) => {
            let out = PathBuf::from(std::env::var("OUT_DIR").unwrap_or_default()).join("npm");
            let js = out.join(IIFE);
            if !(js.exists() && same(&out.join(STAMP), &lock)) {
                fetch(&out, &pkg, &lock);
            }
            js
        }
    };
    if !js.is_file() {
        fail(format!("{} is not a file", js.display()));
    }
    println!("cargo:rustc-env=SHOAL_AUTOMERGE_JS={}", js.display());
    // dist/iife/iife.js → the package's package.json, for its version.
    let package = js
        .ancestors()
        .nth(3)
        .map(|p| p.join("package.json"))
        .unwrap_or_default();
    let text = std::fs::read_to_string(&package).unwrap_or_default();
    let version = text
        .split_once("\"version\"")
        .and_then(|(_, rest)| rest.split('"').nth(1))
        .unwrap_or_else(|| fail(format!("no version in {}", package.display())));
    println!("cargo:rustc-env=SHOAL_AUTOMERGE_VERSION={version}");
}

fn fetch(out: &Path, pkg: &Path, lock: &Path) {
    let copy = |from: &Path, name: &str| {
        if let Err(e) = std::fs::copy(from, out.join(name)) {
            fail(format!(
                "copying {} into {}: {e}",
                from.display(),
                out.display()
            ));
        }
    };
    if let Err(e) = std::fs::create_dir_all(out) {
        fail(format!("{}: {e}", out.display()));
    }
    let _ = std::fs::remove_file(out.join(STAMP));
    copy(pkg, "package.json");
    copy(lock, "package-lock.json");
    let run = Command::new("npm")
        .args([
            "ci",
            "--ignore-scripts",
            "--no-audit",
            "--no-fund",
            "--loglevel=error",
        ])
        .current_dir(out)
        .output();
    let ok = match &run {
        Ok(o) if o.status.success() => true,
        Ok(o) => {
            eprintln!("{}", String::from_utf8_lossy(&o.stderr));
            false
        }
        Err(e) => {
            eprintln!("npm: {e}");
            false
        }
    };
    if !ok {
        fail(format!(
            "the anchor's web UI embeds @automerge/automerge from the npm registry, and `npm ci` in {} failed (above). \
             Install Node.js and npm (Debian: apt-get install nodejs npm), or set SHOAL_AUTOMERGE_JS to the package's {IIFE}",
            out.display()
        ));
    }
    copy(lock, STAMP);
}
