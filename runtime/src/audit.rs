//! The audit log (gateway.md section 6, `CGW_AUDIT_LOG`): one JSON line per security-relevant
//! event in a file of its own, mode 0600, opened for append.
//!
//! The core already logs every such event through `tracing` with structured fields, so the
//! audit log is a tracing layer ([`AuditLayer`]) that picks events by their `event` field and
//! writes them again, under the audit names, to the file. The core has no audit API and does
//! not know whether the audit log is on. The layer has its own level filter (see
//! `logging::init`): `CGW_LOG_LEVEL=error` quiets stderr, never the audit log.
//!
//! | core event             | audit record          |
//! |------------------------|-----------------------|
//! | `connection_opened`    | `connection_accepted` |
//! | `connection_rejected`  | `connection_denied`   |
//! | `connection_closed`    | `connection_closed`   |
//! | `config_loaded`        | `config_loaded`       |
//! | `shutdown_started`     | `shutdown_started`    |
//! | `shutdown_complete`    | `shutdown_complete`   |
//! | `shutdown_forced`      | `shutdown_forced`     |
//! | `nats_authenticated`   | `nats_authenticated`  |
//!
//! `nats_authenticated` is the session's line when a NATS link comes up: `server`,
//! `auth_method` (`none`, `user_password`, `token`, `nkey`, `creds`; never the secret) and
//! `tls`.
//!
//! Writing: every record is one `write` of the whole line on an unbuffered `O_APPEND`
//! descriptor, so nothing waits in a buffer when SIGHUP reopens the file or the process
//! exits. All writes happen on the event loop's thread (the core's events) or before it starts
//! (`config_loaded`); the mutex is never contended in practice. A failed write never stops
//! serving: it is counted ([`AuditLog::write_errors`], the `audit_write_errors` field of the
//! SIGUSR1 `stats` line) and reported on stderr (`audit_write_failed`) at most once a minute.
//!
//! Mode: a new file is created with mode 0600 (`open(2)`'s mode argument, never a chmod
//! afterwards). An existing regular file is appended to and, if its mode lets anyone but the
//! owner in, tightened to 0600 with `fchmod` on the open descriptor (logged as
//! `audit_mode_tightened`): the records name peers and the configuration, and a logrotate
//! `create 0640` line should not widen that silently. Non-regular files (a FIFO, a device) are
//! used as they are.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::Layer;

use crate::logging::utc_millis;

/// Mode of the audit file.
const MODE: u32 = 0o600;
/// At most one `audit_write_failed` line on stderr per this interval.
const REPORT_INTERVAL: Duration = Duration::from_secs(60);

/// The core's event names that make an audit record, and the record's name.
const AUDITED: &[(&str, &str)] = &[
    ("connection_opened", "connection_accepted"),
    ("connection_rejected", "connection_denied"),
    ("connection_closed", "connection_closed"),
    ("config_loaded", "config_loaded"),
    ("shutdown_started", "shutdown_started"),
    ("shutdown_complete", "shutdown_complete"),
    ("shutdown_forced", "shutdown_forced"),
    // Hook for the NATS authentication issue; see the module doc.
    ("nats_authenticated", "nats_authenticated"),
];

/// Fields of the core's events that do not go into the record: the stderr log's own
/// bookkeeping, and the free-text message.
const SKIPPED: &[&str] = &["event", "component", "message"];

/// The open audit file, shared by the tracing layer (writes) and the event loop (SIGHUP
/// reopen, the stats line).
#[derive(Clone)]
pub struct AuditLog(Arc<Mutex<State>>);

struct State {
    path: PathBuf,
    file: File,
    write_errors: u64,
    /// When the last `audit_write_failed` line went to stderr.
    last_report: Option<Instant>,
    /// Failed writes since that line, reported with the next one.
    unreported: u64,
}

impl AuditLog {
    /// Opens (or creates, mode 0600) `path` for append; with the old mode if an existing
    /// file had to be tightened, for the caller to log once logging is up. The caller turns an
    /// error into the start's exit code 2.
    pub fn open(path: &Path) -> io::Result<(AuditLog, Option<u32>)> {
        let (file, tightened) = open_file(path)?;
        let log = AuditLog(Arc::new(Mutex::new(State {
            path: path.to_path_buf(),
            file,
            write_errors: 0,
            last_report: None,
            unreported: 0,
        })));
        Ok((log, tightened))
    }

