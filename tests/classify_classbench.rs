//! Every ClassBench set loads; generated packets get the same evaluation from the tree and the
//! reference, and the expected first-matching line.

use std::sync::Arc;

use keepstate::classify::classbench::{self, SETS};
use keepstate::classify::{Classifier, Decision, Evaluation, Linear, NoLimits, Tree};
use keepstate::rules::ir::Hook;

/// Packets per set: enough to touch most rules of a 1k set; the 10k reference scan dominates.
const PACKETS: usize = 3000;

#[test]
fn classbench_sets_agree_with_reference_and_expected_line() {
    for name in SETS {
        let path = classbench::dir().join(name);
        let rules = classbench::load(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(rules.len() > 500, "{name}: only {} rules", rules.len());
        let rs = Arc::new(classbench::to_ruleset(name, &rules));
        let tree = Tree::new(rs.clone()).unwrap_or_else(|e| panic!("{name}: {e}"));
        let linear = Linear::new(rs.clone()).unwrap();
        eprintln!("{name}: {} rules, {:?}", rules.len(), tree.stats());
        let (mut a, mut b) = (Evaluation::new(), Evaluation::new());
        let mut matched = 0;
        for (i, (p, expected)) in classbench::packets(&rules, PACKETS, 10, 7)
            .iter()
            .enumerate()
        {
            let key = p.key();
            tree.eval(Hook::Forward, &key, &mut NoLimits, &mut a);
            linear.eval(Hook::Forward, &key, &mut NoLimits, &mut b);
            assert_eq!(a, b, "{name}: packet #{i} {p:?}");
            let line = a
                .first_rule()
                .map_or(0, |id| rs.rules().nth(id as usize).unwrap().loc.line);
            assert_eq!(line, *expected, "{name}: packet #{i} {p:?}");
            let verdict = if *expected == 0 {
                Decision::Drop
            } else {
                Decision::Accept
            };
            assert_eq!(a.verdict, verdict);
            matched += (*expected != 0) as usize;
        }
        assert!(
            matched > PACKETS / 2,
            "{name}: only {matched} packets matched a rule"
        );
    }
}
