//! The deployment files (deploy/, gateway.md section 10) and the operator CLI
//! (`ipc-gateway health`): the systemd units pass `systemd-analyze verify` and agree with each
//! other, the dashboard and the alert rules use only metric names a running daemon exports,
//! the container image and the Kubernetes sidecar probe the endpoints and call the CLI options
//! that exist, and `health` maps what it gets to its exit codes.
//!
//! Written from the spec and the files alone: the PromQL and HTTP code here shares nothing with
//! the daemon's.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use ipc_gateway_tests::daemon::{binary, workspace_dir, Daemon, IO_TIMEOUT, START_TIMEOUT};
use ipc_gateway_tests::http_client;
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    workspace_dir().join("deploy")
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// systemd

const SYSTEMD_ANALYZE: &str = "/usr/bin/systemd-analyze";

/// `systemd-analyze verify` on copies of `units` whose `ExecStart=` names the built daemon
/// (verify checks that the binary exists, and the shipped path /usr/local/bin is not there on
/// a test machine). `Err` holds what it reported: a non-zero exit, or any diagnostic at all,
/// since verify only warns (exit 0) about unknown keys and values it cannot parse.
///
/// No running systemd is needed: verify loads the units into a manager of its own.
/// `--man=no` keeps it from checking `Documentation=` man pages, `--generators=no` from running
/// the machine's generators; user mode needs an XDG_RUNTIME_DIR, given a private one.
fn verify_units(units: &[(String, String)], user: bool) -> Result<(), String> {
    let dir = tempfile::tempdir().expect("creating a temporary directory");
    let runtime_dir = tempfile::tempdir().expect("creating a temporary directory");
    let mut paths = Vec::new();
    for (name, text) in units {
        let path = dir.path().join(name);
        fs::write(&path, text).expect("writing a unit copy");
        paths.push(path);
    }
    let mut cmd = Command::new(SYSTEMD_ANALYZE);
    if user {
        cmd.arg("--user").env("XDG_RUNTIME_DIR", runtime_dir.path());
    }
    let out = cmd
        .args(["verify", "--man=no", "--generators=no"])
        .args(&paths)
        .output()
        .expect("running systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if out.status.success() && stderr.is_empty() && stdout.is_empty() {
        Ok(())
    } else {
        Err(format!("{}: {stdout}\n{stderr}", out.status))
    }
}

/// The unit files in `dir` (`*.service`, `*.socket`) with `ExecStart=` pointed at the built
/// daemon; panics if a service has no single `ExecStart=` line to point.
fn units_for_verify(dir: &Path) -> Vec<(String, String)> {
    let mut units = Vec::new();
    for entry in fs::read_dir(dir).expect("listing unit files") {
        let path = entry.expect("a directory entry").path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !(name.ends_with(".service") || name.ends_with(".socket")) {
            continue;
        }
        let mut text = read(&path);
        if name.ends_with(".service") {
            let exec_lines = text.lines().filter(|l| l.starts_with("ExecStart=")).count();
            assert_eq!(exec_lines, 1, "{name}: expected one ExecStart= line");
            text = text
                .lines()
                .map(|l| {
                    if l.starts_with("ExecStart=") {
                        format!("ExecStart={}", binary().display())
                    } else {
                        l.to_owned()
                    }
                })
                .collect::<Vec<_>>()
                .join("\n");
        }
        units.push((name, text));
    }
    units.sort();
    units
}

fn have_systemd_analyze() -> bool {
    if Path::new(SYSTEMD_ANALYZE).exists() {
        return true;
    }
    println!("SKIPPED: {SYSTEMD_ANALYZE} is not installed (apt-get install systemd)");
    false
}

/// The system units and the per-user units verify cleanly.
#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    if !have_systemd_analyze() {
        return;
    }
    let system = units_for_verify(&deploy_dir().join("systemd"));
    let names: Vec<_> = system.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "ipc-gateway-http.socket",
            "ipc-gateway.service",
            "ipc-gateway.socket"
        ]
    );
    verify_units(&system, false).unwrap_or_else(|e| panic!("system units: {e}"));

    let user = units_for_verify(&deploy_dir().join("systemd/user"));
    let names: Vec<_> = user.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["ipc-gateway.service", "ipc-gateway.socket"]);
    verify_units(&user, true).unwrap_or_else(|e| panic!("user units: {e}"));
}

/// The check above can fail: a misspelt directive (which verify only warns about) and a
/// missing binary (an error) are both caught.
#[test]
fn systemd_analyze_verify_catches_broken_units() {
    if !have_systemd_analyze() {
        return;
    }
    let good = units_for_verify(&deploy_dir().join("systemd"));
    let broken = |from: &str, to: &str| {
        let mut units = good.clone();
        let service = units
            .iter_mut()
            .find(|(n, _)| n == "ipc-gateway.service")
            .expect("the service");
        assert!(service.1.contains(from), "the service has no {from:?}");
        service.1 = service.1.replacen(from, to, 1);
        units
    };
    let misspelt = verify_units(&broken("NoNewPrivileges=", "NoNewPrivilege="), false);
    assert!(
        misspelt
            .as_ref()
            .is_err_and(|e| e.contains("NoNewPrivilege")),
        "{misspelt:?}"
    );
    let exec = format!("ExecStart={}", binary().display());
    let missing = verify_units(&broken(&exec, "ExecStart=/nonexistent/ipc-gateway"), false);
    assert!(
        missing.as_ref().is_err_and(|e| e.contains("/nonexistent")),
        "{missing:?}"
    );
}

/// `[Section] Key=Value` lines of a unit file, in order (repeated keys kept).
fn unit_settings(text: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut settings = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
        } else if let Some((key, value)) = line.split_once('=') {
            settings.push((section.clone(), key.to_owned(), value.to_owned()));
        }
    }
    settings
}

/// Every value of `key` in `section` (empty when absent).
fn unit_values<'a>(
    settings: &'a [(String, String, String)],
    section: &str,
    key: &str,
) -> Vec<&'a str> {
    settings
        .iter()
        .filter(|(s, k, _)| s == section && k == key)
        .map(|(_, _, v)| v.as_str())
        .collect()
}

/// The one value of `key` in `section`; panics naming the unit otherwise.
fn unit_value<'a>(
    settings: &'a [(String, String, String)],
    unit: &str,
    section: &str,
    key: &str,
) -> &'a str {
    match unit_values(settings, section, key).as_slice() {
        [one] => one,
        other => panic!("{unit}: expected one [{section}] {key}=, found {other:?}"),
    }
}

