//! One resource of any known kind, and reading manifests into resources.

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::kinds::{self, KindInfo};
use crate::resources::*;

/// Any object Waystone stores.
#[derive(Debug, Clone, PartialEq)]
pub enum Resource {
    Namespace(Namespace),
    Service(Service),
    EndpointSlice(EndpointSlice),
    Gateway(Gateway),
    GatewayClass(GatewayClass),
    HttpRoute(HttpRoute),
    WasmPlugin(WasmPlugin),
    TrafficExtension(TrafficExtension),
    Secret(Secret),
    TcpRoute(TcpRoute),
}

macro_rules! each {
    ($self:expr, $o:ident => $e:expr) => {
        match $self {
            Resource::Namespace($o) => $e,
            Resource::Service($o) => $e,
            Resource::EndpointSlice($o) => $e,
            Resource::Gateway($o) => $e,
            Resource::GatewayClass($o) => $e,
            Resource::HttpRoute($o) => $e,
            Resource::WasmPlugin($o) => $e,
            Resource::TrafficExtension($o) => $e,
            Resource::Secret($o) => $e,
            Resource::TcpRoute($o) => $e,
        }
    };
}

/// Why a manifest could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The text is neither YAML nor JSON.
    #[error("{source_name}: {message}")]
    Syntax {
        source_name: String,
        message: String,
    },
    /// One document (or one item of a `List`) is not a valid object of a known kind.
    #[error("{0}")]
    Object(Box<ObjectParseError>),
}

/// Where and why one object failed to parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectParseError {
    /// Names the input (a file name); empty when the object did not come from a file.
    pub source_name: String,
    /// 1-based among the non-empty documents; 0 when the object did not come from a file.
    pub document: usize,
    /// 0-based index in a `kind: List`.
    pub item: Option<usize>,
    pub kind: Option<String>,
    pub name: Option<String>,
    /// Where in the object, e.g. `spec.targetRefs[0].nme`; empty for the object itself.
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for ObjectParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut loc = Vec::new();
        if !self.source_name.is_empty() {
            loc.push(self.source_name.clone());
        }
        let mut what = String::new();
        if self.document > 0 {
            what.push_str(&format!("document {}", self.document));
        }
        if let Some(i) = self.item {
            if !what.is_empty() {
                what.push(' ');
            }
            what.push_str(&format!("item {i}"));
        }
        let ident = match (&self.kind, &self.name) {
            (Some(k), Some(n)) => Some(format!("{k} {n}")),
            (Some(k), None) => Some(k.clone()),
            (None, Some(n)) => Some(n.clone()),
            (None, None) => None,
        };
        match (what.is_empty(), ident) {
            (false, Some(id)) => loc.push(format!("{what} ({id})")),
            (false, None) => loc.push(what),
            (true, Some(id)) => loc.push(id),
            (true, None) => {}
        }
        if !self.path.is_empty() {
            loc.push(self.path.clone());
        }
        for part in loc {
            write!(f, "{part}: ")?;
        }
        write!(f, "{}", self.message)
    }
}

impl ParseError {
    fn object(path: impl Into<String>, message: impl Into<String>) -> Self {
        ParseError::Object(Box::new(ObjectParseError {
            source_name: String::new(),
            document: 0,
            item: None,
            kind: None,
            name: None,
            path: path.into(),
            message: message.into(),
        }))
    }

    fn located(mut self, source: &str, doc: usize, list_item: Option<usize>) -> Self {
        if let ParseError::Object(o) = &mut self {
            o.source_name = source.to_string();
            o.document = doc;
            o.item = list_item;
        }
        self
    }

    fn identified(mut self, kind: &Option<String>, name: &Option<String>) -> Self {
        if let ParseError::Object(o) = &mut self {
            o.kind = kind.clone();
            o.name = name.clone();
        }
        self
    }
}

fn typed<T: DeserializeOwned>(map: Map<String, Value>) -> Result<T, ParseError> {
    serde_path_to_error::deserialize(Value::Object(map)).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        ParseError::object(path, e.into_inner().to_string())
    })
}

