//! A Proxy-Wasm plugin that misbehaves on demand, for the host's reliability tests.
//!
//! What it does is chosen by its configuration (`pluginConfig`, JSON) and, per request, by the
//! `x-misbehave` request header (which wins over the configured `mode`):
//!
//! | mode | in `on_http_request_headers` |
//! |---|---|
//! | `pass` (default) | continue |
//! | `loop` | spin forever (the host's deadline must interrupt it) |
//! | `trap` | panic (a trap: panics abort in this module) |
//! | `abort` | `std::process::abort()` (the `unreachable` instruction) |
//! | `grow` | allocate and fill `grow_mib` MiB (default 512) of linear memory, 1 MiB at a time |
//! | `reply` | answer locally with `reply_status` (default 418) |
//!
//! Configuration keys besides `mode`: `trap_every` (N > 0: trap on every Nth request this
//! instance sees, counting from 1), `reject_config` (true: `on_configure` returns false),
//! `tag` (echoed in the `x-misbehave-tag` response header, so tests tell configurations apart),
//! `grow_mib`, `reply_status`. The `x-misbehave-response: trap` request header makes the
//! response-headers callback trap instead. Every response that passes gets
//! `x-misbehave-count: <n>`, the number of requests this instance has seen, so a test can tell
//! a fresh instance (count 1) from a reused one.

use std::cell::Cell;
use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(MisbehaveRoot { config: Rc::new(Config::default()), seen: Rc::new(Cell::new(0)) })
    });
}}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Pass,
    Loop,
    Trap,
    Abort,
    Grow,
    Reply,
}

impl Mode {
    pub fn parse(s: &str) -> Option<Mode> {
        Some(match s {
            "pass" => Mode::Pass,
            "loop" => Mode::Loop,
            "trap" => Mode::Trap,
            "abort" => Mode::Abort,
            "grow" => Mode::Grow,
            "reply" => Mode::Reply,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub mode: Mode,
    pub trap_every: u64,
    pub reject_config: bool,
    pub tag: String,
    pub grow_mib: usize,
    pub reply_status: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            mode: Mode::Pass,
            trap_every: 0,
            reject_config: false,
            tag: String::new(),
            grow_mib: 512,
            reply_status: 418,
        }
    }
}

impl Config {
    /// Parses the plugin configuration; empty means the defaults. Unknown keys and wrong types
    /// are errors, so a typo in a test fails loudly instead of silently passing.
    pub fn parse(bytes: &[u8]) -> Result<Config, String> {
        let mut cfg = Config::default();
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(cfg);
        }
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| format!("configuration is not JSON: {e}"))?;
        let obj = value
            .as_object()
            .ok_or("configuration must be a JSON object")?;
        for (k, v) in obj {
            let bad = || format!("configuration key {k:?} has an unexpected value {v}");
            match k.as_str() {
                "mode" => cfg.mode = v.as_str().and_then(Mode::parse).ok_or_else(bad)?,
                "trap_every" => cfg.trap_every = v.as_u64().ok_or_else(bad)?,
                "reject_config" => cfg.reject_config = v.as_bool().ok_or_else(bad)?,
                "tag" => cfg.tag = v.as_str().ok_or_else(bad)?.to_owned(),
                "grow_mib" => cfg.grow_mib = v.as_u64().ok_or_else(bad)? as usize,
                "reply_status" => cfg.reply_status = v.as_u64().ok_or_else(bad)? as u32,
                _ => return Err(format!("unknown configuration key {k:?}")),
            }
        }
        Ok(cfg)
    }

    /// What request number `n` (1-based, per instance) does, given the header override.
    pub fn mode_for(&self, n: u64, header: Option<&str>) -> Mode {
        if let Some(m) = header.and_then(Mode::parse) {
            return m;
        }
        // `%` rather than `is_multiple_of`: the offline wasm build uses Debian's rustc 1.85,
        // which predates it.
        #[allow(clippy::manual_is_multiple_of)]
        if self.trap_every > 0 && n % self.trap_every == 0 {
            return Mode::Trap;
        }
        self.mode
    }
}

pub struct MisbehaveRoot {
    config: Rc<Config>,
    seen: Rc<Cell<u64>>,
}

impl Context for MisbehaveRoot {}

