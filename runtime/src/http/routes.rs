//! Method and path to response (gateway.md section 5). Every figure comes from the core or the
//! upstream's report as it is at this instant; nothing is decided here that the core does not
//! decide (health is `Gateway::health`, readiness `Gateway::readiness`), this file only
//! formats it.

use std::time::Duration;

use ipc_gateway_core::gateway::HealthStatus;
use ipc_gateway_core::Gateway;
use serde_json::Value;

use super::connection::{Method, Request, Response};
use crate::metrics::{self, Format, HttpCounters, Scrape};
use crate::nats_link::UpstreamIo;

/// The paths served, which are also the `path` labels of `http_requests_total`.
const PATHS: [&str; 4] = ["/health", "/ready", "/live", "/metrics"];
/// The label of every other path (a bounded label set, whatever clients ask for).
pub const OTHER: &str = "other";
const ALLOW: &str = "GET, HEAD";

/// What a response is computed from.
pub struct View<'a, U: UpstreamIo> {
    pub gateway: &'a Gateway<U>,
    pub counters: &'a HttpCounters,
    pub audit_write_errors: u64,
    pub uptime: Duration,
}

/// The `path` label of a request path.
pub fn label(path: &str) -> &'static str {
    PATHS.iter().find(|p| **p == path).copied().unwrap_or(OTHER)
}

/// The response to `request`, and its path label.
pub fn route<U: UpstreamIo>(request: &Request, view: &View<'_, U>) -> (&'static str, Response) {
    let label = label(&request.path);
    if label == OTHER {
        return (label, Response::text(404, "not found"));
    }
    if request.method == Method::Other {
        let mut response = Response::text(405, "method not allowed; use GET or HEAD");
        response.allow = Some(ALLOW);
        return (label, response);
    }
    let response = match label {
        "/health" => health(view),
        "/ready" => match view.gateway.readiness() {
            Ok(()) => Response::text(200, "ready"),
            Err(why) => Response::text(503, why),
        },
        // Answering at all is the proof: the loop turns.
        "/live" => Response::text(200, "live"),
        _ => {
            let format = Format::from_accept(request.accept.as_deref());
            let scrape = Scrape {
                gateway: view.gateway,
                http: view.counters,
                audit_write_errors: view.audit_write_errors,
            };
            Response {
                status: 200,
                content_type: format.content_type(),
                body: metrics::render(&scrape, format),
                allow: None,
            }
        }
    };
    (label, response)
}

/// `/health`: the JSON of gateway.md section 5; 200 unless UNHEALTHY.
fn health<U: UpstreamIo>(view: &View<'_, U>) -> Response {
    let g = view.gateway;
    let health = g.health();
    let report = g.upstream().report();
    // Written field by field: the spec's order (serde_json's map would sort the keys), so a
    // person reading `curl` output sees the status first.
    let text = |v: Option<String>| Value::from(v).to_string();
    let server = Some(report.server).filter(|s| !s.is_empty());
    let body = format!(
        "{{\"status\":\"{}\",\"reason\":{},\"uptime_seconds\":{},\"connections\":{},\
         \"inflight\":{},\"nats\":{{\"state\":{},\"server\":{},\"reconnects\":{},\
         \"last_error\":{}}},\"breaker\":{},\"version\":{}}}\n",
        health.status.name(),
        text(health.reason.map(|r| r.to_string())),
        view.uptime.as_secs(),
        g.connection_count(),
        g.inflight_len(),
        Value::from(report.state),
        text(server),
        report.nats.reconnects,
        text(report.last_error),
        Value::from(g.breaker_state().name()),
        Value::from(g.config().version.as_str()),
    );
    let status = if health.status == HealthStatus::Unhealthy {
        503
    } else {
        200
    };
    Response {
        status,
        content_type: "application/json",
        body: body.into_bytes(),
        allow: None,
    }
}
