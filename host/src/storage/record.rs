//! Byte encodings of what `meta`, `values` and `changelog` hold (see
//! `docs/design.md` for the layout).

use super::{Committed, DirIdentity, Error, CHANGELOG_FORMAT, IDENTITY_LEN, STORAGE_FORMAT};

/// `identity/` and the peer id, big-endian.
pub(super) fn identity_key(peer: u32) -> Vec<u8> {
    let mut key = b"identity/".to_vec();
    key.extend_from_slice(&peer.to_be_bytes());
    key
}

/// `[format][16 bytes]`.
pub(super) fn record_identity(identity: &DirIdentity) -> Vec<u8> {
    let mut out = Vec::with_capacity(IDENTITY_LEN + 1);
    out.push(STORAGE_FORMAT);
    out.extend_from_slice(identity);
    out
}

pub(super) fn record_flag(flag: bool) -> [u8; 2] {
    [STORAGE_FORMAT, flag as u8]
}

pub(super) fn read_flag(bytes: &[u8]) -> Result<bool, Error> {
    match bytes {
        [STORAGE_FORMAT, 0] => Ok(false),
        [STORAGE_FORMAT, 1] => Ok(true),
        _ => Err(Error::Corrupt("a flag record is malformed".into())),
    }
}

pub(super) fn read_identity(bytes: &[u8]) -> Result<DirIdentity, Error> {
    match bytes {
        [STORAGE_FORMAT, rest @ ..] if rest.len() == IDENTITY_LEN => {
            Ok(rest.try_into().expect("checked length"))
        }
        _ => Err(Error::Corrupt("an identity record is malformed".into())),
    }
}

/// `cursor/` and the peer id, big-endian.
pub(super) fn cursor_key(peer: u32) -> Vec<u8> {
    let mut key = b"cursor/".to_vec();
    key.extend_from_slice(&peer.to_be_bytes());
    key
}

/// `[format][version u64 BE][present u8][value]`.
pub(super) fn encode_committed(out: &mut Vec<u8>, version: u64, value: Option<&[u8]>) {
    out.push(STORAGE_FORMAT);
    out.extend_from_slice(&version.to_be_bytes());
    match value {
        Some(v) => {
            out.push(1);
            out.extend_from_slice(&(v.len() as u32).to_be_bytes());
            out.extend_from_slice(v);
        }
        None => out.push(0),
    }
}

pub(super) fn decode_committed(bytes: &[u8]) -> Result<(Committed, &[u8]), Error> {
    let bad = || Error::Corrupt("a committed-value record is malformed".to_string());
    let [STORAGE_FORMAT, rest @ ..] = bytes else {
        return Err(Error::Corrupt(format!(
            "a committed-value record has format {:?}; this build reads {STORAGE_FORMAT}",
            bytes.first()
        )));
    };
    if rest.len() < 9 {
        return Err(bad());
    }
    let version = u64::from_be_bytes(rest[..8].try_into().map_err(|_| bad())?);
    match rest[8] {
        0 => Ok((
            Committed {
                version,
                value: None,
            },
            &rest[9..],
        )),
        1 if rest.len() >= 13 => {
            let len = u32::from_be_bytes(rest[9..13].try_into().map_err(|_| bad())?) as usize;
            let body = &rest[13..];
            if body.len() < len {
                return Err(bad());
            }
            let value = Some(body[..len].to_vec());
            Ok((Committed { version, value }, &body[len..]))
        }
        _ => Err(bad()),
    }
}

/// A changelog entry, format 2: `[2][version: u64][key]`.
pub(super) fn encode_change(out: &mut Vec<u8>, version: u64, key: &[u8]) {
    out.push(CHANGELOG_FORMAT);
    out.extend_from_slice(&version.to_be_bytes());
    out.extend_from_slice(key);
}

/// The version and key of a format-2 changelog entry.
pub(super) fn decode_change(bytes: &[u8]) -> Option<(u64, &[u8])> {
    match bytes {
        [CHANGELOG_FORMAT, rest @ ..] if rest.len() > 8 => {
            let (version, key) = rest.split_at(8);
            Some((u64::from_be_bytes(version.try_into().ok()?), key))
        }
        _ => None,
    }
}

/// The version and key of a format-1 changelog entry: a `values` record
/// (with the value), then `[key_len: u32][key]`. Read until truncation
/// removes the last of them.
pub(super) fn decode_change_v1(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let (committed, rest) = decode_committed(bytes).ok()?;
    match rest {
        [a, b, c, d, key @ ..] if u32::from_be_bytes([*a, *b, *c, *d]) as usize == key.len() => {
            (!key.is_empty()).then_some((committed.version, key))
        }
        _ => None,
    }
}

pub(super) fn record_u64(v: u64) -> [u8; 9] {
    let mut out = [0u8; 9];
    out[0] = STORAGE_FORMAT;
    out[1..].copy_from_slice(&v.to_be_bytes());
    out
}

pub(super) fn read_u64(bytes: &[u8]) -> Result<u64, Error> {
    match bytes {
        [STORAGE_FORMAT, rest @ ..] if rest.len() == 8 => {
            Ok(u64::from_be_bytes(rest.try_into().expect("8 bytes")))
        }
        _ => Err(Error::Corrupt(format!(
            "a meta record is malformed: {bytes:?}"
        ))),
    }
}