fn to_map<T: Serialize>(value: &T) -> Map<String, Value> {
    match serde_json::to_value(value) {
        Ok(Value::Object(m)) => m,
        // Every resource struct serializes to an object; nothing else can come out of serde here.
        _ => Map::new(),
    }
}

impl Resource {
    pub fn kind_info(&self) -> &'static KindInfo {
        kinds::kind_at(match self {
            Resource::Namespace(_) => kinds::NAMESPACE,
            Resource::Service(_) => kinds::SERVICE,
            Resource::EndpointSlice(_) => kinds::ENDPOINT_SLICE,
            Resource::Gateway(_) => kinds::GATEWAY,
            Resource::GatewayClass(_) => kinds::GATEWAY_CLASS,
            Resource::HttpRoute(_) => kinds::HTTP_ROUTE,
            Resource::WasmPlugin(_) => kinds::WASM_PLUGIN,
            Resource::TrafficExtension(_) => kinds::TRAFFIC_EXTENSION,
            Resource::Secret(_) => kinds::SECRET,
            Resource::TcpRoute(_) => kinds::TCP_ROUTE,
        })
    }

    pub fn meta(&self) -> &ObjectMeta {
        each!(self, o => &o.metadata)
    }

    pub fn meta_mut(&mut self) -> &mut ObjectMeta {
        each!(self, o => &mut o.metadata)
    }

    pub fn status(&self) -> Option<&Value> {
        each!(self, o => o.status.as_ref())
    }

    pub fn set_status(&mut self, status: Option<Value>) {
        each!(self, o => o.status = status)
    }

    /// `namespace/name`, or just `name` for cluster-scoped kinds or while the namespace is unset.
    pub fn display_name(&self) -> String {
        let m = self.meta();
        match &m.namespace {
            Some(ns) if self.kind_info().namespaced => format!("{ns}/{}", m.name),
            _ => m.name.clone(),
        }
    }

    /// Fills `metadata.namespace` when absent, for namespaced kinds only.
    pub fn set_default_namespace(&mut self, ns: &str) {
        let namespaced = self.kind_info().namespaced;
        let meta = self.meta_mut();
        if namespaced {
            if meta.namespace.as_deref().is_none_or(str::is_empty) {
                meta.namespace = Some(ns.to_string());
            }
        } else {
            meta.namespace = None;
        }
    }

    /// The whole object as `kubectl get -o json` shows it.
    pub fn to_json(&self) -> Value {
        let info = self.kind_info();
        let mut out = Map::new();
        out.insert("apiVersion".into(), Value::String(info.api_version()));
        out.insert("kind".into(), Value::String(info.kind.into()));
        out.extend(each!(self, o => to_map(o)));
        Value::Object(out)
    }

    /// What counts for `metadata.generation`: changes here bump it, label or status changes don't.
    pub fn spec_json(&self) -> Value {
        let mut m = each!(self, o => to_map(o));
        m.remove("metadata");
        m.remove("status");
        match self {
            // Kinds with a `spec` field: only the spec counts.
            Resource::Namespace(_)
            | Resource::Service(_)
            | Resource::Gateway(_)
            | Resource::GatewayClass(_)
            | Resource::HttpRoute(_)
            | Resource::TcpRoute(_)
            | Resource::WasmPlugin(_)
            | Resource::TrafficExtension(_) => m.remove("spec").unwrap_or(Value::Null),
            // Secret (type/data/stringData) and EndpointSlice (addressType/endpoints/ports)
            // keep their content at the top level.
            Resource::Secret(_) | Resource::EndpointSlice(_) => Value::Object(m),
        }
    }

    /// Reads one object (`apiVersion`, `kind`, `metadata`, ...). `status` is kept as given.
    pub fn from_json(v: Value) -> Result<Resource, ParseError> {
        let Value::Object(mut map) = v else {
            return Err(ParseError::object(
                "",
                format!("expected an object, found {}", type_name(&v)),
            ));
        };
        let kind_name = map.get("kind").and_then(Value::as_str).map(str::to_string);
        let name = map
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(Value::as_str)
            .map(str::to_string);
        let identify = |e: ParseError| e.identified(&kind_name, &name);
        let api_version = match map.remove("apiVersion") {
            Some(Value::String(s)) if !s.is_empty() => s,
            Some(other) => {
                return Err(identify(ParseError::object(
                    "apiVersion",
                    format!("expected a string, found {}", type_name(&other)),
                )));
            }
            None => return Err(identify(ParseError::object("apiVersion", "required"))),
        };
        let kind = match map.remove("kind") {
            Some(Value::String(s)) if !s.is_empty() => s,
            Some(other) => {
                return Err(identify(ParseError::object(
                    "kind",
                    format!("expected a string, found {}", type_name(&other)),
                )));
            }
            None => return Err(identify(ParseError::object("kind", "required"))),
        };
        let Some(info) = kinds::kind_for(&api_version, &kind) else {
            let known_kind = kinds::all_kinds().iter().find(|k| k.kind == kind);
            let message = match known_kind {
                Some(k) => format!(
                    "unsupported apiVersion \"{api_version}\" for kind {kind} (expected \"{}\")",
                    k.api_version()
                ),
                None => format!("unknown kind \"{kind}\" (apiVersion \"{api_version}\")"),
            };
            return Err(identify(ParseError::object("", message)));
        };
        let res = match info.kind {
            "Namespace" => typed(map).map(Resource::Namespace),
            "Service" => typed(map).map(Resource::Service),
            "EndpointSlice" => typed(map).map(Resource::EndpointSlice),
            "Gateway" => typed(map).map(Resource::Gateway),
            "GatewayClass" => typed(map).map(Resource::GatewayClass),
            "HTTPRoute" => typed(map).map(Resource::HttpRoute),
            "WasmPlugin" => typed(map).map(Resource::WasmPlugin),
            "TrafficExtension" => typed(map).map(Resource::TrafficExtension),
            "Secret" => typed(map).map(Resource::Secret),
            "TCPRoute" => typed(map).map(Resource::TcpRoute),
            other => Err(ParseError::object("", format!("unknown kind \"{other}\""))),
        };
        res.map_err(identify)
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Reads a multi-document YAML stream (or JSON, or a `kind: List`) into resources.
///
/// Empty documents and comments are skipped. `source` names the input in errors
/// (`walk.yaml: document 3 (WasmPlugin basic-auth): spec.priority: ...`).
/// `metadata.namespace` is left unset when absent; see [`Resource::set_default_namespace`].
pub fn parse_manifests(text: &str, source: &str) -> Result<Vec<Resource>, ParseError> {
    let documents = read_documents(text, source)?;
    let mut out = Vec::new();
    for (i, doc) in documents.into_iter().enumerate() {
        let index = i + 1;
        if doc.is_null() {
            continue;
        }
        let is_list = doc.get("kind").and_then(Value::as_str) == Some("List")
            && doc.get("apiVersion").and_then(Value::as_str) == Some("v1");
        if is_list {
            let items = match doc.get("items") {
                Some(Value::Array(items)) => items.clone(),
                None | Some(Value::Null) => Vec::new(),
                Some(other) => {
                    return Err(ParseError::object(
                        "items",
                        format!("expected an array, found {}", type_name(other)),
                    )
                    .identified(&Some("List".into()), &None)
                    .located(source, index, None));
                }
            };
            for (j, item) in items.into_iter().enumerate() {
                out.push(Resource::from_json(item).map_err(|e| e.located(source, index, Some(j)))?);
            }
        } else {
            out.push(Resource::from_json(doc).map_err(|e| e.located(source, index, None))?);
        }
    }
    Ok(out)
}

fn read_documents(text: &str, source: &str) -> Result<Vec<Value>, ParseError> {
    let trimmed = text.trim_start();
    if trimmed.starts_with('{') || trimmed.starts_with('[') {
        // JSON first: exact numbers and JSON's own error messages. A JSON array is a list
        // of objects, as `kubectl apply -f` accepts too.
        if let Ok(v) = serde_json::from_str::<Value>(text) {
            return Ok(match v {
                Value::Array(items) => items,
                other => vec![other],
            });
        }
    }
    serde_saphyr::from_multiple::<Value>(text).map_err(|e| ParseError::Syntax {
        source_name: source.to_string(),
        message: format!(
            "invalid YAML: {}",
            e.to_string().trim_start_matches("error: ")
        ),
    })
}
