//! Plain data exchanged with the data plane: the host knows no HTTP server, so a stream is
//! just headers, bodies, trailers and a few connection facts.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

/// The Proxy-Wasm ABI a module announces through its `proxy_abi_version_*` export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbiVersion {
    V0_1_0,
    V0_2_0,
    V0_2_1,
}

impl AbiVersion {
    /// The name of the marker export announcing this version.
    pub fn export_name(self) -> &'static str {
        match self {
            AbiVersion::V0_1_0 => "proxy_abi_version_0_1_0",
            AbiVersion::V0_2_0 => "proxy_abi_version_0_2_0",
            AbiVersion::V0_2_1 => "proxy_abi_version_0_2_1",
        }
    }
}

impl std::fmt::Display for AbiVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AbiVersion::V0_1_0 => f.write_str("0.1.0"),
            AbiVersion::V0_2_0 => f.write_str("0.2.0"),
            AbiVersion::V0_2_1 => f.write_str("0.2.1"),
        }
    }
}

/// What a plugin instance is started with.
#[derive(Debug, Clone, Default)]
pub struct PluginSpec {
    /// `<namespace>.<name>`: used in logs, errors and as the `plugin_name` property.
    pub name: String,
    pub root_id: String,
    pub vm_id: String,
    pub plugin_configuration: Vec<u8>,
    pub vm_configuration: Vec<u8>,
    /// Environment visible to the guest through WASI `environ_get`.
    pub env: Vec<(String, String)>,
}

/// What a header or body callback tells the data plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Continue,
    /// Headers: stop until `proxy_continue_stream`; bodies: buffer until end of stream.
    Pause,
}

/// Direction of an HTTP stream, as named by `proxy_continue_stream` / `proxy_close_stream`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamType {
    Request,
    Response,
    /// L4: the client side of a TCP connection.
    Downstream,
    /// L4: the server side of a TCP connection.
    Upstream,
}

/// An ordered multimap of lowercase header names to raw values.
///
/// Pseudo-headers (`:method`, `:path`, `:authority`, `:scheme`, `:status`) are ordinary
/// entries so that plugins see them the way Envoy presents them.
///
/// The data plane builds one of these per request and direction, and plugins mostly read
/// them, so names and values live back to back in one buffer with a list of spans: building a
/// map of n headers costs two allocations instead of 2n, and dropping it two frees. Removed
/// entries leave their bytes behind until the map is compacted (when more than half of the
/// buffer is dead).
#[derive(Default, Clone)]
pub struct HeaderMap {
    buf: Vec<u8>,
    spans: Vec<Span>,
    /// Bytes of `buf` no span points at any more.
    dead: usize,
    /// Set by every change; the data plane clears it once it has built the map from the wire,
    /// and forwards the original head untouched when no plugin changed anything.
    modified: bool,
}

#[derive(Debug, Clone, Copy)]
struct Span {
    name_at: u32,
    name_len: u32,
    value_len: u32,
}

impl Span {
    fn name<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        let at = self.name_at as usize;
        &buf[at..at + self.name_len as usize]
    }

    fn value<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        let at = self.name_at as usize + self.name_len as usize;
        &buf[at..at + self.value_len as usize]
    }

    fn bytes(&self) -> usize {
        self.name_len as usize + self.value_len as usize
    }
}

/// Header names compare case-insensitively; names are nearly always lowercase on both sides,
/// so an exact comparison settles most of them without folding each byte.
fn same_name(stored: &[u8], name: &[u8]) -> bool {
    stored.len() == name.len() && (stored == name || stored.eq_ignore_ascii_case(name))
}

/// Cleared maps kept for reuse on this thread ([`HeaderMap::recycle`]): the data plane
/// builds a request and a response map for every request that runs plugins, and reusing their
/// buffers saves four allocations and four frees per request.
const SPARE_MAPS: usize = 64;
/// A map whose buffer grew past this many bytes is freed, not kept.
const SPARE_MAP_BYTES: usize = 16 << 10;
/// What [`HeaderMap::reusing`] reserves per entry, a guess: summing the real sizes first would
/// walk the headers twice, the buffer grows if the guess is short, and recycled buffers are
/// nearly always large enough already.
const GUESSED_ENTRY_BYTES: usize = 40;

