//! The Router request envelope (router.md sections 2 and 3).
//!
//! Turns one client task into the JSON body the Router's `decide` validator accepts, plus the
//! NATS headers that go with it. Two modes: `router-v1` (what the Router validates today) and
//! `legacy` (what the C gateway sent). In both, the client's object is embedded as a JSON value
//! through `serde_json::value::RawValue`: serde_json checks it is one JSON value and copies it
//! byte for byte, so the Router sees exactly what the client sent (key order, number
//! spelling), and no client text can escape its place in the envelope. Absent fields are
//! omitted, never `null`: the Router rejects `null`.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

use crate::payload::TaskPayload;
use crate::rng::Rng;
use crate::upstream::TaskKind;

/// Longest `tenant_id` the Router accepts (bytes).
const MAX_TENANT_ID: usize = 128;

/// Which envelope the Router expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EnvelopeMode {
    /// `router-v1`: the Router's decide request, version 1.
    #[default]
    RouterV1,
    /// `legacy`: the C gateway's `{"from","to","message_id",...,"input"}`.
    Legacy,
}

impl EnvelopeMode {
    /// Parses the configuration value (`router-v1` or `legacy`).
    pub fn parse(text: &str) -> Option<EnvelopeMode> {
        match text {
            "router-v1" => Some(EnvelopeMode::RouterV1),
            "legacy" => Some(EnvelopeMode::Legacy),
            _ => None,
        }
    }
}

/// Configured values used when the client does not supply its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvelopeDefaults {
    pub mode: EnvelopeMode,
    pub tenant_id: String,
    pub policy_id: String,
}

impl Default for EnvelopeDefaults {
    fn default() -> EnvelopeDefaults {
        EnvelopeDefaults {
            mode: EnvelopeMode::RouterV1,
            tenant_id: "default".to_owned(),
            policy_id: "default".to_owned(),
        }
    }
}

/// One Router request, ready to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouterRequest {
    /// The JSON body.
    pub body: Bytes,
    /// NATS headers, in the order they are written (used only when the server has headers).
    pub headers: Vec<(&'static str, String)>,
    pub trace_id: String,
    pub span_id: String,
}

/// The client fields the gateway reads (router.md section 3); everything else is skipped
/// without being built. `Value`, not `String`, so that a field of the wrong type is ignored
/// instead of failing the whole read.
#[derive(Deserialize, Default)]
struct ClientFields {
    tenant_id: Option<Value>,
    policy_id: Option<Value>,
    trace_id: Option<Value>,
    traceparent: Option<Value>,
    task_type: Option<Value>,
    task: Option<Value>,
}

impl ClientFields {
    fn read(payload: &[u8]) -> ClientFields {
        // The payload was validated as one JSON object; a failure here can only be a
        // pathological input (e.g. nesting too deep), and then no field is taken.
        serde_json::from_slice(payload).unwrap_or_default()
    }
}

/// A non-empty string field, or `None`.
fn text(v: &Option<Value>) -> Option<&str> {
    v.as_ref().and_then(Value::as_str).filter(|s| !s.is_empty())
}

#[derive(Serialize)]
struct V1<'a> {
    version: &'static str,
    request_id: &'a str,
    tenant_id: &'a str,
    policy_id: &'a str,
    trace_id: &'a str,
    task: V1Task<'a>,
    metadata: V1Metadata<'a>,
}

#[derive(Serialize)]
struct V1Task<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    payload: &'a RawValue,
}

#[derive(Serialize)]
struct V1Metadata<'a> {
    ipc_message_type: &'static str,
    traceparent: &'a str,
}

#[derive(Serialize)]
struct Legacy<'a> {
    from: &'static str,
    to: &'static str,
    message_id: &'a str,
    tenant_id: &'a str,
    policy_id: &'a str,
    /// Not in the C gateway's envelope; added so the IPC message type is not lost
    /// (router.md section 3). Routers that do not know it ignore it.
    ipc_message_type: &'static str,
    input: &'a RawValue,
}

