//! W3C trace context and OTLP/HTTP JSON export.
//!
//! With tracing on (`--otlp-endpoint`), every gateway/waypoint request gets a server span whose
//! id replaces the parent id of the `traceparent` sent upstream (a new trace starts when the
//! request has none), and one child span per plugin callback. Finished spans go through a
//! channel to an exporter thread that batches them (up to 512, or what arrived within 200 ms)
//! and POSTs them to `<endpoint>/v1/traces` — never on a worker. With tracing off, a
//! `traceparent` passes upstream untouched.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{Value, json};

/// A parsed `traceparent`: version 00, trace id, parent span id, flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: bool,
}

impl TraceParent {
    pub fn parse(v: &str) -> Option<Self> {
        let mut parts = v.trim().split('-');
        let version = parts.next()?;
        let trace = parts.next()?;
        let span = parts.next()?;
        let flags = parts.next()?;
        if version.len() != 2 || version == "ff" || trace.len() != 32 || span.len() != 16 {
            return None;
        }
        if version == "00" && parts.next().is_some() {
            return None;
        }
        let mut trace_id = [0u8; 16];
        let mut span_id = [0u8; 8];
        hex_decode(trace, &mut trace_id)?;
        hex_decode(span, &mut span_id)?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        let mut f = [0u8; 1];
        hex_decode(flags.get(..2)?, &mut f)?;
        Some(Self {
            trace_id,
            span_id,
            sampled: f[0] & 1 == 1,
        })
    }

    pub fn header(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            hex(&self.trace_id),
            hex(&self.span_id),
            u8::from(self.sampled)
        )
    }
}

fn hex_decode(s: &str, out: &mut [u8]) -> Option<()> {
    if s.len() != out.len() * 2 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    if s.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[i * 2..i * 2 + 2], 16).ok()?;
    }
    Some(())
}

pub fn hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push_str(&format!("{x:02x}"));
    }
    s
}

pub fn new_span_id() -> [u8; 8] {
    loop {
        let id: [u8; 8] = rand::random();
        if id != [0; 8] {
            return id;
        }
    }
}

pub fn new_trace_id() -> [u8; 16] {
    loop {
        let id: [u8; 16] = rand::random();
        if id != [0; 16] {
            return id;
        }
    }
}

/// One finished span.
#[derive(Debug, Clone)]
pub struct Span {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent: Option<[u8; 8]>,
    pub name: String,
    /// OTLP kind: 1 internal, 2 server.
    pub kind: u8,
    pub start_unix_nanos: u64,
    pub end_unix_nanos: u64,
    pub attributes: Vec<(&'static str, AttrValue)>,
    pub error: bool,
    /// `service.name` of the resource (the gateway, `<name>.<namespace>` as Istio names it).
    pub service: String,
}

#[derive(Debug, Clone)]
pub enum AttrValue {
    Str(String),
    Int(i64),
}

/// A plugin callback timed for a child span.
#[derive(Debug, Clone)]
pub struct PluginSpan {
    pub plugin: std::sync::Arc<str>,
    pub callback: &'static str,
    pub outcome: &'static str,
    pub start_unix_nanos: u64,
    pub end_unix_nanos: u64,
}

/// The exporter's handle: cheap to clone, sending never blocks.
#[derive(Clone)]
pub struct SpanExporter {
    tx: mpsc::Sender<Vec<Span>>,
}

impl SpanExporter {
    /// Starts the exporter thread for `endpoint` (`http://host:port[/base]`).
    pub fn start(endpoint: &str) -> Result<Self, String> {
        let target = OtlpTarget::parse(endpoint)?;
        let (tx, rx) = mpsc::channel::<Vec<Span>>();
        std::thread::Builder::new()
            .name("waystone-otlp".into())
            .spawn(move || export_loop(rx, target))
            .map_err(|e| format!("cannot start the OTLP exporter thread: {e}"))?;
        Ok(Self { tx })
    }

