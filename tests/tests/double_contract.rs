//! The Router test double (src/bin/router-double.rs) checked on its own through a real
//! nats-server with the `nats` crate, before it is trusted to judge the gateway: it accepts
//! what router.md section 2 accepts, rejects what it rejects in the Router's error shape, and
//! each behaviour of section 5 does what it says.

use std::time::{Duration, Instant};

use ipc_gateway_tests::nats_server::NatsServer;
use ipc_gateway_tests::router_double::{RouterDouble, DEFAULT_SUBJECT};
use nats::header::HeaderMap;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(5);

fn client(server: &NatsServer) -> nats::Connection {
    nats::connect(server.url().as_str()).expect("connecting to nats-server")
}

/// A request in the shape the gateway builds (router.md section 3) around `payload`.
fn v1_request(request_id: &str, payload: Value) -> Value {
    json!({
        "version": "1",
        "request_id": request_id,
        "tenant_id": "default",
        "policy_id": "default",
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
        "task": {"type": "code_completion", "payload": payload},
        "metadata": {"ipc_message_type": "task_submit",
                     "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},
    })
}

fn headers() -> HeaderMap {
    [
        ("version", "1"),
        ("trace_id", "4bf92f3577b34da6a3ce929d0e0e4736"),
        ("span_id", "00f067aa0ba902b7"),
        ("tenant_id", "default"),
    ]
    .into_iter()
    .collect()
}

fn ask(nc: &nats::Connection, request: &Value) -> Value {
    let msg = nc
        .request_with_headers_or_timeout(
            DEFAULT_SUBJECT,
            Some(&headers()),
            Some(WAIT),
            request.to_string(),
        )
        .unwrap_or_else(|e| panic!("request {request}: {e}"));
    serde_json::from_slice(&msg.data).expect("the double replies JSON")
}

#[test]
fn happy_path_echoes_ids_and_reports_what_it_received() {
    let server = NatsServer::start();
    let double = RouterDouble::start(&server.url());
    let nc = client(&server);
    let request = v1_request("req-1", json!({"file": "a.py", "line": 42}));
    let reply = ask(&nc, &request);
    assert_eq!(reply["ok"], json!(true), "{reply}");
    assert_eq!(reply["decision"]["provider_id"], json!("openai"));
    assert_eq!(reply["decision"]["priority"], json!(50));
    assert_eq!(
        reply["context"],
        json!({"request_id": "req-1", "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736"})
    );
    let received = &reply["received"];
    assert_eq!(received["subject"], json!(DEFAULT_SUBJECT));
    assert_eq!(received["request"], request);
    assert_eq!(received["headers"]["span_id"], json!("00f067aa0ba902b7"));
    assert_eq!(received["copy"], json!(1));
    // The reply subject without its last token (the `nats` crate's request inbox is
    // `_INBOX.<nuid>`, so the prefix is `_INBOX`).
    let reply_to = received["reply"].as_str().expect("a reply subject");
    assert_eq!(
        received["reply_prefix"].as_str(),
        reply_to.rsplit_once('.').map(|(p, _)| p)
    );
    let logged = double.wait_requests(1, WAIT);
    assert_eq!(logged[0]["request"], request);
    assert_eq!(logged[0]["outcome"], json!("ok"));
}

#[test]
fn rejects_invalid_requests_like_the_router() {
    let server = NatsServer::start();
    let _double = RouterDouble::start(&server.url());
    let nc = client(&server);
    let mut long_tenant = v1_request("req-2", json!({"file": "a.py"}));
    long_tenant["tenant_id"] = json!("t".repeat(129));
    let mut small_payload = v1_request("req-3", json!({"a": 1}));
    small_payload["task"]["payload"] = json!({"a": 1});
    let mut null_value = v1_request("req-4", json!({"file": "a.py", "x": null}));
    null_value["task"]["payload"]["x"] = Value::Null;
    for (request, field) in [
        (long_tenant, "tenant_id"),
        (small_payload, "task.payload"),
        (null_value, "task.payload.x"),
    ] {
        let reply = ask(&nc, &request);
        assert_eq!(reply["ok"], json!(false), "{reply}");
        assert_eq!(reply["error"]["code"], json!("invalid_request"), "{reply}");
        assert_eq!(reply["error"]["details"]["field"], json!(field), "{reply}");
        assert_eq!(reply["context"]["request_id"], request["request_id"]);
    }
    // Not JSON at all.
    let msg = nc
        .request_timeout(DEFAULT_SUBJECT, "not json", WAIT)
        .unwrap();
    let reply: Value = serde_json::from_slice(&msg.data).unwrap();
    assert_eq!(reply["error"]["code"], json!("invalid_request"));
    assert_eq!(reply["received"]["raw"], json!("not json"));
}

#[test]
fn each_error_class_and_the_legacy_envelope() {
    let server = NatsServer::start();
    let _double = RouterDouble::start(&server.url());
    let nc = client(&server);
    for class in ["policy_not_found", "decision_failed", "internal"] {
        let reply = ask(&nc, &v1_request("req-e", json!({"double": class})));
        assert_eq!(reply["ok"], json!(false), "{reply}");
        assert_eq!(reply["error"]["code"], json!(class), "{reply}");
        assert_eq!(reply["context"], json!({"request_id": "req-e"}));
    }
    let legacy = json!({"from": "ide@localhost", "to": "router", "message_id": "m-1",
                        "tenant_id": "default", "policy_id": "default",
                        "input": {"double": "policy_not_found"}});
    let reply = ask(&nc, &legacy);
    assert_eq!(reply["error"]["code"], json!("policy_not_found"), "{reply}");
    assert_eq!(reply["context"]["request_id"], json!("m-1"));
    let mut bad_legacy = legacy.clone();
    bad_legacy["to"] = json!("elsewhere");
    let reply = ask(&nc, &bad_legacy);
    assert_eq!(reply["error"]["code"], json!("invalid_request"), "{reply}");
    // A typo in the behaviour is not silently the happy path.
    let reply = ask(&nc, &v1_request("req-t", json!({"double": "sillent"})));
    assert_eq!(reply["error"]["code"], json!("double_usage"), "{reply}");
}

#[test]
fn silent_duplicate_and_slow() {
    let server = NatsServer::start();
    let double = RouterDouble::start(&server.url());
    let nc = client(&server);

    // Silent: no reply at all.
    let silent = v1_request("req-s", json!({"double": "silent"}));
    let got = nc.request_timeout(
        DEFAULT_SUBJECT,
        silent.to_string(),
        Duration::from_millis(300),
    );
    assert!(got.is_err(), "silent replied: {got:?}");

    // Duplicate: two replies on the same inbox, copy 1 first.
    let inbox = nc.new_inbox();
    let sub = nc.subscribe(&inbox).unwrap();
    let dup = v1_request("req-d", json!({"double": "duplicate"}));
    nc.publish_request(DEFAULT_SUBJECT, &inbox, dup.to_string())
        .unwrap();
    for copy in [1, 2] {
        let msg = sub.next_timeout(WAIT).expect("a duplicate reply");
        let reply: Value = serde_json::from_slice(&msg.data).unwrap();
        assert_eq!(reply["ok"], json!(true));
        assert_eq!(reply["received"]["copy"], json!(copy));
    }
    assert!(sub.next_timeout(Duration::from_millis(200)).is_err());

    // Slow: a delayed reply does not hold up the next request.
    let slow_inbox = nc.new_inbox();
    let slow_sub = nc.subscribe(&slow_inbox).unwrap();
    let slow = v1_request("req-slow", json!({"double": {"slow_ms": 700}}));
    let sent = Instant::now();
    nc.publish_request(DEFAULT_SUBJECT, &slow_inbox, slow.to_string())
        .unwrap();
    let fast = ask(&nc, &v1_request("req-fast", json!({"file": "a.py"})));
    assert_eq!(fast["context"]["request_id"], json!("req-fast"));
    assert!(
        slow_sub.next_timeout(Duration::ZERO).is_err(),
        "the slow reply came before the fast one"
    );
    let msg = slow_sub.next_timeout(WAIT).expect("the slow reply");
    assert!(sent.elapsed() >= Duration::from_millis(700));
    let reply: Value = serde_json::from_slice(&msg.data).unwrap();
    assert_eq!(reply["context"]["request_id"], json!("req-slow"));
    let outcomes: Vec<Value> = double
        .requests()
        .iter()
        .map(|r| r["outcome"].clone())
        .collect();
    assert_eq!(
        outcomes,
        [json!("silent"), json!("ok"), json!("ok"), json!("ok")]
    );
}

#[test]
fn double_follows_a_restarted_server() {
    let mut server = NatsServer::start();
    let double = RouterDouble::start(&server.url());
    server.kill();
    server.restart();
    let deadline = Instant::now() + WAIT;
    // The double resubscribes after its reconnect; until then the server has no responders.
    loop {
        let nc = client(&server);
        let got = nc.request_timeout(
            DEFAULT_SUBJECT,
            v1_request("req-r", json!({"file": "a.py"})).to_string(),
            Duration::from_millis(500),
        );
        if let Ok(msg) = got {
            let reply: Value = serde_json::from_slice(&msg.data).unwrap();
            assert_eq!(reply["ok"], json!(true));
            break;
        }
        assert!(Instant::now() < deadline, "the double never came back");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(double.events().iter().any(|e| e["event"] == "reconnected"));
}