/// Builds the Router request for one task. `rng` supplies the span id, and the trace id when
/// the client gave no usable one.
pub fn build_router_request(
    defaults: &EnvelopeDefaults,
    request_id: &str,
    kind: TaskKind,
    payload: &TaskPayload,
    rng: &mut Rng,
) -> RouterRequest {
    let json = payload.json();
    let fields = ClientFields::read(json);
    // Validated UTF-8 JSON object text; the fallback only guards against misuse.
    let raw: &RawValue = std::str::from_utf8(json)
        .ok()
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or_else(|| empty_object());
    // A tenant the Router would reject (empty, too long, not a string) is replaced by the
    // default rather than turned into an `invalid_request` for the client.
    let tenant_id = text(&fields.tenant_id)
        .filter(|t| t.len() <= MAX_TENANT_ID)
        .unwrap_or(&defaults.tenant_id);
    let policy_id = text(&fields.policy_id).unwrap_or(&defaults.policy_id);
    let trace_id = text(&fields.trace_id)
        .filter(|t| is_trace_id(t))
        .map(str::to_owned)
        .or_else(|| text(&fields.traceparent).and_then(trace_id_of_traceparent))
        .unwrap_or_else(|| random_hex(rng, 2));
    let span_id = random_hex(rng, 1);
    let traceparent = format!("00-{}-{span_id}-01", trace_id.replace('-', ""));
    let method = kind.method();
    // The legacy envelope names the configured tenant, as the C gateway did; the header must
    // say the same, or the Router's metrics would count the request under another tenant.
    let tenant_id = match defaults.mode {
        EnvelopeMode::RouterV1 => tenant_id,
        EnvelopeMode::Legacy => &defaults.tenant_id,
    };
    // Sized up front: growing from empty reallocated several times per request.
    let mut body = Vec::with_capacity(json.len() + request_id.len() + 320);
    let written = match defaults.mode {
        EnvelopeMode::RouterV1 => {
            let default_type = format!("ide.{method}");
            let task_type = text(&fields.task_type)
                .or_else(|| text(&fields.task))
                .unwrap_or(&default_type);
            serde_json::to_writer(
                &mut body,
                &V1 {
                    version: "1",
                    request_id,
                    tenant_id,
                    policy_id,
                    trace_id: &trace_id,
                    task: V1Task {
                        kind: task_type,
                        payload: raw,
                    },
                    metadata: V1Metadata {
                        ipc_message_type: method,
                        traceparent: &traceparent,
                    },
                },
            )
        }
        EnvelopeMode::Legacy => serde_json::to_writer(
            &mut body,
            &Legacy {
                from: "ide@localhost",
                to: "router",
                message_id: request_id,
                tenant_id,
                policy_id: &defaults.policy_id,
                ipc_message_type: method,
                input: raw,
            },
        ),
    };
    // Strings and an already-parsed raw value always serialize; the check guards misuse.
    if written.is_err() {
        body.clear();
    }
    let headers = vec![
        ("version", "1".to_owned()),
        ("trace_id", trace_id.clone()),
        ("span_id", span_id.clone()),
        ("tenant_id", tenant_id.to_owned()),
        ("traceparent", traceparent),
    ];
    RouterRequest {
        body: Bytes::from(body),
        headers,
        trace_id,
        span_id,
    }
}

fn empty_object() -> &'static RawValue {
    // A constant that is valid JSON; `from_str` on it cannot fail.
    serde_json::from_str("{}").unwrap_or_else(|_| unreachable!("{{}} is JSON"))
}

