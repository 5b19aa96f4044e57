//! Validation of task payloads (ipc-protocol.md section 5).
//!
//! A TASK_* payload must be UTF-8 JSON object text; an empty payload means `{}`. The C gateway
//! forwarded anything verbatim and let the Router choke on it; we answer error 4 with a message
//! that says what is wrong, and the connection stays open.

use std::fmt;

use bytes::Bytes;
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};

/// A payload that is known to be one JSON object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskPayload(Bytes);

impl TaskPayload {
    /// The JSON object text, exactly as the client sent it (or `{}` for an empty payload).
    pub fn json(&self) -> &Bytes {
        &self.0
    }
}

/// Checks that `payload` is one JSON object; the error text is meant for the client.
pub fn validate_task_payload(payload: Bytes) -> Result<TaskPayload, String> {
    if payload.is_empty() {
        return Ok(TaskPayload(Bytes::from_static(b"{}")));
    }
    // Up front, not only on failure: serde_json checks UTF-8 in strings it decodes, but not
    // in strings it skips (IgnoredAny), so `{"a":"\xff"}` would pass its parse.
    if let Err(e) = std::str::from_utf8(&payload) {
        return Err(format!(
            "payload is not UTF-8: invalid byte at offset {}",
            e.valid_up_to()
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(&payload);
    let checked = de.deserialize_any(ObjectOnly).and_then(|()| de.end());
    match checked {
        Ok(()) => Ok(TaskPayload(payload)),
        Err(e) if e.is_data() => Err(format!("payload is not a JSON object: {e}")),
        Err(e) => Err(format!("payload is not valid JSON: {e}")),
    }
}

/// Accepts a JSON object and skips its contents without building anything.
struct ObjectOnly;

impl<'de> Visitor<'de> for ObjectOnly {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(s: &[u8]) -> Result<TaskPayload, String> {
        validate_task_payload(Bytes::copy_from_slice(s))
    }

    #[test]
    fn empty_payload_means_empty_object() {
        assert_eq!(check(b"").unwrap().json().as_ref(), b"{}");
    }

    #[test]
    fn objects_pass_verbatim_including_whitespace() {
        let text = b" {\"a\": [1, {\"b\": null}], \"s\": \"\\u00e9\"} \n";
        assert_eq!(check(text).unwrap().json().as_ref(), text);
    }

    #[test]
    fn non_objects_are_named() {
        assert_eq!(
            check(b"[1,2]").unwrap_err(),
            "payload is not a JSON object: invalid type: sequence, \
             expected a JSON object at line 1 column 1"
        );
        let e = check(b"7").unwrap_err();
        assert!(e.starts_with("payload is not a JSON object"), "{e}");
    }

    #[test]
    fn syntax_errors_say_where() {
        assert_eq!(
            check(b"not json").unwrap_err(),
            "payload is not valid JSON: expected ident at line 1 column 2"
        );
        let e = check(b"{\"a\":1} {}").unwrap_err();
        assert!(e.contains("trailing characters"), "{e}");
        let e = check(b"{\"a\":").unwrap_err();
        assert!(e.starts_with("payload is not valid JSON: EOF"), "{e}");
    }

    #[test]
    fn invalid_utf8_is_refused_with_its_offset() {
        assert_eq!(
            check(b"{\"a\":\"\xff\"}").unwrap_err(),
            "payload is not UTF-8: invalid byte at offset 6"
        );
    }
}