/// `Environment=` assignments of a service, as a map.
fn unit_environment(settings: &[(String, String, String)]) -> BTreeMap<String, String> {
    unit_values(settings, "Service", "Environment")
        .iter()
        .flat_map(|v| v.split_whitespace())
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// What the daemon needs from its units: the socket path and HTTP address it is told equal the
/// ones systemd listens on, the descriptor names are the two it recognises, and the hardening
/// of gateway.md section 10 is there.
#[test]
fn systemd_units_agree_with_each_other_and_the_spec() {
    let dir = deploy_dir().join("systemd");
    let service = unit_settings(&read(&dir.join("ipc-gateway.service")));
    let ipc = unit_settings(&read(&dir.join("ipc-gateway.socket")));
    let http = unit_settings(&read(&dir.join("ipc-gateway-http.socket")));
    let env = unit_environment(&service);
    let s = "ipc-gateway.service";

    assert_eq!(unit_value(&service, s, "Service", "Type"), "notify");
    assert!(!unit_value(&service, s, "Service", "WatchdogSec").is_empty());
    let sockets: BTreeSet<&str> = unit_value(&service, s, "Service", "Sockets")
        .split_whitespace()
        .collect();
    assert_eq!(
        sockets,
        BTreeSet::from(["ipc-gateway.socket", "ipc-gateway-http.socket"])
    );
    assert_eq!(
        unit_value(&service, s, "Service", "EnvironmentFile"),
        "-/etc/ipc-gateway/env"
    );

    assert_eq!(
        unit_value(&ipc, "ipc socket", "Socket", "FileDescriptorName"),
        "ipc"
    );
    let socket_path = unit_value(&ipc, "ipc socket", "Socket", "ListenStream");
    assert_eq!(
        Some(socket_path),
        env.get("CGW_IPC_SOCKET_PATH").map(String::as_str)
    );
    // The socket lives in the service's RuntimeDirectory, which must then survive a stop
    // (systemd would otherwise delete the file the socket unit listens on).
    let runtime_dir = unit_value(&service, s, "Service", "RuntimeDirectory");
    assert_eq!(
        Path::new(socket_path).parent(),
        Some(Path::new("/run").join(runtime_dir).as_path())
    );
    assert_eq!(
        unit_value(&service, s, "Service", "RuntimeDirectoryPreserve"),
        "yes"
    );
    // PrivateTmp hides /tmp from clients; only fine because the socket is not there.
    assert!(!socket_path.starts_with("/tmp/"));

    assert_eq!(
        unit_value(&http, "http socket", "Socket", "FileDescriptorName"),
        "http"
    );
    assert_eq!(
        Some(unit_value(&http, "http socket", "Socket", "ListenStream")),
        env.get("CGW_HTTP_ADDR").map(String::as_str)
    );
    assert_eq!(
        unit_value(&http, "http socket", "Socket", "Service"),
        "ipc-gateway.service"
    );

    for (key, want) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("CapabilityBoundingSet", ""),
        ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectControlGroups", "yes"),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("RestrictNamespaces", "yes"),
    ] {
        assert_eq!(unit_value(&service, s, "Service", key), want, "{key}=");
    }
    assert!(unit_values(&service, "Service", "SystemCallFilter").contains(&"@system-service"));
    // Draining takes up to CGW_IPC_DRAIN_MS (30 s by default); a shorter stop timeout kills it.
    let stop = unit_value(&service, s, "Service", "TimeoutStopSec");
    let stop_secs: u64 = stop
        .trim_end_matches('s')
        .parse()
        .expect("TimeoutStopSec in seconds");
    assert!(stop_secs > 30, "TimeoutStopSec={stop}");
    // A dedicated account named like the socket's group, created by the sysusers.d file.
    let user = unit_value(&service, s, "Service", "User");
    assert_eq!(
        unit_value(&ipc, "ipc socket", "Socket", "SocketGroup"),
        user
    );
    assert!(read(&dir.join("ipc-gateway.sysusers"))
        .lines()
        .any(|l| l.split_whitespace().take(2).eq(["u", user])));

    let user_dir = dir.join("user");
    let user_service = unit_settings(&read(&user_dir.join("ipc-gateway.service")));
    let user_socket = unit_settings(&read(&user_dir.join("ipc-gateway.socket")));
    assert_eq!(
        unit_value(&user_socket, "user socket", "Socket", "ListenStream"),
        "%t/beamline-gateway.sock"
    );
    assert_eq!(
        unit_value(&user_socket, "user socket", "Socket", "FileDescriptorName"),
        "ipc"
    );
    assert_eq!(
        unit_environment(&user_service)
            .get("CGW_IPC_SOCKET_PATH")
            .map(String::as_str),
        Some("%t/beamline-gateway.sock")
    );
    assert_eq!(
        unit_value(&user_service, "user service", "Service", "Type"),
        "notify"
    );
}

