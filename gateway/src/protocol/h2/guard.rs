//! What `h2` does not bound itself: floods of frames that cost work and carry no request
//! payload. `h2` answers every SETTINGS with an ACK and every PING with a PONG (one pending
//! at a time, so memory stays bounded), applies every WINDOW_UPDATE (waking every stream
//! waiting for capacity) and PRIORITY frame, skips unknown frame types, and spends CPU on
//! each without limit. [`FrameGuard`] sits between the byte stream and `h2`, follows the
//! frame headers of the inbound bytes (RFC 9113 §4.1: a 9-byte header, a 24-bit payload
//! length, then the payload) and of the outbound ones, and fails the read once a client
//! goes past a budget (the models are Envoy's and nginx's flood limits):
//!
//! - SETTINGS, PING (ACKs included: an unsolicited PING ACK costs `h2` as much as a PING, and
//!   a legitimate client sends a handful), frame types `h2` does not know (RFC 9113 §5.5:
//!   ignored, so free to send) and DATA frames with neither payload nor END_STREAM (they
//!   carry nothing): `max_control_frames_per_second` per second together.
//! - WINDOW_UPDATE: [`WINDOW_UPDATES_BASE`] plus [`WINDOW_UPDATES_PER_STREAM`] per stream the
//!   client opened plus [`WINDOW_UPDATES_PER_DATA_SENT`] per DATA frame the gateway sent
//!   (Envoy's `max_inbound_window_update_frames_per_data_frame_sent` is 10). A browser sends
//!   one per chunk it consumed, so at most one or two per DATA frame it received; a client
//!   that opens a zero window one byte at a time gets DATA frames back and stays within it,
//!   one that sends WINDOW_UPDATEs for nothing (a zero-window stream, attack report F4) does
//!   not.
//! - PRIORITY: [`PRIORITY_PER_STREAM`] per stream the client opened, plus as many ahead of
//!   the first (Envoy's `max_inbound_priority_frames_per_stream`).
//! - RST_STREAM: one per stream the client opened plus [`RESETS_BASE`]: a client resets a
//!   stream at most once; the rest name closed streams and cost work for nothing.
//!   (`h2` bounds resets of streams before they were accepted itself, CVE-2023-44487.)
//!
//! The frames of a stream that are not counted carry its request (HEADERS, CONTINUATION,
//! bounded by `h2`'s header-list limit, and DATA, bounded by flow control).
//!
//! Fairness: `h2` reads and handles frames until the socket has none left, so a client that
//! keeps it busy would keep the worker's thread from parking, and the io_uring side of the
//! worker (accepts, HTTP/1 connections, upstream legs) submits its operations only when the
//! thread parks (tokio-uring flushes its submission queue in `on_thread_park`): every other
//! client of the worker would wait for the flood to end (attack report F4). So after
//! [`FRAMES_PER_ROUND`] frames read without the socket running dry, the guard reads nothing
//! more and raises its [`RoundOver`] signal; the session lets the driver's other work run
//! (`io::Stream::yield_to_driver`) and resumes it.
//!
//! It also replays bytes read before `h2` took over (the h2c preface the listener peeked at)
//! ahead of the socket's.

use bytes::{Buf, BytesMut};
use std::cell::Cell;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{ready, Context, Poll, Waker};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

/// The client connection preface (RFC 9113 §3.4), ahead of the first frame.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

const FRAME_HEADER: usize = 9;
const TYPE_DATA: u8 = 0x0;
const TYPE_HEADERS: u8 = 0x1;
const TYPE_PRIORITY: u8 = 0x2;
const TYPE_RST_STREAM: u8 = 0x3;
const TYPE_SETTINGS: u8 = 0x4;
const TYPE_PING: u8 = 0x6;
const TYPE_WINDOW_UPDATE: u8 = 0x8;
/// The last frame type RFC 9113 defines (CONTINUATION); above it, unknown types.
const TYPE_LAST_KNOWN: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;

