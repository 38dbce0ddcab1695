//! Snapshot tests of `keepstate check` on bad files: tests/fixtures/diag/NAME.nft is checked
//! from that directory and its stderr and exit code must equal NAME.expected. Run with
//! `UPDATE_SNAPSHOTS=1` to rewrite the expectations after a deliberate change (then read the
//! diff).

use std::path::Path;
use std::process::Command;

#[test]
fn diagnostics_match_snapshots() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/diag");
    let update = std::env::var_os("UPDATE_SNAPSHOTS").is_some();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "nft"))
        .collect();
    files.sort();
    assert!(files.len() >= 10, "too few diagnostic fixtures");
    let mut failures = Vec::new();
    for f in &files {
        let name = f.file_name().unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_keepstate"))
            .arg("check")
            .arg(name)
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(
            out.stdout.is_empty(),
            "check without --print prints nothing on stdout"
        );
        let got = format!(
            "{}exit {}\n",
            String::from_utf8_lossy(&out.stderr),
            out.status.code().unwrap_or(-1)
        );
        let exp_path = f.with_extension("expected");
        if update {
            std::fs::write(&exp_path, &got).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&exp_path).unwrap_or_default();
        if got != want {
            failures.push(format!(
                "{}:\n--- expected\n{want}--- got\n{got}",
                name.to_string_lossy()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_error_is_reported_not_only_the_first() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/diag");
    let out = Command::new(env!("CARGO_BIN_EXE_keepstate"))
        .args(["check", "many-errors.nft", "unknown-chain.nft"])
        .current_dir(&dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    // Six errors in the first file, one in the second, each with its line and caret.
    assert_eq!(err.matches("many-errors.nft:").count(), 6, "{err}");
    assert!(
        err.contains("unknown-chain.nft:4:21: unknown chain `web`"),
        "{err}"
    );
    assert!(err.matches('^').count() >= 7);
}

#[test]
fn valid_files_exit_zero() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let out = Command::new(env!("CARGO_BIN_EXE_keepstate"))
        .args([
            "check",
            "home-router.nft",
            "web-server.nft",
            "sets-maps.nft",
        ])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty() && out.stderr.is_empty());
}
