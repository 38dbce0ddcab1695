//! Every input the fuzzers keep (`fuzz/seeds/TARGET`, and the crashes they found, saved in
//! `tests/fixtures/fuzz/TARGET`) through the same target bodies (`keepstate::fuzz`), on the
//! stable toolchain: what once crashed stays fixed. See the README's reliability section for
//! how the fuzzers are run.

use std::path::Path;

fn replay(target: &str, body: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut n = 0;
    for dir in [
        root.join("fuzz/seeds").join(target),
        root.join("tests/fixtures/fuzz").join(target),
    ] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let data = std::fs::read(e.path()).unwrap();
            body(&data);
            n += 1;
        }
    }
    assert!(n > 0, "no inputs for {target}");
}

#[test]
fn engine_inputs() {
    replay("engine", keepstate::fuzz::engine_frames);
}

#[test]
fn rules_inputs() {
    replay("rules", keepstate::fuzz::rules_text);
}

#[test]
fn config_inputs() {
    replay("config", keepstate::fuzz::config_text);
}

#[test]
fn ftp_inputs() {
    replay("ftp", keepstate::fuzz::ftp_payload);
}

#[test]
fn sip_inputs() {
    replay("sip", keepstate::fuzz::sip_message);
}
