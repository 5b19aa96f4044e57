//! Requests: publishing (now, or from the reconnect buffer after the next PONG) and matching
//! replies to them by the reply token, which *is* the request id in base 36.

use bytes::{Bytes, BytesMut};
use tracing::debug;

use super::link::Link;
use super::{NatsSession, INBOX_SID, MAX_REPLY_BYTES};
use crate::error::ErrorCode;
use crate::inflight::RequestId;
use crate::nats::requests::{Pending, Place};
use crate::nats_codec::{encode_hpub, encode_pub, ServerOp};
use crate::nats_config::SessionAction;
use crate::time::Instant;
use crate::upstream::{FailureCause, UpstreamEvent};

impl NatsSession {
    pub(super) fn handle_msg(&mut self, op: ServerOp, now: Instant) {
        let no_responders = op.is_no_responders();
        let (subject, sid, payload) = match op {
            ServerOp::Msg {
                subject,
                sid,
                payload,
                ..
            }
            | ServerOp::HMsg {
                subject,
                sid,
                payload,
                ..
            } => (subject, sid, payload),
            _ => return,
        };
        let token = subject
            .strip_prefix(self.inbox.as_str())
            .and_then(|rest| rest.strip_prefix('.'))
            .and_then(from_base36)
            .filter(|_| sid == INBOX_SID);
        let Some(token) = token else {
            self.stats.unknown_replies += 1;
            debug!(event = "nats_reply_unknown", component = "nats_resilience", subject = %subject);
            return;
        };
        let id = RequestId(token);
        let written = self
            .requests
            .get(id)
            .is_some_and(|p| matches!(p.place(), Place::Written { .. }));
        if !written {
            if self.requests.is_recent(token) {
                self.stats.duplicate_replies += 1;
            } else {
                self.stats.late_replies += 1;
            }
            debug!(
                event = "nats_reply_dropped",
                component = "nats_resilience",
                request_id = token,
                duplicate = self.requests.is_recent(token)
            );
            return;
        }
        self.requests.remove(id);
        self.requests.remember(token);
        if no_responders {
            self.stats.no_responders += 1;
            self.events.push_back(UpstreamEvent::Failed {
                id,
                code: ErrorCode::RouterUnavailable,
                message: "Router unavailable: no responders".to_owned(),
                cause: FailureCause::NoResponders,
            });
        } else if payload.len() > MAX_REPLY_BYTES {
            // A server may allow up to 64 MiB; an IPC frame carries 4 MiB. Error 3 for this
            // request rather than a frame clients would refuse.
            let message = format!(
                "Frame too large: the Router's reply is {} bytes, over the {MAX_REPLY_BYTES} \
                 bytes an IPC frame can carry",
                payload.len()
            );
            self.events.push_back(UpstreamEvent::Failed {
                id,
                code: ErrorCode::FrameTooLarge,
                message,
                cause: FailureCause::Refused,
            });
        } else {
            self.events.push_back(UpstreamEvent::Reply { id, payload });
        }
        self.check_drain();
        self.check_lame_duck(now);
    }

    // ----- internals: requests --------------------------------------------------------------

    pub(super) fn push_out(&mut self, bytes: Bytes) {
        if bytes.is_empty() {
            return;
        }
        self.queued_total += bytes.len() as u64;
        self.out.push(bytes);
        if !self.transmit_announced {
            self.transmit_announced = true;
            self.actions
                .push_back(SessionAction::Transmit { link: self.link_id });
        }
    }

    pub(super) fn can_publish(&self) -> bool {
        matches!(self.link, Link::Up { .. })
    }

    /// What the server compares with `max_payload`: the payload, plus the header block for HPUB.
    pub(super) fn wire_payload_len(&self, p: &Pending) -> usize {
        if self.server_headers {
            header_block_len(&p.headers) + p.body.len()
        } else {
            p.body.len()
        }
    }

    pub(super) fn too_large(&self, p: &Pending) -> Option<String> {
        let max = self.server_max_payload?;
        let len = self.wire_payload_len(p);
        (len as u64 > max).then(|| {
            format!(
                "Frame too large: the Router request is {len} bytes, over the NATS server's \
                 max_payload of {max}"
            )
        })
    }

