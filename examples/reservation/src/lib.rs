//! Set-once ownership with a lease: the actor-key pattern.
//!
//! The value is `OWNER\nEXPIRES_MS` (text). Commands, as text:
//!
//! | command | effect |
//! |---|---|
//! | `acquire OWNER LEASE_MS` | take the key if it is free, expired, or already OWNER's (then it renews) |
//! | `renew OWNER LEASE_MS`   | extend OWNER's unexpired lease |
//! | `release OWNER`          | give the key up (deletes it) |
//!
//! Expiry is judged against the proposing replica's clock (`now_ms`, from
//! the host). Clocks differ between replicas, so an owner should renew well
//! before its lease ends and stop acting as owner once `EXPIRES_MS` minus a
//! margin for clock skew has passed.

use ballot_policy::{Change, Context, Current, Policy, Rejection};

pub struct Reservation;

/// Longest lease a command may ask for: one day.
pub const LEASE_MAX_MS: u64 = 24 * 3600 * 1000;

/// A decoded reservation.
#[derive(Debug, PartialEq, Eq)]
pub struct Held<'a> {
    pub owner: &'a str,
    pub expires_ms: u64,
}

pub fn decode(value: &[u8]) -> Option<Held<'_>> {
    let (owner, expires) = std::str::from_utf8(value).ok()?.split_once('\n')?;
    Some(Held {
        owner,
        expires_ms: expires.parse().ok()?,
    })
}

fn encode(owner: &str, expires_ms: u64) -> Vec<u8> {
    format!("{owner}\n{expires_ms}").into_bytes()
}

fn lease(arg: Option<&str>) -> Result<u64, Rejection> {
    match arg.and_then(|a| a.parse::<u64>().ok()) {
        Some(ms) if ms > 0 && ms <= LEASE_MAX_MS => Ok(ms),
        _ => Err(Rejection::invalid(format!(
            "the lease is a number of milliseconds from 1 to {LEASE_MAX_MS}"
        ))),
    }
}

impl Policy for Reservation {
    const NAME: &'static str = "reservation";
    const VERSION: &'static str = "0.1.0";

    fn apply(ctx: &Context, current: &Current, command: &[u8]) -> Result<Change, Rejection> {
        let text = std::str::from_utf8(command)
            .map_err(|_| Rejection::invalid("commands are UTF-8 text"))?;
        let mut words = text.split_whitespace();
        let verb = words.next().unwrap_or("");
        let owner = words
            .next()
            .ok_or_else(|| Rejection::invalid("usage: acquire|renew|release OWNER [LEASE_MS]"))?;
        let held = match &current.value {
            None => None,
            Some(v) => Some(
                decode(v)
                    .ok_or_else(|| Rejection::conflict("the stored value is not a reservation"))?,
            ),
        };
        // An expired lease is as good as none.
        let live = held.filter(|h| h.expires_ms > ctx.now_ms);
        let now = ctx.now_ms;
        match (verb, live) {
            ("acquire", None) => Ok(Change::Set(encode(owner, now + lease(words.next())?))),
            ("acquire" | "renew", Some(h)) if h.owner == owner => {
                Ok(Change::Set(encode(owner, now + lease(words.next())?)))
            }
            ("release", Some(h)) if h.owner == owner => Ok(Change::Remove),
            ("acquire" | "renew" | "release", Some(h)) => Err(Rejection::new(
                "held",
                format!("held by {} for another {} ms", h.owner, h.expires_ms - now),
            )),
            ("renew", None) => Err(Rejection::new(
                "expired",
                format!("{owner} holds no live lease; acquire it again"),
            )),
            // Releasing what nobody holds is done already; an expired
            // lease's record is cleared.
            ("release", None) if current.value.is_some() => Ok(Change::Remove),
            ("release", None) => Ok(Change::Keep),
            _ => Err(Rejection::invalid(format!("unknown command {verb:?}"))),
        }
    }
}

ballot_policy::export_policy!(Reservation);

#[cfg(test)]
mod tests {
    use super::*;
    use ballot_policy::testing::Key;

    #[test]
    fn one_owner_at_a_time_until_the_lease_expires() {
        let mut key = Key::<Reservation>::new("actor/42");
        key.now_ms = 1_000;
        key.apply("acquire alice 500").unwrap();
        assert_eq!(
            decode(key.value().unwrap()),
            Some(Held {
                owner: "alice",
                expires_ms: 1_500
            })
        );
        key.now_ms = 1_200;
        let refused = key.apply("acquire bob 500").unwrap_err();
        assert_eq!(refused.code, "held");
        assert!(refused.message.contains("alice"), "{}", refused.message);
        key.now_ms = 1_500;
        key.apply("acquire bob 500").unwrap();
        assert_eq!(decode(key.value().unwrap()).unwrap().owner, "bob");
    }

    #[test]
    fn the_owner_renews_and_releases() {
        let mut key = Key::<Reservation>::new("actor/42");
        key.now_ms = 1_000;
        key.apply("acquire alice 500").unwrap();
        key.now_ms = 1_400;
        key.apply("renew alice 500").unwrap();
        assert_eq!(decode(key.value().unwrap()).unwrap().expires_ms, 1_900);
        assert_eq!(key.apply("release bob").unwrap_err().code, "held");
        key.apply("release alice").unwrap();
        assert_eq!(key.value(), None);
        assert_eq!(key.apply("release alice").unwrap(), Change::Keep);
    }

    #[test]
    fn a_lapsed_lease_cannot_be_renewed() {
        let mut key = Key::<Reservation>::new("actor/42");
        key.apply("acquire alice 10").unwrap();
        key.now_ms = 10;
        assert_eq!(key.apply("renew alice 10").unwrap_err().code, "expired");
    }

    #[test]
    fn bad_commands_are_invalid() {
        let mut key = Key::<Reservation>::new("actor/42");
        for bad in [
            "",
            "acquire",
            "acquire alice",
            "acquire alice 0",
            "steal alice 5",
        ] {
            assert_eq!(
                key.apply(bad).unwrap_err().code,
                "invalid-command",
                "{bad:?}"
            );
        }
        assert_eq!(key.version(), 0);
    }
}