thread_local! {
    static SPARE_MAPS_HERE: std::cell::RefCell<Vec<HeaderMap>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

impl HeaderMap {
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty map with room for `entries` headers of a typical size plus `extra_bytes`,
    /// built on the buffers of a map recycled on this thread when there is one.
    pub fn reusing(entries: usize, extra_bytes: usize) -> Self {
        let bytes = entries * GUESSED_ENTRY_BYTES + extra_bytes;
        let spare = SPARE_MAPS_HERE
            .try_with(|s| s.borrow_mut().pop())
            .ok()
            .flatten();
        match spare {
            Some(mut m) => {
                m.buf.reserve(bytes);
                m.spans.reserve(entries);
                m
            }
            None => Self::with_capacity(entries, bytes),
        }
    }

    /// Clears the map and keeps its buffers for [`Self::reusing`] on this thread (unless the
    /// thread keeps enough already, or the buffer grew large).
    pub fn recycle(mut self) {
        if self.spans.capacity() == 0 || self.buf.capacity() > SPARE_MAP_BYTES {
            return;
        }
        self.buf.clear();
        self.spans.clear();
        self.dead = 0;
        self.modified = false;
        let _ = SPARE_MAPS_HERE.try_with(|s| {
            let mut s = s.borrow_mut();
            if s.len() < SPARE_MAPS {
                s.push(self);
            }
        });
    }

    /// Room for `entries` headers of `bytes` name and value bytes in all.
    pub fn with_capacity(entries: usize, bytes: usize) -> Self {
        HeaderMap {
            buf: Vec::with_capacity(bytes),
            spans: Vec::with_capacity(entries),
            dead: 0,
            modified: false,
        }
    }

    /// Whether the map changed since it was built or since [`Self::mark_unmodified`].
    pub fn is_modified(&self) -> bool {
        self.modified
    }

    /// Forgets earlier changes: what [`Self::is_modified`] reports starts from here.
    pub fn mark_unmodified(&mut self) {
        self.modified = false;
    }

    /// The first value stored under `name` (case-insensitive), as Envoy's
    /// `getHeaderMapValue` answers for repeated headers.
    pub fn get(&self, name: impl AsRef<[u8]>) -> Option<&[u8]> {
        let name = name.as_ref();
        self.spans
            .iter()
            .find(|s| same_name(s.name(&self.buf), name))
            .map(|s| s.value(&self.buf))
    }

    /// Every value stored under `name`, in order.
    pub fn get_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.spans
            .iter()
            .filter(move |s| same_name(s.name(&self.buf), name.as_bytes()))
            .map(|s| s.value(&self.buf))
    }

    /// Replaces every entry named `name` by one entry holding `value`, placed last: Envoy's
    /// header maps remove the old entries and append the new one, and plugins can tell.
    pub fn set(&mut self, name: &str, value: impl AsRef<[u8]>) {
        self.remove(name);
        self.add(name, value);
    }

    /// Appends an entry, keeping any existing ones with the same name.
    pub fn add(&mut self, name: &str, value: impl AsRef<[u8]>) {
        let at = self.buf.len();
        self.buf.extend_from_slice(name.as_bytes());
        self.buf[at..].make_ascii_lowercase();
        self.push_raw(at, name.len(), value.as_ref());
    }

    /// Appends an entry whose name is taken as given (callers that already hold a lowercase
    /// name, or that must keep the name a plugin wrote).
    pub fn add_exact(&mut self, name: &str, value: impl AsRef<[u8]>) {
        let at = self.buf.len();
        self.buf.extend_from_slice(name.as_bytes());
        self.push_raw(at, name.len(), value.as_ref());
    }

    fn push_raw(&mut self, name_at: usize, name_len: usize, value: &[u8]) {
        self.modified = true;
        self.buf.extend_from_slice(value);
        // Header maps are bounded far below 4 GiB by the listeners and the plugin memory cap.
        self.spans.push(Span {
            name_at: name_at as u32,
            name_len: name_len as u32,
            value_len: value.len() as u32,
        });
    }

    /// Removes every entry named `name`; returns whether any was present.
    pub fn remove(&mut self, name: &str) -> bool {
        let before = self.spans.len();
        let buf = &self.buf;
        let mut freed = 0;
        self.spans.retain(|s| {
            let keep = !same_name(s.name(buf), name.as_bytes());
            if !keep {
                freed += s.bytes();
            }
            keep
        });
        self.dead += freed;
        self.modified |= before != self.spans.len();
        if self.dead > 4096 && self.dead * 2 > self.buf.len() {
            self.compact();
        }
        before != self.spans.len()
    }

    fn compact(&mut self) {
        let mut fresh = HeaderMap::with_capacity(self.spans.len(), self.buf.len() - self.dead);
        fresh.modified = self.modified;
        for (k, v) in self.iter_bytes() {
            let at = fresh.buf.len();
            fresh.buf.extend_from_slice(k);
            fresh.push_raw(at, k.len(), v);
        }
        *self = fresh;
    }

    /// Replaces the whole map with `pairs`, names kept as given.
    pub fn replace_all<K: AsRef<str>, V: AsRef<[u8]>>(&mut self, pairs: &[(K, V)]) {
        self.clear();
        for (k, v) in pairs {
            self.add_exact(k.as_ref(), v);
        }
    }

    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Entries in order. Names were written from `&str`, so they are UTF-8.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&str, &[u8])> + Clone {
        self.spans.iter().map(|s| {
            (
                std::str::from_utf8(s.name(&self.buf)).unwrap_or_default(),
                s.value(&self.buf),
            )
        })
    }

    fn iter_bytes(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.spans
            .iter()
            .map(|s| (s.name(&self.buf), s.value(&self.buf)))
    }

    /// Envoy's `byteSize()`: the sum of name and value lengths.
    pub fn byte_size(&self) -> usize {
        self.spans.iter().map(Span::bytes).sum()
    }

    pub fn clear(&mut self) {
        self.modified |= !self.spans.is_empty();
        self.buf.clear();
        self.spans.clear();
        self.dead = 0;
    }
}

