//! Minimal line logging to stderr: `2026-11-26T04:59:01.123Z INFO message`.
//!
//! Callers never pass secrets: values resolved from secret references stay in
//! the connection and auth layers.

use std::fmt::Arguments;
use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

pub fn info(args: Arguments<'_>) {
    line("INFO", args);
}

pub fn warn(args: Arguments<'_>) {
    line("WARN", args);
}

pub fn error(args: Arguments<'_>) {
    line("ERROR", args);
}

fn line(level: &str, args: Arguments<'_>) {
    let now = rfc3339(SystemTime::now());
    let _ = writeln!(std::io::stderr().lock(), "{now} {level} {args}");
}

/// `2026-11-26T04:59:01.123Z`: RFC 3339, UTC, milliseconds.
pub fn rfc3339(time: SystemTime) -> String {
    let now = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let (secs, millis) = (now.as_secs(), now.subsec_millis());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    #[test]
    fn civil_dates() {
        assert_eq!(super::civil_from_days(0), (1970, 1, 1));
        assert_eq!(super::civil_from_days(20_600), (2026, 5, 27));
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_779_840_000_123);
        assert_eq!(super::rfc3339(t), "2026-05-27T00:00:00.123Z");
    }
}
