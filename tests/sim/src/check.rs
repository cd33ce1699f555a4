//! A linearizability checker for the register policy, per key.
//!
//! Wing and Gong's search with Lowe's memoisation (as in Porcupine): walk the
//! history in real-time order, try to linearize each pending call against a
//! sequential model of the register, backtrack on a dead end, and never
//! revisit a (set of linearized ops, model state) pair. Operations whose
//! outcome is unknown (a crashed replica, `maybe-applied` failures) return at
//! infinity: they may take effect at any point after their call, or never.

use std::collections::HashSet;

/// What a client asked.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Input {
    Create(Vec<u8>),
    Put(Vec<u8>),
    Cas(u64, Vec<u8>),
    Delete,
    /// Delete only at this version (a no-op on an absent key there).
    DeleteIf(u64),
    Read,
}

/// What the client was told.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Output {
    /// The value and version after the operation.
    Done(Option<Vec<u8>>, u64),
    /// Refused with this code; the value and version seen.
    Rejected(String, Option<Vec<u8>>, u64),
    /// Unknown: may or may not have taken effect.
    Unknown,
}

/// One operation on one key. Times are a global order of sim events.
#[derive(Clone, Debug)]
pub struct Op {
    pub input: Input,
    pub output: Output,
    pub call: u64,
    /// `None` when the outcome is unknown.
    pub ret: Option<u64>,
}

type State = (Option<Vec<u8>>, u64);

/// The register's sequential specification: the next state and the output a
/// correct register gives. Written independently of `ballot_core::register`.
fn model(state: &State, input: &Input) -> (State, Output) {
    let (value, version) = state;
    let set = |v: &Vec<u8>| {
        (
            (Some(v.clone()), version + 1),
            Output::Done(Some(v.clone()), version + 1),
        )
    };
    let keep = || (state.clone(), Output::Done(value.clone(), *version));
    let reject = |code: &str| {
        (
            state.clone(),
            Output::Rejected(code.to_string(), value.clone(), *version),
        )
    };
    match input {
        Input::Create(v) => match value {
            None => set(v),
            Some(existing) if existing == v => keep(),
            Some(_) => reject("conflict"),
        },
        Input::Put(v) => set(v),
        Input::Cas(expected, v) if expected == version => set(v),
        Input::Cas(..) => reject("version-mismatch"),
        Input::Delete if value.is_none() => keep(),
        Input::Delete => ((None, version + 1), Output::Done(None, version + 1)),
        Input::DeleteIf(expected) if expected != version => reject("version-mismatch"),
        Input::DeleteIf(_) if value.is_none() => keep(),
        Input::DeleteIf(_) => ((None, version + 1), Output::Done(None, version + 1)),
        Input::Read => keep(),
    }
}

const NIL: usize = usize::MAX;
/// Configurations the search may memoise before it gives up: a bound on
/// memory (histories with many unknown outcomes grow exponentially).
pub const SEARCH_MAX: usize = 40_000_000;

