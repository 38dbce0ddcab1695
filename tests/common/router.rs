//! The small router most engine tests use: `lan` 192.168.1.1/24, `wan` 198.51.100.1/24, the
//! default route via 198.51.100.254.

#![allow(dead_code)]

use std::path::Path;

use keepstate::config::Config;
use keepstate::engine::Engine;
use keepstate::rules;

pub const CONFIG: &str = r#"
[[port]]
name = "lan"
addresses = ["192.168.1.1/24"]

[[port]]
name = "wan"
addresses = ["198.51.100.1/24"]

[[route]]
to = "default"
via = "198.51.100.254"
"#;

/// This router with examples/home-router.nft, its table bounded to `max` connections,
/// checksums off (floods' frames are made fast, not checksummed).
pub fn home_router(max: u32) -> Engine {
    let cfg = Config::parse(
        &format!("{CONFIG}\n[conntrack]\nmax = {max}\nchecksum = false\n"),
        Path::new("ks.toml"),
    )
    .unwrap();
    let rules =
        rules::load_file(&Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/home-router.nft"))
            .unwrap();
    Engine::from_config(&cfg, &rules).unwrap()
}
