//! Differential-test plugin on the Rust SDK, proxy-wasm 0.1 (ABI 0.1.0): the
//! old signatures (`on_request_headers(ctx, n)` without end of stream,
//! `proxy_get_configuration`, `proxy_continue_request`,
//! `proxy_clear_route_cache`). The request header `x-test` picks the scenario;
//! every stream logs `end` from `on_log` (the harness's fence).

use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

// SDK 0.1 has no entry-point macro: the host calls this export once, before
// any context exists.
#[no_mangle]
pub fn _start() {
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}

#[derive(Default)]
struct Root {
    upstream: String,
}

fn info(msg: &str) {
    let _ = hostcalls::log(LogLevel::Info, msg);
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, size: usize) -> bool {
        // 0.1's get_configuration is proxy_get_configuration.
        let cfg = self.get_configuration().unwrap_or_default();
        let text = String::from_utf8_lossy(&cfg).into_owned();
        info(&format!("rust_v01 configured ({size} bytes): {text}"));
        // The configuration is {"upstream": "..."}; no JSON parser on purpose
        // (the module stays small): take the first quoted value after the key.
        self.upstream = text
            .split("\"upstream\"")
            .nth(1)
            .and_then(|rest| rest.split('"').nth(1))
            .unwrap_or_default()
            .to_string();
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream {
            upstream: self.upstream.clone(),
            test: String::new(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Stream {
    upstream: String,
    test: String,
}

impl Context for Stream {
    fn on_http_call_response(
        &mut self,
        _token: u32,
        _headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        let status = self
            .get_http_call_response_header(":status")
            .unwrap_or_default();
        info(&format!(
            "v01 http_call response status={status} body={body_size}"
        ));
        self.set_http_request_header("x-v01-callout-status", Some(&status));
        // 0.1's resume is proxy_continue_request.
        self.resume_http_request();
    }
}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, n: usize) -> Action {
        self.test = self.get_http_request_header("x-test").unwrap_or_default();
        info(&format!(
            "v01 request headers test={} has headers={}",
            self.test,
            n > 0
        ));
        match self.test.as_str() {
            "v01-headers" => {
                self.add_http_request_header("x-v01-added", "1");
                self.set_http_request_header("x-v01-replace", Some("replaced"));
                self.set_http_request_header("x-v01-remove", None);
                let got = self.get_http_request_header("x-v01-get");
                info(&format!("x-v01-get={}", got.as_deref().unwrap_or("<none>")));
                if hostcalls::clear_http_route_cache().is_ok() {
                    info("route cache cleared");
                }
                Action::Continue
            }
            "v01-local" => {
                self.send_http_response(
                    451,
                    vec![("x-v01-local", "1"), ("x-plugin", "rust_v01")],
                    Some(b"unavailable (v01)\n"),
                );
                Action::Pause
            }
            "v01-httpcall" => {
                let upstream = self.upstream.clone();
                match self.dispatch_http_call(
                    &upstream,
                    vec![
                        (":method", "GET"),
                        (":path", "/v01-callout"),
                        (":authority", "echo.default.svc.cluster.local"),
                    ],
                    None,
                    vec![],
                    Duration::from_secs(5),
                ) {
                    Ok(_) => Action::Pause,
                    Err(e) => {
                        self.send_http_response(
                            500,
                            vec![],
                            Some(format!("dispatch failed: {e:?}\n").as_bytes()),
                        );
                        Action::Pause
                    }
                }
            }
            _ => Action::Continue,
        }
    }

    fn on_http_request_body(&mut self, size: usize, eos: bool) -> Action {
        if self.test != "v01-body" {
            return Action::Continue;
        }
        if !eos {
            return Action::Pause;
        }
        let body = self.get_http_request_body(0, size).unwrap_or_default();
        info(&format!(
            "v01 body {size}: {}",
            String::from_utf8_lossy(&body)
        ));
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _n: usize) -> Action {
        if self.test == "v01-headers" {
            self.set_http_response_header("x-v01-resp", Some("added"));
        }
        if self.test == "v01-local" {
            let status = self.get_http_response_header(":status").unwrap_or_default();
            info(&format!("v01-local response sees :status={status}"));
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        info("end");
    }
}
