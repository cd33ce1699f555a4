//! Frame bytes: the length prefix, hellos and message bodies.

use ballot_core::ReplicaId;
use quinn::RecvStream;

use crate::storage::{DirIdentity, IDENTITY_LEN};

use super::{Message, FRAME_FORMAT, FRAME_MAX};

/// A malformed frame or stream.
#[derive(Debug)]
pub struct FrameError(pub String);

/// A hello's body: the sender's id and data-directory identity.
pub(super) fn hello_body(from: ReplicaId, directory: &DirIdentity) -> Vec<u8> {
    let mut body = Vec::with_capacity(4 + IDENTITY_LEN);
    body.extend_from_slice(&from.to_be_bytes());
    body.extend_from_slice(directory);
    body
}

/// Parses a hello's body: 4 bytes (no identity) or 4 + 16.
pub(super) fn parse_hello(body: &[u8]) -> Option<(ReplicaId, Option<DirIdentity>)> {
    let from = u32::from_be_bytes(body.get(..4)?.try_into().ok()?);
    match body.len() {
        4 => Some((from, None)),
        n if n == 4 + IDENTITY_LEN => Some((from, Some(body[4..].try_into().ok()?))),
        _ => None,
    }
}

pub(super) fn frame(out: &mut Vec<u8>, kind: u8, body: &[u8]) {
    out.extend_from_slice(&((body.len() + 2) as u32).to_be_bytes());
    out.push(FRAME_FORMAT);
    out.push(kind);
    out.extend_from_slice(body);
}

/// Encodes the body of a messages frame. A message whose key does not fit
/// the frame's 16-bit length (or payload its 32-bit one) is left out, never
/// truncated into another key; the core's output checks refuse such
/// messages before they get here.
pub fn encode_messages(out: &mut Vec<u8>, messages: &[Message]) {
    let fits = |(key, payload): &&Message| {
        u16::try_from(key.len()).is_ok() && u32::try_from(payload.len()).is_ok()
    };
    let count = messages.iter().filter(fits).count();
    out.extend_from_slice(&(count as u32).to_be_bytes());
    for (key, payload) in messages.iter().filter(fits) {
        out.extend_from_slice(&(key.len() as u16).to_be_bytes());
        out.extend_from_slice(key);
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(payload);
    }
}

/// Decodes the body of a messages frame.
pub fn decode_messages(mut body: &[u8]) -> Result<Vec<Message>, FrameError> {
    let bad = |what: &str| FrameError(format!("malformed messages frame: {what}"));
    let take = |n: usize, body: &mut &[u8]| -> Result<Vec<u8>, FrameError> {
        if body.len() < n {
            return Err(bad("truncated"));
        }
        let (head, rest) = body.split_at(n);
        *body = rest;
        Ok(head.to_vec())
    };
    let count = u32::from_be_bytes(take(4, &mut body)?.try_into().expect("4 bytes")) as usize;
    // Each message takes at least 6 bytes: refuse counts the body cannot hold.
    if count > body.len() / 6 {
        return Err(bad("count exceeds the frame"));
    }
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let key_len = u16::from_be_bytes(take(2, &mut body)?.try_into().expect("2 bytes")) as usize;
        let key = take(key_len, &mut body)?;
        let len = u32::from_be_bytes(take(4, &mut body)?.try_into().expect("4 bytes")) as usize;
        let payload = take(len, &mut body)?;
        out.push((key, payload));
    }
    if !body.is_empty() {
        return Err(bad("trailing bytes"));
    }
    Ok(out)
}

/// Reads one frame: (kind, body).
pub(super) async fn read_frame(
    stream: &mut RecvStream,
) -> Result<Option<(u8, Vec<u8>)>, FrameError> {
    let mut len = [0u8; 4];
    match stream.read_exact(&mut len).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(FrameError(format!("reading: {e}"))),
    }
    let len = u32::from_be_bytes(len) as usize;
    if !(2..=FRAME_MAX).contains(&len) {
        return Err(FrameError(format!("frame length {len} out of bounds")));
    }
    let mut buf = vec![0u8; len];
    stream
        .read_exact(&mut buf)
        .await
        .map_err(|e| FrameError(format!("reading: {e}")))?;
    if buf[0] != FRAME_FORMAT {
        return Err(FrameError(format!(
            "frame format {} is not supported (this build speaks {FRAME_FORMAT})",
            buf[0]
        )));
    }
    let kind = buf[1];
    buf.drain(..2);
    Ok(Some((kind, buf)))
}

#[cfg(test)]
mod tests {
    use super::super::KIND_HELLO;
    use super::*;

    #[test]
    fn hellos_carry_the_data_directory() {
        let directory: DirIdentity = core::array::from_fn(|i| 0xa0 + i as u8);
        let body = hello_body(7, &directory);
        assert_eq!(body[..6], [0, 0, 0, 7, 0xa0, 0xa1]);
        assert_eq!(body.len(), 20);
        assert_eq!(parse_hello(&body), Some((7, Some(directory))));
        assert_eq!(parse_hello(&[0, 0, 0, 7]), Some((7, None)));
        assert_eq!(parse_hello(&body[..19]), None);
        assert_eq!(parse_hello(&[0, 0]), None);
    }

    #[test]
    fn messages_round_trip_and_fixed_bytes() {
        let messages = vec![(b"k".to_vec(), vec![1, 2]), (Vec::new(), Vec::new())];
        let mut body = Vec::new();
        encode_messages(&mut body, &messages);
        assert_eq!(
            body,
            [0, 0, 0, 2, 0, 1, b'k', 0, 0, 0, 2, 1, 2, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(decode_messages(&body).unwrap(), messages);
        // A key longer than the length field holds is left out, not cut
        // down to another key.
        let mut with_long = messages.clone();
        with_long.insert(1, (vec![b'k'; 65_536 + 1], vec![9]));
        let mut long_body = Vec::new();
        encode_messages(&mut long_body, &with_long);
        assert_eq!(long_body, body);
        let mut f = Vec::new();
        frame(&mut f, KIND_HELLO, &7u32.to_be_bytes());
        assert_eq!(f, [0, 0, 0, 6, 1, 1, 0, 0, 0, 7]);
    }

    #[test]
    fn malformed_bodies_are_refused() {
        for body in [
            &[][..],
            &[0, 0, 0, 1][..],
            &[0, 0, 0, 1, 0, 5, b'k'][..],
            &[255, 255, 255, 255, 0, 0][..],
            &[0, 0, 0, 0, 9][..],
        ] {
            assert!(decode_messages(body).is_err(), "{body:?}");
        }
    }
}
