//! Request metrics with Istio's standard names and labels, and per-plugin call metrics.
//!
//! Hot-path design: every worker thread keeps its own series (a thread-local map from a small
//! `Copy` key to an `Arc` of atomics that only that thread writes), so recording a request is a
//! hash lookup of a few integers plus plain relaxed loads and stores — no lock, no locked
//! instruction, no label string built per request. The label text that does not vary per request
//! (reporter, source and destination) is rendered once per gateway × service when a config is
//! applied and interned, so equal label sets share one `Arc<str>` whose address keys the series.
//! A series is registered in a global list the first time a worker sees its key (cold path);
//! a scrape sums the series of all workers by label text and renders Prometheus text.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use waystone_model::snapshot::{GatewayConfig, GatewayRole, ServiceConfig};
use waystone_wasm::HostError;

/// Istio's `istio_request_duration_milliseconds` buckets, in milliseconds.
pub const DURATION_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];
/// Istio's byte-size buckets (`exponential(1, 10, 8)`).
pub const BYTES_BUCKETS: [f64; 8] = [
    1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0, 1000000.0, 10000000.0,
];
/// Plugin callback latency buckets, in seconds (10 µs … 1 s, the default call deadline).
pub const PLUGIN_CALL_BUCKETS_S: [f64; 13] = [
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25,
    1.0,
];

/// A fast hasher for the thread-local series maps: their keys are a few small integers chosen
/// by this process (not by clients), so SipHash's flooding resistance buys nothing here.
#[derive(Default, Clone, Copy)]
pub(crate) struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Eight bytes per step: names (gateway and service keys) hash in a few steps.
        let mut words = bytes.chunks_exact(8);
        for w in &mut words {
            let mut word = [0u8; 8];
            word.copy_from_slice(w);
            self.write_u64(u64::from_le_bytes(word));
        }
        let rest = words.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.write_u64(u64::from_le_bytes(word));
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    fn write_u8(&mut self, v: u8) {
        self.write_u64(u64::from(v));
    }
    fn write_u16(&mut self, v: u16) {
        self.write_u64(u64::from(v));
    }
    fn write_usize(&mut self, v: usize) {
        self.write_u64(v as u64);
    }
    fn write_isize(&mut self, v: isize) {
        self.write_u64(v as u64);
    }
}

/// A map keyed by internal ids (revisions, addresses, enums) or config names: hashing them
/// with SipHash would cost more than the rest of the lookup, and no client chooses them.
pub(crate) type KeyMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<KeyHasher>>;

/// Adds to a counter that only the current thread writes: a plain load and store (no locked
/// read-modify-write); scrapes on other threads read whole values, never torn ones.
#[inline]
fn bump(a: &AtomicU64, by: u64) {
    a.store(
        a.load(Ordering::Relaxed).wrapping_add(by),
        Ordering::Relaxed,
    );
}

/// A histogram written by one thread: per-bucket counts (not cumulative; the scrape adds them
/// up), the sum in the unit's integer base, and the count.
struct Hist {
    bounds: &'static [f64],
    /// For each bound, the largest raw value that falls in its bucket: `record` compares
    /// integers instead of dividing and searching floats on every sample.
    limits: Box<[u64]>,
    /// `bounds.len() + 1` slots, the last one is `+Inf`.
    buckets: Box<[AtomicU64]>,
    /// Sum in `1 / scale` units of the rendered unit (e.g. µs for a milliseconds histogram).
    sum: AtomicU64,
    scale: f64,
}

impl Hist {
    fn new(bounds: &'static [f64], scale: f64) -> Self {
        Self {
            bounds,
            limits: bounds.iter().map(|b| raw_limit(*b, scale)).collect(),
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
            scale,
        }
    }

    /// Records `raw` (in `1 / scale` units): into the first bucket whose bound is at least
    /// `raw / scale`. A scan from the smallest bound: nearly every sample (a plugin callback,
    /// a proxied request) lands in the first few buckets, so it stops after a compare or two
    /// where a binary search takes four.
    fn record(&self, raw: u64) {
        let i = self
            .limits
            .iter()
            .position(|l| raw <= *l)
            .unwrap_or(self.limits.len());
        bump(&self.buckets[i], 1);
        bump(&self.sum, raw);
    }