/// The units' listeners and environment, handed to the real daemon as systemd would hand
/// them (`LISTEN_FDS`, `LISTEN_FDNAMES` from `FileDescriptorName=`, the service's
/// `Environment=`): it starts, takes both listeners, is HEALTHY on the inherited HTTP
/// listener and answers a PING on the inherited IPC socket. Paths and ports are the test's
/// (a temporary directory for the socket, port 0 for HTTP); everything else is the units'.
#[test]
fn the_units_environment_and_descriptors_start_the_daemon() {
    let dir = deploy_dir().join("systemd");
    for (service, sockets, user) in [
        (
            dir.join("ipc-gateway.service"),
            vec![
                dir.join("ipc-gateway.socket"),
                dir.join("ipc-gateway-http.socket"),
            ],
            false,
        ),
        (
            dir.join("user/ipc-gateway.service"),
            vec![dir.join("user/ipc-gateway.socket")],
            true,
        ),
    ] {
        let tmp = tempfile::tempdir().expect("creating a temporary directory");
        let service = unit_settings(&read(&service));
        let mut env = unit_environment(&service);
        let mut names = Vec::new();
        let mut unix = None;
        let mut tcp = None;
        for socket in &sockets {
            let settings = unit_settings(&read(socket));
            let listen = unit_value(&settings, "socket", "Socket", "ListenStream");
            let name = unit_value(&settings, "socket", "Socket", "FileDescriptorName");
            names.push(name.to_owned());
            if listen.starts_with('/') || listen.starts_with("%t/") {
                // The daemon is told the same path as systemd listens on; so here.
                let path = tmp.path().join("gateway.sock");
                let configured = env
                    .get("CGW_IPC_SOCKET_PATH")
                    .expect("CGW_IPC_SOCKET_PATH in the service");
                assert_eq!(configured, listen, "service and socket disagree");
                env.insert(
                    "CGW_IPC_SOCKET_PATH".into(),
                    path.to_string_lossy().into_owned(),
                );
                unix = Some((
                    path.clone(),
                    std::os::unix::net::UnixListener::bind(&path).expect("binding"),
                ));
            } else {
                tcp = Some(TcpListener::bind("127.0.0.1:0").expect("binding port 0"));
            }
        }
        let (path, unix) = unix.expect("an IPC socket unit");
        let fds: Vec<std::os::fd::BorrowedFd<'_>> = {
            use std::os::fd::AsFd;
            let mut fds = vec![unix.as_fd()];
            fds.extend(tcp.as_ref().map(|t| t.as_fd()));
            fds
        };
        // systemd passes descriptors in the order of the service's Sockets=, names alike; the
        // daemon goes by name, so the test's order (ipc first) is as good as any.
        names.sort_by_key(|n| n != "ipc");
        let fdnames = names.join(":");
        let mut vars: Vec<(&str, &str)> =
            env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        vars.push(("LISTEN_FDNAMES", &fdnames));
        let mut daemon = Daemon::spawn_activated(&path, &fds, &vars, &[]);
        // A connect proves nothing (the test's listener accepts before the daemon runs), and a
        // daemon that refused the units' settings would only show as a PING timing out.
        let deadline = Instant::now() + START_TIMEOUT;
        while !daemon.stderr().contains("\"listener_inherited\"") {
            if let Some(status) = daemon.poll_exit() {
                panic!(
                    "the daemon refused the units ({status}):\n{}",
                    daemon.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no listener_inherited:\n{}",
                daemon.stderr()
            );
            thread::sleep(Duration::from_millis(10));
        }
        ipc_gateway_tests::daemon::ping(&mut daemon.connect());
        if let Some(tcp) = &tcp {
            let addr = daemon.http_addr();
            assert_eq!(
                addr,
                tcp.local_addr().unwrap(),
                "the HTTP listener was not taken over"
            );
            let out = health(&["--addr", &addr.to_string()], &[]);
            assert_eq!(
                out.status.code(),
                Some(0),
                "{}{}",
                stdout(&out),
                stderr(&out)
            );
        }
        assert!(
            daemon.is_running(),
            "user units: {user}\n{}",
            daemon.stderr()
        );
        daemon.terminate();
        // Not expect_clean_exit: that also expects the socket file gone, and an inherited
        // socket's file is systemd's to keep.
        let status = daemon.wait_exit(START_TIMEOUT);
        assert!(status.success(), "{status}\n{}", daemon.stderr());
        assert!(
            path.exists(),
            "the daemon removed the socket file systemd owns"
        );
    }
}

/// The sysusers.d file is one `systemd-sysusers` accepts (dry run into an empty root).
#[test]
fn the_sysusers_file_creates_the_service_account() {
    let tool = Path::new("/usr/bin/systemd-sysusers");
    if !tool.exists() {
        println!("SKIPPED: {} is not installed", tool.display());
        return;
    }
    let root = tempfile::tempdir().expect("creating a temporary directory");
    fs::create_dir(root.path().join("etc")).expect("creating etc/");
    let out = Command::new(tool)
        .arg("--dry-run")
        .arg(format!("--root={}", root.path().display()))
        .arg(deploy_dir().join("systemd/ipc-gateway.sysusers"))
        .output()
        .expect("running systemd-sysusers");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("Creating user 'ipc-gateway'"), "{text}");
}

// ---------------------------------------------------------------------------------------------
// PromQL: which metric names an expression uses

/// PromQL functions, aggregation operators and keywords: identifiers that are not metric names
/// even where they are not followed by a parenthesis (`sum by (le) (…)`, `x > bool 0`).
#[rustfmt::skip] // one word a line would make this list 130 lines long
const PROMQL_WORDS: &[&str] = &[
    // aggregation operators
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk",
    "topk", "quantile", "limitk", "limit_ratio",
    // keywords and binary operators spelt as words
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
    "unless", "offset", "atan2", "inf", "nan",
    // functions
    "abs", "absent", "absent_over_time", "acos", "acosh", "asin", "asinh", "atan", "atanh",
    "avg_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min", "cos", "cosh",
    "count_over_time", "day_of_month", "day_of_week", "day_of_year", "days_in_month", "deg",
    "delta", "deriv", "exp", "floor", "histogram_avg", "histogram_count", "histogram_fraction",
    "histogram_quantile", "histogram_stddev", "histogram_stdvar", "histogram_sum",
    "holt_winters", "double_exponential_smoothing", "hour", "idelta", "increase", "irate",
    "label_join", "label_replace", "last_over_time", "ln", "log10", "log2", "mad_over_time",
    "max_over_time", "min_over_time", "minute", "month", "pi", "predict_linear",
    "present_over_time", "quantile_over_time", "rad", "rate", "resets", "round", "scalar",
    "sgn", "sin", "sinh", "sort", "sort_desc", "sort_by_label", "sort_by_label_desc", "sqrt",
    "stddev_over_time", "stdvar_over_time", "sum_over_time", "tan", "tanh", "time", "timestamp",
    "vector", "year",
];

/// Keywords whose parenthesised list that follows is label names, not an expression.
const LABEL_LIST_WORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// The index after the string literal starting at `i` (PromQL's "…", '…' with backslash
/// escapes, and raw `…`).
fn skip_string(chars: &[char], i: usize) -> usize {
    let quote = chars[i];
    let mut j = i + 1;
    while j < chars.len() && chars[j] != quote {
        if chars[j] == '\\' && quote != '`' {
            j += 1;
        }
        j += 1;
    }
    j + 1
}

/// The index after the `close` that ends the group opening at `i`, skipping string literals
/// (a label value may hold `}` or `)`) and nested groups of the same kind.
fn skip_group(chars: &[char], i: usize, close: char) -> usize {
    let open = chars[i];
    let mut depth = 0;
    let mut j = i;
    while j < chars.len() {
        match chars[j] {
            '"' | '\'' | '`' => {
                j = skip_string(chars, j);
                continue;
            }
            c if c == open => depth += 1,
            c if c == close => {
                depth -= 1;
                if depth == 0 {
                    return j + 1;
                }
            }
            _ => {}
        }
        j += 1;
    }
    j
}