/// WINDOW_UPDATE frames a client may send before it got any DATA (the connection window
/// it opens at the start, a few streams').
pub const WINDOW_UPDATES_BASE: u64 = 100;
/// WINDOW_UPDATE frames each stream the client opens adds to its budget.
pub const WINDOW_UPDATES_PER_STREAM: u64 = 2;
/// WINDOW_UPDATE frames each DATA frame sent to the client adds to its budget.
pub const WINDOW_UPDATES_PER_DATA_SENT: u64 = 10;
/// PRIORITY frames allowed per stream the client opened (and before the first).
pub const PRIORITY_PER_STREAM: u64 = 100;
/// RST_STREAM frames allowed beyond one per stream the client opened.
pub const RESETS_BASE: u64 = 100;
/// Frames handled in a row before the worker's other connections get their turn.
pub const FRAMES_PER_ROUND: u32 = 256;

/// Follows frame boundaries in one direction of a byte stream; `on_header` gets each
/// frame header (payload length, type, flags).
#[derive(Debug, Clone)]
struct FrameFollower {
    /// Preface bytes still to pass before the first frame header.
    preface: usize,
    header: [u8; FRAME_HEADER],
    have: usize,
    /// Payload bytes of the current frame still to pass.
    payload: usize,
}

impl FrameFollower {
    fn new(preface: usize) -> Self {
        FrameFollower {
            preface,
            header: [0; FRAME_HEADER],
            have: 0,
            payload: 0,
        }
    }

    fn feed<E>(
        &mut self,
        mut bytes: &[u8],
        mut on_header: impl FnMut(usize, u8, u8) -> Result<(), E>,
    ) -> Result<(), E> {
        while !bytes.is_empty() {
            if self.preface > 0 {
                let n = self.preface.min(bytes.len());
                self.preface -= n;
                bytes = &bytes[n..];
            } else if self.payload > 0 {
                let n = self.payload.min(bytes.len());
                self.payload -= n;
                bytes = &bytes[n..];
            } else {
                let n = (FRAME_HEADER - self.have).min(bytes.len());
                self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
                self.have += n;
                bytes = &bytes[n..];
                if self.have == FRAME_HEADER {
                    self.have = 0;
                    let h = &self.header;
                    self.payload = (h[0] as usize) << 16 | (h[1] as usize) << 8 | h[2] as usize;
                    on_header(self.payload, h[3], h[4])?;
                }
            }
        }
        Ok(())
    }
}

/// Counts a connection's frames both ways against the budgets of the module documentation.
#[derive(Debug, Clone)]
pub struct FrameCounter {
    inbound: FrameFollower,
    outbound: FrameFollower,
    budget: u32,
    window: Instant,
    count: u32,
    /// HEADERS frames received: streams opened (trailers make it a little generous).
    streams: u64,
    data_sent: u64,
    window_updates: u64,
    priorities: u64,
    resets: u64,
    /// Frames read since the socket last ran dry or the last round ended.
    round: u32,
}

impl FrameCounter {
    /// `budget`: SETTINGS, PING and the other per-second frames allowed per second.
    pub fn new(budget: u32) -> Self {
        FrameCounter {
            inbound: FrameFollower::new(PREFACE.len()),
            outbound: FrameFollower::new(0),
            budget,
            window: Instant::now(),
            count: 0,
            streams: 0,
            data_sent: 0,
            window_updates: 0,
            priorities: 0,
            resets: 0,
            round: 0,
        }
    }

    /// Feeds inbound bytes; `Err` once a budget is exceeded.
    pub fn feed(&mut self, bytes: &[u8], now: Instant) -> Result<(), Flood> {
        let mut inbound = std::mem::replace(&mut self.inbound, FrameFollower::new(0));
        let r = inbound.feed(bytes, |len, kind, flags| {
            self.inbound_frame(len, kind, flags, now)
        });
        self.inbound = inbound;
        r
    }

