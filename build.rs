//! Link-time settings of the `shoal` binary.

fn main() {
    // Relative relocations packed (DT_RELR, glibc ≥ 2.36): the loader reads
    // a few kB at start instead of 1.8 MB of `.rela.dyn`, which stayed
    // resident in every daemon (issue 13's idle RSS). The binary stays
    // position-independent (ASLR kept).
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux")
        && std::env::var("CARGO_CFG_TARGET_ENV").as_deref() == Ok("gnu")
    {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
