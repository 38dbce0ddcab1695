//! Differential tests against the real nft (Debian's nftables), inside a throwaway network
//! namespace so the host's ruleset is never touched. Needs root and `nft`; skipped with a
//! message otherwise (CI runs as root and the test command installs nftables).
//!
//! Every example and every accepted fixture is loaded with `nft -f`, listed with
//! `nft list ruleset`, and compared with `keepstate check --print` of the same file.

use std::path::{Path, PathBuf};
use std::process::Command;

use keepstate::rules;

/// A network namespace that is deleted when dropped, also when a test fails.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Option<Netns> {
        let name = format!("ks-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Netns(name))
    }

    /// Runs `nft ARGS` in the namespace from `cwd`; stdout, or stderr as the error.
    fn nft(&self, cwd: &Path, args: &[&str]) -> Result<String, String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0, "nft"])
            .args(args)
            .current_dir(cwd)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn can_run() -> bool {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let nft = Command::new("nft").arg("--version").output().is_ok();
    if !root || !nft {
        eprintln!(
            "SKIPPED: needs root and nft (apt-get install nftables); run as root: \
             cargo test --test netns_nft"
        );
        return false;
    }
    true
}

fn nft_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "nft"))
        .collect();
    v.sort();
    v
}

/// Loads each file with nft and with keepstate; returns the differences.
fn compare(ns: &Netns, files: &[PathBuf], skip: &[&str]) -> (usize, Vec<String>) {
    let mut diffs = Vec::new();
    let mut compared = 0;
    for path in files {
        let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
        if skip.iter().any(|s| stem.ends_with(s)) {
            continue;
        }
        let dir = path.parent().unwrap();
        let file = path.file_name().unwrap().to_str().unwrap();
        ns.nft(dir, &["flush", "ruleset"]).expect("flush ruleset");
        let theirs = ns
            .nft(dir, &["-f", file])
            .and_then(|_| ns.nft(dir, &["list", "ruleset"]));
        let ours = rules::load_file(path);
        compared += 1;
        match (theirs, ours) {
            (Ok(t), Ok(o)) if t == o.listing() => {}
            (Ok(t), Ok(o)) => diffs.push(format!(
                "{stem}: listings differ\n--- nft\n{t}--- keepstate\n{}",
                o.listing()
            )),
            (Ok(_), Err(d)) => diffs.push(format!("{stem}: nft accepts, keepstate refuses:\n{d}")),
            // This kernel has no CONFIG_NF_FLOW_TABLE: it refuses every flowtable with ENOENT.
            // Such files are checked against nft's source in tests/fixtures/nft-flowtable/.
            (Err(e), Ok(_))
                if e.contains("No such file or directory")
                    && std::fs::read_to_string(path).is_ok_and(|t| t.contains("flowtable")) =>
            {
                eprintln!("{stem}: SKIPPED, this kernel has no flowtables ({e})");
                compared -= 1;
            }
            (Err(e), Ok(_)) => diffs.push(format!("{stem}: nft refuses, keepstate accepts:\n{e}")),
            (Err(_), Err(_)) => {}
        }
    }
    (compared, diffs)
}

#[test]
fn examples_list_the_same_as_real_nft() {
    if !can_run() {
        return;
    }
    let ns = Netns::new("ex").expect("ip netns add");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let files = nft_files(&dir);
    let (n, diffs) = compare(&ns, &files, &[]);
    assert!(n >= 5, "only {n} examples");
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
    // And every example is accepted by both.
    for f in &files {
        rules::load_file(f).unwrap_or_else(|d| panic!("{}:\n{d}", f.display()));
    }
}

#[test]
fn fixtures_list_the_same_as_real_nft() {
    if !can_run() {
        return;
    }
    let ns = Netns::new("fx").expect("ip netns add");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nft");
    // The deliberate deviations, as in tests/nft_corpus.rs.
    let skip = [
        "tcp-flags-forms",
        "tcp-flags-more",
        "names-tcp-flags-bits",
        "flags-explicit-eq",
        "number-formats",
        "err-iif-missing-interface",
        "err-rule-missing-separator",
        "err-include-plain-name",
        "err-chain-name-keyword",
        "err-log-prefix-variable",
        "err-define-keyword-value",
        "err-ip6-embedded-ipv4-nat64",
    ];
    let (n, diffs) = compare(&ns, &nft_files(&dir), &skip);
    assert!(n > 200, "only {n} fixtures");
    assert!(
        diffs.is_empty(),
        "{} of {n} differ:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
}
