//! A counter whose concurrent increments merge instead of conflicting.
//!
//! The value is a signed 64-bit integer in decimal text (`GET` shows `42`).
//! A command is a signed decimal delta: `1`, `+5`, `-3`. Because the policy
//! runs inside consensus on the committed value, every increment counts
//! exactly once, whichever replica it is sent to.

use ballot_policy::{Change, Context, Current, Policy, Rejection};

pub struct Counter;

/// Parses a signed decimal integer, tolerating surrounding whitespace.
fn number(bytes: &[u8]) -> Option<i64> {
    let text = std::str::from_utf8(bytes).ok()?.trim();
    text.strip_prefix('+').unwrap_or(text).parse().ok()
}

impl Policy for Counter {
    const NAME: &'static str = "counter";
    const VERSION: &'static str = "0.1.0";

    fn apply(_: &Context, current: &Current, command: &[u8]) -> Result<Change, Rejection> {
        let delta = number(command).ok_or_else(|| {
            Rejection::invalid("a counter command is a signed decimal delta, like 1 or -3")
        })?;
        let value = match &current.value {
            None => 0,
            Some(v) => number(v).ok_or_else(|| {
                Rejection::conflict(
                    "the stored value is not a number; was it written by another policy?",
                )
            })?,
        };
        let next = value.checked_add(delta).ok_or_else(|| {
            Rejection::new("overflow", format!("{value} + {delta} overflows i64"))
        })?;
        if delta == 0 && current.value.is_some() {
            return Ok(Change::Keep);
        }
        Ok(Change::Set(next.to_string().into_bytes()))
    }

    fn self_check() -> Result<(), String> {
        let mut key = ballot_policy::testing::Key::<Counter>::new("self-check");
        for command in ["1", "+2", "-4"] {
            key.apply(command).map_err(|r| r.message)?;
        }
        match key.text() {
            Some("-1") => Ok(()),
            other => Err(format!("1 + 2 - 4 gave {other:?}")),
        }
    }
}

ballot_policy::export_policy!(Counter);

#[cfg(test)]
mod tests {
    use super::*;
    use ballot_policy::testing::Key;

    #[test]
    fn increments_add_up() {
        let mut key = Key::<Counter>::new("hits");
        for _ in 0..10 {
            key.apply("1").unwrap();
        }
        key.apply("-3").unwrap();
        assert_eq!(key.text(), Some("7"));
        assert_eq!(key.version(), 11);
    }

    #[test]
    fn adding_zero_to_an_existing_counter_writes_nothing() {
        let mut key = Key::<Counter>::new("hits");
        key.apply("0").unwrap();
        assert_eq!(key.text(), Some("0"));
        assert_eq!(key.apply("0").unwrap(), Change::Keep);
        assert_eq!(key.version(), 1);
    }

    #[test]
    fn garbage_and_overflow_are_rejected_without_a_change() {
        let mut key = Key::<Counter>::new("hits");
        assert_eq!(key.apply("one").unwrap_err().code, "invalid-command");
        key.apply(i64::MAX.to_string()).unwrap();
        assert_eq!(key.apply("1").unwrap_err().code, "overflow");
        assert_eq!(key.version(), 1);
    }

    #[test]
    fn self_check_passes() {
        Counter::self_check().unwrap();
    }
}