    fn add_into(&self, acc: &mut HistTotals) {
        if acc.buckets.is_empty() {
            acc.buckets = vec![0; self.buckets.len()];
            acc.bounds = self.bounds;
            acc.scale = self.scale;
        }
        for (a, b) in acc.buckets.iter_mut().zip(self.buckets.iter()) {
            *a += b.load(Ordering::Relaxed);
        }
        acc.sum += self.sum.load(Ordering::Relaxed);
    }
}

/// The largest `raw` with `raw as f64 / scale <= bound` (the float test the bucket stands
/// for, so integer and float bucketing agree exactly, rounding included).
fn raw_limit(bound: f64, scale: f64) -> u64 {
    let inside = |r: u64| r as f64 / scale <= bound;
    let mut r = (bound * scale) as u64;
    while r > 0 && !inside(r) {
        r -= 1;
    }
    while r < u64::MAX && inside(r + 1) {
        r += 1;
    }
    r
}

#[derive(Default, Clone)]
struct HistTotals {
    bounds: &'static [f64],
    buckets: Vec<u64>,
    sum: u64,
    scale: f64,
}

impl HistTotals {
    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0u64;
        for (i, n) in self.buckets.iter().enumerate() {
            cumulative += n;
            let le = match self.bounds.get(i) {
                Some(b) => format_float(*b),
                None => "+Inf".to_string(),
            };
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
        }
        let sum = self.sum as f64 / self.scale;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", format_float(sum));
        let _ = writeln!(out, "{name}_count{{{labels}}} {cumulative}");
    }
}

fn format_float(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// Escapes a Prometheus label value.
pub(crate) fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

// ------------------------------------------------------------------ label sets

/// Envoy's response flags this proxy can set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResponseFlags {
    None,
    /// No route (or no service) for the request.
    NoRoute,
    /// No healthy upstream host.
    NoHealthyUpstream,
    /// Upstream connection failure.
    UpstreamConnectFailure,
    /// The downstream closed the connection before the response was sent.
    DownstreamDisconnect,
}

impl ResponseFlags {
    pub fn as_str(self) -> &'static str {
        match self {
            ResponseFlags::None => "-",
            ResponseFlags::NoRoute => "NR",
            ResponseFlags::NoHealthyUpstream => "UH",
            ResponseFlags::UpstreamConnectFailure => "UF",
            ResponseFlags::DownstreamDisconnect => "DC",
        }
    }

    /// The flag of a local reply, from its `response_code_details`.
    pub fn from_details(details: &str) -> Self {
        match details {
            "route_not_found" | "unknown_destination" | "service_not_on_waypoint" => {
                ResponseFlags::NoRoute
            }
            "no_healthy_upstream" => ResponseFlags::NoHealthyUpstream,
            "upstream_connect_error" => ResponseFlags::UpstreamConnectFailure,
            _ => ResponseFlags::None,
        }
    }
}

/// The interned, pre-rendered labels of one reporter × destination.
pub type LabelSet = Arc<str>;

fn intern(text: String) -> LabelSet {
    static INTERNED: OnceLock<Mutex<HashMap<String, LabelSet>>> = OnceLock::new();
    let mut map = INTERNED
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    map.entry(text.clone())
        .or_insert_with(|| Arc::from(text))
        .clone()
}

/// Istio's `reporter`: `waypoint` for waypoints; an ingress gateway reports as `source`.
pub fn reporter(gw: &GatewayConfig) -> &'static str {
    match gw.role {
        GatewayRole::Waypoint { .. } => "waypoint",
        GatewayRole::Ingress => "source",
    }
}