/// Rewrites a history into an equivalent one that is cheaper to search, and
/// says, for each operation, which one must be linearized before it.
///
/// - A value that no completed operation ever reports was written, if at all,
///   by an operation with unknown outcome, and nothing ever read it. Every
///   such value becomes one sentinel: the model only compares values for
///   `create`, whose effect on the state (set when absent, keep otherwise) does
///   not depend on the comparison, and every known output that could show the
///   value would have made it observed. So the history is linearizable iff the
///   rewritten one is.
/// - Operations with unknown outcome and the same (rewritten) input are
///   interchangeable: if a linearization uses a later-called one before an
///   earlier-called one, swapping them gives another (both return at
///   infinity, the earlier call is legal wherever the later is). So such
///   operations are linearized in call order only: `after[i]` names the one
///   before `i`. With k lost writes of unseen values the search then meets k+1
///   subsets of them instead of 2^k.
fn canonical(ops: &[Op]) -> (Vec<Op>, Vec<usize>) {
    let mut seen: HashSet<&[u8]> = HashSet::new();
    for op in ops {
        match &op.output {
            Output::Done(Some(v), _) | Output::Rejected(_, Some(v), _) => {
                seen.insert(v);
            }
            _ => {}
        }
    }
    let mut taken = seen.clone();
    for op in ops {
        if let Input::Create(v) | Input::Put(v) | Input::Cas(_, v) = &op.input {
            taken.insert(v);
        }
    }
    let mut sentinel = b"\xffunseen".to_vec();
    while taken.contains(sentinel.as_slice()) {
        sentinel.push(b'~');
    }
    let hide = |v: &Vec<u8>| {
        if seen.contains(v.as_slice()) {
            v.clone()
        } else {
            sentinel.clone()
        }
    };
    let rewritten: Vec<Op> = ops
        .iter()
        .map(|op| {
            let mut op = op.clone();
            if op.output == Output::Unknown {
                op.input = match &op.input {
                    Input::Create(v) => Input::Create(hide(v)),
                    Input::Put(v) => Input::Put(hide(v)),
                    Input::Cas(e, v) => Input::Cas(*e, hide(v)),
                    other => other.clone(),
                };
            }
            op
        })
        .collect();
    let mut by_call: Vec<usize> = (0..ops.len()).collect();
    by_call.sort_by_key(|&i| (rewritten[i].call, i));
    let mut last: std::collections::HashMap<&Input, usize> = std::collections::HashMap::new();
    let mut after = vec![NIL; ops.len()];
    for &i in &by_call {
        if rewritten[i].output == Output::Unknown {
            if let Some(prev) = last.insert(&rewritten[i].input, i) {
                after[i] = prev;
            }
        }
    }
    (rewritten, after)
}

/// Checks one key's history; on failure says why, with the history.
pub fn check(ops: &[Op]) -> Result<(), String> {
    let original = ops;
    // A read whose outcome is unknown changes nothing and told nobody
    // anything: every history is linearizable with it iff without it.
    let ops: Vec<Op> = ops
        .iter()
        .filter(|op| !(op.input == Input::Read && op.output == Output::Unknown))
        .cloned()
        .collect();
    let n = ops.len();
    if n == 0 {
        return Ok(());
    }
    let (rewritten, after) = canonical(&ops);
    let ops = &rewritten[..];
    // Entries: calls 0..n, returns n..2n; the head sentinel is 2n.
    let mut order: Vec<(u64, usize)> = Vec::with_capacity(2 * n);
    for (i, op) in ops.iter().enumerate() {
        order.push((op.call, i));
        order.push((op.ret.unwrap_or(u64::MAX), n + i));
    }
    order.sort();
    let head = 2 * n;
    let mut next = vec![NIL; 2 * n + 1];
    let mut prev = vec![NIL; 2 * n + 1];
    let mut last = head;
    for &(_, e) in &order {
        next[last] = e;
        prev[e] = last;
        last = e;
    }
    let unlink = |e: usize, next: &mut Vec<usize>, prev: &mut Vec<usize>| {
        next[prev[e]] = next[e];
        if next[e] != NIL {
            prev[next[e]] = prev[e];
        }
    };
    let relink = |e: usize, next: &mut Vec<usize>, prev: &mut Vec<usize>| {
        next[prev[e]] = e;
        if next[e] != NIL {
            prev[next[e]] = e;
        }
    };

    let words = n.div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut cache: HashSet<(Vec<u64>, State)> = HashSet::new();
    let mut stack: Vec<(usize, State)> = Vec::new();
    let mut state: State = (None, 0);
    let mut cur = next[head];
    while next[head] != NIL {
        if cur == NIL {
            // Unreachable for a well-formed list (every call has a return after it).
            return Err("checker: ran off the history".to_string());
        }
        if cur < n {
            let op = &ops[cur];
            let (next_state, expected) = model(&state, &op.input);
            let first_of_kind =
                after[cur] == NIL || linearized[after[cur] / 64] & (1 << (after[cur] % 64)) != 0;
            let ok = first_of_kind && (op.output == Output::Unknown || op.output == expected);
            if ok {
                let mut lin = linearized.clone();
                lin[cur / 64] |= 1 << (cur % 64);
                if cache.len() >= SEARCH_MAX {
                    return Err(format!(
                        "checker: gave up after {SEARCH_MAX} states (too many operations with unknown outcome); \
                         inconclusive:\n{}",
                        render(original)
                    ));
                }
                if cache.insert((lin.clone(), next_state.clone())) {
                    stack.push((cur, state));
                    state = next_state;
                    linearized = lin;
                    unlink(cur, &mut next, &mut prev);
                    unlink(n + cur, &mut next, &mut prev);
                    cur = next[head];
                    continue;
                }
            }
            cur = next[cur];
        } else {
            let Some((call, before)) = stack.pop() else {
                return Err(format!("not linearizable:\n{}", render(original)));
            };
            state = before;
            linearized[call / 64] &= !(1 << (call % 64));
            relink(n + call, &mut next, &mut prev);
            relink(call, &mut next, &mut prev);
            cur = next[call];
        }
    }
    Ok(())
}

