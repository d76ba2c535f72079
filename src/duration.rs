//! Durations on the command line (`--connect-timeout 5s`, `shunt validate --timeout 500ms`):
//! one parser, one rule, for every command.
//!
//! The rule: a number, whole or with a fraction (`5`, `1.5`, `.5`), followed at once by a
//! unit, `ms`, `s` or `m`; a bare number is seconds. Zero is a duration like any other, and
//! the longest is a day ([`MAX`]). Whether an option can use zero is the option's business:
//! it says so where it is declared, with [`positive`] as its parser instead of [`parse`].
//! The arithmetic is exact (integers, nanoseconds), so no float can turn `NaN`, `inf` or
//! `1e3` into something; they are refused as not numbers.

use std::time::Duration;

/// The longest duration accepted. Nothing shunt waits for should take longer, and it catches
/// a value with digits to spare (`50000000s`).
pub const MAX: Duration = Duration::from_secs(86_400);

const NANOS_PER_SEC: u128 = 1_000_000_000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error(
        "'{0}' is not a duration: give a number and a unit, ms, s or m (e.g. 5s, 500ms, 1.5m)"
    )]
    Malformed(String),
    #[error(
        "'{value}' has an unknown unit '{unit}': use ms, s or m, right after the number (e.g. 5s)"
    )]
    UnknownUnit { value: String, unit: String },
    #[error("'{0}' is negative: a duration is 0 or more (e.g. 5s)")]
    Negative(String),
    #[error("'{0}' is longer than a day, the most shunt accepts: give e.g. 30s or 10m")]
    TooLong(String),
    #[error("'{0}' is zero, which this option cannot use: give more than 0 (e.g. 5s)")]
    Zero(String),
}

/// `5s`, `500ms`, `1.5m`, `2` (seconds), `0`; see the module documentation for the rule.
pub fn parse(s: &str) -> Result<Duration, DurationError> {
    let t = s.trim();
    let malformed = || DurationError::Malformed(s.to_string());
    if t.starts_with('-') {
        return Err(DurationError::Negative(s.to_string()));
    }
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let unit_nanos: u128 = match unit {
        "ms" => NANOS_PER_SEC / 1000,
        "" | "s" => NANOS_PER_SEC,
        "m" => 60 * NANOS_PER_SEC,
        // No number at all (`NaN`, `inf`, `s`, ``) is not a number with a bad unit.
        _ if number.is_empty() => return Err(malformed()),
        _ => {
            return Err(DurationError::UnknownUnit {
                value: s.to_string(),
                unit: unit.to_string(),
            })
        }
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if (whole.is_empty() && fraction.is_empty()) || fraction.contains('.') {
        return Err(malformed());
    }
    let too_long = || DurationError::TooLong(s.to_string());
    // Only digits are left, so a failed parse is a number too big for u128.
    let whole: u128 = match whole {
        "" => 0,
        w => w.parse().map_err(|_| too_long())?,
    };
    // Digits past the eighteenth are below a nanosecond for every unit: dropped.
    let fraction = &fraction[..fraction.len().min(18)];
    let fraction_nanos = match fraction {
        "" => 0,
        f => {
            let digits: u128 = f.parse().map_err(|_| malformed())?;
            digits * unit_nanos / 10u128.pow(f.len() as u32)
        }
    };
    let nanos = whole
        .checked_mul(unit_nanos)
        .and_then(|n| n.checked_add(fraction_nanos))
        .ok_or_else(too_long)?;
    if nanos > MAX.as_nanos() {
        return Err(too_long());
    }
    let secs = (nanos / NANOS_PER_SEC) as u64;
    Ok(Duration::new(secs, (nanos % NANOS_PER_SEC) as u32))
}

/// [`parse`], refusing zero: for an option where zero means nothing useful (a connect
/// timeout of 0 fails every connection).
pub fn positive(s: &str) -> Result<Duration, DurationError> {
    match parse(s)? {
        d if d.is_zero() => Err(DurationError::Zero(s.to_string())),
        d => Ok(d),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Result<Duration, DurationError> {
        Ok(Duration::from_millis(n))
    }

    #[test]
    fn numbers_with_units() {
        assert_eq!(parse("5s"), ms(5000));
        assert_eq!(parse("250ms"), ms(250));
        assert_eq!(parse("2m"), ms(120_000));
        assert_eq!(parse("1.5s"), ms(1500));
        assert_eq!(parse("0.25m"), ms(15_000));
        assert_eq!(parse(".5s"), ms(500));
        assert_eq!(parse("5."), ms(5000));
        assert_eq!(parse(" 5s "), ms(5000));
        assert_eq!(parse("1.0000000001s"), Ok(Duration::new(1, 0)));
        assert_eq!(parse("0.000000001s"), Ok(Duration::from_nanos(1)));
    }

    #[test]
    fn a_bare_number_is_seconds() {
        assert_eq!(parse("3"), ms(3000));
        assert_eq!(parse("0.5"), ms(500));
    }

    #[test]
    fn zero_is_a_duration_and_positive_refuses_it() {
        for zero in ["0", "0s", "0ms", "0.0m", ".0"] {
            assert_eq!(parse(zero), Ok(Duration::ZERO), "{zero}");
            assert_eq!(positive(zero), Err(DurationError::Zero(zero.into())));
        }
        assert_eq!(positive("1ms"), ms(1));
    }

    #[test]
    fn unknown_or_misplaced_units() {
        for (value, unit) in [("5x", "x"), ("5h", "h"), ("5 s", " s"), ("5sec", "sec")] {
            let err = parse(value).unwrap_err();
            assert_eq!(
                err,
                DurationError::UnknownUnit {
                    value: value.into(),
                    unit: unit.into()
                }
            );
            assert!(err.to_string().contains(&format!("'{value}'")), "{err}");
        }
        // Exponents are not part of the rule.
        assert!(matches!(
            parse("1e3s"),
            Err(DurationError::UnknownUnit { .. })
        ));
    }

    #[test]
    fn not_numbers() {
        for value in [
            "", " ", "s", "ms", ".", "..5s", "1.2.3s", "NaN", "nan", "inf", "+5s",
        ] {
            assert_eq!(
                parse(value),
                Err(DurationError::Malformed(value.into())),
                "{value:?}"
            );
        }
        let err = parse("soon").unwrap_err().to_string();
        assert!(err.contains("'soon'") && err.contains("5s"), "{err}");
    }

    #[test]
    fn negative() {
        for value in ["-1s", "-0", "-5"] {
            assert_eq!(parse(value), Err(DurationError::Negative(value.into())));
        }
    }

    #[test]
    fn a_day_at_most_and_no_overflow() {
        assert_eq!(parse("86400s"), Ok(MAX));
        assert_eq!(parse("1440m"), Ok(MAX));
        for value in [
            "86400.000000001s",
            "1441m",
            "100000000000000000000s",
            "18446744073709551616ms",
            // More digits than a u128 holds.
            "999999999999999999999999999999999999999999s",
            "99999999999999999999999999999999999m",
        ] {
            assert_eq!(
                parse(value),
                Err(DurationError::TooLong(value.into())),
                "{value}"
            );
        }
    }
}
