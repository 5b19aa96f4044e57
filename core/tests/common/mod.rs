//! Support shared by the core's integration tests.

/// The fields of each tracing event emitted while it is the thread's subscriber.
#[derive(Clone, Default)]
pub struct LogCapture(pub std::sync::Arc<std::sync::Mutex<Vec<LogEvent>>>);

/// One event's fields, as (name, value) text.
pub type LogEvent = Vec<(String, String)>;

struct LogFields(Vec<(String, String)>);

impl tracing::field::Visit for LogFields {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.push((field.name().to_owned(), value.to_owned()));
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.push((field.name().to_owned(), format!("{value:?}")));
    }
}

impl tracing::Subscriber for LogCapture {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut fields = LogFields(Vec::new());
        event.record(&mut fields);
        self.0.lock().unwrap().push(fields.0);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// Runs `scenario` under a [`LogCapture`] and returns what it logged. With more than one
/// subscriber, tracing computes a call site's interest from whichever thread registers it
/// first, so a second (idle) one is installed to make it consult both; the call sites are
/// registered by a first run and their interest recomputed once the capture is in place.
pub fn capture_logs(scenario: impl Fn()) -> LogCapture {
    scenario();
    let logs = LogCapture::default();
    tracing::subscriber::with_default(LogCapture::default(), || {
        tracing::subscriber::with_default(logs.clone(), || {
            tracing::callsite::rebuild_interest_cache();
            scenario();
        });
    });
    logs
}
