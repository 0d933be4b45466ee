//! What `h2` does not bound itself: floods of SETTINGS and PING frames. `h2` answers every
//! SETTINGS with an ACK and every PING with a PONG (one pending at a time, so memory stays
//! bounded) but spends CPU on each without limit. [`FrameGuard`] sits between the byte
//! stream and `h2`, follows the frame headers of the inbound bytes (RFC 9113 §4.1: a 9-byte
//! header, a 24-bit payload length, then the payload) and fails the read once a client sends
//! more SETTINGS or PING frames in one second than the budget: `h2` then ends the
//! connection. ACKs count too: an unsolicited PING ACK costs `h2` as much work as a PING
//! (attack report: ~5.5 µs each, uncounted), and a legitimate client sends only a handful
//! (one SETTINGS ACK per SETTINGS of ours, one PING ACK per PING of ours).
//!
//! It also replays bytes read before `h2` took over (the h2c preface the listener peeked at)
//! ahead of the socket's.

use bytes::{Buf, BytesMut};
use std::cell::Cell;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

/// The client connection preface (RFC 9113 §3.4), ahead of the first frame.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

const FRAME_HEADER: usize = 9;
const TYPE_SETTINGS: u8 = 0x4;
const TYPE_PING: u8 = 0x6;

/// Follows frame boundaries in a byte stream and counts control frames per second.
#[derive(Debug)]
pub struct FrameCounter {
    /// Preface bytes still to pass before the first frame header.
    preface: usize,
    header: [u8; FRAME_HEADER],
    have: usize,
    /// Payload bytes of the current frame still to pass.
    payload: usize,
    budget: u32,
    window: Instant,
    count: u32,
}

impl FrameCounter {
    /// `budget`: SETTINGS and PING frames (ACKs included) allowed per second.
    pub fn new(budget: u32) -> Self {
        FrameCounter {
            preface: PREFACE.len(),
            header: [0; FRAME_HEADER],
            have: 0,
            payload: 0,
            budget,
            window: Instant::now(),
            count: 0,
        }
    }

    /// Feeds inbound bytes; `Err` once the budget is exceeded.
    pub fn feed(&mut self, mut bytes: &[u8], now: Instant) -> Result<(), Flood> {
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
                    if matches!(h[3], TYPE_SETTINGS | TYPE_PING) {
                        self.control_frame(now)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn control_frame(&mut self, now: Instant) -> Result<(), Flood> {
        if now.duration_since(self.window) >= Duration::from_secs(1) {
            self.window = now;
            self.count = 0;
        }
        self.count += 1;
        if self.count > self.budget {
            return Err(Flood);
        }
        Ok(())
    }
}

/// More control frames in one second than the budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flood;

/// The I/O `h2` runs on: `io` with the bytes read before it (`prefix`) replayed first, and
/// every inbound byte passed through a [`FrameCounter`]. Past the budget it reads nothing
/// more (the frames already read are `h2`'s to finish) and raises its [`FloodAlarm`]: the
/// session then ends the connection with GOAWAY ENHANCE_YOUR_CALM.
pub struct FrameGuard<T> {
    io: T,
    prefix: BytesMut,
    counter: FrameCounter,
    alarm: FloodAlarm,
}

/// Raised by a [`FrameGuard`] whose client went past its control-frame budget.
#[derive(Clone, Default)]
pub struct FloodAlarm(Rc<(Cell<bool>, Notify)>);

impl FloodAlarm {
    /// Resolves once the alarm is raised.
    pub async fn raised(&self) {
        if !self.0 .0.get() {
            self.0 .1.notified().await;
        }
    }

    pub fn is_raised(&self) -> bool {
        self.0 .0.get()
    }

    fn raise(&self) {
        self.0 .0.set(true);
        self.0 .1.notify_one();
    }
}

impl<T> FrameGuard<T> {
    pub fn new(io: T, prefix: BytesMut, budget: u32) -> (Self, FloodAlarm) {
        let alarm = FloodAlarm::default();
        let guard = FrameGuard {
            io,
            prefix,
            counter: FrameCounter::new(budget),
            alarm: alarm.clone(),
        };
        (guard, alarm)
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
        let before = buf.filled().len();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
        } else {
            ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        }
        if this
            .counter
            .feed(&buf.filled()[before..], Instant::now())
            .is_err()
        {
            // The bytes of this read are dropped: `h2` never sees the frame over budget.
            buf.set_filled(before);
            this.alarm.raise();
            return Poll::Pending;
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
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
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
}
