//! A JSON document updated by merge patches (RFC 7396), kept valid.
//!
//! A command is a JSON merge patch: `{"name": "Ada", "address": {"city": "London"}}`
//! sets or replaces those fields, `{"nickname": null}` removes one, and the
//! patch `null` deletes the document. Concurrent patches to different fields
//! all apply, with no ETag round trips and no lost updates, because each is
//! merged into the committed value inside consensus.
//!
//! Every result is validated before it is written; a patch that would
//! break a rule is rejected (409) and changes nothing:
//! - the document is a JSON object of at most [`SIZE_MAX`] bytes, nested at
//!   most [`DEPTH_MAX`] levels;
//! - fields whose names begin with `_` (`_id`, `_created`) are write-once:
//!   a patch may add them but never change or remove them.

use ballot_policy::{Change, Context, Current, Policy, Rejection};
use serde_json::{Map, Value};

pub struct Document;

/// Largest document, serialised.
pub const SIZE_MAX: usize = 64 * 1024;
/// Deepest nesting of objects and arrays.
pub const DEPTH_MAX: usize = 16;

/// RFC 7396: applies `patch` to `target`.
pub fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(fields) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let object = target.as_object_mut().expect("made an object above");
    for (name, value) in fields {
        if value.is_null() {
            object.remove(name);
        } else {
            merge(object.entry(name.clone()).or_insert(Value::Null), value);
        }
    }
}

fn depth(value: &Value) -> usize {
    match value {
        Value::Object(m) => 1 + m.values().map(depth).max().unwrap_or(0),
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

fn validate(before: &Map<String, Value>, after: &Value) -> Result<Vec<u8>, Rejection> {
    let Value::Object(fields) = after else {
        return Err(Rejection::conflict("the document must stay a JSON object"));
    };
    for (name, old) in before.iter().filter(|(name, _)| name.starts_with('_')) {
        if fields.get(name) != Some(old) {
            return Err(Rejection::conflict(format!("field {name} is write-once")));
        }
    }
    if depth(after) > DEPTH_MAX {
        return Err(Rejection::conflict(format!(
            "the document nests deeper than {DEPTH_MAX} levels"
        )));
    }
    let bytes = serde_json::to_vec(after).expect("a Value serialises");
    if bytes.len() > SIZE_MAX {
        return Err(Rejection::conflict(format!(
            "the document would be {} bytes; at most {SIZE_MAX}",
            bytes.len()
        )));
    }
    Ok(bytes)
}

impl Policy for Document {
    const NAME: &'static str = "document";
    const VERSION: &'static str = "0.1.0";

    fn apply(_: &Context, current: &Current, command: &[u8]) -> Result<Change, Rejection> {
        let patch: Value = serde_json::from_slice(command)
            .map_err(|e| Rejection::invalid(format!("the command is not JSON: {e}")))?;
        let mut doc = match &current.value {
            None => Value::Object(Map::new()),
            Some(v) => serde_json::from_slice(v)
                .map_err(|_| Rejection::conflict("the stored value is not a JSON document"))?,
        };
        let before = doc.as_object().cloned().unwrap_or_default();
        if patch.is_null() {
            if let Some((name, _)) = before.iter().find(|(name, _)| name.starts_with('_')) {
                return Err(Rejection::conflict(format!(
                    "field {name} is write-once, so the document cannot be deleted"
                )));
            }
            return Ok(if current.value.is_some() {
                Change::Remove
            } else {
                Change::Keep
            });
        }
        merge(&mut doc, &patch);
        let bytes = validate(&before, &doc)?;
        if current.value.as_deref() == Some(&bytes[..]) {
            return Ok(Change::Keep);
        }
        Ok(Change::Set(bytes))
    }
}

ballot_policy::export_policy!(Document);

#[cfg(test)]
mod tests {
    use super::*;
    use ballot_policy::testing::Key;
    use serde_json::json;

    fn doc(key: &Key<Document>) -> Value {
        serde_json::from_slice(key.value().unwrap()).unwrap()
    }

    #[test]
    fn patches_merge_field_by_field() {
        let mut key = Key::<Document>::new("user/1");
        key.apply(r#"{"_id": 1, "name": "Ada", "address": {"city": "London", "zip": "N1"}}"#)
            .unwrap();
        key.apply(r#"{"address": {"zip": null}, "langs": ["en"]}"#)
            .unwrap();
        assert_eq!(
            doc(&key),
            json!({"_id": 1, "name": "Ada", "address": {"city": "London"}, "langs": ["en"]})
        );
        assert_eq!(key.version(), 2);
    }

    #[test]
    fn the_rfc_7396_examples_hold() {
        // RFC 7396, appendix A (the cases whose target is an object).
        let cases = [
            (json!({"a": "b"}), json!({"a": "c"}), json!({"a": "c"})),
            (
                json!({"a": "b"}),
                json!({"b": "c"}),
                json!({"a": "b", "b": "c"}),
            ),
            (json!({"a": "b"}), json!({"a": null}), json!({})),
            (
                json!({"a": "b", "b": "c"}),
                json!({"a": null}),
                json!({"b": "c"}),
            ),
            (json!({"a": ["b"]}), json!({"a": "c"}), json!({"a": "c"})),
            (
                json!({"a": {"b": "c"}}),
                json!({"a": {"b": "d", "c": null}}),
                json!({"a": {"b": "d"}}),
            ),
            (
                json!({"a": [{"b": "c"}]}),
                json!({"a": [1]}),
                json!({"a": [1]}),
            ),
            (
                json!({"e": null}),
                json!({"a": 1}),
                json!({"e": null, "a": 1}),
            ),
        ];
        for (mut target, patch, want) in cases {
            merge(&mut target, &patch);
            assert_eq!(target, want, "patch {patch}");
        }
    }

    #[test]
    fn write_once_fields_hold() {
        let mut key = Key::<Document>::new("user/1");
        key.apply(r#"{"_id": 1}"#).unwrap();
        assert_eq!(key.apply(r#"{"_id": 2}"#).unwrap_err().code, "conflict");
        assert_eq!(key.apply(r#"{"_id": null}"#).unwrap_err().code, "conflict");
        assert_eq!(key.apply("null").unwrap_err().code, "conflict");
        assert_eq!(key.version(), 1);
    }

    #[test]
    fn invalid_results_are_refused() {
        let mut key = Key::<Document>::new("user/1");
        assert_eq!(key.apply("[1, 2]").unwrap_err().code, "conflict");
        assert_eq!(key.apply("{not json").unwrap_err().code, "invalid-command");
        let deep = format!("{}1{}", "{\"a\":".repeat(20), "}".repeat(20));
        assert_eq!(key.apply(deep).unwrap_err().code, "conflict");
        let big = format!(r#"{{"blob": "{}"}}"#, "x".repeat(SIZE_MAX));
        assert_eq!(key.apply(big).unwrap_err().code, "conflict");
        assert_eq!(key.version(), 0);
    }

    #[test]
    fn null_deletes_and_repeats_write_nothing() {
        let mut key = Key::<Document>::new("user/1");
        key.apply(r#"{"a": 1}"#).unwrap();
        assert_eq!(key.apply(r#"{"a": 1}"#).unwrap(), Change::Keep);
        key.apply("null").unwrap();
        assert_eq!(key.value(), None);
        assert_eq!(key.version(), 2);
    }
}
