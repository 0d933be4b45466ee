//! Human-readable units used in the config file: durations (`"300ms"`, `"5s"`, `"1h"`),
//! sizes (`"16KiB"`, `"50MiB"`, nginx-style `"50m"`) and rates (`"100/s"`).

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use std::fmt;
use std::time::Duration;

/// A duration written as a number followed by a unit: `ms`, `s`, `m`, `h`, `d`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Dur(pub Duration);

/// A byte size: a plain integer, or a number with `B`, `K`/`KB`/`KiB`, `M`/`MB`/`MiB`,
/// `G`/`GB`/`GiB` (all binary multiples, as nginx reads `50m`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Size(pub u64);

/// Events per second: `"100/s"`, `"6000/m"`, `"10/ms"` is not allowed (finer than a second
/// is not a meaningful client rate).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    pub per_second: f64,
}

/// The longest duration the config accepts. Timers add durations to `Instant::now()`
/// and to the millisecond clock, which panic or wrap on overflow; a year is far beyond any
/// sensible timeout and far below either limit.
pub(crate) const MAX_DURATION: Duration = Duration::from_secs(365 * 86400);

/// The largest size the config accepts (1 TiB): sizes are compared with and added to
/// byte counters, and none of them means anything beyond this.
pub(crate) const MAX_SIZE: u64 = 1 << 40;

/// The highest rate the config accepts, per second; token buckets derive bursts and
/// per-worker shares from it, which must stay finite and fit their integer types.
pub(crate) const MAX_RATE: f64 = 1e9;

/// A non-negative decimal as written in the file: digits, optionally one `.` and more
/// digits. Returns the integer part and the fraction as (digits, number of digits).
/// Exponents, signs, `inf` and `NaN` are refused here, so nothing downstream sees them.
fn decimal(number: &str) -> Option<(u128, u128, u32)> {
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if int.is_empty() || !digits(int) || !digits(frac) || (number.contains('.') && frac.is_empty())
    {
        return None;
    }
    // Too many digits for u128 saturates: every unit multiplication then overflows and
    // is reported as too large, not as malformed.
    let significant = int.trim_start_matches('0');
    let int: u128 = if significant.is_empty() {
        0
    } else {
        significant.parse().unwrap_or(u128::MAX)
    };
    // The longest unit, a day, is under 10^14 ns: fraction digits past the 18th place
    // cannot change a nanosecond, so they are dropped rather than parsed (no overflow).
    let frac = frac.trim_end_matches('0');
    let kept = &frac[..frac.len().min(18)];
    let value: u128 = if kept.is_empty() {
        0
    } else {
        kept.parse().ok()?
    };
    Some((int, value, kept.len() as u32))
}

pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .ok_or_else(|| format!("duration {text:?} needs a unit (ms, s, m, h, d)"))?;
    let (number, unit) = text.split_at(split);
    let unit_ns: u128 = match unit {
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" => 60 * 1_000_000_000,
        "h" => 3600 * 1_000_000_000,
        "d" => 86400 * 1_000_000_000,
        _ => {
            return Err(format!(
                "invalid duration unit {unit:?} in {text:?} (ms, s, m, h, d)"
            ))
        }
    };
    let (int, frac, places) =
        decimal(number).ok_or_else(|| format!("invalid duration {text:?}"))?;
    let too_long = || format!("duration {text:?} is too long (at most 365d)");
    // Exact integer arithmetic, checked at every step: floats lose precision and
    // `Duration::from_secs_f64` panics on overflow.
    let nanos = int
        .checked_mul(unit_ns)
        .and_then(|n| n.checked_add(frac.checked_mul(unit_ns)? / 10u128.checked_pow(places)?))
        .ok_or_else(too_long)?;
    if nanos > MAX_DURATION.as_nanos() {
        return Err(too_long());
    }
    let nanos = u64::try_from(nanos).map_err(|_| too_long())?;
    Ok(Duration::from_nanos(nanos))
}

pub(crate) fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    if number.is_empty() {
        return Err(format!("invalid size {text:?}"));
    }
    let multiplier: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => {
            return Err(format!(
                "invalid size unit {unit:?} in {text:?} (B, KiB, MiB, GiB)"
            ))
        }
    };
    let too_large = || format!("size {text:?} is too large (at most 1TiB)");
    // Leading zeros do not count towards overflow; anything longer than u64 is too large.
    let significant = number.trim_start_matches('0');
    let value: u64 = if significant.is_empty() {
        0
    } else {
        significant.parse().map_err(|_| too_large())?
    };
    value
        .checked_mul(multiplier)
        .filter(|&bytes| bytes <= MAX_SIZE)
        .ok_or_else(too_large)
}

