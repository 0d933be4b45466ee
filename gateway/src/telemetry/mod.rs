//! What the data plane reports: per-worker counters (merged for `/metrics`) and the access
//! log, and the count of diagnostic (stderr) log lines dropped.

pub mod access_log;
pub mod metrics;

/// The dropped-lines counter of the diagnostic log's non-blocking writer, registered once
/// by the binary at start-up (tests and `gateway check` log nowhere that can stall).
static LOG_DROPS: std::sync::OnceLock<tracing_appender::non_blocking::ErrorCounter> =
    std::sync::OnceLock::new();

/// Registers the counter that `gateway_log_lines_dropped_total` reports.
pub fn register_log_drops(counter: tracing_appender::non_blocking::ErrorCounter) {
    let _ = LOG_DROPS.set(counter);
}

/// Appends `gateway_log_lines_dropped_total`: diagnostic lines dropped because the stderr
/// reader (journald, a log shipper) did not keep up. A worker never waits for stderr.
pub(crate) fn render_log_drops(out: &mut String) {
    use std::fmt::Write;
    let n = LOG_DROPS.get().map_or(0, |c| c.dropped_lines());
    let _ = writeln!(
        out,
        "# HELP gateway_log_lines_dropped_total Diagnostic (stderr) log lines dropped because the reader did not keep up.\n# TYPE gateway_log_lines_dropped_total counter\ngateway_log_lines_dropped_total {n}"
    );
}
