//! Named invariants, and the list of those the code is known to break (`fuzz/pending.txt`).

use std::cell::RefCell;
use std::collections::BTreeSet;

/// `fuzz/pending.txt`: one invariant name per line (`#` starts a comment).
const PENDING: &str = include_str!("../pending.txt");

thread_local! {
    /// Pending invariants that an input broke since the last [`take_pending_hits`].
    static HITS: RefCell<BTreeSet<&'static str>> = const { RefCell::new(BTreeSet::new()) };
}

/// The invariant names listed in `fuzz/pending.txt`.
pub fn pending() -> impl Iterator<Item = &'static str> {
    PENDING
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
}

fn is_pending(name: &str) -> bool {
    pending().any(|p| p == name)
}

/// Asserts invariant `name`. A failure panics (a finding), unless `name` is listed as
/// pending: then it is only recorded, for the replay to see that the fault is still there.
#[track_caller]
pub fn invariant(name: &'static str, holds: bool, detail: impl FnOnce() -> String) {
    if holds {
        return;
    }
    if is_pending(name) {
        HITS.with(|h| h.borrow_mut().insert(name));
        return;
    }
    panic!("invariant {name} broken: {}", detail());
}

/// The pending invariants broken since the last call.
pub fn take_pending_hits() -> BTreeSet<&'static str> {
    HITS.with(|h| std::mem::take(&mut *h.borrow_mut()))
}

/// Bytes for a failure message: printable ASCII as is, the rest escaped.
pub fn show(bytes: &[u8]) -> String {
    const MAX: usize = 512;
    let mut s: String = bytes[..bytes.len().min(MAX)].escape_ascii().to_string();
    if bytes.len() > MAX {
        s.push_str(&format!("... ({} bytes)", bytes.len()));
    }
    s
}
