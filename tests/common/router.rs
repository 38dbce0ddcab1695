//! The small router most engine tests use: `lan` 192.168.1.1/24, `wan` 198.51.100.1/24, the
//! default route via 198.51.100.254.

#![allow(dead_code)]

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
