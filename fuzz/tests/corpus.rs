//! The stable replay of the fuzz targets: every target over its committed seed corpus
//! (`fuzz/corpus/<target>/`), so `cargo test` (and `cargo xtask test`) fails on any input
//! that crashes a harness or breaks an invariant, without nightly or libFuzzer.
//!
//! It also keeps `fuzz/pending.txt` honest: each invariant listed there (known broken,
//! tracked in an issue) must still be broken by at least one seed; once a fix makes it hold,
//! this test fails until the line is removed, and the invariant is enforced from then on.

use gateway_fuzz::replay::{corpus_dir, files, replay};
use gateway_fuzz::{check, TARGETS};
use std::collections::BTreeSet;

#[test]
fn every_target_replays_its_seed_corpus() {
    let mut failures = Vec::new();
    let mut pending_hit = BTreeSet::new();
    for (name, run) in TARGETS {
        let dir = corpus_dir(name);
        let inputs = files(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        assert!(!inputs.is_empty(), "no seeds in {}", dir.display());
        let report = replay(*run, &inputs);
        eprintln!(
            "{name}: {} inputs in {:?}; pending invariants broken: {:?}",
            report.executions, report.elapsed, report.pending_hits
        );
        for (file, msg) in report.failures {
            failures.push(format!("{name} {}: {msg}", file.display()));
        }
        pending_hit.extend(report.pending_hits);
    }
    assert!(
        failures.is_empty(),
        "failing seeds:\n{}",
        failures.join("\n")
    );
    let fixed: Vec<_> = check::pending()
        .filter(|p| !pending_hit.contains(p))
        .collect();
    assert!(
        fixed.is_empty(),
        "no seed breaks these invariants any more: remove them from fuzz/pending.txt \
         (they are then enforced): {fixed:?}"
    );
}
