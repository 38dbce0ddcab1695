//! keepstate's listing against the real nft's, case by case: every `NNN-name.nft` in
//! tests/fixtures/nft/ has beside it what nft 1.0.6 printed after loading it (`.list`) or
//! what it refused it with (`.err`); `regen.sh` there remakes them. Also every example in
//! examples/ against examples/expected/. Runs without root: the listings were recorded.

use std::path::{Path, PathBuf};

use keepstate::rules;

/// Cases where keepstate deliberately differs from nft, each with the reason, by fixture name
/// without its number.
const DEVIATIONS: &[(&str, &str)] = &[
    (
        "tcp-flags-forms",
        "nft's spelling of masked single-flag and all-flags-zero tests (`& syn == syn`, `== 0x0`)",
    ),
    (
        "tcp-flags-more",
        "nft's spelling of `|` inside anonymous tcp flag sets",
    ),
    ("names-tcp-flags-bits", "nft prints `== all flags` as hex"),
    (
        "flags-explicit-eq",
        "nft's `a | b` spelling of exact multi-bit ct state matches",
    ),
    (
        "number-formats",
        "inet_aton's octal reading of 010.000.000.001",
    ),
    (
        "err-iif-missing-interface",
        "nft resolves `iif` against the host's interfaces at load time; keepstate matches names \
         of its own ports, which need not exist on the machine checking the file",
    ),
    (
        "err-rule-missing-separator",
        "keepstate accepts `chain a { accept }` without a newline before `}`",
    ),
    (
        "err-include-plain-name",
        "keepstate resolves a relative include against the including file's directory first",
    ),
    ("err-chain-name-keyword", "`fwd` is a keyword only in nft"),
    (
        "err-log-prefix-variable",
        "keepstate substitutes variables in log prefixes",
    ),
    (
        "err-define-keyword-value",
        "keepstate accepts keywords as define values",
    ),
    (
        "err-ip6-embedded-ipv4-nat64",
        "keepstate parses 64:ff9b::1.2.3.4",
    ),
];

fn dir(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// `056-tcp-flags-forms` -> `tcp-flags-forms`.
fn unnumbered(stem: &str) -> &str {
    stem.split_once('-').map_or(stem, |(_, rest)| rest)
}

fn cases(d: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(d)
        .expect("fixture directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "nft"))
        .collect();
    v.sort();
    v
}

#[test]
fn listing_matches_nft_for_every_fixture() {
    let d = dir("tests/fixtures/nft");
    let mut failures = Vec::new();
    let mut checked = 0;
    // Loaded from the fixture directory, as nft was, so relative includes resolve alike.
    for path in cases(&d) {
        let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
        if DEVIATIONS.iter().any(|(n, _)| *n == unnumbered(&stem)) {
            continue;
        }
        let list = path.with_extension("list");
        let err = path.with_extension("err");
        let got = rules::load_file(&path);
        checked += 1;
        if list.exists() {
            let want = std::fs::read_to_string(&list).unwrap();
            match got {
                Ok(l) if l.listing() == want => {}
                Ok(l) => failures.push(format!(
                    "{stem}: listing differs\n--- nft\n{want}--- keepstate\n{}",
                    l.listing()
                )),
                Err(d) => failures.push(format!("{stem}: nft accepts it, keepstate says\n{d}")),
            }
        } else if err.exists() && got.is_ok() {
            let why = std::fs::read_to_string(&err).unwrap();
            failures.push(format!(
                "{stem}: nft refuses it, keepstate accepts it\n{why}"
            ));
        }
    }
    assert!(checked > 200, "only {checked} fixtures found");
    assert!(
        failures.is_empty(),
        "{} of {checked} fixtures differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn deviations_still_deviate() {
    // A listed deviation that starts matching nft should leave the list.
    let d = dir("tests/fixtures/nft");
    for (stem, why) in DEVIATIONS {
        let path = cases(&d)
            .into_iter()
            .find(|p| unnumbered(&p.file_stem().unwrap().to_string_lossy()) == *stem)
            .unwrap_or_else(|| panic!("{stem} is listed as a deviation but has no fixture"));
        let got = rules::load_file(&path);
        let list = path.with_extension("list");
        let same = if list.exists() {
            got.is_ok_and(|l| l.listing() == std::fs::read_to_string(&list).unwrap())
        } else {
            got.is_err()
        };
        assert!(
            !same,
            "{stem} now matches nft; remove it from DEVIATIONS ({why})"
        );
    }
}

#[test]
fn flowtable_listings_match_nfts_printer() {
    // Written from nft 1.0.6's source, not recorded: this machine's kernel has no
    // flowtables (see tests/fixtures/nft-flowtable/README.md).
    let d = dir("tests/fixtures/nft-flowtable");
    let mut n = 0;
    for path in cases(&d) {
        let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
        let want = std::fs::read_to_string(path.with_extension("list")).unwrap();
        let loaded = rules::load_file(&path).unwrap_or_else(|e| panic!("{stem}:\n{e}"));
        assert_eq!(loaded.listing(), want, "{stem}");
        // nft reads its own listing back unchanged.
        let again = rules::load_str(&stem, &want).unwrap_or_else(|e| panic!("{stem}:\n{e}"));
        assert_eq!(again.listing(), want, "{stem} read back");
        n += 1;
    }
    assert!(n >= 2, "only {n} flowtable fixtures");
}

#[test]
fn examples_print_as_nft_lists_them() {
    let d = dir("examples");
    let mut n = 0;
    for path in cases(&d) {
        let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
        let want = std::fs::read_to_string(d.join("expected").join(format!("{stem}.list")))
            .unwrap_or_else(|e| panic!("examples/expected/{stem}.list: {e}"));
        let loaded = rules::load_file(&path).unwrap_or_else(|e| panic!("{stem}:\n{e}"));
        assert_eq!(loaded.listing(), want, "{stem}");
        n += 1;
    }
    assert!(n >= 5, "only {n} examples");
}
