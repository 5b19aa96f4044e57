//! `/metrics`: the Prometheus exposition of the gateway's state (gateway.md section 5).
//!
//! This file fixes the interface between the HTTP server (`crate::http`, which serves the
//! bytes and counts its own requests) and the exposition. The body of [`render`] is a
//! placeholder until the metrics families land.

use std::collections::BTreeMap;

use ipc_gateway_core::Gateway;

use crate::nats_link::UpstreamIo;

/// What the HTTP side counts itself (the core never sees HTTP).
#[derive(Debug, Default, Clone)]
pub struct HttpCounters {
    /// Requests answered, by path label (`/health`, `/ready`, `/live`, `/metrics`, `other`)
    /// and status code.
    pub requests: BTreeMap<(&'static str, u16), u64>,
    /// Connections accepted and closed at once because the limit was reached.
    pub connections_rejected: u64,
}

/// Everything one scrape reads.
pub struct Scrape<'a, U: UpstreamIo> {
    pub gateway: &'a Gateway<U>,
    pub http: &'a HttpCounters,
    /// `CGW_AUDIT_LOG` write failures (0 without an audit log).
    pub audit_write_errors: u64,
}

/// The exposition format, chosen by the request's `Accept` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Text format 0.0.4, the default.
    Prometheus,
    /// When `Accept` names `application/openmetrics-text`.
    OpenMetrics,
}

impl Format {
    pub fn from_accept(accept: Option<&[u8]>) -> Format {
        let asks = |a: &[u8]| {
            a.windows(b"application/openmetrics-text".len())
                .any(|w| w.eq_ignore_ascii_case(b"application/openmetrics-text"))
        };
        match accept {
            Some(a) if asks(a) => Format::OpenMetrics,
            _ => Format::Prometheus,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// The exposition body in `format`.
pub fn render<U: UpstreamIo>(scrape: &Scrape<'_, U>, format: Format) -> Vec<u8> {
    let _ = (scrape.gateway, scrape.http, scrape.audit_write_errors);
    let mut out =
        String::from("# HELP build_info The gateway's version.\n# TYPE build_info gauge\n");
    out.push_str(&format!(
        "build_info{{version=\"{}\"}} 1\n",
        env!("CARGO_PKG_VERSION")
    ));
    if format == Format::OpenMetrics {
        out.push_str("# EOF\n");
    }
    out.into_bytes()
}
