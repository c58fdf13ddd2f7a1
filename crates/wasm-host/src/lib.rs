//! The Proxy-Wasm host of Waystone (ABI 0.2.1, 0.2.0 and 0.1.0) on wasmtime.
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
//!
//! Work the host cannot do itself is queued on the instance for the embedder: HTTP and gRPC
//! callouts (`take_callouts`, `take_grpc_commands`, answered with `on_http_call_response` /
//! `on_grpc_*`), tick timers (`tick_period`, `on_tick`), queue notifications
//! (`set_queue_waker`, `deliver_queue_ready`) and actions aimed at other contexts
//! (`take_context_actions`). All of them run on the thread that owns the instance.

mod compiled_cache;
mod engine;
mod error;
mod hostcalls;
mod instance;
mod log_level;
mod shared;
mod state;
mod status;
mod types;

pub use compiled_cache::{CompiledCache, CompiledCacheError, CompiledEntry, CompiledSource};
pub use engine::{CompiledModule, EngineConfig, WasmEngine};
pub use error::HostError;
pub use instance::{PluginInstance, ROOT_CONTEXT};
pub use log_level::{
    LogLevel, plugin_log_levels, set_default_plugin_log_level, set_plugin_log_level,
};
pub use shared::{MetricKind, MetricSample, MetricValue, QueueWaker};
pub use state::{ContextAction, UpstreamCheck};
pub use types::{
    AbiVersion, Action, GrpcCommand, GrpcTarget, HeaderMap, HeaderSource, HttpCallResponse,
    HttpStream, LocalResponse, MtlsProperties, NetworkStream, PeerType, PendingCallout, PluginSpec,
    SharedName, StreamData, StreamProperties, StreamType,
};