/// The labels of requests that `gw` sends to `service` (`None`: no destination was found).
/// Source identities are `unknown`: without mTLS nothing tells this proxy who the peer is.
pub fn label_set(gw: &GatewayConfig, service: Option<&ServiceConfig>) -> LabelSet {
    let unknown = "unknown";
    let (svc_host, svc_name, svc_ns, app, version, canonical, canonical_rev) = match service {
        Some(s) => {
            let app = s.labels.get("app").map(String::as_str).unwrap_or(unknown);
            let version = s
                .labels
                .get("version")
                .map(String::as_str)
                .unwrap_or(unknown);
            let canonical = s
                .labels
                .get("service.istio.io/canonical-name")
                .or_else(|| s.labels.get("app.kubernetes.io/name"))
                .or_else(|| s.labels.get("app"))
                .map(String::as_str)
                .unwrap_or(s.key.name.as_str());
            let rev = s
                .labels
                .get("service.istio.io/canonical-revision")
                .or_else(|| s.labels.get("version"))
                .map(String::as_str)
                .unwrap_or("latest");
            (
                format!("{}.{}.svc.cluster.local", s.key.name, s.key.namespace),
                s.key.name.as_str(),
                s.key.namespace.as_str(),
                app,
                version,
                canonical,
                rev,
            )
        }
        None => (
            unknown.to_string(),
            unknown,
            unknown,
            unknown,
            unknown,
            unknown,
            unknown,
        ),
    };
    let (src_workload, src_ns) = match gw.role {
        // An ingress gateway reports itself as the source, as Istio's gateways do.
        GatewayRole::Ingress => (gw.key.name.as_str(), gw.key.namespace.as_str()),
        GatewayRole::Waypoint { .. } => (unknown, unknown),
    };
    let text = format!(
        "reporter=\"{}\",source_workload=\"{}\",source_workload_namespace=\"{}\",\
         source_principal=\"unknown\",source_app=\"{}\",source_version=\"unknown\",\
         source_canonical_service=\"{}\",source_canonical_revision=\"latest\",\
         source_cluster=\"Kubernetes\",destination_workload=\"unknown\",\
         destination_workload_namespace=\"{}\",destination_principal=\"unknown\",\
         destination_app=\"{}\",destination_version=\"{}\",destination_service=\"{}\",\
         destination_canonical_service=\"{}\",destination_canonical_revision=\"{}\",\
         destination_service_name=\"{}\",destination_service_namespace=\"{}\",\
         destination_cluster=\"Kubernetes\",connection_security_policy=\"{}\"",
        reporter(gw),
        escape(src_workload),
        escape(src_ns),
        escape(src_workload),
        escape(src_workload),
        escape(svc_ns),
        escape(app),
        escape(version),
        escape(&svc_host),
        escape(canonical),
        escape(canonical_rev),
        escape(svc_name),
        escape(svc_ns),
        // Waypoints cannot tell plaintext from mTLS here (no HBONE yet); gateways see plaintext.
        match gw.role {
            GatewayRole::Waypoint { .. } => "unknown",
            GatewayRole::Ingress => "none",
        },
    );
    intern(text)
}

/// Label sets for one config: per gateway, the no-destination set and one per service.
#[derive(Default)]
pub struct LabelTable {
    by_gateway: KeyMap<waystone_model::snapshot::ObjectKey, GatewayLabels>,
}

struct GatewayLabels {
    none: LabelSet,
    services: KeyMap<waystone_model::snapshot::ObjectKey, LabelSet>,
}

impl LabelTable {
    pub fn build(snapshot: &waystone_model::snapshot::Snapshot) -> Self {
        let mut by_gateway = KeyMap::default();
        for gw in &snapshot.gateways {
            let services = snapshot
                .services
                .iter()
                .map(|s| (s.key.clone(), label_set(gw, Some(s))))
                .collect();
            by_gateway.insert(
                gw.key.clone(),
                GatewayLabels {
                    none: label_set(gw, None),
                    services,
                },
            );
        }
        Self { by_gateway }
    }

    pub fn get(
        &self,
        gateway: &waystone_model::snapshot::ObjectKey,
        service: Option<&waystone_model::snapshot::ObjectKey>,
    ) -> Option<LabelSet> {
        let g = self.by_gateway.get(gateway)?;
        Some(match service.and_then(|s| g.services.get(s)) {
            Some(l) => l.clone(),
            None => g.none.clone(),
        })
    }
}

