//! One wasmtime engine per process, an epoch ticker that bounds guest calls, and modules
//! compiled once and validated against the Proxy-Wasm ABI.

use std::collections::HashSet;
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use wasmtime::{
    Config, Engine, ExternType, FuncType, InstancePre, Linker, Module, OptLevel, ProfilingStrategy,
    ValType,
};

use crate::error::HostError;
use crate::hostcalls;
use crate::shared::{MetricSample, SharedState};
use crate::state::HostState;
use crate::types::{AbiVersion, StreamType};

/// How often the epoch advances; per-call deadlines are rounded up to it.
pub(crate) const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Limits applied to every instance.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Linear memory cap per instance (default 64 MiB).
    pub max_memory_bytes: usize,
    /// Wall-clock budget of one guest callback (default 1 s).
    pub call_deadline: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_memory_bytes: 64 * 1024 * 1024,
            call_deadline: Duration::from_secs(1),
        }
    }
}

/// The process-wide Wasm engine. Cheap to clone; the epoch ticker thread stops when the last
/// clone (including the ones held by compiled modules) is dropped.
#[derive(Clone)]
pub struct WasmEngine {
    pub(crate) inner: Arc<EngineInner>,
}

pub(crate) struct EngineInner {
    pub(crate) engine: Engine,
    pub(crate) config: EngineConfig,
    linker: Linker<HostState>,
    linked_names: HashSet<(String, String)>,
    pub(crate) shared: Arc<SharedState>,
    ticker: Mutex<Option<Ticker>>,
}

struct Ticker {
    stop: Sender<()>,
    thread: JoinHandle<()>,
}

impl Drop for EngineInner {
    fn drop(&mut self) {
        let ticker = self.ticker.get_mut().ok().and_then(Option::take);
        if let Some(Ticker { stop, thread }) = ticker {
            drop(stop);
            let _ = thread.join();
        }
    }
}

impl WasmEngine {
    /// Creates the engine and starts its epoch ticker.
    ///
    /// Instances use on-demand allocation, not the pooling allocator: the pool needs a fixed
    /// number of slots sized up front (workers × plugins is unknown here) and reserves the
    /// virtual memory of every slot at start; with copy-on-write memory images on-demand
    /// instantiation is already cheap (see the crate's README numbers).
    pub fn new(cfg: EngineConfig) -> Result<Self, HostError> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        config.cranelift_opt_level(OptLevel::Speed);
        // `WAYSTONE_WASM_PERFMAP=1`: write /tmp/perf-<pid>.map so `perf` (and callgrind, via
        // scripts/callgrind-proxy.py) name each guest function instead of a bare address.
        if std::env::var_os("WAYSTONE_WASM_PERFMAP").is_some_and(|v| v == "1") {
            config.profiler(ProfilingStrategy::PerfMap);
        }
        let engine = Engine::new(&config).map_err(|e| HostError::Engine {
            reason: format!("{e:#}"),
        })?;
        let (linker, linked_names) =
            hostcalls::build_linker(&engine).map_err(|e| HostError::Engine {
                reason: format!("cannot define host functions: {e:#}"),
            })?;
        let (stop, ticks) = mpsc::channel::<()>();
        let ticking = engine.clone();
        let thread = std::thread::Builder::new()
            .name("waystone-wasm-epoch".into())
            .spawn(move || {
                // The sender never sends: its drop (engine gone) ends the loop.
                while let Err(RecvTimeoutError::Timeout) = ticks.recv_timeout(EPOCH_TICK) {
                    ticking.increment_epoch();
                }
            })
            .map_err(|e| HostError::Engine {
                reason: format!("cannot start the epoch ticker thread: {e}"),
            })?;
        Ok(WasmEngine {
            inner: Arc::new(EngineInner {
                engine,
                config: cfg,
                linker,
                linked_names,
                shared: Arc::new(SharedState::default()),
                ticker: Mutex::new(Some(Ticker { stop, thread })),
            }),
        })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    /// Current values of every metric plugins defined with `proxy_define_metric`, sorted by
    /// name. Names are as the plugin gave them (no `wasmcustom.` prefix).
    pub fn metrics_snapshot(&self) -> Vec<MetricSample> {
        self.inner.shared.metrics_snapshot()
    }

