//! Process clocks: a monotonic millisecond clock for deadlines and health windows, the
//! wall-clock stamp in the access log's format, formatted once per second per thread, and
//! the re-armed timer of a connection's phases ([`PhaseTimer`]).

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn start() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

/// Milliseconds since the process started (monotonic). Never 0, so 0 can mean "unset".
pub(crate) fn now_ms() -> u64 {
    start().elapsed().as_millis() as u64 + 1
}

thread_local! {
    static LOG_STAMP: RefCell<(u64, [u8; 26])> = const { RefCell::new((u64::MAX, [0; 26])) };
}

/// Calls `f` with the current time as `26/Nov/2026:20:03:09 +0000` (nginx `$time_local`
/// in UTC), formatted at most once a second on this thread.
pub(crate) fn with_log_stamp<R>(f: impl FnOnce(&[u8]) -> R) -> R {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    LOG_STAMP.with(|cell| {
        let mut cached = cell.borrow_mut();
        if cached.0 != secs {
            cached.0 = secs;
            format_log_stamp(secs, &mut cached.1);
        }
        f(&cached.1)
    })
}

const MONTHS: [&[u8; 3]; 12] = [
    b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec",
];

fn format_log_stamp(unix: u64, out: &mut [u8; 26]) {
    let days = (unix / 86400) as i64;
    let rem = unix % 86400;
    let (y, m, d) = civil_from_days(days);
    let two = |v: u64| [b'0' + (v / 10) as u8, b'0' + (v % 10) as u8];
    out[0..2].copy_from_slice(&two(d as u64));
    out[2] = b'/';
    out[3..6].copy_from_slice(MONTHS[(m - 1) as usize]);
    out[6] = b'/';
    let y = y as u64;
    out[7..11].copy_from_slice(&[
        b'0' + (y / 1000 % 10) as u8,
        b'0' + (y / 100 % 10) as u8,
        b'0' + (y / 10 % 10) as u8,
        b'0' + (y % 10) as u8,
    ]);
    out[11] = b':';
    out[12..14].copy_from_slice(&two(rem / 3600));
    out[14] = b':';
    out[15..17].copy_from_slice(&two(rem / 60 % 60));
    out[17] = b':';
    out[18..20].copy_from_slice(&two(rem % 60));
    out[20..26].copy_from_slice(b" +0000");
}

/// Days since 1970-01-01 to (year, month, day), Howard Hinnant's `civil_from_days`.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719468;
    let era = z.div_euclid(146097);
    let doe = z.rem_euclid(146097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    (y, m, d)
}

/// `tokio::time::timeout_at` with a std `Instant`, which is what every deadline here is.
pub(crate) async fn timeout_at<F: std::future::Future>(
    deadline: std::time::Instant,
    f: F,
) -> Result<F::Output, tokio::time::error::Elapsed> {
    tokio::time::timeout_at(deadline.into(), f).await
}

/// A deadline an operation missed ([`PhaseTimer`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TimedOut;

/// One timer for a sequence of operations that never run at the same time: the phases of
/// an HTTP/1 connection (idle wait, head read, upstream write, response read, client write).
///
/// Why: a `tokio::time::timeout` per operation inserts an entry into the runtime's timer
/// wheel and removes it again (under the driver's lock), and reads the clock, about six
/// times per keep-alive request. This timer is re-armed instead. Tokio moves a registered
/// timer to a *later* deadline with one compare-and-swap (the wheel entry fires at the old
/// time and is re-filed then, once per period, not per request), so most phases cost no
/// wheel operation at all; only an earlier deadline (the short park delay after a
/// response) goes through the wheel. And the timer is armed only once the operation has
/// returned `Pending`: a write that completes at once (the epoll driver) reads no clock.
/// The precision is tokio's (1 ms), as for `tokio::time::timeout`.
///
/// Never run two operations through one timer at once: the second would re-arm the
/// first's deadline. Watches that overlap an operation need a timer of their own.
///
/// The `Sleep` is boxed when an operation first waits: one allocation per connection
/// (none for one whose operations never wait), where the per-operation timers it replaces
/// cost a wheel insert and cancel each per request.
#[derive(Default)]
pub(crate) struct PhaseTimer {
    sleep: RefCell<Option<Pin<Box<tokio::time::Sleep>>>>,
}