pub(crate) fn parse_rate(text: &str) -> Result<f64, String> {
    let (count, per) = text
        .trim()
        .split_once('/')
        .ok_or_else(|| format!("rate {text:?} must look like \"100/s\""))?;
    let seconds = match per.trim() {
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        other => return Err(format!("invalid rate unit {other:?} in {text:?} (s, m, h)")),
    };
    // A plain decimal only: `f64::from_str` would also take `inf`, `NaN` and `1e999`,
    // which would pass a `<= 0` check and poison every bucket computed from them.
    let (int, frac, places) =
        decimal(count.trim()).ok_or_else(|| format!("invalid rate {text:?}"))?;
    let count = int as f64 + frac as f64 / 10f64.powi(places as i32);
    let per_second = count / seconds;
    if per_second <= 0.0 {
        return Err(format!("rate {text:?} must be positive"));
    }
    if !per_second.is_finite() || per_second > MAX_RATE {
        return Err(format!("rate {text:?} is too high (at most 1000000000/s)"));
    }
    Ok(per_second)
}

struct StrVisitor<F>(&'static str, F);

impl<T, F: Fn(&str) -> Result<T, String>> Visitor<'_> for StrVisitor<F> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.0)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        (self.1)(v).map_err(E::custom)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        (self.1)(&v.to_string()).map_err(E::custom)
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrVisitor(
            "a duration such as \"300ms\", \"5s\" or \"1h\"",
            |s: &str| parse_duration(s).map(Dur),
        ))
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrVisitor(
            "a size such as \"16KiB\" or \"50MiB\"",
            |s: &str| parse_size(s).map(Size),
        ))
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrVisitor("a rate such as \"100/s\"", |s: &str| {
            parse_rate(s).map(|per_second| Rate { per_second })
        }))
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let ms = self.0.as_millis();
        if ms.is_multiple_of(1000) {
            s.serialize_str(&format!("{}s", ms / 1000))
        } else {
            s.serialize_str(&format!("{ms}ms"))
        }
    }
}