    pub(super) fn write_request(&mut self, id: RequestId) {
        let Some(p) = self.requests.get(id) else {
            return;
        };
        let reply = format!("{}.{}", self.inbox, to_base36(id.0));
        let mut b = BytesMut::new();
        let encoded = if self.server_headers {
            let headers: Vec<(&str, &str)> =
                p.headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
            encode_hpub(
                &self.config.subject,
                Some(&reply),
                &headers,
                &p.body,
                &mut b,
            )
        } else {
            encode_pub(&self.config.subject, Some(&reply), &p.body, &mut b)
        };
        if let Err(e) = encoded {
            let message = format!("Internal error: cannot publish the Router request: {e}");
            return self.fail(id, ErrorCode::Internal, &message, FailureCause::Refused);
        }
        self.requests.mark_written(id, self.queued_total);
        self.push_out(b.freeze());
    }

    /// Sends the reconnect buffer in submit order (after the SUB, already queued).
    pub(super) fn flush_buffer(&mut self, now: Instant) {
        while self.can_publish() {
            let Some(id) = self.requests.pop_buffered() else {
                break;
            };
            let Some(p) = self.requests.get(id) else {
                continue;
            };
            if p.deadline <= now {
                self.fail(
                    id,
                    ErrorCode::Timeout,
                    "Timeout: the deadline passed while NATS was disconnected",
                    FailureCause::Link,
                );
            } else if let Some(message) = self.too_large(p) {
                self.fail(
                    id,
                    ErrorCode::FrameTooLarge,
                    &message,
                    FailureCause::Refused,
                );
            } else {
                self.write_request(id);
            }
        }
    }

    /// Removes a request (wherever it is) and reports it failed.
    pub(super) fn fail(
        &mut self,
        id: RequestId,
        code: ErrorCode,
        message: &str,
        cause: FailureCause,
    ) {
        if self.requests.remove(id).is_some() {
            self.events.push_back(UpstreamEvent::Failed {
                id,
                code,
                message: message.to_owned(),
                cause,
            });
        }
    }

    pub(super) fn fail_buffered(&mut self, code: ErrorCode, message: &str, cause: FailureCause) {
        let ids = self.requests.buffered_ids();
        for id in ids {
            self.fail(id, code, message, cause);
        }
    }
}

/// `NATS/1.0\r\n` + `Name: Value\r\n`… + `\r\n`, as `encode_hpub` writes it.
pub(super) fn header_block_len(headers: &[(&'static str, String)]) -> usize {
    12 + headers
        .iter()
        .map(|(n, v)| n.len() + 2 + v.len() + 2)
        .sum::<usize>()
}

/// A request id as a reply token: short, and only `[0-9a-z]`, which is valid in a subject.
pub fn to_base36(mut n: u64) -> String {
    let mut digits = Vec::new();
    loop {
        let d = (n % 36) as u32;
        digits.push(char::from_digit(d, 36).unwrap_or('0'));
        n /= 36;
        if n == 0 {
            break;
        }
    }
    digits.iter().rev().collect()
}

/// The inverse of [`to_base36`], accepting only its canonical spelling (lowercase, no
/// leading zero), so one request has exactly one token.
pub fn from_base36(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 13 || (s.len() > 1 && s.starts_with('0')) {
        return None;
    }
    s.bytes().try_fold(0u64, |n, b| {
        let d = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'z' => b - b'a' + 10,
            _ => return None,
        };
        n.checked_mul(36)?.checked_add(u64::from(d))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nats_codec::encode_hpub;

    #[test]
    fn tokens_round_trip_and_are_canonical() {
        for n in [0, 1, 35, 36, 1_000_000, u64::MAX] {
            assert_eq!(from_base36(&to_base36(n)), Some(n));
        }
        assert_eq!(to_base36(36), "10");
        assert_eq!(from_base36("01"), None);
        assert_eq!(from_base36("A"), None);
        assert_eq!(from_base36(""), None);
        assert_eq!(from_base36("zzzzzzzzzzzzz"), None, "overflows u64");
        assert_eq!(from_base36("*"), None);
    }

    #[test]
    fn header_block_len_matches_the_encoder() {
        let headers = vec![("version", "1".to_owned()), ("trace_id", "abc".to_owned())];
        let borrowed: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let mut b = BytesMut::new();
        encode_hpub("s", None, &borrowed, b"xy", &mut b).unwrap();
        let line_end = b.iter().position(|c| *c == b'\n').unwrap();
        let line = std::str::from_utf8(&b[..line_end - 1]).unwrap();
        assert_eq!(
            line,
            format!(
                "HPUB s {} {}",
                header_block_len(&headers),
                header_block_len(&headers) + 2
            )
        );
        assert_eq!(b.len(), line_end + 1 + header_block_len(&headers) + 2 + 2);
    }
}
