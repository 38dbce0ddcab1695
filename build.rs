//! Compiles the XDP fast path (src/dataplane/bpf/fastpath.bpf.c) with clang for the BPF
//! target; src/dataplane/fastpath.rs embeds the object. clang comes from scripts/setup.sh.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = "src/dataplane/bpf/fastpath.bpf.c";
    println!("cargo:rerun-if-changed={src}");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR")).join("fastpath.bpf.o");
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".into());
    let arch = match std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("x86_64") => "x86_64-linux-gnu",
        Ok("aarch64") => "aarch64-linux-gnu",
        _ => "",
    };
    let status = Command::new(&clang)
        .args(["-O2", "-g", "-Wall", "-Werror", "-target", "bpf"])
        .arg(format!("-I/usr/include/{arch}"))
        .args(["-c", src, "-o"])
        .arg(&out)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("clang failed ({s}) compiling {src}: see its messages above"),
        Err(e) => panic!(
            "cannot run `{clang}` ({e}): the XDP fast path is compiled with clang for the BPF \
             target; install it with scripts/setup.sh (Debian package clang), or point CLANG at one"
        ),
    }
}