impl Serialize for Size {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl Serialize for Rate {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}/s", self.per_second))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("300ms").unwrap(), Duration::from_millis(300));
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("16KiB").unwrap(), 16384);
        assert_eq!(parse_size("50MiB").unwrap(), 50 << 20);
        assert_eq!(parse_size("50m").unwrap(), 50 << 20);
        assert_eq!(parse_size("123").unwrap(), 123);
        assert!(parse_size("12 parsecs").is_err());
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("100/s").unwrap(), 100.0);
        assert_eq!(parse_rate("60/m").unwrap(), 1.0);
        assert!(parse_rate("100").is_err());
        assert!(parse_rate("0/s").is_err());
    }

    /// A deterministic stream of pseudo-random numbers (xorshift), so the fuzz-ish tests
    /// below cover many inputs and still fail the same way every run.
    fn rng(mut seed: u64) -> impl FnMut() -> u64 {
        move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        }
    }

    /// `min + (0..spread)` random decimal digits.
    fn digits(next: &mut impl FnMut() -> u64, min: u64, spread: u64) -> String {
        let len = min + next() % spread;
        (0..len)
            .map(|_| char::from(b'0' + (next() % 10) as u8))
            .collect()
    }

    #[test]
    fn huge_durations_are_errors_not_panics() {
        for text in [
            "99999999999999999999h",
            "18446744073709551615s",
            "18446744073709551616s",
            "18446744073709551615000ms",
            "213503982334601d",
            "1e400s",
            "inf s",
            "infs",
            "NaNs",
            "-1s",
            "+1s",
            "1..5s",
            ".5s",
            "5.s",
            "366d",
            "8761h",
            "365.000000001d",
            "340282366920938463463374607431768211456d",
            "9999999999999999999999999999999999999999999999999999s",
        ] {
            assert!(parse_duration(text).is_err(), "{text:?} accepted");
        }
        assert_eq!(parse_duration("365d").unwrap(), MAX_DURATION);
        assert_eq!(parse_duration("8760h").unwrap(), MAX_DURATION);
        assert_eq!(parse_duration("0s").unwrap(), Duration::ZERO);
        assert_eq!(
            parse_duration("000000000000000000000000000000000000000000005s").unwrap(),
            Duration::from_secs(5)
        );
        assert_eq!(
            parse_duration("0.0000000001s").unwrap(),
            Duration::ZERO,
            "below a nanosecond rounds down"
        );
        assert_eq!(parse_duration("1.000000001s").unwrap(), Duration::new(1, 1));
        assert_eq!(parse_duration("0.25m").unwrap(), Duration::from_secs(15));
    }

    #[test]
    fn durations_over_many_inputs_are_exact_or_refused() {
        let mut next = rng(0x9E37_79B9_7F4A_7C15);
        let units: [(&str, u128); 5] = [
            ("ms", 1_000_000),
            ("s", 1_000_000_000),
            ("m", 60_000_000_000),
            ("h", 3_600_000_000_000),
            ("d", 86_400_000_000_000),
        ];
        for _ in 0..20_000 {
            let int = digits(&mut next, 1, 30);
            let (unit, unit_ns) = units[(next() % 5) as usize];
            let text = format!("{int}{unit}");
            let expected = int
                .parse::<u128>()
                .ok()
                .and_then(|n| n.checked_mul(unit_ns))
                .filter(|&n| n <= MAX_DURATION.as_nanos());
            match (parse_duration(&text), expected) {
                (Ok(d), Some(n)) => assert_eq!(d.as_nanos(), n, "{text}"),
                (Err(e), None) => assert!(e.contains("too long"), "{text}: {e}"),
                (got, want) => panic!("{text}: got {got:?}, want {want:?}"),
            }
            // Fractions and random junk must never panic, and never exceed the bound.
            let frac = format!("{int}.{}{unit}", digits(&mut next, 0, 25));
            let junk: String = (0..(next() % 12))
                .map(|_| char::from(b"0123456789.smhdx-+eE "[(next() % 21) as usize]))
                .collect();
            for text in [frac, junk] {
                if let Ok(d) = parse_duration(&text) {
                    assert!(d <= MAX_DURATION, "{text}");
                }
            }
        }
    }

    #[test]
    fn sizes_over_many_inputs_are_exact_or_refused() {
        for text in [
            "18446744073709551615",
            "18446744073709551616",
            "99999999999999999999999999G",
            "17179869184G",
            "1025G",
            "1099511627777",
            "-1",
            "1.5M",
            "K",
            "",
        ] {
            assert!(parse_size(text).is_err(), "{text:?} accepted");
        }
        assert_eq!(parse_size("1024G").unwrap(), MAX_SIZE);
        assert_eq!(
            parse_size("0000000000000000000000000016KiB").unwrap(),
            16384
        );
        let mut next = rng(0x2545_F491_4F6C_DD1D);
        let units: [(&str, u128); 4] = [("", 1), ("K", 1 << 10), ("MiB", 1 << 20), ("g", 1 << 30)];
        for _ in 0..20_000 {
            let int = digits(&mut next, 1, 25);
            let (unit, mul) = units[(next() % 4) as usize];
            let text = format!("{int}{unit}");
            let expected = int
                .parse::<u128>()
                .ok()
                .and_then(|n| n.checked_mul(mul))
                .filter(|&n| n <= u128::from(MAX_SIZE));
            match (parse_size(&text), expected) {
                (Ok(n), Some(want)) => assert_eq!(u128::from(n), want, "{text}"),
                (Err(e), None) => assert!(e.contains("too large"), "{text}: {e}"),
                (got, want) => panic!("{text}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn rates_are_finite_positive_and_bounded() {
        for text in [
            "NaN/s",
            "nan/s",
            "inf/s",
            "infinity/m",
            "1e999/s",
            "1e3/s",
            "-5/s",
            "0/s",
            "0.0/h",
            "1000000001/s",
            "99999999999999999999999999999999999999999/s",
            "/s",
            "5/",
            "5/ms",
        ] {
            assert!(parse_rate(text).is_err(), "{text:?} accepted");
        }
        assert_eq!(parse_rate("1000000000/s").unwrap(), MAX_RATE);
        assert_eq!(parse_rate("0.5/s").unwrap(), 0.5);
        assert_eq!(parse_rate("3600/h").unwrap(), 1.0);
        let mut next = rng(0xDEAD_BEEF_CAFE_F00D);
        for _ in 0..20_000 {
            let text = format!(
                "{}.{}/{}",
                digits(&mut next, 1, 20),
                digits(&mut next, 1, 20),
                ["s", "m", "h"][(next() % 3) as usize]
            );
            if let Ok(r) = parse_rate(&text) {
                assert!(r.is_finite() && r > 0.0 && r <= MAX_RATE, "{text}: {r}");
            }
        }
    }
}