/// The metric names a PromQL expression selects: identifiers outside label matchers (`{…}`),
/// ranges (`[…]`), strings, label lists (`by (…)`, `on (…)`, …) and Grafana variables
/// (`$__rate_interval`, `${instance}`), that are neither functions (followed by `(`) nor
/// PromQL words. Numbers and durations (`0.99`, `1e-3`, `5m`) are skipped.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut label_list_next = false;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '(' && label_list_next {
            i = skip_group(&chars, i, ')');
            label_list_next = false;
        } else if matches!(c, '"' | '\'' | '`') {
            i = skip_string(&chars, i);
        } else if c == '{' {
            i = skip_group(&chars, i, '}');
        } else if c == '[' {
            i = skip_group(&chars, i, ']');
        } else if c == '#' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '$' {
            i += 1;
            if chars.get(i) == Some(&'{') {
                i = skip_group(&chars, i, '}');
            } else {
                while i < chars.len() && is_ident(chars[i]) {
                    i += 1;
                }
            }
        } else if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            while i < chars.len() {
                let d = chars[i];
                let exponent_sign = matches!(d, '+' | '-') && matches!(chars[i - 1], 'e' | 'E');
                if d.is_ascii_alphanumeric() || d == '.' || d == '_' || exponent_sign {
                    i += 1;
                } else {
                    break;
                }
            }
        } else if is_ident_start(c) {
            let start = i;
            while i < chars.len() && is_ident(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let lower = word.to_ascii_lowercase();
            let next = chars[i..].iter().find(|c| !c.is_whitespace()).copied();
            if LABEL_LIST_WORDS.contains(&lower.as_str()) {
                label_list_next = next == Some('(');
            } else if next != Some('(') && !PROMQL_WORDS.contains(&lower.as_str()) {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

/// The family a series name belongs to: histograms expose `<family>_bucket`, `_sum`, `_count`.
fn histogram_family(name: &str) -> Option<&str> {
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|suffix| name.strip_suffix(suffix))
}

#[test]
fn the_promql_extractor_finds_metric_names_only() {
    let cases: &[(&str, &[&str])] = &[
        (
            r#"histogram_quantile(0.99, sum by (instance, le) (rate(ipc_request_duration_seconds_bucket{instance=~"$instance"}[$__rate_interval]))) > 15"#,
            &["ipc_request_duration_seconds_bucket"],
        ),
        (
            r#"sum(rate(ipc_responses_total{outcome!="ok", x="}{)"}[5m])) by (outcome) / sum(rate(ipc_responses_total[1h:5m]))"#,
            &["ipc_responses_total"],
        ),
        (
            "time() - max by (version) (process_start_time_seconds * on (instance) group_left (version) build_info offset 5m)",
            &["build_info", "process_start_time_seconds"],
        ),
        (
            r#"absent(build_info{job="ipc-gateway"}) or a > bool 1e-3 unless b AND c"#,
            &["a", "b", "build_info", "c"],
        ),
        (
            "increase(nats_reconnects_total[10m]) > 5\n# a comment naming not_a_metric\n",
            &["nats_reconnects_total"],
        ),
        (
            "process_open_fds{instance=~\"${instance}\"} / process_max_fds > .8",
            &["process_max_fds", "process_open_fds"],
        ),
        ("vector(1) + scalar(sum(rate(x:recorded:rate5m[5m])))", &["x:recorded:rate5m"]),
        (
            r#"label_replace(up_to_date, "dst", "$1", "src", "(.*)")"#,
            &["up_to_date"],
        ),
    ];
    for (expr, want) in cases {
        let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
        assert_eq!(metric_names(expr), want, "in {expr}");
    }
    assert_eq!(
        histogram_family("ipc_request_duration_seconds_bucket"),
        Some("ipc_request_duration_seconds")
    );
    assert_eq!(
        histogram_family("ipc_request_duration_seconds_count"),
        Some("ipc_request_duration_seconds")
    );
    assert_eq!(histogram_family("ipc_requests_total"), None);
}

/// Every `expr` string anywhere in a JSON document.
fn json_exprs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                match v {
                    Value::String(s) if key == "expr" => out.push(s.clone()),
                    _ => json_exprs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| json_exprs(v, out)),
        _ => {}
    }
}

/// Every `expr` string anywhere in a YAML document.
fn yaml_exprs(value: &serde_norway::Value, out: &mut Vec<String>) {
    use serde_norway::Value as Y;
    match value {
        Y::Mapping(map) => {
            for (key, v) in map {
                match (key, v) {
                    (Y::String(k), Y::String(s)) if k == "expr" => out.push(s.clone()),
                    _ => yaml_exprs(v, out),
                }
            }
        }
        Y::Sequence(items) => items.iter().for_each(|v| yaml_exprs(v, out)),
        Y::Tagged(tagged) => yaml_exprs(&tagged.value, out),
        _ => {}
    }
}