impl RootContext for MisbehaveRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        match Config::parse(&bytes) {
            Ok(cfg) if cfg.reject_config => {
                proxy_wasm::hostcalls::log(LogLevel::Warn, "misbehave: rejecting configuration as asked")
                    .ok();
                false
            }
            Ok(cfg) => {
                self.config = Rc::new(cfg);
                true
            }
            Err(e) => {
                proxy_wasm::hostcalls::log(LogLevel::Error, &format!("misbehave: {e}")).ok();
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(MisbehaveHttp {
            config: self.config.clone(),
            seen: self.seen.clone(),
            count: 0,
            trap_response: false,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

pub struct MisbehaveHttp {
    config: Rc<Config>,
    seen: Rc<Cell<u64>>,
    count: u64,
    trap_response: bool,
}

impl Context for MisbehaveHttp {}

impl HttpContext for MisbehaveHttp {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        self.count = self.seen.get() + 1;
        self.seen.set(self.count);
        self.trap_response =
            self.get_http_request_header("x-misbehave-response").as_deref() == Some("trap");
        let header = self.get_http_request_header("x-misbehave");
        match self.config.mode_for(self.count, header.as_deref()) {
            Mode::Pass => Action::Continue,
            Mode::Loop => {
                let mut spins: u64 = 0;
                loop {
                    spins = std::hint::black_box(spins.wrapping_add(1));
                }
            }
            Mode::Trap => panic!("misbehave: trapping on request {} as asked", self.count),
            Mode::Abort => std::process::abort(),
            Mode::Grow => {
                // 1 MiB at a time, each touched, as a leaking plugin would: the host's cap
                // stops it part way with the memory really in use.
                let mut kept: Vec<Vec<u8>> = Vec::new();
                for _ in 0..self.config.grow_mib {
                    kept.push(vec![1u8; 1 << 20]);
                }
                let kept = std::hint::black_box(kept);
                if kept.iter().all(|chunk| chunk[chunk.len() - 1] == 1) {
                    Action::Continue
                } else {
                    Action::Pause
                }
            }
            Mode::Reply => {
                let tag = self.config.tag.clone();
                self.send_http_response(
                    self.config.reply_status,
                    vec![("x-misbehave-tag", tag.as_str())],
                    Some(b"misbehave says no\n"),
                );
                Action::Pause
            }
        }
    }

    fn on_http_response_headers(&mut self, _n: usize, _eos: bool) -> Action {
        if self.trap_response {
            panic!("misbehave: trapping in the response path as asked");
        }
        let count = self.count.to_string();
        self.set_http_response_header("x-misbehave-count", Some(&count));
        if !self.config.tag.is_empty() {
            let tag = self.config.tag.clone();
            self.set_http_response_header("x-misbehave-tag", Some(&tag));
        }
        Action::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_key_and_refuses_unknown_ones() {
        let cfg = Config::parse(
            br#"{"mode":"loop","trap_every":3,"reject_config":true,"tag":"v2","grow_mib":8,"reply_status":429}"#,
        )
        .unwrap();
        assert_eq!(
            cfg,
            Config {
                mode: Mode::Loop,
                trap_every: 3,
                reject_config: true,
                tag: "v2".into(),
                grow_mib: 8,
                reply_status: 429
            }
        );
        assert_eq!(Config::parse(b"").unwrap(), Config::default());
        assert!(Config::parse(br#"{"mdoe":"loop"}"#).unwrap_err().contains("mdoe"));
        assert!(Config::parse(br#"{"mode":"fly"}"#).is_err());
        assert!(Config::parse(b"[1]").is_err());
    }

    #[test]
    fn traps_on_every_nth_request_unless_the_header_says_otherwise() {
        let cfg = Config {
            trap_every: 3,
            ..Config::default()
        };
        let modes: Vec<Mode> = (1..=7).map(|n| cfg.mode_for(n, None)).collect();
        assert_eq!(
            modes,
            [
                Mode::Pass,
                Mode::Pass,
                Mode::Trap,
                Mode::Pass,
                Mode::Pass,
                Mode::Trap,
                Mode::Pass
            ]
        );
        assert_eq!(cfg.mode_for(3, Some("pass")), Mode::Pass);
        assert_eq!(cfg.mode_for(1, Some("grow")), Mode::Grow);
        assert_eq!(cfg.mode_for(1, Some("nonsense")), Mode::Pass);
    }
}