// ------------------------------------------------------------------ request series

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct RequestKey {
    labels: usize,
    code: u16,
    flags: ResponseFlags,
    grpc: bool,
    /// `u16::MAX`: no grpc-status.
    grpc_status: u16,
}

struct RequestSeries {
    requests: AtomicU64,
    duration: Hist,
    request_bytes: Hist,
    response_bytes: Hist,
}

impl RequestSeries {
    fn new() -> Self {
        Self {
            requests: AtomicU64::new(0),
            duration: Hist::new(&DURATION_BUCKETS_MS, 1000.0),
            request_bytes: Hist::new(&BYTES_BUCKETS, 1.0),
            response_bytes: Hist::new(&BYTES_BUCKETS, 1.0),
        }
    }
}

struct RequestEntry {
    labels: LabelSet,
    key: RequestKey,
    series: Arc<RequestSeries>,
}

fn request_registry() -> &'static Mutex<Vec<RequestEntry>> {
    static R: OnceLock<Mutex<Vec<RequestEntry>>> = OnceLock::new();
    R.get_or_init(Default::default)
}

thread_local! {
    static REQUESTS: RefCell<KeyMap<RequestKey, Arc<RequestSeries>>> = RefCell::default();
}

/// One finished request, as the metrics see it.
pub struct RequestSample<'a> {
    pub labels: &'a LabelSet,
    pub code: u16,
    pub flags: ResponseFlags,
    pub grpc: bool,
    pub grpc_status: Option<u16>,
    pub duration: Duration,
    pub request_bytes: u64,
    pub response_bytes: u64,
}

pub fn record_request(s: &RequestSample<'_>) {
    let key = RequestKey {
        labels: Arc::as_ptr(s.labels) as *const u8 as usize,
        code: s.code,
        flags: s.flags,
        grpc: s.grpc,
        grpc_status: s.grpc_status.unwrap_or(u16::MAX),
    };
    REQUESTS.with(|m| {
        let mut m = m.borrow_mut();
        let series = m.entry(key).or_insert_with(|| {
            let series = Arc::new(RequestSeries::new());
            request_registry()
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(RequestEntry {
                    labels: s.labels.clone(),
                    key,
                    series: series.clone(),
                });
            series
        });
        bump(&series.requests, 1);
        series
            .duration
            .record(s.duration.as_micros().min(u64::MAX as u128) as u64);
        series.request_bytes.record(s.request_bytes);
        series.response_bytes.record(s.response_bytes);
    });
}

// ------------------------------------------------------------------ plugin series

/// The guest callbacks the data plane drives, as metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Callback {
    /// Starting this worker's instance (`proxy_on_vm_start`, `proxy_on_configure`).
    Start,
    ContextCreate,
    RequestHeaders,
    RequestBody,
    ResponseHeaders,
    ResponseBody,
    RequestTrailers,
    ResponseTrailers,
    /// `proxy_on_done`, `proxy_on_log` and `proxy_on_delete`, run together at end of stream.
    Done,
    /// L4 (NETWORK) plugins.
    NewConnection,
    DownstreamData,
    UpstreamData,
    /// `proxy_on_downstream_connection_close` and `proxy_on_upstream_connection_close`.
    ConnectionClose,
}

pub const CALLBACKS: [Callback; 13] = [
    Callback::Start,
    Callback::ContextCreate,
    Callback::RequestHeaders,
    Callback::RequestBody,
    Callback::ResponseHeaders,
    Callback::ResponseBody,
    Callback::RequestTrailers,
    Callback::ResponseTrailers,
    Callback::Done,
    Callback::NewConnection,
    Callback::DownstreamData,
    Callback::UpstreamData,
    Callback::ConnectionClose,
];