impl PhaseTimer {
    /// `f`, or [`TimedOut`] once `deadline` has passed (checked only while `f` waits).
    pub(crate) async fn run_until<F: Future>(
        &self,
        deadline: Instant,
        f: F,
    ) -> Result<F::Output, TimedOut> {
        self.run(|| deadline, f).await
    }

    /// `f`, or [`TimedOut`] when it has waited `limit` (counted from its first wait).
    pub(crate) async fn run_for<F: Future>(
        &self,
        limit: Duration,
        f: F,
    ) -> Result<F::Output, TimedOut> {
        self.run(|| Instant::now() + limit, f).await
    }

    /// Resolves after `limit`.
    pub(crate) async fn sleep_for(&self, limit: Duration) {
        let _ = self.run_for(limit, std::future::pending::<()>()).await;
    }

    async fn run<F: Future>(
        &self,
        deadline: impl FnOnce() -> Instant,
        f: F,
    ) -> Result<F::Output, TimedOut> {
        let mut f = std::pin::pin!(f);
        let mut deadline = Some(deadline);
        std::future::poll_fn(|cx| {
            if let Poll::Ready(out) = f.as_mut().poll(cx) {
                return Poll::Ready(Ok(out));
            }
            let mut slot = self.sleep.borrow_mut();
            if let Some(at) = deadline.take() {
                let at = at().into();
                match slot.as_mut() {
                    Some(sleep) => sleep.as_mut().reset(at),
                    None => *slot = Some(Box::pin(tokio::time::sleep_until(at))),
                }
            }
            // Armed above on this operation's first wait.
            let Some(sleep) = slot.as_mut() else {
                return Poll::Pending;
            };
            match sleep.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(TimedOut)),
                Poll::Pending => Poll::Pending,
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phase_timer_fires_at_each_phase_deadline_earlier_or_later() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let timer = PhaseTimer::default();
            // Completes before its deadline: never armed.
            assert_eq!(
                timer.run_for(Duration::from_secs(60), async { 7 }).await,
                Ok(7)
            );
            // A long deadline armed and then left behind by an operation that finished...
            let quick = tokio::time::sleep(Duration::from_millis(5));
            assert_eq!(timer.run_for(Duration::from_secs(60), quick).await, Ok(()));
            // ...does not hide an earlier one, which fires on time.
            let t = Instant::now();
            let never = std::future::pending::<()>();
            assert_eq!(
                timer.run_for(Duration::from_millis(50), never).await,
                Err(TimedOut)
            );
            assert!(t.elapsed() >= Duration::from_millis(50));
            // A later one after a fired one is waited for in full.
            let t = Instant::now();
            let never = std::future::pending::<()>();
            let at = t + Duration::from_millis(80);
            assert_eq!(timer.run_until(at, never).await, Err(TimedOut));
            assert!(t.elapsed() >= Duration::from_millis(80));
            let t = Instant::now();
            timer.sleep_for(Duration::from_millis(30)).await;
            assert!(t.elapsed() >= Duration::from_millis(30));
        });
    }

    #[test]
    fn log_stamp() {
        let mut out = [0u8; 26];
        // 2026-11-26T20:03:09Z
        format_log_stamp(1_795_723_389, &mut out);
        assert_eq!(&out, b"26/Nov/2026:20:03:09 +0000");
        format_log_stamp(951_782_400, &mut out); // 2000-02-29
        assert_eq!(&out[..11], b"29/Feb/2000");
    }
}
