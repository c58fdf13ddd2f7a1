//! The data of one wasmtime `Store`: everything host functions may reach during a guest call.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use wasmtime::{Memory, ResourceLimiter, TypedFunc};

use crate::shared::SharedState;
use crate::types::{HttpStream, PluginSpec, StreamType};

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
    pub(crate) shared: Arc<SharedState>,
    pub(crate) limiter: MemoryLimiter,
    /// Set right after instantiation; `None` only while the start function of a module runs
    /// before the host could look it up.
    pub(crate) memory: Option<Memory>,
    pub(crate) allocator: Option<TypedFunc<i32, i32>>,
    /// The stream of the HTTP callback in progress, moved in for the duration of the call.
    pub(crate) stream: Option<HttpStream>,
    /// `proxy_set_property` outside an HTTP callback (e.g. from `proxy_on_configure`).
    pub(crate) root_properties: BTreeMap<Vec<u8>, Vec<u8>>,
    pub(crate) tick_period_ms: u32,
    pub(crate) close_requested: Option<StreamType>,
    pub(crate) done_requested: bool,
    pub(crate) contexts: HashSet<u32>,
    pub(crate) effective_context: u32,
    pub(crate) stdout: Vec<u8>,
    pub(crate) stderr: Vec<u8>,
}

impl HostState {
    pub(crate) fn new(spec: Arc<PluginSpec>, shared: Arc<SharedState>, max_bytes: usize) -> Self {
        HostState {
            spec,
            shared,
            limiter: MemoryLimiter {
                max_bytes,
                hit: false,
            },
            memory: None,
            allocator: None,
            stream: None,
            root_properties: BTreeMap::new(),
            tick_period_ms: 0,
            close_requested: None,
            done_requested: false,
            contexts: HashSet::new(),
            effective_context: 0,
            stdout: Vec::new(),
            stderr: Vec::new(),
        }
    }
}