    /// SIGHUP: opens the path again (logrotate has renamed the old file, and may have created
    /// the new one). If that fails the old descriptor is kept, so records still land in the
    /// renamed file rather than nowhere, and the next SIGHUP tries again.
    pub fn reopen(&self) -> io::Result<()> {
        let mut state = self.lock();
        let (file, tightened) = open_file(&state.path)?;
        state.file = file;
        let path = state.path.clone();
        drop(state);
        log_tightened(&path, tightened);
        Ok(())
    }

    pub fn path(&self) -> PathBuf {
        self.lock().path.clone()
    }

    /// Records that could not be written since the start.
    pub fn write_errors(&self) -> u64 {
        self.lock().write_errors
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write_record(&self, line: &str) {
        let mut state = self.lock();
        if let Err(e) = state.file.write_all(line.as_bytes()) {
            state.write_errors += 1;
            state.unreported += 1;
            let now = Instant::now();
            if state
                .last_report
                .is_none_or(|t| now.duration_since(t) >= REPORT_INTERVAL)
            {
                state.last_report = Some(now);
                let failed = std::mem::take(&mut state.unreported);
                // Straight to stderr in the log's format: a tracing event from inside a layer
                // would come back to this layer with the lock held.
                let report = serde_json::json!({
                    "timestamp": now_utc(),
                    "level": "WARN",
                    "event": "audit_write_failed",
                    "component": "audit",
                    "path": state.path.display().to_string(),
                    "error": e.to_string(),
                    "failed_since_last_report": failed,
                    "audit_write_errors": state.write_errors,
                    "message": "cannot write the audit log; serving goes on, records are lost \
                                (reported at most once a minute)",
                });
                let _ = writeln!(io::stderr().lock(), "{report}");
            }
        }
    }
}

/// Opens `path` for append, creating it with mode 0600; an existing regular file with a
/// looser mode is set to 0600, and its old mode returned.
fn open_file(path: &Path) -> io::Result<(File, Option<u32>)> {
    let file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(MODE)
        .open(path)?;
    let meta = file.metadata()?;
    let mode = meta.mode() & 0o777;
    if meta.file_type().is_file() && mode & !MODE != 0 {
        file.set_permissions(std::fs::Permissions::from_mode(MODE))?;
        return Ok((file, Some(mode)));
    }
    Ok((file, None))
}

/// Logs (stderr) that an existing audit file's mode was tightened.
pub fn log_tightened(path: &Path, old_mode: Option<u32>) {
    if let Some(mode) = old_mode {
        tracing::warn!(event = "audit_mode_tightened", component = "audit",
                       path = %path.display(), old_mode = format!("{mode:04o}"),
                       "the audit log let others in; its mode is now 0600");
    }
}

fn now_utc() -> String {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    utc_millis(since.as_millis() as u64)
}

/// The tracing layer that writes audit records.
pub struct AuditLayer(pub AuditLog);

impl<S: Subscriber> Layer<S> for AuditLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let Some(name) = fields.event.as_deref().and_then(audit_name) else {
            return;
        };
        self.0.write_record(&record_line(name, fields.values));
    }
}

/// `{"timestamp":…,"event":…,"conn_id":…,` then the other fields (sorted by name), and a
/// newline: the leading fields in the stderr log's order, for people reading the file.
fn record_line(name: &str, mut fields: Map<String, Value>) -> String {
    let mut line = format!(
        "{{\"timestamp\":{},\"event\":{}",
        Value::String(now_utc()),
        Value::String(name.to_string())
    );
    if let Some(conn_id) = fields.remove("conn_id") {
        line.push_str(&format!(",\"conn_id\":{conn_id}"));
    }
    for (key, value) in &fields {
        line.push_str(&format!(",{}:{value}", Value::String(key.clone())));
    }
    line.push_str("}\n");
    line
}

fn audit_name(core_event: &str) -> Option<&'static str> {
    AUDITED
        .iter()
        .find(|(core, _)| *core == core_event)
        .map(|(_, audit)| *audit)
}

/// An event's fields as JSON values.
#[derive(Default)]
struct Fields {
    event: Option<String>,
    values: Map<String, Value>,
}

impl Fields {
    fn put(&mut self, field: &Field, value: Value) {
        if !SKIPPED.contains(&field.name()) {
            self.values.insert(field.name().to_string(), value);
        }
    }
}