impl PartialEq for HeaderMap {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter_bytes().eq(other.iter_bytes())
    }
}

impl Eq for HeaderMap {}

impl std::fmt::Debug for HeaderMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(
                self.iter()
                    .map(|(k, v)| (k, String::from_utf8_lossy(v).into_owned())),
            )
            .finish()
    }
}

impl<K: AsRef<str>, V: AsRef<[u8]>> FromIterator<(K, V)> for HeaderMap {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut map = HeaderMap::new();
        for (k, v) in iter {
            map.add(k.as_ref(), v);
        }
        map
    }
}

/// A reply the plugin asked for with `proxy_send_local_response`.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalResponse {
    pub status: u16,
    pub details: String,
    pub body: Vec<u8>,
    /// Lowercase names, in the order the plugin gave them.
    pub headers: Vec<(String, Vec<u8>)>,
    /// -1 when the plugin did not ask for a gRPC status.
    pub grpc_status: i32,
}

/// A mutual-TLS downstream connection as plugins see it (`connection.mtls`,
/// `source.principal`, `connection.uri_san_peer_certificate`, ...).
#[derive(Debug, Default, Clone)]
pub struct MtlsProperties {
    /// The peer's SPIFFE URI (Istio's `source.principal`).
    pub peer_principal: String,
    /// Our own SPIFFE URI (`destination.principal`).
    pub local_principal: String,
    /// "TLSv1.3".
    pub tls_version: String,
}

/// A name a request's properties share with the data plane (route, cluster, node id); empty
/// is `None`. Not an empty `Arc<str>`: that is a clone of std's one static empty `Arc`, whose
/// count every thread writes, and each request built and dropped six of them (the defaults
/// under its stream's and properties' `..Default::default()`): twelve atomic
/// read-modify-writes a request on one cache line all the workers share.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SharedName(Option<Arc<str>>);

impl SharedName {
    pub fn as_str(&self) -> &str {
        self.0.as_deref().unwrap_or("")
    }
}

