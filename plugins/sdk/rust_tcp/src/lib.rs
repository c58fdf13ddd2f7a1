//! L4 (`type: NETWORK`) test plugin on the Rust SDK, proxy-wasm 0.2 (ABI 0.2.1).
//!
//! Each connection logs every callback it gets, one line each, so a test can compare the
//! exact order. `pluginConfig` picks what it does to the bytes:
//! - `rewrite_from`/`rewrite_to`: replaces every occurrence in downstream data (buffer 2);
//! - `upstream_from`/`upstream_to`: the same for upstream data (buffer 3);
//! - `hold_until`: pauses downstream data until the buffered bytes end with this text, so
//!   the proxy must hold them and hand them back together with what follows;
//! - `upstream_hold_until`: the same for upstream data (buffer 3);
//! - `close_on`: downstream data containing it closes the connection (`proxy_close_stream`);
//! - `trap_on`: downstream data containing it makes the plugin trap (a Rust panic aborts);
//! - `log_properties`: logs `source.address`, `destination.address`, `connection.id` on a new
//!   connection and `upstream.address` in `on_log`;
//! - `pause_on_new_connection`: `proxy_on_new_connection` answers Pause (Envoy then holds the
//!   upstream connect and later filters until the context continues reading);
//! - `resume_after_ms`: the root context ticks at this period and, at its first tick after a
//!   connection paused (on its new-connection callback, or holding bytes for `hold_until`),
//!   acts on that connection from the root (`proxy_set_effective_context` +
//!   `resume_via`/`root_action`);
//! - `resume_via`: `tick` (default) acts in `proxy_on_tick`; `callout` makes the tick send
//!   `proxy_http_call` to `callout_upstream` and acts in `proxy_on_http_call_response`;
//! - `root_action`: `continue` (default, `proxy_continue_stream(Downstream)`) or `close`
//!   (`proxy_close_stream(Downstream)`);
//! - `connection_callout`: with `pause_on_new_connection`, the connection's own context sends
//!   `proxy_http_call` to `callout_upstream` and continues in its
//!   `proxy_on_http_call_response`.
//!
//! Each plugin must run in its own VM (Envoy `vm_id`) for the root to find only its own
//! paused connections: they are kept in a per-VM list.
//!
//! The connection's last line is `end` (from `on_log`): a harness waits for it.

use std::cell::RefCell;
use std::time::Duration;

use proxy_wasm::traits::{Context, RootContext, StreamContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, PeerType};