impl Visit for Fields {
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "event" {
            self.event = Some(value.to_string());
        }
        self.put(field, value.into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let text = format!("{value:?}");
        if field.name() == "event" {
            self.event = Some(text.clone());
        }
        // `config_loaded` carries the (already masked) configuration as JSON text: keep it
        // structured in the record.
        if field.name() == "config" {
            if let Ok(v @ Value::Object(_)) = serde_json::from_str(&text) {
                return self.put(field, v);
            }
        }
        self.put(field, Value::String(text));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    fn records(path: &Path) -> Vec<Value> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Only the audited events are written, renamed, with their structured fields (a `None`
    /// field left out, the config as an object) and without component or message.
    #[test]
    fn selects_and_renames_events() {
        let dir = tempfile_dir();
        let path = dir.join("audit.jsonl");
        let (log, _) = AuditLog::open(&path).unwrap();
        let subscriber = tracing_subscriber::registry().with(AuditLayer(log.clone()));
        tracing::subscriber::with_default(subscriber, || {
            let none: Option<u32> = None;
            tracing::info!(
                event = "connection_opened",
                component = "ipc_bridge",
                conn_id = 3u64,
                uid = Some(1000u32),
                gid = none,
                pid = Some(42i32)
            );
            tracing::info!(event = "request_received", conn_id = 3u64);
            tracing::info!(event = "config_loaded", component = "config",
                           config = %serde_json::json!({"a": 1}));
            tracing::warn!(event = "connection_rejected", conn_id = 4u64, uid = 5u32,
                           reason = "permission_denied", message = %"no");
        });
        let r = records(&path);
        assert_eq!(r.len(), 3, "{r:?}");
        assert_eq!(r[0]["event"], "connection_accepted");
        assert_eq!(r[0]["conn_id"], 3);
        assert_eq!(r[0]["uid"], 1000);
        assert_eq!(r[0]["pid"], 42);
        assert!(r[0].get("gid").is_none() && r[0].get("component").is_none());
        assert_eq!(r[1]["config"], serde_json::json!({"a": 1}));
        assert_eq!(r[2]["event"], "connection_denied");
        assert_eq!(r[2]["reason"], "permission_denied");
        assert!(r[2].get("message").is_none());
        assert_eq!(r[0]["timestamp"].as_str().unwrap().len(), 24);
        let first = std::fs::read_to_string(&path).unwrap();
        assert!(
            first.starts_with("{\"timestamp\":")
                && first.contains(r#"","event":"connection_accepted","conn_id":3,"#),
            "{first}"
        );
        assert_eq!(log.write_errors(), 0);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A new file is created 0600; an existing 0644 one is kept, appended to, and tightened.
    #[test]
    fn mode_is_0600() {
        let dir = tempfile_dir();
        let fresh = dir.join("new.jsonl");
        AuditLog::open(&fresh).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&fresh), 0o600);
        let old = dir.join("old.jsonl");
        std::fs::write(&old, "{\"kept\":true}\n").unwrap();
        std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o644)).unwrap();
        let (log, tightened) = AuditLog::open(&old).unwrap();
        assert_eq!(tightened, Some(0o644));
        log.write_record(&record_line("test", Map::new()));
        assert_eq!(mode(&old), 0o600);
        assert_eq!(records(&old).len(), 2);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A reopen that fails (the path is now a directory) keeps the old descriptor: records go
    /// on into the renamed file, none is lost or counted as failed.
    #[test]
    fn failed_reopen_keeps_the_old_file() {
        let dir = tempfile_dir();
        let path = dir.join("audit.jsonl");
        let rotated = dir.join("audit.jsonl.1");
        let (log, _) = AuditLog::open(&path).unwrap();
        std::fs::rename(&path, &rotated).unwrap();
        std::fs::create_dir(&path).unwrap();
        assert!(log.reopen().is_err());
        log.write_record(&record_line("after", Map::new()));
        assert_eq!(records(&rotated).len(), 1);
        assert_eq!(log.write_errors(), 0);
        let _ = std::fs::remove_dir_all(dir);
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "cgw-audit-unit-{}-{}",
            std::process::id(),
            std::thread::current()
                .name()
                .unwrap_or("t")
                .replace(':', "_")
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