    /// Validates the module, checks it exports a known ABI version and the required exports,
    /// links every import (unknown imports → error naming them) and builds the `InstancePre`.
    pub fn compile(&self, wasm: &[u8]) -> Result<CompiledModule, HostError> {
        let module = Module::new(&self.inner.engine, wasm).map_err(|e| HostError::Compile {
            reason: format!("{e:#}"),
        })?;
        self.link(module)
    }

    /// The ABI checks and linking of `compile`, for a module compiled now or loaded from the
    /// compiled-module cache.
    pub(crate) fn link(&self, module: Module) -> Result<CompiledModule, HostError> {
        let abi = detect_abi(&module)?;
        check_exports(&module, abi)?;
        self.check_imports(&module)?;
        check_abi_imports(&module, abi)?;
        let pre =
            self.inner
                .linker
                .instantiate_pre(&module)
                .map_err(|e| HostError::ImportMismatch {
                    module: String::new(),
                    name: String::new(),
                    reason: format!("{e:#}"),
                })?;
        let exports: HashSet<String> = module.exports().map(|e| e.name().to_owned()).collect();
        let has = |name: &str| exports.contains(name);
        let callbacks = [
            [
                has("proxy_on_request_body"),
                has("proxy_on_request_trailers"),
            ],
            [
                has("proxy_on_response_body"),
                has("proxy_on_response_trailers"),
            ],
        ];
        Ok(CompiledModule {
            inner: Arc::new(CompiledInner {
                engine: self.clone(),
                pre,
                abi,
                exports,
                callbacks,
            }),
        })
    }

    fn check_imports(&self, module: &Module) -> Result<(), HostError> {
        let mut unknown = module.imports().filter(|i| {
            !matches!(i.ty(), ExternType::Func(_))
                || !self
                    .inner
                    .linked_names
                    .contains(&(i.module().to_owned(), i.name().to_owned()))
        });
        if let Some(first) = unknown.next() {
            let also: Vec<String> = unknown
                .map(|i| format!("{}::{}", i.module(), i.name()))
                .collect();
            let name = if also.is_empty() {
                first.name().to_owned()
            } else {
                format!("{} (and also {})", first.name(), also.join(", "))
            };
            return Err(HostError::UnknownImport {
                module: first.module().to_owned(),
                name,
            });
        }
        // A known name with the wrong type: say which import, wasmtime's message says how.
        for import in module.imports() {
            let ExternType::Func(ty) = import.ty() else {
                continue;
            };
            let Some(expected) = self.host_func_type(import.module(), import.name()) else {
                continue;
            };
            if !ty.matches(&expected) {
                return Err(HostError::ImportMismatch {
                    module: import.module().to_owned(),
                    name: import.name().to_owned(),
                    reason: format!(
                        "the module expects {}, the host provides {}",
                        describe_func(&ty),
                        describe_func(&expected)
                    ),
                });
            }
        }
        Ok(())
    }

    fn host_func_type(&self, module: &str, name: &str) -> Option<FuncType> {
        // Resolving through a throwaway store is the only public way to read a linker
        // definition's type; it runs once per import at compile time.
        let spec = Arc::new(crate::types::PluginSpec::default());
        let state = HostState::new(spec, AbiVersion::V0_2_1, self.inner.shared.clone(), 0);
        let mut store = wasmtime::Store::new(&self.inner.engine, state);
        match self.inner.linker.get(&mut store, module, name).ok()? {
            wasmtime::Extern::Func(f) => Some(f.ty(&store)),
            _ => None,
        }
    }
}