impl std::ops::Deref for SharedName {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl From<Arc<str>> for SharedName {
    fn from(name: Arc<str>) -> Self {
        SharedName((!name.is_empty()).then_some(name))
    }
}

impl From<Option<Arc<str>>> for SharedName {
    fn from(name: Option<Arc<str>>) -> Self {
        name.map(SharedName::from).unwrap_or_default()
    }
}

impl From<&str> for SharedName {
    fn from(name: &str) -> Self {
        SharedName((!name.is_empty()).then(|| Arc::from(name)))
    }
}

impl From<String> for SharedName {
    fn from(name: String) -> Self {
        SharedName::from(name.as_str())
    }
}

/// Connection and request facts behind `proxy_get_property`.
#[derive(Debug, Default, Clone)]
pub struct StreamProperties {
    pub source: Option<SocketAddr>,
    pub destination: Option<SocketAddr>,
    pub connection_id: u64,
    pub request_id: Option<String>,
    /// "HTTP/1.1", "HTTP/2".
    pub protocol: &'static str,
    pub start_time: Option<SystemTime>,
    /// Names shared with the snapshot they come from (one per route and cluster, not one copy
    /// per request).
    pub route_name: SharedName,
    pub cluster_name: SharedName,
    pub response_code: Option<u16>,
    /// Envoy's `response.code_details` (e.g. `via_upstream`, `wasm:<plugin>:<status>`).
    pub response_code_details: String,
    /// Envoy's `response.flags` bitset (0 when nothing went wrong).
    pub response_flags: u64,
    /// The upstream host the request was sent to, once picked.
    pub upstream: Option<SocketAddr>,
    /// The SNI the client asked for (TLS listeners only).
    pub requested_server_name: String,
    pub node_id: SharedName,
    /// The downstream mutual-TLS facts (HBONE), `None` on plaintext connections.
    pub mtls: Option<MtlsProperties>,
    /// Envoy's `node.cluster` (the proxy's service cluster).
    pub node_cluster: String,
    /// Values written by plugins with `proxy_set_property` (and readable by later plugins of the
    /// chain); key = the NUL-separated path as given.
    pub extra: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// One HTTP exchange as the plugins of a chain see it: a pointer to its [`StreamData`], so
/// that attaching it to an instance for each callback (and handing it between the phases of a
/// request) moves one pointer, not the whole state.
#[derive(Debug, Default)]
pub struct HttpStream(Box<StreamData>);

impl From<StreamData> for HttpStream {
    fn from(data: StreamData) -> Self {
        HttpStream(Box::new(data))
    }
}

impl std::ops::Deref for HttpStream {
    type Target = StreamData;
    fn deref(&self) -> &StreamData {
        &self.0
    }
}

impl std::ops::DerefMut for HttpStream {
    fn deref_mut(&mut self) -> &mut StreamData {
        &mut self.0
    }
}

/// Headers the embedder hands over unconverted ([`StreamData::request_source`],
/// [`StreamData::response_source`]): a chain whose plugins never look at them pays no
/// conversion, and one that only reads a few values by name pays none either when the source
/// answers [`Self::first_value`].
pub trait HeaderSource: std::fmt::Debug + Send + Sync {
    /// How many entries the converted map holds: the count the headers callback is given.
    fn count(&self) -> usize;
    /// Appends the entries to `into`, which is empty.
    fn fill(&self, into: &mut HeaderMap);
    /// Appends to `out` the first value the converted map would hold under `name` (compared
    /// without regard to case, as [`HeaderMap::get`]) and says whether there was one; `None`
    /// when the source cannot tell without being converted.
    fn first_value(&self, _name: &[u8], _out: &mut Vec<u8>) -> Option<bool> {
        None
    }
}

/// What an [`HttpStream`] holds.
#[derive(Debug, Default)]
pub struct StreamData {
    /// Empty while [`Self::request_source`] is set.
    pub request_headers: HeaderMap,
    /// Request headers not converted yet: reads by name are answered by the source when it
    /// can; anything else that touches the request headers (a change, the whole map, its size,
    /// a `request.*` property) converts them into `request_headers` first
    /// ([`Self::convert_request_headers`]).
    pub request_source: Option<Arc<dyn HeaderSource>>,
    pub request_body: Vec<u8>,
    pub request_trailers: HeaderMap,
    /// Empty while [`Self::response_source`] is set.
    pub response_headers: HeaderMap,
    /// Response headers not converted yet. The first host function that reads or changes the
    /// response headers (or a `response.*` property) converts them into `response_headers`
    /// ([`Self::convert_response_headers`]); an embedder that sets `response_headers` itself
    /// leaves this `None`.
    pub response_source: Option<Arc<dyn HeaderSource>>,
    pub response_body: Vec<u8>,
    pub response_trailers: HeaderMap,
    /// Set by `proxy_send_local_response`; the data plane answers with it.
    pub local_response: Option<LocalResponse>,
    /// Set when the guest called `proxy_continue_stream` (request or response); the data plane
    /// clears it.
    pub continue_requested: Option<StreamType>,
    /// Whether the data plane has seen the end of the request / response body. Plugins read
    /// the buffered part of a body through buffer types 0/1; the data plane appends each
    /// chunk before calling the body callback and drains what a plugin lets through.
    pub request_complete: bool,
    pub response_complete: bool,
    /// Bytes of request / response body seen so far (for `request.size` / `response.size`).
    pub request_body_bytes: u64,
    pub response_body_bytes: u64,
    pub properties: StreamProperties,
}

/// Converts `source` into `map` if it is still pending; the converted map counts as
/// unmodified.
fn convert(source: &mut Option<Arc<dyn HeaderSource>>, map: &mut HeaderMap) {
    if let Some(source) = source.take() {
        let mut converted = HeaderMap::reusing(source.count(), 0);
        source.fill(&mut converted);
        converted.mark_unmodified();
        std::mem::replace(map, converted).recycle();
    }
}

impl StreamData {
    /// The request headers, converted from [`Self::request_source`] first if still pending.
    pub fn convert_request_headers(&mut self) -> &mut HeaderMap {
        convert(&mut self.request_source, &mut self.request_headers);
        &mut self.request_headers
    }

