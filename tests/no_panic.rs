//! Bad input gets an error, never a panic: the example rulesets, truncated and mutated at
//! random, go through the whole front end (parse, check, lower, print).

use proptest::prelude::*;

use keepstate::rules;

fn examples() -> Vec<String> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "nft"))
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    v.sort();
    v
}

/// Characters that change nft's meaning most often.
const PIECES: &[&str] = &[
    "{", "}", ";", "\n", ",", ".", "-", "/", ":", "\"", "$", "@", "*", "|", "&", "!=", " ", "\\\n",
    "0", "65536", "::", "10.0.0.", "accept", "jump", "set", "ct", "tcp", "ip6", "vmap", "map",
    "type", "flags", "interval", "elements", "=", "table", "chain", "define", "include",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn mutated_examples_never_panic(
        which in 0usize..16,
        edits in prop::collection::vec((any::<prop::sample::Index>(), 0usize..3, prop::sample::select(PIECES)), 1..6),
        cut in prop::option::of(any::<prop::sample::Index>()),
    ) {
        let ex = examples();
        let mut text = ex[which % ex.len()].clone();
        for (at, kind, piece) in edits {
            let mut i = at.index(text.len() + 1);
            while !text.is_char_boundary(i) {
                i -= 1;
            }
            match kind {
                0 => text.insert_str(i, piece),
                1 => {
                    let mut j = (i + piece.len()).min(text.len());
                    while !text.is_char_boundary(j) {
                        j += 1;
                    }
                    text.replace_range(i..j, "");
                }
                _ => text.replace_range(i..i, piece),
            }
        }
        if let Some(c) = cut {
            let mut i = c.index(text.len() + 1);
            while !text.is_char_boundary(i) {
                i -= 1;
            }
            text.truncate(i);
        }
        match rules::load_str("mutated.nft", &text) {
            Ok(l) => {
                let _ = l.listing();
            }
            Err(d) => {
                prop_assert!(!d.0.is_empty());
                let shown = d.to_string();
                prop_assert!(shown.contains("mutated.nft:"), "{}", shown);
            }
        }
    }
}