/// A module compiled once and linked; instances are created from it cheaply.
#[derive(Clone)]
pub struct CompiledModule {
    pub(crate) inner: Arc<CompiledInner>,
}

pub(crate) struct CompiledInner {
    pub(crate) engine: WasmEngine,
    pub(crate) pre: InstancePre<HostState>,
    pub(crate) abi: AbiVersion,
    exports: HashSet<String>,
    /// Exports the body and the trailers callback, for requests and for responses: asked per
    /// request, so not looked up by name.
    callbacks: [[bool; 2]; 2],
}

impl CompiledModule {
    pub fn abi(&self) -> AbiVersion {
        self.inner.abi
    }

    pub fn has_export(&self, name: &str) -> bool {
        self.inner.exports.contains(name)
    }

    /// Whether the module has a body or trailers callback for `stream` (`Request` or
    /// `Response`): only then must a proxy show it that side's body frames.
    pub fn handles_body(&self, stream: StreamType) -> bool {
        self.has_body_callback(stream) || self.has_trailers_callback(stream)
    }

    /// Whether the module exports `proxy_on_request_body` (`Request`) or
    /// `proxy_on_response_body` (`Response`).
    pub fn has_body_callback(&self, stream: StreamType) -> bool {
        self.callbacks(stream)[0]
    }

    /// Whether the module exports `proxy_on_request_trailers` or `proxy_on_response_trailers`.
    pub fn has_trailers_callback(&self, stream: StreamType) -> bool {
        self.callbacks(stream)[1]
    }

    fn callbacks(&self, stream: StreamType) -> [bool; 2] {
        match stream {
            StreamType::Request => self.inner.callbacks[0],
            StreamType::Response => self.inner.callbacks[1],
            StreamType::Downstream | StreamType::Upstream => [false; 2],
        }
    }
}

fn detect_abi(module: &Module) -> Result<AbiVersion, HostError> {
    let has = |name: &str| module.get_export(name).is_some();
    // Newest first: a module announcing several versions gets the newest this host runs.
    for abi in [AbiVersion::V0_2_1, AbiVersion::V0_2_0, AbiVersion::V0_1_0] {
        if has(abi.export_name()) {
            return Ok(abi);
        }
    }
    Err(HostError::UnknownAbi {
        exports: module.exports().map(|e| e.name().to_owned()).collect(),
    })
}

/// Host functions that exist in some ABI versions only (Envoy links them per version, so a
/// module importing one from another version fails to load there too).
fn import_available(abi: AbiVersion, name: &str) -> bool {
    const ONLY_0_1_0: &[&str] = &[
        "proxy_continue_request",
        "proxy_continue_response",
        "proxy_clear_route_cache",
        "proxy_get_configuration",
    ];
    const ONLY_0_2_X: &[&str] = &["proxy_continue_stream", "proxy_close_stream"];
    match abi {
        AbiVersion::V0_1_0 => !ONLY_0_2_X.contains(&name) && name != "proxy_get_log_level",
        // proxy_get_log_level is 0.2.1's addition; 0.2.0 modules may use it here (Envoy would
        // refuse them: see docs/conformance.md).
        AbiVersion::V0_2_0 | AbiVersion::V0_2_1 => !ONLY_0_1_0.contains(&name),
    }
}

fn check_abi_imports(module: &Module, abi: AbiVersion) -> Result<(), HostError> {
    for import in module.imports() {
        if import.module() == "env" && !import_available(abi, import.name()) {
            return Err(HostError::ImportNotInAbi {
                name: import.name().to_owned(),
                abi,
            });
        }
    }
    Ok(())
}

