//! Byte comparison for wasm guests.
//!
//! The `memcmp` a wasm build links compares a byte at a time, and the
//! replica's maps are keyed by byte strings that often share a long prefix
//! (`bench/spread/12`), so every map lookup paid for it. Components export
//! [`compare`] as their `memcmp` and `bcmp` (see `guest/protocol`).

use core::cmp::Ordering;

/// `memcmp`'s contract: the sign of the first differing byte of `a` and
/// `b` (as unsigned), zero if all `n` are equal. Eight bytes a step.
///
/// # Safety
/// `a` and `b` must each point to `n` readable bytes.
pub unsafe fn compare(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: `i + 8 <= n`, and the caller vouches for `n` bytes.
        let (x, y) = unsafe {
            (
                a.add(i).cast::<u64>().read_unaligned(),
                b.add(i).cast::<u64>().read_unaligned(),
            )
        };
        if x != y {
            // Big-endian order is byte order.
            return match u64::from_be(x).cmp(&u64::from_be(y)) {
                Ordering::Less => -1,
                _ => 1,
            };
        }
        i += 8;
    }
    while i < n {
        // SAFETY: `i < n`, as above.
        let (x, y) = unsafe { (*a.add(i), *b.add(i)) };
        if x != y {
            return x as i32 - y as i32;
        }
        i += 1;
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    fn sign(a: &[u8], b: &[u8]) -> i32 {
        assert_eq!(a.len(), b.len());
        // SAFETY: both slices hold `len` bytes.
        unsafe { compare(a.as_ptr(), b.as_ptr(), a.len()) }.signum()
    }

    #[test]
    fn agrees_with_the_order_of_byte_slices() {
        let base: Vec<u8> = (0..40u8).map(|i| i.wrapping_mul(37)).collect();
        for n in 0..base.len() {
            let a = &base[..n];
            assert_eq!(sign(a, a), 0, "equal, {n} bytes");
            for at in 0..n {
                for delta in [1u8, 0x7f, 0x80, 0xff] {
                    let mut b = a.to_vec();
                    b[at] = b[at].wrapping_add(delta);
                    // A later byte moved the other way decides nothing.
                    if at + 1 < n {
                        b[n - 1] = b[n - 1].wrapping_sub(delta);
                    }
                    let want = match a.cmp(&b[..]) {
                        Ordering::Less => -1,
                        Ordering::Equal => 0,
                        Ordering::Greater => 1,
                    };
                    assert_eq!(sign(a, &b), want, "{n} bytes, differing at {at} by {delta}");
                    assert_eq!(sign(&b, a), -want);
                }
            }
        }
    }
}
