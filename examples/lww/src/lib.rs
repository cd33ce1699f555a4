//! Last-writer-wins by the host's clock.
//!
//! The command is the new value. The stored value is the proposing replica's
//! clock reading, a newline, and the value: `1763790000123\nhello`. A write
//! whose replica's clock reads *earlier* than the stored timestamp loses: it
//! succeeds without changing anything. The time always comes from the host
//! (`Context::now_ms`); a guest has no clock of its own.
//!
//! Under consensus the order of writes is already agreed, so this policy is
//! for data whose meaning is "the newest observation", such as a device's
//! last reported position written through several replicas whose clients'
//! requests can arrive out of order.

use ballot_policy::{Change, Context, Current, Policy, Rejection};

pub struct Lww;

/// Splits a stored value into its timestamp and payload.
pub fn decode(stored: &[u8]) -> Option<(u64, &[u8])> {
    let newline = stored.iter().position(|b| *b == b'\n')?;
    let ts = std::str::from_utf8(&stored[..newline]).ok()?.parse().ok()?;
    Some((ts, &stored[newline + 1..]))
}

impl Policy for Lww {
    const NAME: &'static str = "lww";
    const VERSION: &'static str = "0.1.0";

    fn apply(ctx: &Context, current: &Current, command: &[u8]) -> Result<Change, Rejection> {
        if let Some(stored) = &current.value {
            let (ts, payload) = decode(stored)
                .ok_or_else(|| Rejection::conflict("the stored value has no timestamp line"))?;
            if ts > ctx.now_ms || (ts == ctx.now_ms && payload == command) {
                return Ok(Change::Keep);
            }
        }
        let mut value = ctx.now_ms.to_string().into_bytes();
        value.push(b'\n');
        value.extend_from_slice(command);
        Ok(Change::Set(value))
    }
}

ballot_policy::export_policy!(Lww);

#[cfg(test)]
mod tests {
    use super::*;
    use ballot_policy::testing::Key;

    #[test]
    fn newer_writes_win_and_carry_the_host_time() {
        let mut key = Key::<Lww>::new("position");
        key.now_ms = 1_000;
        key.apply("a").unwrap();
        key.now_ms = 2_000;
        key.apply("b").unwrap();
        assert_eq!(key.text(), Some("2000\nb"));
    }

    #[test]
    fn a_write_from_a_replica_whose_clock_is_behind_loses() {
        let mut key = Key::<Lww>::new("position");
        key.now_ms = 5_000;
        key.apply("new").unwrap();
        key.now_ms = 4_000;
        assert_eq!(key.apply("old").unwrap(), Change::Keep);
        assert_eq!(decode(key.value().unwrap()), Some((5_000, &b"new"[..])));
        assert_eq!(key.version(), 1);
    }
}