/// Callbacks the host calls: (name, number of i32 params, number of i32 results). ABI 0.1.0
/// differs only in the header callbacks, which have no end_of_stream parameter.
pub(crate) fn callbacks(abi: AbiVersion) -> Vec<(&'static str, usize, usize)> {
    let headers_params = if abi == AbiVersion::V0_1_0 { 2 } else { 3 };
    vec![
        ("_initialize", 0, 0),
        ("_start", 0, 0),
        ("proxy_on_memory_allocate", 1, 1),
        ("malloc", 1, 1),
        ("proxy_on_context_create", 2, 0),
        ("proxy_on_vm_start", 2, 1),
        ("proxy_on_configure", 2, 1),
        ("proxy_on_tick", 1, 0),
        ("proxy_on_queue_ready", 2, 0),
        ("proxy_on_request_headers", headers_params, 1),
        ("proxy_on_request_body", 3, 1),
        ("proxy_on_request_trailers", 2, 1),
        ("proxy_on_response_headers", headers_params, 1),
        ("proxy_on_response_body", 3, 1),
        ("proxy_on_response_trailers", 2, 1),
        ("proxy_on_http_call_response", 5, 0),
        ("proxy_on_grpc_receive_initial_metadata", 3, 0),
        ("proxy_on_grpc_receive", 3, 0),
        ("proxy_on_grpc_receive_trailing_metadata", 3, 0),
        ("proxy_on_grpc_close", 3, 0),
        ("proxy_on_new_connection", 1, 1),
        ("proxy_on_downstream_data", 3, 1),
        ("proxy_on_upstream_data", 3, 1),
        ("proxy_on_downstream_connection_close", 2, 0),
        ("proxy_on_upstream_connection_close", 2, 0),
        ("proxy_on_done", 1, 1),
        ("proxy_on_log", 1, 0),
        ("proxy_on_delete", 1, 0),
    ]
}

fn describe(params: usize, results: usize) -> String {
    format!(
        "(func (param{}) (result{}))",
        " i32".repeat(params),
        " i32".repeat(results)
    )
}

fn describe_func(f: &FuncType) -> String {
    let list = |v: Vec<String>| v.join(" ");
    format!(
        "(func (param {}) (result {}))",
        list(f.params().map(|t| t.to_string()).collect()),
        list(f.results().map(|t| t.to_string()).collect())
    )
}

fn check_exports(module: &Module, abi: AbiVersion) -> Result<(), HostError> {
    match module.get_export("memory") {
        Some(ExternType::Memory(_)) => {}
        _ => {
            return Err(HostError::MissingExport {
                export: "memory".into(),
                why: "host functions read and write the guest's linear memory",
                exports: module.exports().map(|e| e.name().to_owned()).collect(),
            });
        }
    }
    let exports = || module.exports().map(|e| e.name().to_owned()).collect();
    if module.get_export("proxy_on_memory_allocate").is_none()
        && module.get_export("malloc").is_none()
    {
        return Err(HostError::MissingExport {
            export: "proxy_on_memory_allocate".into(),
            why: "the host copies headers, bodies and properties into memory the guest allocates (malloc is accepted too)",
            exports: exports(),
        });
    }
    if module.get_export("proxy_on_context_create").is_none() {
        return Err(HostError::MissingExport {
            export: "proxy_on_context_create".into(),
            why: "the host creates the root and HTTP contexts through it",
            exports: exports(),
        });
    }
    for (name, params, results) in callbacks(abi) {
        let Some(ty) = module.get_export(name) else {
            continue;
        };
        let ok = match &ty {
            ExternType::Func(f) => {
                f.params().len() == params
                    && f.results().len() == results
                    && f.params().all(|p| matches!(p, ValType::I32))
                    && f.results().all(|p| matches!(p, ValType::I32))
            }
            _ => false,
        };
        if !ok {
            let found = match &ty {
                ExternType::Func(f) => describe_func(f),
                other => format!("{other:?}"),
            };
            return Err(HostError::ExportSignature {
                export: name.to_owned(),
                found,
                expected: describe(params, results),
            });
        }
    }
    Ok(())
}