/// `n` random non-zero 64-bit words as lowercase hex (W3C forbids all-zero ids).
fn random_hex(rng: &mut Rng, words: usize) -> String {
    use std::fmt::Write;
    let mut hex = String::with_capacity(words * 16);
    loop {
        let mut any = false;
        for _ in 0..words {
            let w = rng.next_u64();
            any |= w != 0;
            let _ = write!(hex, "{w:016x}");
        }
        if any {
            return hex;
        }
        hex.clear();
    }
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// What the Router accepts as `trace_id`: a W3C trace id (32 lowercase hex, not all zero) or
/// a lowercase UUID v4. Uppercase is refused rather than normalised: the Router's check is
/// the authority and lowercase is what both specifications write.
pub fn is_trace_id(s: &str) -> bool {
    is_w3c_trace_id(s) || is_uuid_v4(s)
}

fn is_w3c_trace_id(s: &str) -> bool {
    s.len() == 32 && is_lower_hex(s) && s.bytes().any(|b| b != b'0')
}

fn is_uuid_v4(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() != 36 {
        return false;
    }
    let dashes = [8, 13, 18, 23];
    let shape = b.iter().enumerate().all(|(i, c)| {
        if dashes.contains(&i) {
            *c == b'-'
        } else {
            c.is_ascii_digit() || (b'a'..=b'f').contains(c)
        }
    });
    shape && b.get(14) == Some(&b'4') && matches!(b.get(19), Some(b'8' | b'9' | b'a' | b'b'))
}

/// The trace id of a W3C `traceparent` (`vv-<32 hex>-<16 hex>-ff`), if it is valid.
pub fn trace_id_of_traceparent(tp: &str) -> Option<String> {
    let mut parts = tp.split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    // Version 00 has exactly four parts; later versions may append more (W3C section 3.2.4).
    if version == "00" && parts.next().is_some() {
        return None;
    }
    let ok = version.len() == 2
        && is_lower_hex(version)
        && version != "ff"
        && is_w3c_trace_id(trace)
        && parent.len() == 16
        && is_lower_hex(parent)
        && parent.bytes().any(|b| b != b'0')
        && flags.len() == 2
        && is_lower_hex(flags);
    ok.then(|| trace.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::validate_task_payload;

    fn payload(s: &str) -> TaskPayload {
        validate_task_payload(Bytes::copy_from_slice(s.as_bytes())).unwrap()
    }

    #[test]
    fn trace_id_rules() {
        assert!(is_trace_id("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert!(!is_trace_id("00000000000000000000000000000000"));
        assert!(!is_trace_id("4BF92F3577B34DA6A3CE929D0E0E4736"));
        assert!(!is_trace_id("4bf92f3577b34da6a3ce929d0e0e473"));
        assert!(is_trace_id("3f2504e0-4f89-41d3-9a0c-0305e82c3301"));
        assert!(!is_trace_id("3f2504e0-4f89-11d3-9a0c-0305e82c3301"), "v1");
        assert!(
            !is_trace_id("3f2504e0-4f89-41d3-7a0c-0305e82c3301"),
            "variant"
        );
        assert_eq!(
            trace_id_of_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            Some("4bf92f3577b34da6a3ce929d0e0e4736".to_owned())
        );
        assert_eq!(
            trace_id_of_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"),
            None
        );
        assert_eq!(trace_id_of_traceparent("garbage"), None);
        assert_eq!(
            trace_id_of_traceparent("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            None
        );
    }

    #[test]
    fn payload_is_embedded_byte_for_byte() {
        let text = r#"{"z":1.50,"a":[18446744073709551616],"task":"x"}"#;
        let r = build_router_request(
            &EnvelopeDefaults::default(),
            "r-1",
            TaskKind::Submit,
            &payload(text),
            &mut Rng::new(1),
        );
        let body = std::str::from_utf8(&r.body).unwrap();
        assert!(body.contains(&format!(r#""payload":{text}"#)), "{body}");
    }

    #[test]
    fn surrounding_whitespace_is_not_part_of_the_value() {
        let r = build_router_request(
            &EnvelopeDefaults::default(),
            "r-1",
            TaskKind::Query,
            &payload(" {\"a\":1} \n"),
            &mut Rng::new(1),
        );
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["task"]["payload"], serde_json::json!({"a":1}));
        assert_eq!(v["task"]["type"], "ide.task_query");
    }
}