    /// Feeds bytes the gateway wrote: DATA frames sent raise the WINDOW_UPDATE budget.
    pub fn sent(&mut self, bytes: &[u8]) {
        let data_sent = &mut self.data_sent;
        let _ = self.outbound.feed(bytes, |_, kind, _| {
            *data_sent += (kind == TYPE_DATA) as u64;
            Ok::<(), Flood>(())
        });
    }

    fn inbound_frame(
        &mut self,
        len: usize,
        kind: u8,
        flags: u8,
        now: Instant,
    ) -> Result<(), Flood> {
        self.round += 1;
        let within = match kind {
            TYPE_SETTINGS | TYPE_PING => self.per_second(now),
            k if k > TYPE_LAST_KNOWN => self.per_second(now),
            TYPE_DATA if len == 0 && flags & FLAG_END_STREAM == 0 => self.per_second(now),
            TYPE_HEADERS => {
                self.streams += 1;
                true
            }
            TYPE_WINDOW_UPDATE => {
                self.window_updates += 1;
                self.window_updates
                    <= WINDOW_UPDATES_BASE
                        + WINDOW_UPDATES_PER_STREAM * self.streams
                        + WINDOW_UPDATES_PER_DATA_SENT * self.data_sent
            }
            TYPE_PRIORITY => {
                self.priorities += 1;
                self.priorities <= PRIORITY_PER_STREAM * (1 + self.streams)
            }
            TYPE_RST_STREAM => {
                self.resets += 1;
                self.resets <= RESETS_BASE + self.streams
            }
            _ => true,
        };
        if within {
            Ok(())
        } else {
            Err(Flood)
        }
    }

    fn per_second(&mut self, now: Instant) -> bool {
        if now.duration_since(self.window) >= Duration::from_secs(1) {
            self.window = now;
            self.count = 0;
        }
        self.count += 1;
        self.count <= self.budget
    }
}

/// More frames than a budget allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flood;

/// The I/O `h2` runs on: `io` with the bytes read before it (`prefix`) replayed first, and
/// every byte passed through a [`FrameCounter`]. Past a budget it reads nothing more (the
/// frames already read are `h2`'s to finish) and raises its [`FloodAlarm`]: the session
/// then ends the connection with GOAWAY ENHANCE_YOUR_CALM. After [`FRAMES_PER_ROUND`]
/// frames in a row it reads nothing until [`RoundOver::resume`].
pub struct FrameGuard<T> {
    io: T,
    prefix: BytesMut,
    counter: FrameCounter,
    alarm: FloodAlarm,
    round: RoundOver,
}

/// A flag with a wakeup, shared between the guard and the session (one thread).
#[derive(Clone, Default)]
struct Signal(Rc<(Cell<bool>, Notify)>);

impl Signal {
    async fn raised(&self) {
        if !self.0 .0.get() {
            self.0 .1.notified().await;
        }
    }

    fn raise(&self) {
        self.0 .0.set(true);
        self.0 .1.notify_one();
    }
}

/// Raised by a [`FrameGuard`] whose client went past a frame budget.
#[derive(Clone, Default)]
pub struct FloodAlarm(Signal);

impl FloodAlarm {
    /// Resolves once the alarm is raised.
    pub async fn raised(&self) {
        self.0.raised().await
    }

    pub fn is_raised(&self) -> bool {
        self.0 .0 .0.get()
    }
}

/// Raised by a [`FrameGuard`] that handled [`FRAMES_PER_ROUND`] frames in a row: it reads
/// nothing more until the session [`resume`](RoundOver::resume)s it.
#[derive(Clone, Default)]
pub struct RoundOver {
    signal: Signal,
    /// The task that found the guard paused.
    waker: Rc<Cell<Option<Waker>>>,
}

impl RoundOver {
    /// Resolves once a round is over.
    pub async fn raised(&self) {
        self.signal.raised().await
    }

    /// Starts the next round.
    pub fn resume(&self) {
        self.signal.0 .0.set(false);
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }

