//! The CAPABILITIES reply (ipc-protocol.md section 6). Valid JSON, unlike the C gateway's,
//! which printed hex literals.

use bytes::Bytes;
use serde_json::json;

use crate::frame::{kind, HEADER_LEN};

/// The capabilities JSON for a gateway that accepts frames up to `max_frame_bytes`.
pub fn capabilities_json(max_frame_bytes: usize, gateway_version: &str) -> Bytes {
    let v = json!({
        "protocol_version": "1.0",
        "supported_versions": ["1.0"],
        "supported_message_types": [
            kind::TASK_SUBMIT, kind::TASK_QUERY, kind::TASK_CANCEL,
            kind::PING, kind::PONG, kind::CAPABILITIES
        ],
        "max_payload_size": max_frame_bytes.saturating_sub(HEADER_LEN),
        "features": ["pipelining", "capabilities", "trace-context"],
        "gateway": {"name": "ipc-gateway", "version": gateway_version},
    });
    Bytes::from(v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertises_the_configured_payload_limit_and_types() {
        let v: serde_json::Value =
            serde_json::from_slice(&capabilities_json(4_194_304, "0.1.0")).unwrap();
        assert_eq!(v["protocol_version"], "1.0");
        assert_eq!(v["max_payload_size"], 4_194_298);
        assert_eq!(
            v["supported_message_types"],
            serde_json::json!([1, 2, 3, 240, 241, 242])
        );
        assert_eq!(v["gateway"]["version"], "0.1.0");
        let v: serde_json::Value = serde_json::from_slice(&capabilities_json(1024, "x")).unwrap();
        assert_eq!(v["max_payload_size"], 1018);
    }
}
