//! Differential-test plugin on the Rust SDK, proxy-wasm 0.2 (ABI 0.2.1).
//!
//! One module exercises every feature; the request header `x-test` picks the
//! scenario, so one corpus (tests/differential/rust_v02.yaml) drives it through
//! Envoy and Waystone alike. Every stream logs `end` from `on_log`: the harness
//! waits for that line before it reads a case's log lines.

use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MetricType, Status};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

const TICKS_KEY: &str = "rust_v02.ticks";
const QUEUE_KEY: &str = "rust_v02.queue_last";

#[derive(Default, Clone)]
struct Config {
    upstream: String,
    queue: String,
    tick_ms: u64,
}

#[derive(Default)]
struct Root {
    config: Config,
    queue_id: Option<u32>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_vm_start(&mut self, _size: usize) -> bool {
        proxy_wasm::hostcalls::log(LogLevel::Info, "vm start").is_ok()
    }

    fn on_configure(&mut self, _size: usize) -> bool {
        let raw = self.get_plugin_configuration().unwrap_or_default();
        let json: serde_json::Value = match serde_json::from_slice(&raw) {
            Ok(v) => v,
            Err(e) => {
                log_at(LogLevel::Error, &format!("bad configuration: {e}"));
                return false;
            }
        };
        if json.get("refuse").and_then(|v| v.as_bool()) == Some(true) {
            log_at(LogLevel::Warn, "configuration refused on purpose");
            return false;
        }
        let text = |k: &str| {
            json.get(k)
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_string()
        };
        self.config = Config {
            upstream: text("upstream"),
            queue: text("queue"),
            tick_ms: json.get("tick_ms").and_then(|v| v.as_u64()).unwrap_or(0),
        };
        if !self.config.queue.is_empty() {
            self.queue_id = Some(self.register_shared_queue(&self.config.queue));
        }
        if self.config.tick_ms > 0 {
            self.set_tick_period(Duration::from_millis(self.config.tick_ms));
        }
        log_at(
            LogLevel::Info,
            &format!("configured with {} bytes", raw.len()),
        );
        true
    }