    fn is_raised(&self) -> bool {
        self.signal.0 .0.get()
    }
}

impl<T> FrameGuard<T> {
    pub fn new(io: T, prefix: BytesMut, budget: u32) -> (Self, FloodAlarm, RoundOver) {
        let alarm = FloodAlarm::default();
        let round = RoundOver::default();
        let guard = FrameGuard {
            io,
            prefix,
            counter: FrameCounter::new(budget),
            alarm: alarm.clone(),
            round: round.clone(),
        };
        (guard, alarm, round)
    }

    pub fn get_ref(&self) -> &T {
        &self.io
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for FrameGuard<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.alarm.is_raised() {
            // Nothing more is read; the session is closing the connection.
            return Poll::Pending;
        }
        if this.round.is_raised() {
            this.round.waker.set(Some(cx.waker().clone()));
            return Poll::Pending;
        }
        let before = buf.filled().len();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
        } else {
            match Pin::new(&mut this.io).poll_read(cx, buf) {
                Poll::Pending => {
                    // The socket ran dry: the task waits for the reactor like any other.
                    this.counter.round = 0;
                    return Poll::Pending;
                }
                Poll::Ready(r) => r?,
            }
        }
        if this
            .counter
            .feed(&buf.filled()[before..], Instant::now())
            .is_err()
        {
            // The bytes of this read are dropped: `h2` never sees the frame over budget.
            buf.set_filled(before);
            this.alarm.0.raise();
            return Poll::Pending;
        }
        if this.counter.round >= FRAMES_PER_ROUND {
            // This read's frames are `h2`'s; the next read waits for the next round.
            this.counter.round = 0;
            this.round.signal.raise();
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for FrameGuard<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut this.io).poll_write(cx, buf))?;
        this.counter.sent(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLAG_ACK: u8 = 0x1;

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let n = payload.len();
        let mut f = vec![
            (n >> 16) as u8,
            (n >> 8) as u8,
            n as u8,
            kind,
            flags,
            0,
            0,
            0,
            0,
        ];
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn counts_settings_and_pings_past_the_preface_whatever_the_split() {
        let now = Instant::now();
        let mut bytes = PREFACE.to_vec();
        bytes.extend(frame(TYPE_SETTINGS, 0, &[0; 6]));
        // DATA whose payload looks like PING headers: skipped as payload, not counted.
        bytes.extend(frame(0x0, 0, &frame(TYPE_PING, 0, &[0; 8]).repeat(10)));
        bytes.extend(frame(TYPE_SETTINGS, FLAG_ACK, &[]));
        bytes.extend(frame(TYPE_PING, 0, &[0; 8]));
        bytes.extend(frame(TYPE_PING, FLAG_ACK, &[0; 8]));
        for split in [1, 3, 7, 9, 64, bytes.len()] {
            let mut c = FrameCounter::new(4);
            for piece in bytes.chunks(split) {
                c.feed(piece, now)
                    .expect("four control frames (two ACKs) are within a budget of 4");
            }
            assert_eq!(c.count, 4, "split {split}");
            // A third in the same second is one too many.
            assert_eq!(c.feed(&frame(TYPE_PING, 0, &[0; 8]), now), Err(Flood));
        }
    }

    #[test]
    fn the_budget_is_per_second() {
        let start = Instant::now();
        let mut c = FrameCounter::new(3);
        c.feed(PREFACE, start).unwrap();
        for s in 0..5 {
            let now = start + Duration::from_millis(1100 * s);
            for _ in 0..3 {
                c.feed(&frame(TYPE_SETTINGS, 0, &[]), now).unwrap();
            }
        }
    }

    #[test]
    fn window_updates_are_budgeted_by_the_data_frames_sent() {
        let now = Instant::now();
        let mut c = FrameCounter::new(1000);
        c.feed(PREFACE, now).unwrap();
        c.feed(&frame(TYPE_HEADERS, 0x4, &[0; 4]), now).unwrap();
        let wu = frame(TYPE_WINDOW_UPDATE, 0, &[0, 0, 0, 1]);
        let allowed = WINDOW_UPDATES_BASE + WINDOW_UPDATES_PER_STREAM;
        for _ in 0..allowed {
            c.feed(&wu, now).unwrap();
        }
        // A zero-window stream: nothing sent, so one more is a flood (attack report F4),
        // a minute later too (a ratio, not a rate).
        let later = now + Duration::from_secs(60);
        assert_eq!(c.clone().feed(&wu, later), Err(Flood));
        // Each DATA frame sent (whatever the split of the writes) earns ten more, the
        // most a client that reads the frames could send for them.
        let data = frame(TYPE_DATA, 0, &[7; 1]).repeat(3);
        for piece in data.chunks(4) {
            c.sent(piece);
        }
        for _ in 0..3 * WINDOW_UPDATES_PER_DATA_SENT {
            c.feed(&wu, now).unwrap();
        }
        assert_eq!(c.feed(&wu, now), Err(Flood));
    }

    #[test]
    fn priority_and_reset_frames_are_budgeted_per_stream() {
        let now = Instant::now();
        let mut c = FrameCounter::new(1000);
        c.feed(PREFACE, now).unwrap();
        let priority = frame(TYPE_PRIORITY, 0, &[0; 5]);
        for _ in 0..PRIORITY_PER_STREAM {
            c.feed(&priority, now).unwrap();
        }
        assert_eq!(c.feed(&priority, now), Err(Flood));

        let mut c = FrameCounter::new(1000);
        c.feed(PREFACE, now).unwrap();
        let rst = frame(TYPE_RST_STREAM, 0, &[0; 4]);
        for _ in 0..10 {
            c.feed(&frame(TYPE_HEADERS, 0x4, &[0; 4]), now).unwrap();
            c.feed(&rst, now).unwrap();
            // PRIORITY frames with each stream, as old browsers send: within budget.
            c.feed(&priority, now).unwrap();
        }
        for _ in 0..RESETS_BASE {
            c.feed(&rst, now).unwrap();
        }
        assert_eq!(c.feed(&rst, now), Err(Flood));
    }

    #[test]
    fn unknown_types_and_empty_data_count_per_second() {
        let now = Instant::now();
        let mut c = FrameCounter::new(3);
        c.feed(PREFACE, now).unwrap();
        // Empty DATA with END_STREAM ends a request body: not counted.
        for _ in 0..10 {
            c.feed(&frame(TYPE_DATA, FLAG_END_STREAM, &[]), now)
                .unwrap();
        }
        c.feed(&frame(0xfa, 0, &[1, 2, 3]), now).unwrap();
        c.feed(&frame(TYPE_DATA, 0, &[]), now).unwrap();
        c.feed(&frame(TYPE_PING, 0, &[0; 8]), now).unwrap();
        assert_eq!(c.feed(&frame(0x0b, 0, &[]), now), Err(Flood));
    }

    /// A reader that always has one WINDOW_UPDATE frame ready.
    struct Endless;

    impl AsyncRead for Endless {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            buf.put_slice(&frame(TYPE_SETTINGS, 1, &[]));
            Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn a_round_of_frames_pauses_the_reads_until_resumed() {
        let (mut g, alarm, round) = FrameGuard::new(Endless, BytesMut::from(PREFACE), u32::MAX);
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut mem = [0u8; 64];
        let mut read = |g: &mut FrameGuard<Endless>| {
            let mut buf = ReadBuf::new(&mut mem);
            Pin::new(g).poll_read(&mut cx, &mut buf).is_ready()
        };
        assert!(read(&mut g), "the preface");
        for _ in 0..FRAMES_PER_ROUND {
            assert!(read(&mut g));
        }
        assert!(round.is_raised());
        assert!(!read(&mut g), "paused at the end of a round");
        round.resume();
        assert!(read(&mut g));
        assert!(!alarm.is_raised());
    }
}
