//! A policy that misbehaves on command, so the host's sandbox can be tested
//! against a real component:
//!
//! | command  | what it does |
//! |----------|--------------|
//! | `set V`  | sets the value to V (behaves) |
//! | `loop`   | spins forever |
//! | `trap`   | panics (a wasm trap) |
//! | `bomb`   | allocates until memory runs out |
//! | `huge`   | returns a 2 MiB value, over the host's value limit |
//! | `chatty` | rejects with a 1 MiB message, over the host's text limit |

use ballot_policy::{Change, Context, Current, Policy, Rejection};

pub struct Hostile;

impl Policy for Hostile {
    const NAME: &'static str = "hostile";
    const VERSION: &'static str = "0.1.0";

    fn apply(_: &Context, _: &Current, command: &[u8]) -> Result<Change, Rejection> {
        match command {
            [b's', b'e', b't', b' ', value @ ..] => Ok(Change::Set(value.to_vec())),
            b"loop" => {
                let mut n: u64 = 0;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            b"trap" => panic!("asked to trap"),
            b"bomb" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 8 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            b"huge" => Ok(Change::Set(vec![b'x'; 2 << 20])),
            b"chatty" => Err(Rejection::invalid("x".repeat(1 << 20))),
            _ => Err(Rejection::invalid(
                "set V | loop | trap | bomb | huge | chatty",
            )),
        }
    }
}

ballot_policy::export_policy!(Hostile);
