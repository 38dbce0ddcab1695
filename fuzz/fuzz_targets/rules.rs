#![no_main]
//! cargo +nightly fuzz run rules (see the README's reliability section).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| keepstate::fuzz::rules_text(data));