impl Callback {
    pub fn as_str(self) -> &'static str {
        match self {
            Callback::Start => "proxy_on_configure",
            Callback::ContextCreate => "proxy_on_context_create",
            Callback::RequestHeaders => "proxy_on_request_headers",
            Callback::RequestBody => "proxy_on_request_body",
            Callback::ResponseHeaders => "proxy_on_response_headers",
            Callback::ResponseBody => "proxy_on_response_body",
            Callback::RequestTrailers => "proxy_on_request_trailers",
            Callback::ResponseTrailers => "proxy_on_response_trailers",
            Callback::Done => "proxy_on_done",
            Callback::NewConnection => "proxy_on_new_connection",
            Callback::DownstreamData => "proxy_on_downstream_data",
            Callback::UpstreamData => "proxy_on_upstream_data",
            Callback::ConnectionClose => "proxy_on_connection_close",
        }
    }
}

/// How a plugin callback ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CallOutcome {
    Continue,
    Pause,
    LocalReply(u16),
    Trap,
    Deadline,
    Memory,
    /// Any other host error (an unusable instance, an unknown context).
    Error,
    /// An L4 plugin closed its connection (`proxy_close_stream`).
    Close,
}

impl CallOutcome {
    pub fn of(result: &Result<(), &HostError>, paused: bool, local_reply: Option<u16>) -> Self {
        match result {
            Ok(()) => match local_reply {
                Some(code) => CallOutcome::LocalReply(code),
                None if paused => CallOutcome::Pause,
                None => CallOutcome::Continue,
            },
            Err(HostError::Trap { .. }) => CallOutcome::Trap,
            Err(HostError::DeadlineExceeded { .. }) => CallOutcome::Deadline,
            Err(HostError::MemoryLimit { .. }) => CallOutcome::Memory,
            Err(_) => CallOutcome::Error,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CallOutcome::Continue => "continue",
            CallOutcome::Pause => "pause",
            CallOutcome::LocalReply(_) => "local_reply",
            CallOutcome::Trap => "trap",
            CallOutcome::Deadline => "deadline",
            CallOutcome::Memory => "memory",
            CallOutcome::Error => "error",
            CallOutcome::Close => "close",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct PluginKey {
    /// The loaded plugin's revision (names are looked up only when a series is new).
    revision: u64,
    callback: Callback,
    outcome: CallOutcome,
}

struct PluginSeries {
    calls: AtomicU64,
    /// Nanoseconds, rendered in seconds.
    duration: Hist,
}

struct PluginEntry {
    name: Arc<str>,
    key: PluginKey,
    series: Arc<PluginSeries>,
}

fn plugin_registry() -> &'static Mutex<Vec<PluginEntry>> {
    static R: OnceLock<Mutex<Vec<PluginEntry>>> = OnceLock::new();
    R.get_or_init(Default::default)
}

thread_local! {
    static PLUGINS: RefCell<KeyMap<PluginKey, Arc<PluginSeries>>> = RefCell::default();
}

/// Counts one call by its full key: the path of the outcomes [`PluginCalls`] does not cache.
fn record_plugin_call(
    revision: u64,
    name: &str,
    callback: Callback,
    outcome: CallOutcome,
    took: Duration,
) {
    let key = PluginKey {
        revision,
        callback,
        outcome,
    };
    series_for(key, name).record(took);
}

/// This thread's series of `key`, registered (under `name`) for rendering when new.
fn series_for(key: PluginKey, name: &str) -> Arc<PluginSeries> {
    PLUGINS.with(|m| {
        m.borrow_mut()
            .entry(key)
            .or_insert_with(|| {
                let series = Arc::new(PluginSeries {
                    calls: AtomicU64::new(0),
                    duration: Hist::new(&PLUGIN_CALL_BUCKETS_S, 1e9),
                });
                plugin_registry()
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(PluginEntry {
                        name: intern(name.to_string()),
                        key,
                        series: series.clone(),
                    });
                series
            })
            .clone()
    })
}

impl PluginSeries {
    fn record(&self, took: Duration) {
        bump(&self.calls, 1);
        self.duration
            .record(took.as_nanos().min(u64::MAX as u128) as u64);
    }
}

/// One worker's handle on the call series of one plugin revision, kept with its instance.
/// The outcomes nearly every call ends with (continue, pause) are reached by index, so a
/// request pays no map lookup per callback; other outcomes go through
/// [`record_plugin_call`]. Both paths count into the same series.
pub struct PluginCalls {
    revision: u64,
    name: String,
    common: RefCell<[Option<Arc<PluginSeries>>; CALLBACKS.len() * 2]>,
}

impl PluginCalls {
    pub fn new(revision: u64, name: &str) -> Self {
        PluginCalls {
            revision,
            name: name.to_string(),
            common: RefCell::new(std::array::from_fn(|_| None)),
        }
    }

    pub fn record(&self, callback: Callback, outcome: CallOutcome, took: Duration) {
        let slot = match outcome {
            CallOutcome::Continue => 0,
            CallOutcome::Pause => 1,
            _ => return record_plugin_call(self.revision, &self.name, callback, outcome, took),
        };
        let mut common = self.common.borrow_mut();
        common[callback as usize * 2 + slot]
            .get_or_insert_with(|| {
                let key = PluginKey {
                    revision: self.revision,
                    callback,
                    outcome,
                };
                series_for(key, &self.name)
            })
            .record(took);
    }
}

/// Live instances of one plugin on one worker, for the instance gauges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceStats {
    pub plugin: String,
    pub instances: u64,
    pub memory_bytes: u64,
}

// ------------------------------------------------------------------ rendering

/// Appends every request and plugin metric of this process, in Prometheus text format.
pub fn render_prometheus(out: &mut String) {
    render_requests(out);
    render_plugin_calls(out);
}

fn render_requests(out: &mut String) {
    #[derive(Default)]
    struct Totals {
        requests: u64,
        duration: HistTotals,
        request_bytes: HistTotals,
        response_bytes: HistTotals,
    }
    let mut merged: BTreeMap<String, Totals> = BTreeMap::new();
    {
        let registry = request_registry().lock().unwrap_or_else(|p| p.into_inner());
        for e in registry.iter() {
            let grpc_status = if e.key.grpc_status == u16::MAX {
                String::new()
            } else {
                e.key.grpc_status.to_string()
            };
            let labels = format!(
                "{},request_protocol=\"{}\",response_code=\"{}\",grpc_response_status=\"{}\",response_flags=\"{}\"",
                e.labels,
                if e.key.grpc { "grpc" } else { "http" },
                e.key.code,
                grpc_status,
                e.key.flags.as_str()
            );
            let t = merged.entry(labels).or_default();
            t.requests += e.series.requests.load(Ordering::Relaxed);
            e.series.duration.add_into(&mut t.duration);
            e.series.request_bytes.add_into(&mut t.request_bytes);
            e.series.response_bytes.add_into(&mut t.response_bytes);
        }
    }
    if merged.is_empty() {
        return;
    }
    out.push_str("# TYPE istio_requests_total counter\n");
    for (labels, t) in &merged {
        let _ = writeln!(out, "istio_requests_total{{{labels}}} {}", t.requests);
    }
    out.push_str("# TYPE istio_request_duration_milliseconds histogram\n");
    for (labels, t) in &merged {
        t.duration
            .render(out, "istio_request_duration_milliseconds", labels);
    }
    out.push_str("# TYPE istio_request_bytes histogram\n");
    for (labels, t) in &merged {
        t.request_bytes.render(out, "istio_request_bytes", labels);
    }
    out.push_str("# TYPE istio_response_bytes histogram\n");
    for (labels, t) in &merged {
        t.response_bytes.render(out, "istio_response_bytes", labels);
    }
}

fn render_plugin_calls(out: &mut String) {
    let mut calls: BTreeMap<(Arc<str>, Callback, CallOutcome), u64> = BTreeMap::new();
    let mut durations: BTreeMap<(Arc<str>, Callback), HistTotals> = BTreeMap::new();
    {
        let registry = plugin_registry().lock().unwrap_or_else(|p| p.into_inner());
        for e in registry.iter() {
            *calls
                .entry((e.name.clone(), e.key.callback, e.key.outcome))
                .or_default() += e.series.calls.load(Ordering::Relaxed);
            e.series.duration.add_into(
                durations
                    .entry((e.name.clone(), e.key.callback))
                    .or_default(),
            );
        }
    }
    if calls.is_empty() {
        return;
    }
    out.push_str("# TYPE waystone_wasm_plugin_calls_total counter\n");
    for ((name, cb, outcome), n) in &calls {
        let code = match outcome {
            CallOutcome::LocalReply(c) => c.to_string(),
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "waystone_wasm_plugin_calls_total{{plugin=\"{}\",callback=\"{}\",outcome=\"{}\",response_code=\"{code}\"}} {n}",
            escape(name),
            cb.as_str(),
            outcome.as_str(),
        );
    }
    out.push_str("# TYPE waystone_wasm_plugin_call_duration_seconds histogram\n");
    for ((name, cb), h) in &durations {
        let labels = format!("plugin=\"{}\",callback=\"{}\"", escape(name), cb.as_str());
        h.render(out, "waystone_wasm_plugin_call_duration_seconds", &labels);
    }
}

/// Appends the instance gauges (summed over workers) for `stats`.
pub fn render_instances(out: &mut String, stats: &[InstanceStats]) {
    let mut merged: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    for s in stats {
        let e = merged.entry(s.plugin.as_str()).or_default();
        e.0 += s.instances;
        e.1 += s.memory_bytes;
    }
    out.push_str("# TYPE waystone_wasm_plugin_instances gauge\n");
    for (name, (n, _)) in &merged {
        let _ = writeln!(
            out,
            "waystone_wasm_plugin_instances{{plugin=\"{}\"}} {n}",
            escape(name)
        );
    }
    out.push_str("# TYPE waystone_wasm_plugin_memory_bytes gauge\n");
    for (name, (_, bytes)) in &merged {
        let _ = writeln!(
            out,
            "waystone_wasm_plugin_memory_bytes{{plugin=\"{}\"}} {bytes}",
            escape(name)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_with_le_inclusive() {
        let h = Hist::new(&DURATION_BUCKETS_MS, 1000.0);
        h.record(500); // 0.5 ms: in le=0.5
        h.record(501); // just above: le=1
        h.record(4_000_000_000); // beyond the last bound: +Inf only
        let mut t = HistTotals::default();
        h.add_into(&mut t);
        let mut out = String::new();
        t.render(&mut out, "x", "a=\"b\"");
        assert!(out.contains("x_bucket{a=\"b\",le=\"0.5\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"1\"} 2\n"), "{out}");
        assert!(
            out.contains("x_bucket{a=\"b\",le=\"3600000\"} 2\n"),
            "{out}"
        );
        assert!(out.contains("x_bucket{a=\"b\",le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_count{a=\"b\"} 3\n"), "{out}");
        assert!(out.contains("x_sum{a=\"b\"} 4000001.001\n"), "{out}");
    }

    #[test]
    fn integer_bucketing_agrees_with_the_float_bounds() {
        let sets: [(&'static [f64], f64); 3] = [
            (&DURATION_BUCKETS_MS, 1000.0),
            (&BYTES_BUCKETS, 1.0),
            (&PLUGIN_CALL_BUCKETS_S, 1e9),
        ];
        for (bounds, scale) in sets {
            for &b in bounds {
                let limit = raw_limit(b, scale);
                assert!(limit as f64 / scale <= b, "{b}: {limit} is past the bound");
                assert!(
                    (limit + 1) as f64 / scale > b,
                    "{b}: {} is inside",
                    limit + 1
                );
            }
            let h = Hist::new(bounds, scale);
            for raw in [
                0,
                1,
                499,
                500,
                501,
                9_999,
                10_000,
                10_001,
                25_000,
                1_000_000_000,
                u64::MAX,
            ] {
                let want = bounds.partition_point(|b| *b < raw as f64 / scale);
                let before: Vec<u64> = h
                    .buckets
                    .iter()
                    .map(|b| b.load(Ordering::Relaxed))
                    .collect();
                h.record(raw);
                let hit: Vec<usize> = (0..before.len())
                    .filter(|&i| h.buckets[i].load(Ordering::Relaxed) != before[i])
                    .collect();
                assert_eq!(hit, [want], "{raw} / {scale}");
            }
        }
    }

    #[test]
    fn a_plugin_handle_and_the_by_key_path_count_into_the_same_series() {
        // A revision no other test uses: the registry is process-wide.
        let calls = PluginCalls::new(0xfeed_0001, "handle-test");
        let took = Duration::from_micros(3);
        let headers = |outcome| calls.record(Callback::RequestHeaders, outcome, took);
        headers(CallOutcome::Continue);
        headers(CallOutcome::Continue);
        headers(CallOutcome::Pause);
        // Outcomes the handle does not cache take the keyed path.
        headers(CallOutcome::LocalReply(401));
        let (rev, name) = (0xfeed_0001, "handle-test");
        record_plugin_call(
            rev,
            name,
            Callback::RequestHeaders,
            CallOutcome::Continue,
            took,
        );
        calls.record(Callback::Done, CallOutcome::Continue, took);
        let mut out = String::new();
        render_plugin_calls(&mut out);
        let count = |callback: &str, outcome: &str| {
            out.lines()
                .find(|l| {
                    l.starts_with("waystone_wasm_plugin_calls_total{plugin=\"handle-test\"")
                        && l.contains(&format!("callback=\"{callback}\""))
                        && l.contains(&format!("outcome=\"{outcome}\""))
                })
                .and_then(|l| l.rsplit(' ').next())
                .map(str::to_string)
                .unwrap_or_default()
        };
        assert_eq!(count("proxy_on_request_headers", "continue"), "3", "{out}");
        assert_eq!(count("proxy_on_request_headers", "pause"), "1", "{out}");
        assert_eq!(
            count("proxy_on_request_headers", "local_reply"),
            "1",
            "{out}"
        );
        assert_eq!(count("proxy_on_done", "continue"), "1", "{out}");
        // The five request-headers calls, whichever path they took, share one duration series.
        assert!(
            out.contains("waystone_wasm_plugin_call_duration_seconds_count{plugin=\"handle-test\",callback=\"proxy_on_request_headers\"} 5"),
            "{out}"
        );
    }

    #[test]
    fn series_of_several_threads_merge_by_labels() {
        let labels = intern("reporter=\"test-merge\"".to_string());
        let sample = |code| RequestSample {
            labels: &labels,
            code,
            flags: ResponseFlags::None,
            grpc: false,
            grpc_status: None,
            duration: Duration::from_millis(3),
            request_bytes: 0,
            response_bytes: 42,
        };
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    record_request(&sample(200));
                    record_request(&sample(200));
                    record_request(&sample(401));
                });
            }
        });
        let mut out = String::new();
        render_requests(&mut out);
        let line = |code: u16| {
            out.lines()
                .find(|l| {
                    l.starts_with("istio_requests_total{reporter=\"test-merge\"")
                        && l.contains(&format!("response_code=\"{code}\""))
                })
                .map(str::to_string)
                .unwrap_or_default()
        };
        assert!(line(200).ends_with(" 6"), "{out}");
        assert!(line(401).ends_with(" 3"), "{out}");
        assert!(
            out.contains("istio_response_bytes_bucket{reporter=\"test-merge\",request_protocol=\"http\",response_code=\"200\",grpc_response_status=\"\",response_flags=\"-\",le=\"100\"} 6"),
            "{out}"
        );
    }

    #[test]
    fn flags_from_details() {
        assert_eq!(
            ResponseFlags::from_details("route_not_found").as_str(),
            "NR"
        );
        assert_eq!(
            ResponseFlags::from_details("no_healthy_upstream").as_str(),
            "UH"
        );
        assert_eq!(
            ResponseFlags::from_details("upstream_connect_error").as_str(),
            "UF"
        );
        assert_eq!(
            ResponseFlags::from_details("wasm:default.a:401").as_str(),
            "-"
        );
    }
}