    pub fn send(&self, spans: Vec<Span>) {
        let _ = self.tx.send(spans);
    }
}

#[derive(Debug, Clone)]
struct OtlpTarget {
    host_port: String,
    path: String,
}

impl OtlpTarget {
    fn parse(endpoint: &str) -> Result<Self, String> {
        let rest = endpoint.strip_prefix("http://").ok_or_else(|| {
            format!("OTLP endpoint {endpoint:?}: only http:// endpoints are supported")
        })?;
        let (host_port, base) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        if host_port.is_empty() {
            return Err(format!("OTLP endpoint {endpoint:?} names no host"));
        }
        let path = if base.ends_with("/v1/traces") {
            base.to_string()
        } else {
            format!("{base}/v1/traces")
        };
        Ok(Self {
            host_port: host_port.to_string(),
            path,
        })
    }
}

fn export_loop(rx: mpsc::Receiver<Vec<Span>>, target: OtlpTarget) {
    const MAX_BATCH: usize = 512;
    while let Ok(first) = rx.recv() {
        let mut batch = first;
        let deadline = std::time::Instant::now() + Duration::from_millis(200);
        while batch.len() < MAX_BATCH {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(more) => batch.extend(more),
                Err(_) => break,
            }
        }
        let body = otlp_json(&batch).to_string();
        if let Err(e) = post(&target, body.as_bytes()) {
            tracing::warn!(endpoint = %target.host_port, error = %e, spans = batch.len(), "cannot export spans");
        }
    }
}

fn post(target: &OtlpTarget, body: &[u8]) -> Result<(), String> {
    let addr = target
        .host_port
        .to_socket_addrs()
        .map_err(|e| e.to_string())?
        .next()
        .ok_or("no address")?;
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        target.path,
        target.host_port,
        body.len()
    );
    s.write_all(head.as_bytes())
        .and_then(|_| s.write_all(body))
        .map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let status = String::from_utf8_lossy(&answer)
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .unwrap_or(0);
    if (200..300).contains(&status) {
        Ok(())
    } else {
        Err(format!("the collector answered {status}"))
    }
}

/// The OTLP/JSON `ExportTraceServiceRequest` of `spans`, one resource per gateway.
pub fn otlp_json(spans: &[Span]) -> Value {
    let mut by_service: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
    for s in spans {
        let attributes: Vec<Value> = s
            .attributes
            .iter()
            .map(|(k, v)| {
                let value = match v {
                    AttrValue::Str(s) => json!({ "stringValue": s }),
                    AttrValue::Int(i) => json!({ "intValue": i.to_string() }),
                };
                json!({ "key": k, "value": value })
            })
            .collect();
        by_service.entry(&s.service).or_default().push(json!({
            "traceId": hex(&s.trace_id),
            "spanId": hex(&s.span_id),
            "parentSpanId": s.parent.map(|p| hex(&p)).unwrap_or_default(),
            "name": s.name,
            "kind": s.kind,
            "startTimeUnixNano": s.start_unix_nanos.to_string(),
            "endTimeUnixNano": s.end_unix_nanos.to_string(),
            "attributes": attributes,
            "status": { "code": if s.error { 2 } else { 0 } },
        }));
    }
    let resource_spans: Vec<Value> = by_service
        .into_iter()
        .map(|(service, spans)| {
            json!({
                "resource": { "attributes": [
                    { "key": "service.name", "value": { "stringValue": service } }
                ]},
                "scopeSpans": [{ "scope": { "name": "waystone" }, "spans": spans }]
            })
        })
        .collect();
    json!({ "resourceSpans": resource_spans })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trip_and_rejects() {
        let v = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let t = TraceParent::parse(v).unwrap();
        assert!(t.sampled);
        assert_eq!(t.header(), v);
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "garbage",
        ] {
            assert!(TraceParent::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn endpoints() {
        let t = OtlpTarget::parse("http://127.0.0.1:4318").unwrap();
        assert_eq!(
            (t.host_port.as_str(), t.path.as_str()),
            ("127.0.0.1:4318", "/v1/traces")
        );
        let t = OtlpTarget::parse("http://c:1/otlp/").unwrap();
        assert_eq!(t.path, "/otlp/v1/traces");
        let t = OtlpTarget::parse("http://c:1/v1/traces").unwrap();
        assert_eq!(t.path, "/v1/traces");
        assert!(OtlpTarget::parse("https://c:1").is_err());
    }
}
