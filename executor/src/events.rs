//! Structured JSON event lines for the runner's log (one object per line), never the job log.
//!
//! gitlab-runner copies a driver's stderr of `prepare`/`run` into the job log, so the sink is
//! configurable (`events_log`): `runner` (the default: the stderr of the process that started us,
//! i.e. gitlab-runner's own log), `stderr`, `off`, or a file (e.g. `/proc/1/fd/2` in the manager
//! pod). Nothing but an explicit `stderr` ever writes to our stderr.

use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

#[derive(Clone)]
pub struct Events {
    sink: Arc<Mutex<Sink>>,
    /// Fields added to every line (command, job id, pod).
    context: Arc<Mutex<Map<String, Value>>>,
}

enum Sink {
    Off,
    Stderr,
    File(std::fs::File),
}

impl Events {
    /// Opens the sink; an unusable one is off (observability must never fail a job, and a
    /// fallback to our stderr would put event lines in the job log).
    #[must_use]
    pub fn open(spec: &str) -> Self {
        let append = |path: &str| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_or(Sink::Off, Sink::File)
        };
        let sink = match spec {
            "off" | "" => Sink::Off,
            "stderr" => Sink::Stderr,
            // gitlab-runner starts each stage command directly: its stderr is the runner's log.
            // Opening it through /proc needs the same user, which the runner and its driver are.
            "runner" => append(&format!(
                "/proc/{}/fd/2",
                std::os::unix::process::parent_id()
            )),
            path => append(path),
        };
        Self {
            sink: Arc::new(Mutex::new(sink)),
            context: Arc::new(Mutex::new(Map::new())),
        }
    }

    pub fn set_context(&self, key: &str, value: impl Into<Value>) {
        if let Ok(mut c) = self.context.lock() {
            c.insert(key.to_string(), value.into());
        }
    }

    /// Writes one line: `{"ts":..., "level":..., "event":..., <context>, <fields>}`.
    pub fn emit(&self, level: &str, event: &str, fields: Value) {
        let mut line = Map::new();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        line.insert("ts".into(), Value::from(now.as_secs_f64()));
        line.insert("level".into(), level.into());
        // GKE Cloud Logging reads `severity`.
        line.insert("severity".into(), level.to_ascii_uppercase().into());
        line.insert("event".into(), event.into());
        if let Ok(c) = self.context.lock() {
            line.extend(c.clone());
        }
        if let Value::Object(f) = fields {
            line.extend(f);
        }
        let mut text = Value::Object(line).to_string();
        text.push('\n');
        if let Ok(mut sink) = self.sink.lock() {
            // A single write per line keeps lines whole when several processes append.
            let _ = match &mut *sink {
                Sink::Off => Ok(()),
                Sink::Stderr => std::io::stderr().write_all(text.as_bytes()),
                Sink::File(f) => f.write_all(text.as_bytes()),
            };
        }
    }

    pub fn info(&self, event: &str, fields: Value) {
        self.emit("info", event, fields);
    }

    pub fn warn(&self, event: &str, fields: Value) {
        self.emit("warning", event, fields);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unusable_sink_is_off_never_stderr() {
        let ev = Events::open("/nonexistent-dir/events.log");
        assert!(matches!(*ev.sink.lock().unwrap(), Sink::Off));
        let ev = Events::open("runner");
        assert!(!matches!(*ev.sink.lock().unwrap(), Sink::Stderr));
    }

    #[test]
    fn lines_are_json_with_context() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ev.log");
        let ev = Events::open(path.to_str().unwrap());
        ev.set_context("command", "run");
        ev.info(
            "stage_end",
            serde_json::json!({"stage": "build_script", "exit_code": 0}),
        );
        ev.warn("api_retry", serde_json::json!({"attempt": 1}));
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["event"], "stage_end");
        assert_eq!(lines[0]["command"], "run");
        assert_eq!(lines[0]["stage"], "build_script");
        assert_eq!(lines[1]["severity"], "WARNING");
    }
}
