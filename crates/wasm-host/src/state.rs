//! The data of one wasmtime `Store`: everything host functions may reach during a guest call.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::BuildHasherDefault;
use std::sync::Arc;

use wasmtime::{Memory, ResourceLimiter, TypedFunc};

use crate::shared::{QueueSignal, SharedState};
use crate::types::{
    AbiVersion, GrpcCommand, HeaderMap, HttpCallResponse, HttpStream, LocalResponse, NetworkStream,
    PendingCallout, PluginSpec, StreamType,
};

/// Answers whether `proxy_http_call` / `proxy_grpc_*` may name an upstream, at call time (Envoy
/// answers BadArgument for an unknown cluster before queuing anything).
pub type UpstreamCheck = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// Something a plugin asked of a context other than the one whose callback was running (after
/// `proxy_set_effective_context`), e.g. a root context resuming a request it paused. The
/// embedder applies it to that context's stream ([`crate::PluginInstance::take_context_actions`]).
#[derive(Debug, Clone, PartialEq)]
pub enum ContextAction {
    Continue {
        context_id: u32,
        stream: StreamType,
    },
    Close {
        context_id: u32,
        stream: StreamType,
    },
    LocalResponse {
        context_id: u32,
        response: LocalResponse,
    },
}

/// Callouts the guest started and the embedder has not answered yet.
#[derive(Default)]
pub(crate) struct Callouts {
    pub(crate) next_http_token: u32,
    pub(crate) queued_http: Vec<PendingCallout>,
    /// token → issuing context, for every HTTP call not yet answered.
    pub(crate) http_owner: HashMap<u32, u32>,
    pub(crate) next_grpc_call: u32,
    pub(crate) next_grpc_stream: u32,
    pub(crate) queued_grpc: Vec<GrpcCommand>,
    pub(crate) grpc_owner: HashMap<u32, u32>,
}

/// Data readable only while a callout's answer is being delivered (map types 4-7, buffers
/// 4-5, `proxy_get_status`).
#[derive(Default)]
pub(crate) struct Delivery {
    pub(crate) http_response: Option<HttpCallResponse>,
    pub(crate) grpc_initial: Option<HeaderMap>,
    pub(crate) grpc_trailing: Option<HeaderMap>,
    pub(crate) grpc_message: Option<Vec<u8>>,
    pub(crate) status: Option<(u32, Vec<u8>)>,
}

/// Caps linear memory per instance. A growth beyond the cap traps (rather than making
/// `memory.grow` return -1) so the fault is reported and the instance replaced, and the flag
/// lets the caller tell this trap from others.
pub(crate) struct MemoryLimiter {
    pub(crate) max_bytes: usize,
    pub(crate) hit: bool,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_bytes {
            self.hit = true;
            return Err(wasmtime::Error::msg(format!(
                "memory growth to {desired} bytes exceeds the plugin limit of {} bytes",
                self.max_bytes
            )));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Tables hold function references; a million of them is far beyond any plugin.
        Ok(desired <= 1_000_000)
    }
}

/// Raised by host functions that end the guest call on purpose (WASI `proc_exit`,
/// AssemblyScript `abort`); recognised when classifying the failure.
#[derive(Debug, thiserror::Error)]
pub(crate) enum GuestExit {
    #[error("the guest called proc_exit({0})")]
    ProcExit(i32),
    #[error("the guest aborted: {0}")]
    Abort(String),
}