    fn on_tick(&mut self) {
        // A CAS loop: concurrent roots (one per worker) must never lose a tick.
        loop {
            let (value, cas) = self.get_shared_data(TICKS_KEY);
            let n = value.map(|v| parse_u64(&v)).unwrap_or(0) + 1;
            match self.set_shared_data(TICKS_KEY, Some(n.to_string().as_bytes()), cas) {
                Err(Status::CasMismatch) => continue,
                _ => break,
            }
        }
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        while let Ok(Some(item)) = self.dequeue_shared_queue(queue_id) {
            let _ = self.set_shared_data(QUEUE_KEY, Some(&item), None);
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream {
            config: self.config.clone(),
            queue_id: self.queue_id,
            ..Default::default()
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

#[derive(Default)]
struct Stream {
    config: Config,
    queue_id: Option<u32>,
    test: String,
    mode: String,
    response_headers: Vec<(String, String)>,
}

fn log_at(level: LogLevel, msg: &str) {
    let _ = hostcalls::log(level, msg);
}

fn parse_u64(b: &[u8]) -> u64 {
    std::str::from_utf8(b)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn show(b: Option<Vec<u8>>) -> String {
    match b {
        Some(v) => String::from_utf8_lossy(&v).into_owned(),
        None => "<none>".into(),
    }
}

fn show_int(b: Option<Vec<u8>>) -> String {
    match b {
        Some(v) if v.len() == 8 => i64::from_le_bytes(v.try_into().expect("8 bytes")).to_string(),
        other => show(other),
    }
}

impl Stream {
    fn reply(&self, status: u32, body: &str, extra: &[(&str, &str)]) -> Action {
        let mut headers = vec![("x-plugin", "rust_v02")];
        headers.extend_from_slice(extra);
        self.send_http_response(status, headers, Some(body.as_bytes()));
        Action::Pause
    }

    fn headers_scenario(&mut self) -> Action {
        self.add_http_request_header("x-added", "by-plugin");
        self.add_http_request_header("x-multi", "second");
        self.set_http_request_header("x-replace", Some("replaced"));
        self.set_http_request_header("x-absent-replaced", Some("created"));
        self.remove_http_request_header("x-remove");
        let got = self.get_http_request_header("x-get");
        log_at(
            LogLevel::Info,
            &format!("x-get={}", got.as_deref().unwrap_or("<none>")),
        );
        let missing = self.get_http_request_header("x-missing");
        log_at(LogLevel::Info, &format!("x-missing={}", missing.is_some()));
        // Sorted: the order after a replace is the "order" scenario's subject.
        let mut ours = self.test_headers();
        ours.sort();
        log_at(LogLevel::Info, &format!("x- headers: {}", ours.join(",")));
        Action::Continue
    }

    /// The request's `x-` headers other than those a proxy adds by itself.
    fn test_headers(&self) -> Vec<String> {
        self.get_http_request_headers()
            .iter()
            .filter(|(k, _)| {
                k.starts_with("x-") && k != "x-request-id" && !k.starts_with("x-forwarded-")
            })
            .map(|(k, v)| format!("{k}={v}"))
            .collect()
    }

    fn set_headers_scenario(&mut self) -> Action {
        // Replaces the whole map, keeping pseudo-headers and host.
        let keep: Vec<(String, String)> = self
            .get_http_request_headers()
            .into_iter()
            .filter(|(k, _)| k.starts_with(':') || !k.starts_with("x-"))
            .collect();
        let mut map: Vec<(&str, &str)> =
            keep.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        map.push(("x-set-all", "1"));
        self.set_http_request_headers(map);
        Action::Continue
    }

    fn props_scenario(&mut self) -> Action {
        for path in [
            vec!["request", "path"],
            vec!["request", "url_path"],
            vec!["request", "method"],
            vec!["request", "scheme"],
            vec!["request", "headers", "x-prop"],
            vec!["request", "useragent"],
            vec!["plugin_name"],
            vec!["plugin_root_id"],
            vec!["no_such_property"],
        ] {
            let v = self.get_property(path.clone());
            log_at(
                LogLevel::Info,
                &format!("property {}={}", path.join("."), show(v)),
            );
        }
        let port = self.get_property(vec!["destination", "port"]);
        log_at(
            LogLevel::Info,
            &format!(
                "destination.port is 8 bytes: {}",
                port.map(|p| p.len() == 8).unwrap_or(false)
            ),
        );
        self.set_property(vec!["rust_v02_mark"], Some(b"marked"));
        let back = self.get_property(vec!["rust_v02_mark"]);
        log_at(
            LogLevel::Info,
            &format!("set_property read back {}", show(back)),
        );
        Action::Continue
    }

    fn shared_scenario(&mut self) -> Action {
        let key = self
            .get_http_request_header("x-key")
            .unwrap_or_else(|| "k".into());
        let value = self.get_http_request_header("x-value").unwrap_or_default();
        let (before, cas) = self.get_shared_data(&key);
        let first = self.set_shared_data(&key, Some(value.as_bytes()), cas);
        // The same (now stale) CAS again must fail with CasMismatch when a CAS was held.
        let second = match cas {
            Some(_) => format!("{:?}", self.set_shared_data(&key, Some(b"stale"), cas)),
            None => "no-cas".into(),
        };
        let (after, _) = self.get_shared_data(&key);
        let before = show(before);
        let after = show(after);
        log_at(
            LogLevel::Info,
            &format!("shared {key}: before={before} first={first:?} stale={second} after={after}"),
        );
        self.reply(
            200,
            "shared\n",
            &[
                ("x-before", &before),
                ("x-after", &after),
                ("x-stale", &second),
            ],
        )
    }

    fn metrics_scenario(&mut self) -> Action {
        let define = |t, n| hostcalls::define_metric(t, n).expect("define_metric");
        let c = define(MetricType::Counter, "rust_v02_requests");
        let g = define(MetricType::Gauge, "rust_v02_gauge");
        let h = define(MetricType::Histogram, "rust_v02_latency");
        hostcalls::increment_metric(c, 1).expect("increment counter");
        hostcalls::record_metric(g, 42).expect("record gauge");
        hostcalls::increment_metric(g, -2).expect("decrement gauge");
        hostcalls::record_metric(h, 7).expect("record histogram");
        let cv = hostcalls::get_metric(c)
            .map(|v| v.to_string())
            .unwrap_or_else(|e| format!("{e:?}"));
        let gv = hostcalls::get_metric(g)
            .map(|v| v.to_string())
            .unwrap_or_else(|e| format!("{e:?}"));
        log_at(LogLevel::Info, &format!("metrics counter={cv} gauge={gv}"));
        self.reply(200, "metrics\n", &[("x-counter", &cv), ("x-gauge", &gv)])
    }
}

impl Context for Stream {
    fn on_http_call_response(
        &mut self,
        _token: u32,
        n_headers: usize,
        body_size: usize,
        n_trailers: usize,
    ) {
        let status = self
            .get_http_call_response_header(":status")
            .unwrap_or_default();
        let body = self
            .get_http_call_response_body(0, body_size)
            .unwrap_or_default();
        let echoed = self
            .get_http_call_response_header("x-echo-method")
            .unwrap_or_default();
        log_at(
            LogLevel::Info,
            &format!(
                "http_call response status={status} headers>0={} body={} trailers={n_trailers} method={echoed}",
                n_headers > 0,
                body.len()
            ),
        );
        self.set_http_request_header("x-callout-status", Some(&status));
        self.set_http_request_header("x-callout-body-bytes", Some(&body.len().to_string()));
        self.resume_http_request();
    }
}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _n: usize, eos: bool) -> Action {
        self.test = self.get_http_request_header("x-test").unwrap_or_default();
        self.mode = self.get_http_request_header("x-mode").unwrap_or_default();
        log_at(
            LogLevel::Debug,
            &format!("request headers test={} eos={eos}", self.test),
        );
        match self.test.as_str() {
            "headers" => self.headers_scenario(),
            "set-headers" => self.set_headers_scenario(),
            "order" => {
                self.set_http_request_header("x-first", Some("replaced"));
                self.add_http_request_header("x-third", "added");
                log_at(
                    LogLevel::Info,
                    &format!("order: {}", self.test_headers().join(",")),
                );
                Action::Continue
            }
            "props-nested" => {
                self.set_property(vec!["rust_v02", "nested"], Some(b"deep"));
                let back = self.get_property(vec!["rust_v02", "nested"]);
                log_at(
                    LogLevel::Info,
                    &format!("nested set_property read back {}", show(back)),
                );
                Action::Continue
            }
            "local-empty" => {
                self.send_http_response(204, vec![("x-plugin", "rust_v02")], None);
                Action::Pause
            }
            "config-buffer" => {
                let cfg = hostcalls::get_buffer(
                    proxy_wasm::types::BufferType::PluginConfiguration,
                    0,
                    usize::MAX,
                )
                .ok()
                .flatten()
                .unwrap_or_default();
                self.reply(200, &String::from_utf8_lossy(&cfg), &[])
            }
            "body" => {
                // The body may change size: the length header would be stale.
                self.set_http_request_header("content-length", None);
                Action::Continue
            }
            "local" => self.reply(
                self.mode.parse().unwrap_or(403),
                "denied by rust_v02\n",
                &[
                    ("x-local", "yes"),
                    ("set-cookie", "a=1"),
                    ("set-cookie", "b=2"),
                ],
            ),
            "props" => self.props_scenario(),
            "shared" => self.shared_scenario(),
            "metrics" => self.metrics_scenario(),
            "config" => {
                let upstream = self.config.upstream.clone();
                self.reply(200, "config\n", &[("x-upstream", &upstream)])
            }
            "loglevel" => {
                let level = hostcalls::get_log_level()
                    .map(|l| (l as u32).to_string())
                    .unwrap_or_else(|e| format!("{e:?}"));
                self.reply(200, "loglevel\n", &[("x-log-level", &level)])
            }
            "log" => {
                for (level, name) in [
                    (LogLevel::Trace, "trace"),
                    (LogLevel::Debug, "debug"),
                    (LogLevel::Info, "info"),
                    (LogLevel::Warn, "warn"),
                    (LogLevel::Error, "error"),
                    (LogLevel::Critical, "critical"),
                ] {
                    log_at(level, &format!("a {name} line"));
                }
                Action::Continue
            }
            "queue" => {
                let value = self.get_http_request_header("x-value").unwrap_or_default();
                let r = match self.queue_id {
                    Some(id) => format!(
                        "{:?}",
                        self.enqueue_shared_queue(id, Some(value.as_bytes()))
                    ),
                    None => "no queue configured".into(),
                };
                log_at(LogLevel::Info, &format!("enqueue {value}: {r}"));
                self.reply(200, "queued\n", &[("x-enqueue", &r)])
            }
            "queue-read" => {
                let (v, _) = self.get_shared_data(QUEUE_KEY);
                self.reply(200, "queue-read\n", &[("x-queue-last", &show(v))])
            }
            "tick" => {
                let (v, _) = self.get_shared_data(TICKS_KEY);
                let ticked = v.map(|v| parse_u64(&v) > 0).unwrap_or(false);
                self.reply(
                    200,
                    "tick\n",
                    &[("x-ticked", if ticked { "yes" } else { "no" })],
                )
            }
            "httpcall" => {
                let upstream = self.config.upstream.clone();
                let path = self
                    .get_http_request_header("x-callout-path")
                    .unwrap_or_else(|| "/callout".into());
                let r = self.dispatch_http_call(
                    &upstream,
                    vec![
                        (":method", "POST"),
                        (":path", &path),
                        (":authority", "echo.default.svc.cluster.local"),
                        ("x-from", "rust_v02"),
                    ],
                    Some(b"callout body"),
                    vec![],
                    Duration::from_secs(5),
                );
                match r {
                    Ok(_) => Action::Pause,
                    Err(e) => self.reply(500, &format!("dispatch failed: {e:?}\n"), &[]),
                }
            }
            "httpcall-bad" => {
                let r = self.dispatch_http_call(
                    "no_such_cluster",
                    vec![(":method", "GET"), (":path", "/"), (":authority", "x")],
                    None,
                    vec![],
                    Duration::from_secs(1),
                );
                let r = format!("{:?}", r.map(|_| ()));
                log_at(
                    LogLevel::Info,
                    &format!("dispatch to an unknown upstream: {r}"),
                );
                self.reply(200, "bad\n", &[("x-dispatch", &r)])
            }
            _ => Action::Continue,
        }
    }

    fn on_http_request_body(&mut self, size: usize, eos: bool) -> Action {
        if self.test != "body" {
            return Action::Continue;
        }
        if !eos {
            // Pause buffers: the whole body arrives at end of stream.
            return Action::Pause;
        }
        let body = self.get_http_request_body(0, size).unwrap_or_default();
        log_at(
            LogLevel::Info,
            &format!(
                "request body {size} bytes: {}",
                String::from_utf8_lossy(&body)
            ),
        );
        match self.mode.as_str() {
            "replace" => self.set_http_request_body(0, size, &body.to_ascii_uppercase()),
            "prepend" => self.set_http_request_body(0, 0, b"before:"),
            "append" => self.set_http_request_body(size, 0, b":after"),
            "clear" => self.set_http_request_body(0, size, b""),
            _ => {}
        }
        Action::Continue
    }

    fn on_http_request_trailers(&mut self, n: usize) -> Action {
        let t = self.get_http_request_trailers();
        log_at(LogLevel::Info, &format!("request trailers {n}: {t:?}"));
        if self.test == "trailers" {
            self.add_http_request_trailer("x-req-trailer-added", "1");
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _n: usize, eos: bool) -> Action {
        let status = self.get_http_response_header(":status").unwrap_or_default();
        log_at(
            LogLevel::Debug,
            &format!("response headers status={status} eos={eos}"),
        );
        self.response_headers = self.get_http_response_headers();
        match self.test.as_str() {
            "headers" => {
                self.add_http_response_header("x-resp-added", "yes");
                self.set_http_response_header("x-resp-replace", Some("replaced"));
                self.remove_http_response_header("x-resp-remove");
                let got = self.get_http_response_header("x-resp-get");
                log_at(
                    LogLevel::Info,
                    &format!("x-resp-get={}", got.as_deref().unwrap_or("<none>")),
                );
            }
            "local" => {
                let local = self.get_http_response_header("x-local");
                self.add_http_response_header(
                    "x-seen-by-response",
                    &format!("{status}/{}", local.unwrap_or_default()),
                );
            }
            "props" => {
                let code = self.get_property(vec!["response", "code"]);
                log_at(
                    LogLevel::Info,
                    &format!("property response.code={}", show_int(code)),
                );
            }
            "body" => {
                // The body will change size: the length header is stale.
                self.set_http_response_header("content-length", None);
            }
            _ => {}
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, size: usize, eos: bool) -> Action {
        if self.test != "body" {
            return Action::Continue;
        }
        if !eos {
            return Action::Pause;
        }
        log_at(LogLevel::Info, &format!("response body {size} bytes"));
        self.set_http_response_body(size, 0, b"-- appended by rust_v02\n");
        Action::Continue
    }

    fn on_http_response_trailers(&mut self, n: usize) -> Action {
        let t = self.get_http_response_trailers();
        log_at(LogLevel::Info, &format!("response trailers {n}: {t:?}"));
        self.add_http_response_trailer("x-resp-trailer-added", "1");
        Action::Continue
    }

    fn on_log(&mut self) {
        log_at(LogLevel::Info, "end");
    }
}
