//! Byte budgets for queues: each queued item holds its bytes until it is
//! taken off, so a queue bounded in count is bounded in bytes too.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// A budget of bytes shared by the senders of one queue; each queued item
/// holds a [`Charge`] until it is taken off.
#[derive(Clone)]
pub struct Budget {
    used: Arc<AtomicUsize>,
    max: usize,
}

/// Bytes taken from a [`Budget`], given back when dropped.
pub struct Charge {
    used: Arc<AtomicUsize>,
    bytes: usize,
}

impl Budget {
    pub fn new(max: usize) -> Budget {
        Budget {
            used: Arc::new(AtomicUsize::new(0)),
            max,
        }
    }

    /// Takes `bytes`, or `None` when that would pass the budget. An item
    /// larger than the whole budget is taken only when nothing else is.
    pub fn charge(&self, bytes: usize) -> Option<Charge> {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            if used > 0 && used.saturating_add(bytes) > self.max {
                return None;
            }
            match self.used.compare_exchange_weak(
                used,
                used + bytes,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    return Some(Charge {
                        used: self.used.clone(),
                        bytes,
                    })
                }
                Err(now) => used = now,
            }
        }
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A byte budget refuses what would pass it, takes an oversized item
    /// only alone, and gets its bytes back when a charge is dropped.
    #[test]
    fn a_budget_refuses_past_its_bytes_and_gets_them_back() {
        let budget = Budget::new(100);
        let a = budget.charge(60).unwrap();
        assert!(budget.charge(50).is_none());
        let b = budget.charge(40).unwrap();
        assert_eq!(budget.used(), 100);
        drop(a);
        assert_eq!(budget.used(), 40);
        assert!(budget.charge(500).is_none(), "not while others are queued");
        drop(b);
        let big = budget.charge(500).expect("alone, an oversized item goes");
        assert!(budget.charge(1).is_none());
        drop(big);
        assert_eq!(budget.used(), 0);
    }
}
