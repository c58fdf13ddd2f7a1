//! The data plane: gateway, waypoint and local-mesh-entry listeners that route
//! HTTP and run Proxy-Wasm plugin chains. It reads a [`RuntimeConfig`] (a
//! snapshot plus loaded plugins) and never knows where that came from.
//!
//! Threads: `workers` OS threads, each with its own single-threaded tokio
//! runtime. Accept loops run on the caller's runtime and hand each accepted
//! connection to a worker round-robin; the connection stays on that worker for
//! its whole life, so a request's plugin contexts live in that worker's plugin
//! instances (one instance per plugin per worker, as Envoy does per thread).

mod access_log;
mod callout;
mod chain;
mod dataplane;
mod handler;
pub mod hbone;
mod head_timeout;
mod local_channel;
pub mod metrics;
mod observe;
mod routing;
mod runtime;
mod stream;
mod tcp;
pub mod trace;
mod upstream;
mod worker;

pub use access_log::{AccessLogSink, AccessRecord};
pub use dataplane::{
    DataPlane, DataPlaneConfig, DataPlaneError, GatewayBinding, ListenerBinding, MAX_H2_STREAMS,
    MAX_REQUEST_HEAD, MAX_REQUEST_HEADERS,
};
pub use observe::ObservabilityConfig;
pub use runtime::{LoadedPlugin, PluginSlot, RuntimeConfig};