fn show(v: &Option<Vec<u8>>) -> String {
    match v {
        Some(v) => String::from_utf8_lossy(v).into_owned(),
        None => "-".to_string(),
    }
}

/// The history as lines `[call, ret] input -> output`, in call order.
pub fn render(ops: &[Op]) -> String {
    let mut sorted: Vec<&Op> = ops.iter().collect();
    sorted.sort_by_key(|o| o.call);
    sorted
        .iter()
        .map(|o| {
            let ret = o.ret.map_or("inf".to_string(), |r| r.to_string());
            let input = match &o.input {
                Input::Create(v) => format!("create({})", show(&Some(v.clone()))),
                Input::Put(v) => format!("put({})", show(&Some(v.clone()))),
                Input::Cas(e, v) => format!("cas({e}, {})", show(&Some(v.clone()))),
                Input::Delete => "delete".to_string(),
                Input::DeleteIf(e) => format!("delete-if({e})"),
                Input::Read => "read".to_string(),
            };
            let output = match &o.output {
                Output::Done(v, ver) => format!("ok {} @{ver}", show(v)),
                Output::Rejected(code, v, ver) => format!("{code} {} @{ver}", show(v)),
                Output::Unknown => "unknown".to_string(),
            };
            format!("  [{:>6}, {:>6}] {input} -> {output}", o.call, ret)
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(input: Input, output: Output, call: u64, ret: Option<u64>) -> Op {
        Op {
            input,
            output,
            call,
            ret,
        }
    }
    fn v(s: &str) -> Vec<u8> {
        s.as_bytes().to_vec()
    }

    #[test]
    fn sequential_history_passes() {
        let h = [
            op(
                Input::Put(v("a")),
                Output::Done(Some(v("a")), 1),
                0,
                Some(1),
            ),
            op(Input::Read, Output::Done(Some(v("a")), 1), 2, Some(3)),
            op(
                Input::Cas(1, v("b")),
                Output::Done(Some(v("b")), 2),
                4,
                Some(5),
            ),
            op(
                Input::Create(v("c")),
                Output::Rejected("conflict".into(), Some(v("b")), 2),
                6,
                Some(7),
            ),
            op(Input::Delete, Output::Done(None, 3), 8, Some(9)),
            op(
                Input::Create(v("c")),
                Output::Done(Some(v("c")), 4),
                10,
                Some(11),
            ),
        ];
        check(&h).unwrap();
    }

    #[test]
    fn stale_read_fails() {
        let h = [
            op(
                Input::Put(v("a")),
                Output::Done(Some(v("a")), 1),
                0,
                Some(1),
            ),
            op(
                Input::Put(v("b")),
                Output::Done(Some(v("b")), 2),
                2,
                Some(3),
            ),
            op(Input::Read, Output::Done(Some(v("a")), 1), 4, Some(5)),
        ];
        assert!(check(&h).is_err());
    }

    #[test]
    fn concurrent_ops_may_reorder() {
        // The read overlaps both puts and sees the first.
        let h = [
            op(
                Input::Put(v("b")),
                Output::Done(Some(v("b")), 2),
                0,
                Some(10),
            ),
            op(
                Input::Put(v("a")),
                Output::Done(Some(v("a")), 1),
                1,
                Some(9),
            ),
            op(Input::Read, Output::Done(Some(v("a")), 1), 2, Some(8)),
        ];
        check(&h).unwrap();
    }

    #[test]
    fn two_winners_of_one_version_fail() {
        let h = [
            op(
                Input::Put(v("a")),
                Output::Done(Some(v("a")), 1),
                0,
                Some(10),
            ),
            op(
                Input::Put(v("b")),
                Output::Done(Some(v("b")), 1),
                1,
                Some(9),
            ),
        ];
        assert!(check(&h).is_err());
    }

    #[test]
    fn lost_reads_change_nothing() {
        let put = |x: &str, ver, call| {
            op(
                Input::Put(v(x)),
                Output::Done(Some(v(x)), ver),
                call,
                Some(call + 1),
            )
        };
        let lost_read = |call| op(Input::Read, Output::Unknown, call, None);
        let mut h = vec![put("a", 1, 0), lost_read(1), put("b", 2, 3), lost_read(4)];
        assert!(check(&h).is_ok());
        // A read that saw a value overwritten before it was called is still
        // caught with lost reads around it.
        h.push(op(Input::Read, Output::Done(Some(v("a")), 1), 10, Some(11)));
        assert!(check(&h).is_err());
        // A history of lost reads alone is linearizable.
        assert!(check(&[lost_read(0), lost_read(1)]).is_ok());
    }

    #[test]
    fn many_lost_writes_of_unseen_values_are_cheap_and_still_counted() {
        // 60 lost puts, none read: 2^60 subsets without the rewriting.
        let mut h: Vec<Op> = (0..60)
            .map(|i| op(Input::Put(v(&format!("lost{i}"))), Output::Unknown, i, None))
            .collect();
        // A later put that saw version 41 needs exactly 40 of them applied.
        h.push(op(
            Input::Put(v("a")),
            Output::Done(Some(v("a")), 41),
            100,
            Some(101),
        ));
        h.push(op(
            Input::Read,
            Output::Done(Some(v("a")), 41),
            102,
            Some(103),
        ));
        check(&h).unwrap();
        // 61 would need more lost writes than there are.
        let last = h.len() - 2;
        h[last].output = Output::Done(Some(v("a")), 62);
        h[last + 1].output = Output::Done(Some(v("a")), 62);
        assert!(check(&h).is_err());
    }

    #[test]
    fn an_unseen_value_cannot_be_read() {
        // A read between the lost put and the next write would see the
        // lost value; nobody did, so the put applied after the read or never.
        let h = [
            op(Input::Put(v("x")), Output::Unknown, 0, None),
            op(Input::Read, Output::Done(None, 1), 5, Some(6)),
        ];
        assert!(check(&h).is_err());
        // A lost write that was read is not rewritten, and counts.
        let h = [
            op(Input::Put(v("x")), Output::Unknown, 0, None),
            op(Input::Put(v("y")), Output::Unknown, 1, None),
            op(Input::Read, Output::Done(Some(v("y")), 2), 5, Some(6)),
        ];
        check(&h).unwrap();
    }

    #[test]
    fn unknown_outcomes_may_apply_or_not() {
        let applied = [
            op(Input::Put(v("a")), Output::Unknown, 0, None),
            op(Input::Read, Output::Done(Some(v("a")), 1), 5, Some(6)),
        ];
        check(&applied).unwrap();
        let not_applied = [
            op(Input::Put(v("a")), Output::Unknown, 0, None),
            op(Input::Read, Output::Done(None, 0), 5, Some(6)),
        ];
        check(&not_applied).unwrap();
        // But it cannot take effect before it was called.
        let too_early = [
            op(Input::Read, Output::Done(Some(v("a")), 1), 0, Some(1)),
            op(Input::Put(v("a")), Output::Unknown, 2, None),
        ];
        assert!(check(&too_early).is_err());
    }
}
