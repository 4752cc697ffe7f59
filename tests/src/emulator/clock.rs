//! Wall-clock timestamps in the apiserver's RFC 3339 shapes (seconds and microseconds).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `2026-11-26T18:10:50Z`.
pub fn now_rfc3339() -> String {
    format_time(SystemTime::now(), false)
}

/// Nanoseconds since the epoch, for event names (`<object>.<hex nanos>`).
pub fn unix_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_nanos()
}

/// RFC 3339 (seconds) of an arbitrary instant.
pub fn format_system_time(t: SystemTime) -> String {
    format_time(t, false)
}

/// kubectl's age of an RFC 3339 timestamp (`42s`, `3m12s`, `5h`, `2d3h`), `<unknown>` if unparsable.
pub fn age(ts: &str) -> String {
    let Some(then) = parse_rfc3339(ts) else {
        return "<unknown>".into();
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    let s = now.saturating_sub(then);
    let (m, h, d) = (s / 60, s / 3600, s / 86_400);
    if s < 120 {
        format!("{s}s")
    } else if m < 10 {
        if s % 60 == 0 {
            format!("{m}m")
        } else {
            format!("{m}m{}s", s % 60)
        }
    } else if h < 3 {
        format!("{m}m")
    } else if h < 8 {
        if m % 60 == 0 {
            format!("{h}h")
        } else {
            format!("{h}h{}m", m % 60)
        }
    } else if h < 48 {
        format!("{h}h")
    } else if d < 8 {
        if h % 24 == 0 {
            format!("{d}d")
        } else {
            format!("{d}d{}h", h % 24)
        }
    } else {
        format!("{d}d")
    }
}

/// Seconds since the epoch of `YYYY-MM-DDTHH:MM:SS[.frac]Z`.
fn parse_rfc3339(ts: &str) -> Option<u64> {
    let bytes = ts.as_bytes();
    if bytes.len() < 20 || bytes[4] != b'-' || bytes[10] != b'T' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| ts.get(r)?.parse::<i64>().ok();
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    // Inverse of civil_from_days (Howard Hinnant).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + hour * 3600 + minute * 60 + second).ok()
}

fn format_time(t: SystemTime, micros: bool) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let secs = d.as_secs();
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let (y, m, day) = civil_from_days(days);
    let base = format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    );
    if micros {
        format!("{base}.{:06}Z", d.subsec_micros())
    } else {
        format!("{base}Z")
    }
}

// Howard Hinnant's days-to-civil algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let m = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instant() {
        let t = UNIX_EPOCH + Duration::from_secs(1_764_180_650);
        assert_eq!(format_time(t, false), "2025-11-26T18:10:50Z");
        assert_eq!(format_time(UNIX_EPOCH, true), "1970-01-01T00:00:00.000000Z");
        assert_eq!(parse_rfc3339("2025-11-26T18:10:50Z"), Some(1_764_180_650));
        assert_eq!(age("garbage"), "<unknown>");
    }
}
