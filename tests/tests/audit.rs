//! The audit log (gateway.md section 6, `CGW_AUDIT_LOG`): its records, its mode, reopening on
//! SIGHUP, write errors that do not stop serving, and a path that cannot be opened at start.

use std::collections::BTreeMap;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use ipc_gateway_tests::daemon::{
    expect_error_code, ping, run, submit_echo, wait_until, Daemon, START_TIMEOUT,
};
use rustix::process::{getgid, getuid, Signal};
use serde_json::{json, Value};

/// The audit records in `path` (none if it does not exist yet); panics on a line that is not
/// a JSON object.
fn records(path: &Path) -> Vec<Value> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines()
        .map(|line| {
            let v: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("audit line is not JSON ({e}): {line:?}"));
            assert!(v.is_object(), "audit line is not an object: {line}");
            v
        })
        .collect()
}

fn of<'a>(records: &'a [Value], event: &str) -> Vec<&'a Value> {
    records.iter().filter(|r| r["event"] == event).collect()
}

/// Waits until `path` holds a `connection_closed` record for `conn_id`.
fn wait_closed(path: &Path, conn_id: u64) {
    wait_until(
        &format!("connection_closed of conn {conn_id} in the audit log"),
        START_TIMEOUT,
        || {
            records(path)
                .iter()
                .any(|r| r["event"] == "connection_closed" && r["conn_id"] == conn_id)
        },
    );
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// `2026-11-22T12:00:00.000Z`: UTC with milliseconds, as on stderr.
fn is_utc_millis(ts: &Value) -> bool {
    let Some(s) = ts.as_str() else { return false };
    let b = s.as_bytes();
    b.len() == 24
        && s.char_indices().all(|(i, c)| match i {
            4 | 7 => c == '-',
            10 => c == 'T',
            13 | 16 => c == ':',
            19 => c == '.',
            23 => c == 'Z',
            _ => c.is_ascii_digit(),
        })
}

/// The last `stats` line's `audit_write_errors`, after a SIGUSR1.
fn audit_write_errors(daemon: &Daemon) -> Option<u64> {
    daemon
        .stderr()
        .lines()
        .rfind(|l| l.contains(r#""event":"stats""#))
        .and_then(|l| serde_json::from_str::<Value>(l).ok())
        .and_then(|v| v["audit_write_errors"].as_u64())
}

/// One daemon accepts, serves and closes a client and shuts down; a second, allowing another
/// uid only, denies it; both append to one 0600 file with every record in order, the peer's
/// uid, gid and pid, the requests served, and the configuration without the NATS password.
#[test]
fn records_accept_deny_close_config_and_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let audit_env = audit.to_str().unwrap();
    let (uid, gid, pid) = (
        u64::from(getuid().as_raw()),
        u64::from(getgid().as_raw()),
        u64::from(std::process::id()),
    );
    let url = "nats://alice:s3cret@nats.example:4222";
    let mut daemon = Daemon::start(&[("CGW_AUDIT_LOG", audit_env), ("CGW_IPC_NATS_URL", url)]);
    assert_eq!(mode(&audit), 0o600, "a new audit file is created 0600");
    // Connection 1 was wait_ready's probe; this is connection 2.
    wait_closed(&audit, 1);
    let mut stream = daemon.connect();
    for n in 0..3 {
        submit_echo(&mut stream, &json!({"n": n}));
    }
    ping(&mut stream); // a PING is not a task request: not counted
    drop(stream);
    wait_closed(&audit, 2);
    daemon.terminate();
    daemon.expect_clean_exit();

    let r = records(&audit);
    let events: Vec<&str> = r.iter().map(|r| r["event"].as_str().unwrap()).collect();
    assert_eq!(
        events,
        [
            "config_loaded",
            "connection_accepted",
            "connection_closed",
            "connection_accepted",
            "connection_closed",
            "shutdown_started",
            "shutdown_complete"
        ],
        "{r:#?}"
    );
    assert!(r.iter().all(|r| is_utc_millis(&r["timestamp"])), "{r:#?}");
    let text = std::fs::read_to_string(&audit).unwrap();
    assert!(
        !text.contains("s3cret") && !text.contains("alice"),
        "a NATS credential reached the audit log:\n{text}"
    );
    assert_eq!(
        r[0]["config"]["nats"]["servers"],
        json!(["nats://***@nats.example:4222"])
    );
    assert_eq!(r[0]["config"]["audit_log"], audit_env);
    let accepted = &r[3];
    assert_eq!(
        (
            &accepted["conn_id"],
            &accepted["uid"],
            &accepted["gid"],
            &accepted["pid"]
        ),
        (&json!(2), &json!(uid), &json!(gid), &json!(pid)),
        "{accepted}"
    );
    let closed = &r[4];
    assert_eq!(closed["conn_id"], 2, "{closed}");
    assert_eq!(closed["requests_served"], 3, "{closed}");
    assert_eq!(closed["reason"], "peer_closed", "{closed}");
    assert_eq!(closed["uid"], uid, "{closed}");
    assert_eq!(
        r[2]["requests_served"], 0,
        "the probe sent nothing: {}",
        r[2]
    );
    assert!(r[5].get("conn_id").is_none(), "{}", r[5]);

    // Another daemon on the same file, letting in one other uid only.
    let other = (uid + 1).to_string();
    let mut denying = Daemon::start(&[
        ("CGW_AUDIT_LOG", audit_env),
        ("CGW_IPC_ALLOWED_UIDS", &other),
    ]);
    let mut stream = denying.connect();
    expect_error_code(&mut stream, 9);
    drop(stream);
    wait_closed(&audit, 2);
    denying.terminate();
    denying.expect_clean_exit();
    assert_eq!(mode(&audit), 0o600);
    let all = records(&audit);
    assert_eq!(&all[..r.len()], &r[..], "the first run's records are kept");
    let denied = of(&all[r.len()..], "connection_denied");
    assert_eq!(denied.len(), 2, "the probe and the client: {all:#?}");
    let d = denied[1];
    assert_eq!(
        (&d["conn_id"], &d["uid"], &d["gid"], &d["pid"], &d["reason"]),
        (
            &json!(2),
            &json!(uid),
            &json!(gid),
            &json!(pid),
            &json!("permission_denied")
        ),
        "{d}"
    );
    assert!(of(&all[r.len()..], "connection_accepted").is_empty());
    assert_eq!(of(&all, "shutdown_complete").len(), 2);
}

/// SIGHUP after the file was renamed (logrotate `create`) opens a new file at the path: later
/// records go there, a connection open across it has its accept in the old file and its close
/// in the new, and across both files every record appears exactly once.
#[test]
fn sighup_reopens_without_losing_or_repeating_records() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let rotated = dir.path().join("audit.jsonl.1");
    let mut daemon = Daemon::start(&[("CGW_AUDIT_LOG", audit.to_str().unwrap())]);
    wait_closed(&audit, 1);
    for n in 2..=4 {
        let mut c = daemon.connect();
        submit_echo(&mut c, &json!({"n": n}));
        drop(c);
        wait_closed(&audit, n);
    }
    let mut across = daemon.connect(); // connection 5
    submit_echo(&mut across, &json!({"across": 1}));

    std::fs::rename(&audit, &rotated).unwrap();
    daemon.signal(Signal::HUP);
    daemon.wait_stderr_contains(r#""event":"audit_reopened""#, START_TIMEOUT);
    submit_echo(&mut across, &json!({"across": 2}));
    drop(across);
    for n in 6..=8 {
        let mut c = daemon.connect();
        submit_echo(&mut c, &json!({"n": n}));
        drop(c);
        wait_closed(&audit, n);
    }
    wait_closed(&audit, 5);
    daemon.terminate();
    daemon.expect_clean_exit();

    assert_eq!(mode(&audit), 0o600, "the reopened file is created 0600");
    let old = records(&rotated);
    let new = records(&audit);
    let key = |r: &Value| {
        (
            r["event"].as_str().unwrap().to_string(),
            r["conn_id"].as_u64(),
        )
    };
    let mut seen: BTreeMap<(String, Option<u64>), usize> = BTreeMap::new();
    for r in old.iter().chain(&new) {
        *seen.entry(key(r)).or_default() += 1;
    }
    let mut expected: BTreeMap<(String, Option<u64>), usize> = BTreeMap::new();
    for name in ["config_loaded", "shutdown_started", "shutdown_complete"] {
        expected.insert((name.to_string(), None), 1);
    }
    for conn in 1..=8 {
        for name in ["connection_accepted", "connection_closed"] {
            expected.insert((name.to_string(), Some(conn)), 1);
        }
    }
    assert_eq!(seen, expected, "old file {old:#?}\nnew file {new:#?}");
    let in_new = |event: &str, conn: u64| {
        new.iter()
            .any(|r| r["event"] == event && r["conn_id"] == conn)
    };
    assert!(
        !in_new("connection_accepted", 5) && in_new("connection_closed", 5),
        "connection 5: accepted before the SIGHUP, closed after"
    );
    assert_eq!(
        new.iter()
            .filter(|r| r["event"] == "connection_accepted")
            .count(),
        3,
        "connections 6 to 8 are in the new file: {new:#?}"
    );
    assert_eq!(new.last().unwrap()["event"], "shutdown_complete");
    let closed_5 = new
        .iter()
        .find(|r| r["event"] == "connection_closed" && r["conn_id"] == 5)
        .unwrap();
    assert_eq!(closed_5["requests_served"], 2, "{closed_5}");
}

/// With the audit path pointing at /dev/full (a symlink switched over, then SIGHUP), every
/// write fails: clients are still served, the SIGUSR1 stats line counts the failures, stderr
/// has one `audit_write_failed` line for all of them, and pointing the path back recovers.
#[test]
fn write_errors_are_counted_and_do_not_stop_serving() {
    assert!(Path::new("/dev/full").exists(), "this test needs /dev/full");
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real.jsonl");
    let link = dir.path().join("audit.jsonl");
    symlink(&real, &link).unwrap();
    let mut daemon = Daemon::start(&[("CGW_AUDIT_LOG", link.to_str().unwrap())]);
    wait_closed(&real, 1);

    std::fs::remove_file(&link).unwrap();
    symlink("/dev/full", &link).unwrap();
    daemon.signal(Signal::HUP);
    daemon.wait_stderr_contains(r#""event":"audit_reopened""#, START_TIMEOUT);
    for n in 0..3 {
        let mut c = daemon.connect();
        submit_echo(&mut c, &json!({"n": n}));
        ping(&mut c);
    }
    // Three connections accepted and closed: six records that could not be written.
    wait_until("stats counts 6 audit write errors", START_TIMEOUT, || {
        daemon.signal(Signal::USR1);
        std::thread::sleep(Duration::from_millis(50));
        audit_write_errors(&daemon).is_some_and(|n| n >= 6)
    });
    let stderr = daemon.stderr();
    let failed: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains(r#""event":"audit_write_failed""#))
        .collect();
    assert_eq!(
        failed.len(),
        1,
        "reported once a minute at most: {failed:#?}"
    );
    let report: Value = serde_json::from_str(failed[0]).unwrap();
    assert!(
        report["error"]
            .as_str()
            .is_some_and(|e| e.contains("No space left on device")),
        "{report}"
    );
    assert_eq!(report["level"], "WARN");
    assert!(is_utc_millis(&report["timestamp"]), "{report}");

    // Back to a file: the records flow again (and the counter does not move).
    std::fs::remove_file(&link).unwrap();
    symlink(&real, &link).unwrap();
    daemon.signal(Signal::HUP);
    wait_until("a second audit_reopened", START_TIMEOUT, || {
        daemon
            .stderr()
            .matches(r#""event":"audit_reopened""#)
            .count()
            == 2
    });
    let errors = audit_write_errors(&daemon).unwrap();
    let mut c = daemon.connect();
    submit_echo(&mut c, &json!({"after": true}));
    drop(c);
    wait_closed(&real, 5);
    daemon.terminate();
    daemon.expect_clean_exit();
    let r = records(&real);
    assert!(of(&r, "connection_accepted")
        .iter()
        .all(|r| r["conn_id"] == 1 || r["conn_id"] == 5));
    assert_eq!(r.last().unwrap()["event"], "shutdown_complete");
    assert_eq!(
        errors, 6,
        "exactly the six records of connections 2 to 4 failed"
    );
}

/// An audit path that cannot be opened (a directory, a missing directory) stops the start
/// with exit code 2 and a message naming CGW_AUDIT_LOG and the path.
#[test]
fn unopenable_path_exits_2_naming_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dir").join("audit.jsonl");
    for path in [dir.path(), missing.as_path()] {
        let path = path.to_str().unwrap();
        let finished = run(&[("CGW_AUDIT_LOG", path)], &[]);
        assert_eq!(finished.status.code(), Some(2), "{path}: {finished:?}");
        assert!(
            finished.stderr.contains("CGW_AUDIT_LOG") && finished.stderr.contains(path),
            "{path}: {}",
            finished.stderr
        );
    }
}
