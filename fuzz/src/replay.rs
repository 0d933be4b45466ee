//! Runs targets over files: the seed corpus on stable (`tests/corpus.rs`, and so
//! `cargo xtask test`), or any file a fuzzer reported (`cargo run -p gateway-fuzz --bin T -- FILE`).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// `fuzz/corpus/<target>`: the committed seeds.
pub fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target)
}

/// Every file under `path` (or `path` itself), sorted so runs are reproducible.
pub fn files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(path)? {
        let p = entry?.path();
        if p.is_dir() {
            out.extend(files(&p)?);
        } else {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

/// What one replay found.
#[derive(Default)]
pub struct Report {
    pub executions: usize,
    pub elapsed: Duration,
    /// (file, panic message) for each input that failed.
    pub failures: Vec<(PathBuf, String)>,
    /// Pending invariants (fuzz/pending.txt) some input broke.
    pub pending_hits: std::collections::BTreeSet<&'static str>,
}

/// Runs `run` on each file, catching panics.
pub fn replay(run: crate::Harness, inputs: &[PathBuf]) -> Report {
    let mut report = Report::default();
    let started = Instant::now();
    crate::check::take_pending_hits();
    for file in inputs {
        let data = match std::fs::read(file) {
            Ok(d) => d,
            Err(e) => {
                report
                    .failures
                    .push((file.clone(), format!("unreadable: {e}")));
                continue;
            }
        };
        report.executions += 1;
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| run(&data))) {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "non-string panic".into());
            report.failures.push((file.clone(), msg));
        }
        report
            .pending_hits
            .extend(crate::check::take_pending_hits());
    }
    report.elapsed = started.elapsed();
    report
}

/// `main` of a target bin built without `--cfg fuzzing`: replays the paths given, or the
/// target's seed corpus.
pub fn main(target: &str) -> std::process::ExitCode {
    let run = crate::TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .map(|(_, run)| *run)
        .expect("bin names match TARGETS");
    let mut paths: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    if paths.is_empty() {
        paths.push(corpus_dir(target));
    }
    let mut inputs = Vec::new();
    for p in &paths {
        match files(p) {
            Ok(f) => inputs.extend(f),
            Err(e) => {
                eprintln!("{}: {e}", p.display());
                return std::process::ExitCode::FAILURE;
            }
        }
    }
    let report = replay(run, &inputs);
    for (file, msg) in &report.failures {
        eprintln!("FAILED {}: {msg}", file.display());
    }
    eprintln!(
        "{target}: {} inputs in {:?}, {} failed, pending invariants broken: {:?}",
        report.executions,
        report.elapsed,
        report.failures.len(),
        report.pending_hits
    );
    if report.failures.is_empty() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