thread_local! {
    /// Connections paused on their new-connection callback, waiting for the root context.
    static PAUSED: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

#[derive(Default, Clone)]
struct Config {
    rewrite: Option<(String, String)>,
    upstream_rewrite: Option<(String, String)>,
    hold_until: String,
    upstream_hold_until: String,
    close_on: String,
    trap_on: String,
    log_properties: bool,
    pause_on_new_connection: bool,
    resume_after_ms: u64,
    resume_via_callout: bool,
    callout_upstream: String,
    root_closes: bool,
    connection_callout: bool,
}

#[derive(Default)]
struct Root {
    config: Config,
    /// Connections the callout in flight will act on.
    awaiting_callout: Vec<u32>,
}

impl Root {
    /// Resumes or closes each connection from the root context, as a timer or a callout
    /// answer of a real plugin would.
    fn act_on(&self, connections: Vec<u32>) {
        for id in connections {
            if proxy_wasm::hostcalls::set_effective_context(id).is_err() {
                log(LogLevel::Warn, "a paused connection is gone");
                continue;
            }
            let done = if self.config.root_closes {
                log(LogLevel::Info, "root closes a paused connection");
                proxy_wasm::hostcalls::close_downstream()
            } else {
                log(LogLevel::Info, "root resumes a paused connection");
                proxy_wasm::hostcalls::resume_downstream()
            };
            if let Err(e) = done {
                log(LogLevel::Warn, &format!("acting on a paused connection: {e:?}"));
            }
        }
    }
}

impl Context for Root {
    fn on_http_call_response(&mut self, _token: u32, _headers: usize, _body: usize, _: usize) {
        let status = self
            .get_http_call_response_header(":status")
            .unwrap_or_default();
        log(LogLevel::Info, &format!("callout answered {status}"));
        let waiting = std::mem::take(&mut self.awaiting_callout);
        self.act_on(waiting);
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let raw = self.get_plugin_configuration().unwrap_or_default();
        let json: serde_json::Value = if raw.is_empty() {
            serde_json::Value::Null
        } else {
            match serde_json::from_slice(&raw) {
                Ok(v) => v,
                Err(e) => {
                    log(LogLevel::Error, &format!("bad configuration: {e}"));
                    return false;
                }
            }
        };
        let text = |k: &str| {
            json.get(k)
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_string()
        };
        let pair = |from: &str, to: &str| {
            let from = text(from);
            (!from.is_empty()).then(|| (from, text(to)))
        };
        self.config = Config {
            rewrite: pair("rewrite_from", "rewrite_to"),
            upstream_rewrite: pair("upstream_from", "upstream_to"),
            hold_until: text("hold_until"),
            upstream_hold_until: text("upstream_hold_until"),
            close_on: text("close_on"),
            trap_on: text("trap_on"),
            log_properties: json.get("log_properties").and_then(|v| v.as_bool()) == Some(true),
            pause_on_new_connection: json.get("pause_on_new_connection").and_then(|v| v.as_bool())
                == Some(true),
            resume_after_ms: json
                .get("resume_after_ms")
                .and_then(|v| v.as_u64())
                .unwrap_or(0),
            resume_via_callout: text("resume_via") == "callout",
            callout_upstream: text("callout_upstream"),
            root_closes: text("root_action") == "close",
            connection_callout: json.get("connection_callout").and_then(|v| v.as_bool())
                == Some(true),
        };
        if self.config.resume_after_ms > 0 {
            self.set_tick_period(Duration::from_millis(self.config.resume_after_ms));
        }
        true
    }

    fn on_tick(&mut self) {
        let paused = PAUSED.with(|p| std::mem::take(&mut *p.borrow_mut()));
        if paused.is_empty() || !self.awaiting_callout.is_empty() {
            PAUSED.with(|p| p.borrow_mut().extend(paused));
            return;
        }
        if !self.config.resume_via_callout {
            self.act_on(paused);
            return;
        }
        let headers = vec![
            (":method", "GET"),
            (":path", "/resume"),
            (":authority", "echo"),
        ];
        match self.dispatch_http_call(
            &self.config.callout_upstream,
            headers,
            None,
            vec![],
            Duration::from_secs(5),
        ) {
            Ok(_) => {
                log(LogLevel::Info, "root sent a callout");
                self.awaiting_callout = paused;
            }
            Err(e) => {
                log(LogLevel::Warn, &format!("callout refused: {e:?}"));
                self.act_on(paused);
            }
        }
    }

    fn create_stream_context(&self, context_id: u32) -> Option<Box<dyn StreamContext>> {
        Some(Box::new(Conn {
            id: context_id,
            config: self.config.clone(),
            downstream_bytes: 0,
            upstream_bytes: 0,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::StreamContext)
    }
}

struct Conn {
    id: u32,
    config: Config,
    /// Bytes this plugin let through in each direction (after its rewrites).
    downstream_bytes: usize,
    upstream_bytes: usize,
}

impl Conn {
    fn property(&self, path: &[&str]) -> String {
        match self.get_property(path.to_vec()) {
            Some(v) if path == ["connection", "id"] && v.len() == 8 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&v);
                u64::from_le_bytes(b).to_string()
            }
            Some(v) => String::from_utf8_lossy(&v).into_owned(),
            None => "-".to_string(),
        }
    }
}

impl Context for Conn {
    fn on_http_call_response(&mut self, _token: u32, _headers: usize, _body: usize, _: usize) {
        let status = self
            .get_http_call_response_header(":status")
            .unwrap_or_default();
        log(LogLevel::Info, &format!("connection callout answered {status}"));
        self.resume_downstream();
    }

    fn on_done(&mut self) -> bool {
        PAUSED.with(|p| p.borrow_mut().retain(|id| *id != self.id));
        log(LogLevel::Info, "done");
        true
    }
}

impl StreamContext for Conn {
    fn on_new_connection(&mut self) -> Action {
        log(LogLevel::Info, "new_connection");
        if self.config.log_properties {
            let line = format!(
                "properties source={} destination={} connection_id={}",
                self.property(&["source", "address"]),
                self.property(&["destination", "address"]),
                self.property(&["connection", "id"]),
            );
            log(LogLevel::Info, &line);
        }
        if self.config.pause_on_new_connection && self.config.connection_callout {
            let headers = vec![(":method", "GET"), (":path", "/conn"), (":authority", "echo")];
            match self.dispatch_http_call(
                &self.config.callout_upstream,
                headers,
                None,
                vec![],
                Duration::from_secs(5),
            ) {
                Ok(_) => log(LogLevel::Info, "connection sent a callout"),
                Err(e) => log(LogLevel::Warn, &format!("callout refused: {e:?}")),
            }
        }
        if self.config.pause_on_new_connection {
            if self.config.resume_after_ms > 0 {
                PAUSED.with(|p| p.borrow_mut().push(self.id));
            }
            log(LogLevel::Info, "pausing the new connection");
            return Action::Pause;
        }
        Action::Continue
    }

    fn on_downstream_data(&mut self, size: usize, end_of_stream: bool) -> Action {
        log(
            LogLevel::Info,
            &format!("downstream_data size={size} eos={end_of_stream}"),
        );
        let data = self.get_downstream_data(0, size).unwrap_or_default();
        let text = String::from_utf8_lossy(&data).into_owned();
        if !self.config.trap_on.is_empty() && text.contains(&self.config.trap_on) {
            log(LogLevel::Warn, "trapping on purpose");
            panic!("trap_on payload seen");
        }
        if !self.config.close_on.is_empty() && text.contains(&self.config.close_on) {
            log(LogLevel::Info, "closing the connection");
            self.close_downstream();
            return Action::Pause;
        }
        if !self.config.hold_until.is_empty()
            && !end_of_stream
            && !text.ends_with(&self.config.hold_until)
        {
            log(LogLevel::Info, &format!("holding {size} bytes"));
            if self.config.resume_after_ms > 0 {
                PAUSED.with(|p| {
                    let mut p = p.borrow_mut();
                    if !p.contains(&self.id) {
                        p.push(self.id);
                    }
                });
            }
            return Action::Pause;
        }
        let mut passed = data.len();
        // No let chain: the offline wasm build uses Debian's rustc 1.85, which predates them.
        let rewrite = self.config.rewrite.as_ref();
        if let Some((from, to)) = rewrite.filter(|(from, _)| text.contains(from.as_str())) {
            let rewritten = text.replace(from.as_str(), to);
            self.set_downstream_data(0, size, rewritten.as_bytes());
            passed = rewritten.len();
        }
        self.downstream_bytes += passed;
        Action::Continue
    }

    fn on_downstream_close(&mut self, peer: PeerType) {
        log(
            LogLevel::Info,
            &format!("downstream_close peer={}", peer_name(peer)),
        );
    }

    fn on_upstream_data(&mut self, size: usize, end_of_stream: bool) -> Action {
        log(
            LogLevel::Info,
            &format!("upstream_data size={size} eos={end_of_stream}"),
        );
        if !self.config.upstream_hold_until.is_empty() && !end_of_stream {
            let data = self.get_upstream_data(0, size).unwrap_or_default();
            if !data.ends_with(self.config.upstream_hold_until.as_bytes()) {
                log(LogLevel::Info, &format!("holding {size} upstream bytes"));
                return Action::Pause;
            }
        }
        let mut passed = size;
        if let Some((from, to)) = &self.config.upstream_rewrite {
            let data = self.get_upstream_data(0, size).unwrap_or_default();
            let text = String::from_utf8_lossy(&data).into_owned();
            if text.contains(from.as_str()) {
                let rewritten = text.replace(from.as_str(), to);
                self.set_upstream_data(0, size, rewritten.as_bytes());
                passed = rewritten.len();
            }
        }
        self.upstream_bytes += passed;
        Action::Continue
    }

    fn on_upstream_close(&mut self, peer: PeerType) {
        log(
            LogLevel::Info,
            &format!("upstream_close peer={}", peer_name(peer)),
        );
    }

    fn on_log(&mut self) {
        log(
            LogLevel::Info,
            &format!(
                "bytes downstream={} upstream={}",
                self.downstream_bytes, self.upstream_bytes
            ),
        );
        if self.config.log_properties {
            let line = format!("upstream={}", self.property(&["upstream", "address"]));
            log(LogLevel::Info, &line);
        }
        log(LogLevel::Info, "end");
    }
}

fn peer_name(peer: PeerType) -> &'static str {
    match peer {
        PeerType::Local => "local",
        PeerType::Remote => "remote",
        _ => "unknown",
    }
}

fn log(level: LogLevel, message: &str) {
    let _ = proxy_wasm::hostcalls::log(level, message);
}
