#![no_main]
//! cargo +nightly fuzz run config (see the README's reliability section).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| keepstate::fuzz::config_text(data));
