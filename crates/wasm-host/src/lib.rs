//! The Proxy-Wasm host of Waystone (ABI 0.2.1 and 0.2.0) on wasmtime.
//!
//! It knows no HTTP server, Kubernetes or OCI: the data plane hands it plain data
//! ([`HttpStream`]) and drives the plugin callbacks one phase at a time.
//!
//! ```text
//! WasmEngine::new ─► compile(bytes) ─► CompiledModule ─► PluginInstance::start(spec)
//!   (one per process,    (validate ABI,        (Arc, shared     (instantiate, _initialize,
//!    epoch ticker)        link imports,         by workers)      root ctx, vm_start, configure)
//!                         InstancePre)
//! per request: create_http_context → on_request_headers/body/trailers
//!              → on_response_headers/body/trailers → finish_http_context (done, log, delete)
//! ```
//!
//! Shared data, shared queues and plugin metrics live in the engine, hence are process-wide
//! (keyed by `vm_id` for data and queues).

mod engine;
mod error;
mod hostcalls;
mod instance;
mod log_level;
mod shared;
mod state;
mod status;
mod types;

pub use engine::{CompiledModule, EngineConfig, WasmEngine};
pub use error::HostError;
pub use instance::PluginInstance;
pub use log_level::{
    LogLevel, plugin_log_levels, set_default_plugin_log_level, set_plugin_log_level,
};
pub use shared::{MetricKind, MetricSample, MetricValue};
pub use types::{
    AbiVersion, Action, HeaderMap, HttpStream, LocalResponse, PluginSpec, StreamProperties,
    StreamType,
};
