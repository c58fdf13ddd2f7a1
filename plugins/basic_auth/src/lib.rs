//! Proxy-Wasm `basic_auth` plugin, a drop-in for Istio's
//! (istio-ecosystem/wasm-extensions) module: same configuration, same
//! decisions, same 401 answer.
//!
//! The decisions live in [`rules`]; this file only moves data between the
//! host and them.

pub mod pool;
pub mod rules;

use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

use rules::{Config, Decision, Request};

/// Per-request allocations come from free lists by size class (see [`pool`]).
#[cfg(all(target_arch = "wasm32", not(target_feature = "atomics")))]
#[global_allocator]
static ALLOCATOR: pool::Pool<std::alloc::System> = pool::Pool::new(std::alloc::System);

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(BasicAuthRoot::default()) });
}}

/// Holds the configuration; every HTTP context shares it.
#[derive(Default)]
pub struct BasicAuthRoot {
    config: Rc<Config>,
}

impl Context for BasicAuthRoot {}

impl RootContext for BasicAuthRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let raw = self.get_plugin_configuration().unwrap_or_default();
        match Config::parse(&raw) {
            Ok(config) => {
                log::info!(
                    "basic_auth: configured {} rule(s), realm {:?}",
                    config.rules.len(),
                    config.realm
                );
                self.config = Rc::new(config);
                true
            }
            Err(err) => {
                log::error!("basic_auth: configuration refused, plugin will not start: {err}");
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(BasicAuthHttp {
            config: Rc::clone(&self.config),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// One per HTTP stream; decides on the request headers.
pub struct BasicAuthHttp {
    config: Rc<Config>,
}

impl Context for BasicAuthHttp {}

impl HttpContext for BasicAuthHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        // Nothing to read from the host when no rule could apply.
        if self.config.rules.is_empty() {
            return Action::Continue;
        }
        // Bytes, not `String`: the values are only compared, and the SDK's `String` reads
        // validate UTF-8 and abort the plugin on a value that is not (obs-text is legal in
        // HTTP/1.1 header values).
        let header = |name: &str| self.get_http_request_header_bytes(name).unwrap_or_default();
        // Each read is a host call and a guest allocation; `:authority` only matters to rules
        // with `hosts`.
        let authority = if self.config.matches_hosts() {
            header(":authority")
        } else {
            Vec::new()
        };
        let (method, path, authorization) =
            (header(":method"), header(":path"), header("authorization"));
        let request = Request {
            method: &method,
            path: &path,
            authority: &authority,
            authorization: &authorization,
        };
        match self.config.decide(&request) {
            Decision::Allow => Action::Continue,
            Decision::Deny {
                realm,
                reason,
                rule,
            } => {
                log::debug!(
                    "basic_auth: {} {} denied by rule {rule}: {reason:?}",
                    String::from_utf8_lossy(&method),
                    String::from_utf8_lossy(&path)
                );
                let challenge = format!("Basic realm={realm}");
                self.send_http_response(401, vec![("WWW-Authenticate", challenge.as_str())], None);
                Action::Pause
            }
        }
    }
}
