//! Access logs: Istio's default text line (Envoy's format with `response_code_details`) or
//! its JSON form, one line per request, per gateway. Lines are formatted on the worker and
//! written by one writer thread, so a slow disk or terminal never stalls a request.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use serde::Serialize;
use waystone_model::snapshot::AccessLogFormat;

/// What one access log line says. Absent values print as `-` (text) or `null` (JSON).
#[derive(Debug, Clone, Default, Serialize)]
pub struct AccessRecord {
    /// RFC 3339 with milliseconds, UTC.
    pub start_time: String,
    pub method: String,
    pub path: String,
    pub protocol: String,
    pub response_code: u16,
    pub response_flags: &'static str,
    pub response_code_details: String,
    pub connection_termination_details: Option<String>,
    pub upstream_transport_failure_reason: Option<String>,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    /// Milliseconds.
    pub duration: u64,
    pub upstream_service_time: Option<String>,
    pub x_forwarded_for: Option<String>,
    pub user_agent: Option<String>,
    pub request_id: Option<String>,
    pub authority: String,
    pub upstream_host: Option<String>,
    pub upstream_cluster: Option<String>,
    pub upstream_local_address: Option<String>,
    pub downstream_local_address: String,
    pub downstream_remote_address: String,
    pub requested_server_name: Option<String>,
    pub route_name: Option<String>,
    /// `namespace/name` of the gateway or waypoint that served the request (not in Istio's
    /// format; JSON only, so one file can hold several gateways' lines).
    pub gateway: String,
}

fn dash(v: &Option<String>) -> &str {
    v.as_deref().filter(|s| !s.is_empty()).unwrap_or("-")
}

impl AccessRecord {
    /// Istio's default text format:
    /// `[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%"
    /// %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS%
    /// "%UPSTREAM_TRANSPORT_FAILURE_REASON%" %BYTES_RECEIVED% %BYTES_SENT% %DURATION%
    /// %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%"
    /// "%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%" %UPSTREAM_CLUSTER_RAW%
    /// %UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS%
    /// %REQUESTED_SERVER_NAME% %ROUTE_NAME%`
    pub fn text(&self) -> String {
        let mut s = String::with_capacity(256);
        let _ = write!(
            s,
            "[{}] \"{} {} {}\" {} {} {} {} \"{}\" {} {} {} {} \"{}\" \"{}\" \"{}\" \"{}\" \"{}\" {} {} {} {} {} {}",
            self.start_time,
            self.method,
            self.path,
            self.protocol,
            self.response_code,
            self.response_flags,
            self.response_code_details,
            dash(&self.connection_termination_details),
            dash(&self.upstream_transport_failure_reason),
            self.bytes_received,
            self.bytes_sent,
            self.duration,
            dash(&self.upstream_service_time),
            dash(&self.x_forwarded_for),
            dash(&self.user_agent),
            dash(&self.request_id),
            self.authority,
            dash(&self.upstream_host),
            dash(&self.upstream_cluster),
            dash(&self.upstream_local_address),
            self.downstream_local_address,
            self.downstream_remote_address,
            dash(&self.requested_server_name),
            dash(&self.route_name),
        );
        s
    }

    pub fn json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn line(&self, format: AccessLogFormat) -> Option<String> {
        match format {
            AccessLogFormat::Off => None,
            AccessLogFormat::Text => Some(self.text()),
            AccessLogFormat::Json => Some(self.json()),
        }
    }
}

/// Where access log lines go: a writer thread fed through a channel.
#[derive(Clone)]
pub struct AccessLogSink {
    tx: mpsc::Sender<String>,
}

impl AccessLogSink {
    /// Lines to stdout (`None`) or appended to `file`.
    pub fn start(file: Option<&Path>) -> std::io::Result<Self> {
        let mut out: Box<dyn std::io::Write + Send> = match file {
            Some(p) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)?,
            ),
            None => Box::new(std::io::stdout()),
        };
        let (tx, rx) = mpsc::channel::<String>();
        let target: Option<PathBuf> = file.map(Path::to_path_buf);
        std::thread::Builder::new()
            .name("waystone-access-log".into())
            .spawn(move || {
                let mut buf = Vec::with_capacity(64 << 10);
                // Blocks for the first line, then takes whatever else is queued, so a burst
                // becomes one write; ends when every sender is gone.
                while let Ok(line) = rx.recv() {
                    buf.extend_from_slice(line.as_bytes());
                    buf.push(b'\n');
                    while let Ok(more) = rx.try_recv() {
                        buf.extend_from_slice(more.as_bytes());
                        buf.push(b'\n');
                        if buf.len() > 1 << 20 {
                            break;
                        }
                    }
                    if let Err(e) = out.write_all(&buf).and_then(|_| out.flush()) {
                        tracing::warn!(file = ?target, error = %e, "cannot write the access log");
                    }
                    buf.clear();
                }
            })?;
        Ok(Self { tx })
    }

    pub fn write(&self, line: String) {
        let _ = self.tx.send(line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> AccessRecord {
        AccessRecord {
            start_time: "2025-01-02T03:04:05.678Z".into(),
            method: "GET".into(),
            path: "/productpage".into(),
            protocol: "HTTP/1.1".into(),
            response_code: 401,
            response_flags: "-",
            response_code_details: "wasm:default.basic-auth-at-gateway:401".into(),
            bytes_received: 0,
            bytes_sent: 0,
            duration: 1,
            user_agent: Some("curl/8".into()),
            request_id: Some("abc".into()),
            authority: "127.0.0.1".into(),
            downstream_local_address: "127.0.0.1:80".into(),
            downstream_remote_address: "127.0.0.1:5555".into(),
            route_name: Some("default/bookinfo/0".into()),
            gateway: "default/bookinfo-gateway".into(),
            ..Default::default()
        }
    }

    #[test]
    fn text_is_istios_default_format() {
        assert_eq!(
            record().text(),
            "[2025-01-02T03:04:05.678Z] \"GET /productpage HTTP/1.1\" 401 - \
             wasm:default.basic-auth-at-gateway:401 - \"-\" 0 0 1 - \"-\" \"curl/8\" \"abc\" \
             \"127.0.0.1\" \"-\" - - 127.0.0.1:80 127.0.0.1:5555 - default/bookinfo/0"
        );
    }

    #[test]
    fn json_names_the_plugin() {
        let v: serde_json::Value = serde_json::from_str(&record().json()).unwrap();
        assert_eq!(
            v["response_code_details"],
            "wasm:default.basic-auth-at-gateway:401"
        );
        assert_eq!(v["response_code"], 401);
        assert_eq!(v["upstream_host"], serde_json::Value::Null);
        assert!(record().line(AccessLogFormat::Off).is_none());
    }

    #[test]
    fn file_sink_appends_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let sink = AccessLogSink::start(Some(&path)).unwrap();
        sink.write("one".into());
        sink.write("two".into());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if text == "one\ntwo\n" {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{text:?}");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}