pub(crate) struct HostState {
    pub(crate) spec: Arc<PluginSpec>,
    pub(crate) abi: AbiVersion,
    pub(crate) shared: Arc<SharedState>,
    pub(crate) limiter: MemoryLimiter,
    /// Set right after instantiation; `None` only while the start function of a module runs
    /// before the host could look it up.
    pub(crate) memory: Option<Memory>,
    /// Taken out for each call (no clone of the typed function); `None` during the call, so
    /// an allocator that calls back into a host function that allocates gets an error instead
    /// of recursing.
    pub(crate) allocator: Option<TypedFunc<i32, i32>>,
    /// Reused for values copied out of the host state before they go to guest memory (a
    /// header value), so a read allocates nothing on the host.
    pub(crate) scratch: Vec<u8>,
    /// The stream of the HTTP callback in progress, moved in for the duration of the call.
    pub(crate) stream: Option<HttpStream>,
    /// An empty stream left with the caller while its own is in `stream`: swapping the two
    /// allocates nothing.
    pub(crate) spare_stream: Option<HttpStream>,
    /// `proxy_set_property` outside an HTTP callback (e.g. from `proxy_on_configure`).
    pub(crate) root_properties: BTreeMap<Vec<u8>, Vec<u8>>,
    pub(crate) tick_period_ms: u32,
    pub(crate) close_requested: Option<StreamType>,
    pub(crate) done_requested: bool,
    /// The root context's `proxy_on_done` returned false: it finishes when it calls `proxy_done`.
    pub(crate) root_closing: bool,
    pub(crate) contexts: ContextIds,
    /// The context whose callback is running (its stream, if any, is `stream`/`network`).
    pub(crate) current_context: u32,
    /// `proxy_set_effective_context` target; reset to `current_context` at every callback.
    pub(crate) effective_context: u32,
    pub(crate) context_actions: Vec<ContextAction>,
    /// The L4 connection of the callback in progress.
    pub(crate) network: Option<NetworkStream>,
    pub(crate) callouts: Callouts,
    pub(crate) delivery: Delivery,
    pub(crate) upstream_check: Option<UpstreamCheck>,
    pub(crate) queue_signal: Arc<QueueSignal>,
    pub(crate) stdout: Vec<u8>,
    pub(crate) stderr: Vec<u8>,
}

impl HostState {
    pub(crate) fn new(
        spec: Arc<PluginSpec>,
        abi: AbiVersion,
        shared: Arc<SharedState>,
        max_bytes: usize,
    ) -> Self {
        HostState {
            spec,
            abi,
            shared,
            limiter: MemoryLimiter {
                max_bytes,
                hit: false,
            },
            memory: None,
            allocator: None,
            scratch: Vec::new(),
            stream: None,
            spare_stream: None,
            root_properties: BTreeMap::new(),
            tick_period_ms: 0,
            close_requested: None,
            done_requested: false,
            root_closing: false,
            contexts: ContextIds::default(),
            current_context: 0,
            effective_context: 0,
            context_actions: Vec::new(),
            network: None,
            callouts: Callouts {
                next_http_token: 1,
                next_grpc_call: 1,
                next_grpc_stream: 2,
                ..Callouts::default()
            },
            delivery: Delivery::default(),
            upstream_check: None,
            queue_signal: Arc::new(QueueSignal::default()),
            stdout: Vec::new(),
            stderr: Vec::new(),
        }
    }
}

impl HostState {
    /// The HTTP stream the host calls act on: the running callback's, unless the guest switched
    /// to another context with `proxy_set_effective_context`.
    pub(crate) fn effective_stream(&mut self) -> Option<&mut HttpStream> {
        if self.effective_context != self.current_context {
            return None;
        }
        self.stream.as_mut()
    }

    /// Whether the effective context is some context other than the running one.
    pub(crate) fn switched_context(&self) -> bool {
        self.effective_context != self.current_context
    }
}

/// The live context ids of an instance: a context is added and removed once per request, so
/// the set hashes ids with one multiplication instead of SipHash (ids come from the host's
/// counter, not from clients) and stays O(1) with many streams open.
pub(crate) type ContextIds = HashSet<u32, BuildHasherDefault<IdHasher>>;

/// Fibonacci hashing of a `u32` id: the multiplication spreads consecutive ids over the high
/// bits the table's control bytes use, while the low bits stay distinct.
#[derive(Default)]
pub(crate) struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u32(u32::from(*b));
        }
    }
    fn write_u32(&mut self, v: u32) {
        self.0 = (self.0 ^ u64::from(v)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

#[cfg(test)]
mod tests {
    use std::hash::{BuildHasher, Hasher};

    use super::*;

    #[test]
    fn context_ids_hash_apart_and_round_trip() {
        let build = BuildHasherDefault::<IdHasher>::default();
        let hash = |id: u32| build.hash_one(id);
        // Consecutive ids differ in the top 7 bits (the table's control byte) most of the time.
        let tops: HashSet<u64> = (1..=128u32).map(|id| hash(id) >> 57).collect();
        assert!(
            tops.len() > 64,
            "only {} distinct control bytes",
            tops.len()
        );
        let mut ids = ContextIds::default();
        for id in 1..=10_000u32 {
            assert!(ids.insert(id));
        }
        for id in (1..=10_000u32).step_by(2) {
            assert!(ids.remove(&id));
        }
        assert_eq!(ids.len(), 5_000);
        assert!(ids.contains(&2) && !ids.contains(&1) && !ids.contains(&10_001));
        let mut h = IdHasher::default();
        h.write(&[1, 2, 3]);
        assert_ne!(h.finish(), 0);
    }
}
