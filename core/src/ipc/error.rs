//! Error replies (ipc-protocol.md section 4).
//!
//! An error reply is a RESPONSE_ERROR frame whose payload is
//! `{"ok":false,"error":{"code":N,"message":"…","retryable":bool,"request_id":"…"}}`.
//! `code` is a JSON number because v1 clients parse it as one; the message is JSON-escaped by
//! serde_json, never formatted by hand.

use bytes::Bytes;
use serde::Serialize;

use crate::frame::{kind, ReplyFrame};

/// The error codes of the wire protocol. 1–6 and 99 are the C header's; 7–9 are additions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErrorCode {
    UnsupportedVersion,
    UnsupportedType,
    FrameTooLarge,
    InvalidPayload,
    Timeout,
    ShuttingDown,
    Overloaded,
    RouterUnavailable,
    PermissionDenied,
    Internal,
}

impl ErrorCode {
    /// The number on the wire.
    pub fn code(self) -> u16 {
        match self {
            ErrorCode::UnsupportedVersion => 1,
            ErrorCode::UnsupportedType => 2,
            ErrorCode::FrameTooLarge => 3,
            ErrorCode::InvalidPayload => 4,
            ErrorCode::Timeout => 5,
            ErrorCode::ShuttingDown => 6,
            ErrorCode::Overloaded => 7,
            ErrorCode::RouterUnavailable => 8,
            ErrorCode::PermissionDenied => 9,
            ErrorCode::Internal => 99,
        }
    }

    /// Whether the same request may succeed if the client sends it again later: true for
    /// conditions of the gateway or the Router, false for faults of the request itself.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::Timeout
                | ErrorCode::ShuttingDown
                | ErrorCode::Overloaded
                | ErrorCode::RouterUnavailable
        )
    }

    /// Short name used in logs and metrics labels.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::UnsupportedType => "unsupported_type",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::InvalidPayload => "invalid_payload",
            ErrorCode::Timeout => "timeout",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::RouterUnavailable => "router_unavailable",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::Internal => "internal",
        }
    }
}

#[derive(Serialize)]
struct ErrorReply<'a> {
    ok: bool,
    error: ErrorBody<'a>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: u16,
    message: &'a str,
    retryable: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_id: Option<&'a str>,
}

/// The payload of an error reply.
pub fn error_payload(code: ErrorCode, message: &str, request_id: Option<&str>) -> Vec<u8> {
    let reply = ErrorReply {
        ok: false,
        error: ErrorBody {
            code: code.code(),
            message,
            retryable: code.retryable(),
            request_id,
        },
    };
    // Serialising a struct of strings, numbers and bools into a Vec cannot fail.
    serde_json::to_vec(&reply).unwrap_or_default()
}

/// A whole RESPONSE_ERROR frame.
pub fn error_frame(code: ErrorCode, message: &str, request_id: Option<&str>) -> ReplyFrame {
    ReplyFrame::new(
        kind::RESPONSE_ERROR,
        Bytes::from(error_payload(code, message, request_id)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn payload_has_numeric_code_and_escaped_message() {
        let p = error_payload(ErrorCode::Timeout, "said \"late\"\n", Some("r-1"));
        let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
        assert_eq!(
            v,
            json!({"ok":false,"error":{"code":5,"message":"said \"late\"\n","retryable":true,"request_id":"r-1"}})
        );
    }

    #[test]
    fn request_id_is_omitted_when_none_was_assigned() {
        let p = error_payload(ErrorCode::UnsupportedType, "Unsupported message type", None);
        assert_eq!(
            std::str::from_utf8(&p).unwrap(),
            r#"{"ok":false,"error":{"code":2,"message":"Unsupported message type","retryable":false}}"#
        );
    }

    #[test]
    fn codes_match_the_wire_table() {
        let all = [
            (ErrorCode::UnsupportedVersion, 1, false),
            (ErrorCode::UnsupportedType, 2, false),
            (ErrorCode::FrameTooLarge, 3, false),
            (ErrorCode::InvalidPayload, 4, false),
            (ErrorCode::Timeout, 5, true),
            (ErrorCode::ShuttingDown, 6, true),
            (ErrorCode::Overloaded, 7, true),
            (ErrorCode::RouterUnavailable, 8, true),
            (ErrorCode::PermissionDenied, 9, false),
            (ErrorCode::Internal, 99, false),
        ];
        for (c, n, r) in all {
            assert_eq!((c.code(), c.retryable()), (n, r), "{c:?}");
        }
        let names: Vec<&str> = all.iter().map(|(c, _, _)| c.name()).collect();
        assert_eq!(
            names,
            [
                "unsupported_version",
                "unsupported_type",
                "frame_too_large",
                "invalid_payload",
                "timeout",
                "shutting_down",
                "overloaded",
                "router_unavailable",
                "permission_denied",
                "internal"
            ]
        );
    }

    #[test]
    fn frame_is_response_error_type() {
        let f = error_frame(ErrorCode::Internal, "x", None);
        assert_eq!(f.kind(), kind::RESPONSE_ERROR);
        let bytes: Vec<u8> = f.slices_from(0).flatten().copied().collect();
        let length = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        assert_eq!(length as usize, f.wire_len());
        let v: serde_json::Value = serde_json::from_slice(f.body()).unwrap();
        assert_eq!(v["error"]["code"], 99);
    }
}