fn dashboard() -> Value {
    let path = deploy_dir().join("grafana/ipc-gateway.json");
    serde_json::from_str(&read(&path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn alert_rules() -> serde_norway::Value {
    let path = deploy_dir().join("prometheus/alerts.yml");
    serde_norway::from_str(&read(&path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The metric names the dashboard and the alert rules use, each with where it is used.
fn used_metric_names() -> BTreeMap<String, &'static str> {
    let mut used = BTreeMap::new();
    let mut exprs = Vec::new();
    json_exprs(&dashboard(), &mut exprs);
    assert!(
        exprs.len() > 10,
        "the dashboard has only {} queries",
        exprs.len()
    );
    for name in exprs.iter().flat_map(|e| metric_names(e)) {
        used.insert(name, "grafana/ipc-gateway.json");
    }
    let mut exprs = Vec::new();
    yaml_exprs(&alert_rules(), &mut exprs);
    assert!(
        exprs.len() >= 5,
        "the alert rules have only {} expressions",
        exprs.len()
    );
    for name in exprs.iter().flat_map(|e| metric_names(e)) {
        used.entry(name).or_insert("prometheus/alerts.yml");
    }
    used
}

/// The dashboard and the alerts cover what an operator looks at first (the panel list of
/// gateway.md section 10's deliverables), so a dashboard that lost a query fails here.
#[test]
fn the_dashboard_and_alerts_cover_the_essentials() {
    let used = used_metric_names();
    for name in [
        "ipc_requests_total",
        "ipc_responses_total",
        "ipc_request_duration_seconds_bucket",
        "ipc_inflight",
        "ipc_connections_active",
        "nats_connection_state",
        "nats_reconnects_total",
        "ipc_circuit_breaker_state",
        "ipc_health_status",
        "process_resident_memory_bytes",
    ] {
        assert!(
            used.contains_key(name),
            "{name} is used by neither the dashboard nor the alerts"
        );
    }
    // Every name is one of the daemon's families (gateway.md section 5): a label name or a
    // Grafana variable read as a metric would show here, before the live check runs.
    let foreign: Vec<&String> = used
        .keys()
        .filter(|n| {
            !["ipc_", "nats_", "http_", "audit_", "process_"]
                .iter()
                .any(|p| n.starts_with(p))
                && n.as_str() != "build_info"
        })
        .collect();
    assert!(foreign.is_empty(), "not gateway metric names: {foreign:?}");
}

/// What a /metrics page declares: sample names, and families with their `# TYPE`.
struct Exposition {
    samples: BTreeSet<String>,
    types: BTreeMap<String, String>,
}

impl Exposition {
    fn parse(text: &str) -> Exposition {
        let mut samples = BTreeSet::new();
        let mut types = BTreeMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split_whitespace();
                if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                    types.insert(name.to_owned(), kind.to_owned());
                }
            } else if !line.starts_with('#') && !line.trim().is_empty() {
                let name: String = line.chars().take_while(|&c| is_ident(c)).collect();
                samples.insert(name);
            }
        }
        Exposition { samples, types }
    }

    /// Whether `name` as a query uses it exists: a sample of that name, a declared family
    /// (a labelled counter may have no series yet), or a histogram's `_bucket`/`_sum`/`_count`.
    fn exports(&self, name: &str) -> bool {
        self.samples.contains(name)
            || self.types.contains_key(name)
            || histogram_family(name).is_some_and(|family| {
                matches!(
                    self.types.get(family).map(String::as_str),
                    Some("histogram")
                )
            })
    }
}

#[test]
fn the_exposition_reader_maps_histogram_series_to_their_family() {
    let page = "# HELP h x\n# TYPE h histogram\nh_bucket{le=\"+Inf\"} 1\nh_sum 0.5\nh_count 1\n\
                # TYPE c_total counter\n# TYPE g gauge\ng 1\n";
    let e = Exposition::parse(page);
    for name in ["h_bucket", "h_sum", "h_count", "c_total", "g"] {
        assert!(e.exports(name), "{name}");
    }
    for name in ["g_bucket", "c", "h_total", "other"] {
        assert!(!e.exports(name), "{name}");
    }
}

/// Every metric the dashboard and the alert rules query is on a live daemon's /metrics page.
/// Needs the HTTP server (branch `http`) and the metrics (branch `metrics`) in the daemon.
#[test]
fn the_dashboard_and_alerts_use_only_metrics_a_live_daemon_exports() {
    let used = used_metric_names();
    let (_daemon, addr) = start_with_http();
    let response = http_get(&addr, "/metrics");
    assert_eq!(response.status, 200, "GET /metrics: {}", response.text());
    let exposition = Exposition::parse(&response.text());
    let missing: Vec<String> = used
        .iter()
        .filter(|(name, _)| !exposition.exports(name))
        .map(|(name, file)| format!("{name} (used in deploy/{file})"))
        .collect();
    assert!(
        missing.is_empty(),
        "not exported by the daemon: {missing:#?}\nexported: {:?}",
        exposition.types.keys().collect::<Vec<_>>()
    );
}

// ---------------------------------------------------------------------------------------------
// Dashboard and alert rules: well-formed for their tools

/// An importable dashboard: Grafana's export format (`__inputs` with DS_PROMETHEUS) whose
/// panels take their data source from a variable defaulting to it, unique panel ids, and a
/// query in every panel.
#[test]
fn the_dashboard_is_importable() {
    let d = dashboard();
    assert!(d["schemaVersion"].as_u64().is_some_and(|v| v >= 30));
    assert_eq!(d["uid"], "ipc-gateway");
    assert!(d["__inputs"]
        .as_array()
        .expect("__inputs")
        .iter()
        .any(|i| i["name"] == "DS_PROMETHEUS" && i["pluginId"] == "prometheus"));
    let variables = d["templating"]["list"].as_array().expect("templating.list");
    let ds = variables
        .iter()
        .find(|v| v["type"] == "datasource")
        .expect("a data source variable");
    assert_eq!(ds["query"], "prometheus");
    assert_eq!(ds["current"]["value"], "${DS_PROMETHEUS}");
    let ds_ref = format!("${{{}}}", ds["name"].as_str().expect("variable name"));

    let mut ids = BTreeSet::new();
    for panel in d["panels"].as_array().expect("panels") {
        let title = panel["title"].as_str().unwrap_or("?");
        assert!(
            ids.insert(panel["id"].as_u64().expect("panel id")),
            "duplicate id at {title}"
        );
        assert!(
            panel["gridPos"]["w"].as_u64().is_some(),
            "{title}: no gridPos"
        );
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"]["uid"], ds_ref.as_str(), "{title}");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no query");
        for t in targets {
            assert!(t["expr"].as_str().is_some_and(|e| !e.is_empty()), "{title}");
            assert_eq!(t["datasource"]["uid"], ds_ref.as_str(), "{title}");
        }
    }
}

/// Prometheus rule groups whose rules each have a name, an expression, a severity and a
/// summary; the latency rule's threshold is half the default request timeout and says so.
#[test]
fn the_alert_rules_are_well_formed() {
    let rules = alert_rules();
    let groups = rules["groups"].as_sequence().expect("groups");
    let mut names = BTreeSet::new();
    let mut exprs = BTreeMap::new();
    for group in groups {
        assert!(group["name"].as_str().is_some(), "a group without a name");
        for rule in group["rules"].as_sequence().expect("rules") {
            let name = rule["alert"].as_str().expect("alert name").to_owned();
            assert!(names.insert(name.clone()), "duplicate alert {name}");
            assert!(
                rule["labels"]["severity"].as_str().is_some(),
                "{name}: severity"
            );
            assert!(
                rule["annotations"]["summary"].as_str().is_some(),
                "{name}: summary"
            );
            if let Some(f) = rule.get("for") {
                let f = f.as_str().expect("`for` is a duration string");
                assert!(f.ends_with(['s', 'm', 'h']), "{name}: for: {f}");
            }
            exprs.insert(name, rule["expr"].as_str().expect("expr").to_owned());
        }
    }
    let unhealthy = groups
        .iter()
        .flat_map(|g| g["rules"].as_sequence().unwrap())
        .find(|r| {
            r["expr"]
                .as_str()
                .is_some_and(|e| e.contains("ipc_health_status") && e.contains("== 2"))
        })
        .expect("an alert on UNHEALTHY");
    assert_eq!(unhealthy["for"].as_str(), Some("1m"));
    let (latency_name, latency) = exprs
        .iter()
        .find(|(_, e)| e.contains("histogram_quantile(0.99"))
        .expect("a p99 latency alert");
    assert!(latency.trim_end().ends_with("> 15"), "{latency}");
    let latency_rule = groups
        .iter()
        .flat_map(|g| g["rules"].as_sequence().unwrap())
        .find(|r| r["alert"].as_str() == Some(latency_name.as_str()))
        .unwrap();
    let description = latency_rule["annotations"]["description"]
        .as_str()
        .unwrap_or_default();
    assert!(
        description.contains("15 s") && description.contains("30 s"),
        "the annotation must say 15 s is half the 30 s timeout: {description}"
    );
    for needle in [
        "ipc_circuit_breaker_state",
        "ipc_responses_total",
        "nats_reconnects_total[10m]",
    ] {
        assert!(
            exprs.values().any(|e| e.contains(needle)),
            "no alert uses {needle}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Container image and Kubernetes

/// `binary <subcommand> --help` lists every `--option` in `argv` (argv[0] is the binary).
fn assert_cli_exists(argv: &[String], file: &str) {
    assert!(
        argv.first()
            .is_some_and(|b| b.ends_with("/ipc-gateway") || b == "ipc-gateway"),
        "{file}: {argv:?} does not run ipc-gateway"
    );
    let subcommand: Vec<&str> = argv[1..]
        .iter()
        .take_while(|a| !a.starts_with('-'))
        .map(String::as_str)
        .collect();
    let out = Command::new(binary())
        .args(&subcommand)
        .arg("--help")
        .output()
        .expect("running ipc-gateway --help");
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{file}: `ipc-gateway {} --help` failed",
        subcommand.join(" ")
    );
    for option in argv.iter().filter(|a| a.starts_with("--")) {
        let option = option.split('=').next().unwrap();
        assert!(
            help.contains(option),
            "{file}: {option} is not an option of {subcommand:?}:\n{help}"
        );
    }
}

fn containerfile() -> String {
    read(&deploy_dir().join("container/Containerfile"))
}

/// Containerfile instructions with their continuation lines joined, comments dropped.
fn instructions(text: &str) -> Vec<(String, String)> {
    let mut joined = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
        } else {
            current.push_str(trimmed);
            if !current.is_empty() {
                joined.push(std::mem::take(&mut current));
            }
        }
    }
    joined
        .into_iter()
        .map(|l| {
            let (word, rest) = l.split_once(' ').unwrap_or((&l, ""));
            (word.to_ascii_uppercase(), rest.trim().to_owned())
        })
        .collect()
}

/// The image checks /live with the CLI that exists, runs as a non-root uid, serves HTTP on
/// the port it exposes, and keeps the socket in a volume.
#[test]
fn the_container_image_checks_live_with_the_daemons_own_cli() {
    let ins = instructions(&containerfile());
    let get = |word: &str| -> Vec<&str> {
        ins.iter()
            .filter(|(w, _)| w == word)
            .map(|(_, r)| r.as_str())
            .collect()
    };
    assert!(get("FROM").len() >= 2, "not multi-stage");
    let health = get("HEALTHCHECK");
    let [health] = health.as_slice() else {
        panic!("expected one HEALTHCHECK, found {health:?}")
    };
    let cmd = health
        .split_once("CMD")
        .expect("HEALTHCHECK … CMD")
        .1
        .trim();
    let argv: Vec<String> = serde_json::from_str(cmd).expect("HEALTHCHECK CMD in exec (JSON) form");
    assert_eq!(
        &argv[1..],
        ["health", "--live"],
        "the healthcheck must ask /live"
    );
    assert_cli_exists(&argv, "Containerfile");

    let user = get("USER");
    let user = user.last().expect("a USER");
    let uid: u32 = user
        .split(':')
        .next()
        .unwrap()
        .parse()
        .expect("a numeric USER");
    assert_ne!(uid, 0);

    let env: BTreeMap<String, String> = get("ENV")
        .iter()
        .flat_map(|r| r.split_whitespace())
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let http = env.get("CGW_HTTP_ADDR").expect("ENV CGW_HTTP_ADDR");
    assert!(
        http.starts_with("0.0.0.0:"),
        "{http}: unreachable from outside the container"
    );
    let port = http.rsplit(':').next().unwrap();
    assert!(get("EXPOSE")
        .iter()
        .any(|e| e.split_whitespace().any(|p| p == port)));
    let socket = env
        .get("CGW_IPC_SOCKET_PATH")
        .expect("ENV CGW_IPC_SOCKET_PATH");
    let socket_dir = Path::new(socket)
        .parent()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(
        get("VOLUME").iter().any(|v| v.contains(&socket_dir)),
        "the socket's directory {socket_dir} is not a volume"
    );
}

/// The builder stage copies every workspace member: cargo loads the whole workspace even to
/// build one package, so a member added later and not copied would break the image build.
#[test]
fn the_container_build_copies_every_workspace_member() {
    let manifest = read(&workspace_dir().join("Cargo.toml"));
    let members_line = manifest
        .lines()
        .find(|l| l.trim_start().starts_with("members"))
        .expect("workspace members");
    let members: Vec<&str> = members_line.split('"').skip(1).step_by(2).collect();
    assert!(members.contains(&"runtime"), "{members:?}");
    let copies: Vec<String> = instructions(&containerfile())
        .into_iter()
        .filter(|(w, _)| w == "COPY")
        .map(|(_, r)| r)
        .collect();
    for member in members {
        assert!(
            copies
                .iter()
                .any(|c| c.split_whitespace().next() == Some(member)),
            "the Containerfile does not COPY workspace member {member}: {copies:?}"
        );
    }
}

fn sidecar() -> serde_norway::Value {
    let path = deploy_dir().join("k8s/sidecar.yaml");
    serde_norway::from_str(&read(&path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The pod: the gateway probes /live and /ready on the port its CGW_HTTP_ADDR names, any exec
/// probe calls CLI options that exist, both containers mount the socket's directory from one
/// emptyDir and agree on the socket path, and the gateway is locked down.
#[test]
fn the_kubernetes_sidecar_probes_live_and_ready() {
    use serde_norway::Value as Y;
    let pod = sidecar();
    let spec = &pod["spec"];
    let all: Vec<&Y> = ["initContainers", "containers"]
        .iter()
        .filter_map(|k| spec[*k].as_sequence())
        .flatten()
        .collect();
    let gateway = all
        .iter()
        .find(|c| c["name"] == "ipc-gateway")
        .expect("a container named ipc-gateway");
    let ide = all
        .iter()
        .find(|c| c["name"] != "ipc-gateway")
        .expect("an IDE container");
    let env = |c: &Y| -> BTreeMap<String, String> {
        c["env"]
            .as_sequence()
            .map(|s| s.as_slice())
            .unwrap_or_default()
            .iter()
            .map(|e| {
                let name = e["name"].as_str().expect("env name").to_owned();
                (name, e["value"].as_str().unwrap_or_default().to_owned())
            })
            .collect()
    };
    let gateway_env = env(gateway);

    let http = &gateway_env["CGW_HTTP_ADDR"];
    let http_port: u64 = http.rsplit(':').next().unwrap().parse().expect("a port");
    let port_of = |port: &Y| -> u64 {
        match port {
            Y::Number(n) => n.as_u64().unwrap(),
            Y::String(name) => gateway["ports"]
                .as_sequence()
                .expect("ports")
                .iter()
                .find(|p| p["name"].as_str() == Some(name.as_str()))
                .and_then(|p| p["containerPort"].as_u64())
                .unwrap_or_else(|| panic!("no port named {name}")),
            other => panic!("probe port {other:?}"),
        }
    };
    for (probe, path) in [("livenessProbe", "/live"), ("readinessProbe", "/ready")] {
        let get = &gateway[probe]["httpGet"];
        assert_eq!(get["path"].as_str(), Some(path), "{probe}");
        assert_eq!(
            port_of(&get["port"]),
            http_port,
            "{probe} asks another port than {http}"
        );
    }
    for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
        if let Some(cmd) = gateway[probe]["exec"]["command"].as_sequence() {
            let argv: Vec<String> = cmd.iter().map(|a| a.as_str().unwrap().to_owned()).collect();
            assert_cli_exists(&argv, "k8s/sidecar.yaml");
        }
    }

    let socket = &gateway_env["CGW_IPC_SOCKET_PATH"];
    assert_eq!(
        env(ide).get("CGW_IPC_SOCKET_PATH"),
        Some(socket),
        "the IDE looks elsewhere"
    );
    let socket_dir = Path::new(socket).parent().unwrap().to_str().unwrap();
    let volume_at = |c: &Y| -> Option<String> {
        c["volumeMounts"]
            .as_sequence()?
            .iter()
            .find(|m| m["mountPath"].as_str() == Some(socket_dir))
            .and_then(|m| m["name"].as_str().map(str::to_owned))
    };
    let volume = volume_at(gateway).expect("the gateway mounts the socket directory");
    assert_eq!(
        volume_at(ide).as_ref(),
        Some(&volume),
        "the IDE does not share it"
    );
    let declared = spec["volumes"]
        .as_sequence()
        .expect("volumes")
        .iter()
        .find(|v| v["name"].as_str() == Some(volume.as_str()))
        .expect("the shared volume is declared");
    assert!(
        declared.get("emptyDir").is_some(),
        "the socket volume is not an emptyDir"
    );

    let security = &gateway["securityContext"];
    assert_eq!(security["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(security["allowPrivilegeEscalation"].as_bool(), Some(false));
    let non_root = security["runAsNonRoot"]
        .as_bool()
        .or(spec["securityContext"]["runAsNonRoot"].as_bool());
    assert_eq!(non_root, Some(true));
    for kind in ["cpu", "memory"] {
        assert!(
            !gateway["resources"]["limits"][kind].is_null(),
            "no {kind} limit"
        );
    }
}

/// Every CGW_* variable the unit files, the image and the pod set is one the daemon knows
/// (`--help` lists each with its `[env: …]`; a misspelt one would only be warned about), and
/// each file's settings together are a configuration the daemon accepts (`--check-config`).
#[test]
fn deployment_files_set_only_valid_daemon_settings() {
    let out = Command::new(binary())
        .arg("--help")
        .output()
        .expect("running --help");
    let help = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut files: Vec<(&str, BTreeMap<String, String>)> = Vec::new();
    let systemd = deploy_dir().join("systemd");
    for (file, path) in [
        (
            "systemd/ipc-gateway.service",
            systemd.join("ipc-gateway.service"),
        ),
        (
            "systemd/user/ipc-gateway.service",
            systemd.join("user/ipc-gateway.service"),
        ),
    ] {
        let mut env = unit_environment(&unit_settings(&read(&path)));
        // %t is the user's runtime directory; any absolute directory checks the same.
        for value in env.values_mut() {
            *value = value.replace("%t", "/run/user/1000");
        }
        files.push((file, env));
    }
    let image = instructions(&containerfile())
        .iter()
        .filter(|(w, _)| w == "ENV")
        .flat_map(|(_, rest)| {
            rest.split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect::<Vec<_>>()
        })
        .collect();
    files.push(("container/Containerfile", image));
    let pod = sidecar();
    let gateway = pod["spec"]["initContainers"]
        .as_sequence()
        .into_iter()
        .chain(pod["spec"]["containers"].as_sequence())
        .flatten()
        .find(|c| c["name"] == "ipc-gateway")
        .expect("the gateway container");
    let pod_env = gateway["env"]
        .as_sequence()
        .into_iter()
        .flatten()
        .map(|e| {
            let name = e["name"].as_str().expect("env name").to_owned();
            (name, e["value"].as_str().unwrap_or_default().to_owned())
        })
        .collect();
    files.push(("k8s/sidecar.yaml", pod_env));

    let mut problems = Vec::new();
    for (file, env) in &files {
        assert!(!env.is_empty(), "deploy/{file}: no CGW_* settings found");
        for name in env.keys() {
            if !help.contains(&format!("{name}=")) && !help.contains(&format!("env: {name}]")) {
                problems.push(format!(
                    "deploy/{file}: {name} is not in `ipc-gateway --help`"
                ));
            }
        }
        let mut cmd = Command::new(binary());
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("CGW_") {
                cmd.env_remove(key);
            }
        }
        let out = cmd
            .arg("--check-config")
            .envs(env)
            .output()
            .expect("running --check-config");
        if !out.status.success() {
            problems.push(format!(
                "deploy/{file}: --check-config refuses its settings: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

// ---------------------------------------------------------------------------------------------
// `ipc-gateway health`

/// Runs `ipc-gateway health <args>` with no CGW_* variable but `env`.
fn health(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(binary());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("CGW_") {
            cmd.env_remove(key);
        }
    }
    cmd.arg("health")
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("running ipc-gateway health")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A loopback address nothing listens on: a port the kernel handed out and that was closed
/// again at once (port 0, so no two tests pick the same one).
fn closed_address() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding port 0");
    let addr = listener.local_addr().unwrap().to_string();
    drop(listener);
    addr
}

/// `--help` names the options and the exit codes, and the daemon's `--help` lists `health`.
#[test]
fn health_help_explains_options_and_exit_codes() {
    let out = health(&["--help"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let help = stdout(&out);
    for needle in [
        "--addr",
        "--live",
        "CGW_HTTP_ADDR",
        "127.0.0.1:8080",
        "HEALTHY",
        "DEGRADED",
        "UNHEALTHY",
    ] {
        assert!(
            help.contains(needle),
            "health --help does not mention {needle}:\n{help}"
        );
    }
    let out = Command::new(binary())
        .arg("--help")
        .output()
        .expect("running --help");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("health"),
        "--help does not list the health subcommand"
    );
}

/// Nothing listening: exit 2 and a message naming the address and where it came from, also
/// when the shell's other CGW_* variables would not be a valid daemon configuration.
#[test]
fn health_names_an_unreachable_address_and_exits_2() {
    let addr = closed_address();
    let out = health(&["--addr", &addr], &[("CGW_IPC_SOCKET_MODE", "not-octal")]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&addr) && stderr(&out).contains("--addr"),
        "{}",
        stderr(&out)
    );
    assert!(stdout(&out).is_empty());

    let out = health(&["--live"], &[("CGW_HTTP_ADDR", &addr)]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("http://{addr}/live"))
            && stderr(&out).contains("CGW_HTTP_ADDR"),
        "{}",
        stderr(&out)
    );
}

/// A peer that accepts and never answers: exit 2 after the 2 s timeout, not a hang.
#[test]
fn health_gives_up_on_a_silent_peer_after_its_timeout() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding port 0");
    let addr = listener.local_addr().unwrap().to_string();
    // The first binary() of a test process may run `cargo build`: not part of the timing.
    binary();
    let started = Instant::now();
    let out = health(&["--addr", &addr], &[]);
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains(&addr), "{}", stderr(&out));
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(10),
        "took {took:?}"
    );
    drop(listener);
}

/// A test-owned HTTP responder: answers each connection with the next canned response and
/// reports the request line it got. It stands in for the daemon where the daemon cannot
/// easily be made DEGRADED or UNHEALTHY on demand: it tests the CLI's status → exit code
/// mapping, not the daemon.
fn canned_responder(
    responses: Vec<String>,
) -> (String, mpsc::Receiver<String>, thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding port 0");
    let addr = listener.local_addr().unwrap().to_string();
    let (tx, rx) = mpsc::channel();
    let handle = thread::spawn(move || {
        for response in responses {
            let (mut stream, _) = listener.accept().expect("accepting");
            stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            reader.read_line(&mut request_line).unwrap();
            // The rest of the head, so the client never sees a reset for unread bytes.
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap_or(0) > 0 && line != "\r\n" {
                line.clear();
            }
            let _ = tx.send(request_line.trim_end().to_owned());
            stream.write_all(response.as_bytes()).unwrap();
        }
    });
    (addr, rx, handle)
}

fn http_response(code: u16, body: &str) -> String {
    let reason = if code == 200 {
        "OK"
    } else {
        "Service Unavailable"
    };
    format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// HEALTHY → 0, DEGRADED → 1, UNHEALTHY (503) → 2, the body on stdout; an answer that is not
/// the daemon's → 2; `--live` asks /live and maps 200 → 0, anything else → 2.
#[test]
fn health_maps_the_status_to_its_exit_code() {
    let body = |status: &str| format!(r#"{{"status":"{status}","reason":null,"inflight":0}}"#);
    let to_health = "GET /health HTTP/1.1";
    let to_live = "GET /live HTTP/1.1";
    // (options, canned answer, request expected, exit code, stdout: the body or nothing)
    let cases: Vec<(&[&str], String, &str, i32, String)> = vec![
        (
            &[],
            http_response(200, &body("HEALTHY")),
            to_health,
            0,
            body("HEALTHY") + "\n",
        ),
        (
            &[],
            http_response(200, &body("DEGRADED")),
            to_health,
            1,
            body("DEGRADED") + "\n",
        ),
        (
            &[],
            http_response(503, &body("UNHEALTHY")),
            to_health,
            2,
            body("UNHEALTHY") + "\n",
        ),
        (
            &[],
            http_response(200, "<html>not the gateway</html>"),
            to_health,
            2,
            String::new(),
        ),
        (
            &[],
            http_response(404, &body("HEALTHY")),
            to_health,
            2,
            String::new(),
        ),
        (
            &["--live"],
            http_response(200, "alive\n"),
            to_live,
            0,
            "alive\n".into(),
        ),
        (
            &["--live"],
            http_response(503, "stuck\n"),
            to_live,
            2,
            "stuck\n".into(),
        ),
    ];
    let (addr, requests, responder) =
        canned_responder(cases.iter().map(|(_, r, _, _, _)| r.clone()).collect());
    for (args, response, request, code, printed) in &cases {
        let mut argv = vec!["--addr", addr.as_str()];
        argv.extend(args.iter());
        let out = health(&argv, &[]);
        assert_eq!(
            out.status.code(),
            Some(*code),
            "answer {response:?}\nstdout: {}\nstderr: {}",
            stdout(&out),
            stderr(&out)
        );
        assert_eq!(requests.recv_timeout(IO_TIMEOUT).as_deref(), Ok(*request));
        assert_eq!(&stdout(&out), printed, "answer {response:?}");
        if printed.is_empty() {
            assert!(stderr(&out).contains(&addr), "{}", stderr(&out));
        }
    }
    responder.join().expect("the responder");
}

/// A real daemon in stub mode: HEALTHY, exit 0, its /health JSON on stdout; /live answers.
/// Needs the HTTP server (branch `http`).
#[test]
fn health_reports_a_stub_daemon_as_healthy() {
    let (_daemon, addr) = start_with_http();
    let out = health(&["--addr", &addr], &[]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {}\nstderr: {}",
        stdout(&out),
        stderr(&out)
    );
    let json: Value = serde_json::from_str(&stdout(&out)).expect("stdout is JSON");
    assert_eq!(json["status"], "HEALTHY", "{json}");
    assert_eq!(json["breaker"], "closed", "{json}");

    let out = health(&["--live"], &[("CGW_HTTP_ADDR", &addr)]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

// ---------------------------------------------------------------------------------------------
// A daemon with HTTP, and a minimal HTTP client of the tests' own

/// Starts a stub-mode daemon with HTTP on a free port and returns it with the address from its
/// `http_listening` log line.
fn start_with_http() -> (Daemon, String) {
    let mut daemon = Daemon::start(&[("CGW_HTTP_ADDR", "127.0.0.1:0")]);
    let addr = daemon.http_addr().to_string();
    (daemon, addr)
}

/// GET `path` from the daemon at `addr`; panics on any failure.
fn http_get(addr: &str, path: &str) -> http_client::Response {
    let parsed = addr.parse().unwrap_or_else(|e| panic!("{addr}: {e}"));
    http_client::get(parsed, path, None, IO_TIMEOUT).unwrap_or_else(|e| panic!("{e}"))
}