    /// How many request headers there are, converted or not.
    pub fn request_header_count(&self) -> usize {
        match &self.request_source {
            Some(source) => source.count(),
            None => self.request_headers.len(),
        }
    }

    /// The response headers, converted from [`Self::response_source`] first if still pending.
    pub fn convert_response_headers(&mut self) -> &mut HeaderMap {
        convert(&mut self.response_source, &mut self.response_headers);
        &mut self.response_headers
    }

    /// How many response headers there are, converted or not.
    pub fn response_header_count(&self) -> usize {
        match &self.response_source {
            Some(source) => source.count(),
            None => self.response_headers.len(),
        }
    }
}

/// An HTTP request a plugin asked for with `proxy_http_call`, queued on the instance until the
/// embedder takes it ([`crate::PluginInstance::take_callouts`]) and later answers it with
/// [`crate::PluginInstance::on_http_call_response`].
#[derive(Debug, Clone, PartialEq)]
pub struct PendingCallout {
    pub token: u32,
    /// The context that issued the call (root or HTTP); the response goes back to it.
    pub context_id: u32,
    /// As the plugin named it: a cluster name (`outbound|9080||reviews.default.svc.cluster.local`)
    /// or a host and port (`reviews:9080`).
    pub upstream: String,
    /// Includes `:method`, `:path` and `:authority` (checked when queued).
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    pub trailers: Vec<(String, Vec<u8>)>,
    pub timeout: std::time::Duration,
}

/// What came back for a callout. A transport failure is delivered as `None` (no headers,
/// `proxy_get_status` = BrokenConnection), as Envoy does for a reset stream.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HttpCallResponse {
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    pub trailers: HeaderMap,
}

/// A gRPC operation a plugin asked for, queued on the instance for the embedder
/// ([`crate::PluginInstance::take_grpc_commands`]).
#[derive(Debug, Clone, PartialEq)]
pub enum GrpcCommand {
    /// `proxy_grpc_call`: one request message, one response.
    Call {
        token: u32,
        context_id: u32,
        call: GrpcTarget,
        message: Vec<u8>,
        timeout: std::time::Duration,
    },
    /// `proxy_grpc_stream`: opens a bidirectional stream; messages follow as `Send`.
    OpenStream {
        token: u32,
        context_id: u32,
        call: GrpcTarget,
    },
    /// `proxy_grpc_send`.
    Send {
        token: u32,
        message: Vec<u8>,
        end_of_stream: bool,
    },
    /// `proxy_grpc_cancel`: abandon without telling the plugin.
    Cancel { token: u32 },
    /// `proxy_grpc_close`: half-close the local side.
    Close { token: u32 },
}

/// Where a gRPC call goes and what it calls.
#[derive(Debug, Clone, PartialEq)]
pub struct GrpcTarget {
    /// A cluster name, or the `envoy_grpc.cluster_name` of a serialized `GrpcService`.
    pub upstream: String,
    pub service: String,
    pub method: String,
    pub initial_metadata: Vec<(String, Vec<u8>)>,
}

/// Which side of an L4 connection closed (`proxy_on_*_connection_close` peer type).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerType {
    Unknown = 0,
    Local = 1,
    Remote = 2,
}

/// One TCP connection as an L4 (`NETWORK`) plugin sees it: data not yet passed on in each
/// direction (buffer types 2 and 3) and the connection facts.
#[derive(Debug, Default)]
pub struct NetworkStream {
    pub downstream_data: Vec<u8>,
    pub upstream_data: Vec<u8>,
    /// Set when the guest called `proxy_close_stream(2|3)` during a callback; the data plane
    /// closes that side.
    pub close_requested: Option<StreamType>,
    pub properties: StreamProperties,
}

#[cfg(test)]
mod tests {
    use super::{HeaderMap, SharedName, StreamData};
    use std::sync::Arc;

    #[test]
    fn a_stream_built_from_defaults_holds_no_shared_name() {
        // No `Arc` at all: an empty `Arc<str>` would be std's one static, written by every
        // thread that clones or drops it.
        let data = StreamData::default();
        for name in [
            &data.properties.route_name,
            &data.properties.cluster_name,
            &data.properties.node_id,
        ] {
            assert_eq!(*name, SharedName::default());
            assert_eq!(name.as_str(), "");
        }
        assert_eq!(SharedName::from(""), SharedName::default());
        assert_eq!(
            SharedName::from(Arc::<str>::from("")),
            SharedName::default()
        );
        assert_eq!(SharedName::from(None), SharedName::default());
        let named: Arc<str> = Arc::from("outbound|80||a.default.svc.cluster.local");
        let shared = SharedName::from(Some(named.clone()));
        assert_eq!(&*shared, &*named);
        assert_eq!(SharedName::from(String::from(&*named)).as_str(), &*named);
    }

    fn pairs(m: &HeaderMap) -> Vec<(String, String)> {
        m.iter()
            .map(|(k, v)| (k.to_string(), String::from_utf8(v.to_vec()).unwrap()))
            .collect()
    }

    #[test]
    fn a_recycled_map_comes_back_empty_with_its_buffers() {
        // Each test runs on a thread of its own, so this thread's spares are this test's.
        let mut m = HeaderMap::reusing(8, 256);
        m.add(":status", "200");
        m.add("set-cookie", "secret=1");
        m.remove("set-cookie");
        m.recycle();
        let again = HeaderMap::reusing(1, 1);
        assert_eq!(again.len(), 0);
        assert!(again.get("set-cookie").is_none());
        assert!(again.iter().next().is_none());
        assert!(!again.is_modified());
        assert!(again.buf.capacity() >= 256 && again.spans.capacity() >= 8);
        // A map whose buffer grew large is freed rather than kept.
        let mut big = HeaderMap::reusing(1, 1);
        big.add("x-big", vec![b'a'; 64 << 10]);
        big.recycle();
        let fresh = HeaderMap::reusing(1, 1);
        assert!(fresh.buf.capacity() < 64 << 10);
    }

    #[test]
    fn order_case_and_repeats_are_kept_as_envoy_shows_them() {
        let mut m = HeaderMap::with_capacity(4, 64);
        m.add(":path", "/a");
        m.add("X-Multi", "1");
        m.add("x-multi", "2");
        m.add("accept", b"*/*");
        assert_eq!(m.get("X-MULTI"), Some(&b"1"[..]));
        assert_eq!(m.get_all("x-multi").collect::<Vec<_>>(), [&b"1"[..], b"2"]);
        // set removes every entry of the name and appends one at the end.
        m.set("x-multi", "3");
        assert_eq!(
            pairs(&m),
            [(":path", "/a"), ("accept", "*/*"), ("x-multi", "3")]
                .map(|(k, v)| (k.to_string(), v.to_string()))
        );
        assert_eq!(m.byte_size(), ":path/aaccept*/*x-multi3".len());
        assert!(m.remove("ACCEPT"));
        assert!(!m.remove("accept"));
        assert_eq!(m.len(), 2);
        assert_eq!(m.get("accept"), None);
    }

    #[test]
    fn modification_is_tracked_from_the_last_mark() {
        let mut m: HeaderMap = [("a", "1"), ("b", "2")].into_iter().collect();
        assert!(m.is_modified());
        m.mark_unmodified();
        assert!(!m.remove("missing"));
        let _ = m.get("a");
        assert!(!m.is_modified(), "reads and no-op removals change nothing");
        m.set("a", "1");
        assert!(m.is_modified());
        m.mark_unmodified();
        m.clear();
        assert!(m.is_modified());
    }

    #[test]
    fn dead_bytes_are_reclaimed_and_equality_ignores_layout() {
        let mut m = HeaderMap::new();
        let big = vec![b'v'; 1024];
        for _ in 0..64 {
            m.set("x-big", &big);
        }
        // 64 KiB were written; compaction keeps the buffer near what is live.
        assert!(m.buf.len() < 8 * 1024, "buffer kept {} bytes", m.buf.len());
        let mut fresh = HeaderMap::new();
        fresh.add("x-big", &big);
        assert_eq!(m, fresh);
        m.replace_all(&[("Keep-Case", b"v".to_vec())]);
        assert_eq!(m.iter().next(), Some(("Keep-Case", &b"v"[..])));
    }
}
