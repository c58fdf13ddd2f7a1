//! `proxy_get_property`: Envoy's attribute vocabulary over the plain data the host has.
//! Strings are returned as raw bytes, integers and times as 8-byte little-endian.

use std::net::SocketAddr;
use std::time::UNIX_EPOCH;

use crate::state::HostState;
use crate::types::{HeaderMap, StreamProperties};

use super::serialize_map;

/// Splits a property path into segments. Paths are NUL-separated (`request\0path`); a path
/// without NUL is also accepted in dotted form (`request.path`) since some SDKs send that.
fn segments(path: &[u8]) -> Vec<&[u8]> {
    let path = path.strip_suffix(b"\0").unwrap_or(path);
    if path.contains(&0) {
        return path.split(|b| *b == 0).collect();
    }
    // Dotted form: only the first two dots separate segments so header names keep theirs.
    let mut parts = Vec::new();
    let mut rest = path;
    for _ in 0..2 {
        match rest.iter().position(|b| *b == b'.') {
            Some(i) => {
                parts.push(&rest[..i]);
                rest = &rest[i + 1..];
            }
            None => break,
        }
    }
    parts.push(rest);
    parts
}

fn int(v: i64) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

fn header(map: &HeaderMap, name: &str) -> Option<Vec<u8>> {
    map.get(name).map(<[u8]>::to_vec)
}

fn headers_or_one(map: &HeaderMap, rest: &[&[u8]]) -> Option<Vec<u8>> {
    match rest {
        [] => Some(serialize_map(map.iter())),
        [name] => header(map, &String::from_utf8_lossy(name)),
        _ => None,
    }
}

fn address(a: Option<SocketAddr>, what: &[u8]) -> Option<Vec<u8>> {
    let a = a?;
    match what {
        b"address" => Some(a.to_string().into_bytes()),
        b"port" => Some(int(i64::from(a.port()))),
        _ => None,
    }
}

fn non_empty(s: &str) -> Option<Vec<u8>> {
    (!s.is_empty()).then(|| s.as_bytes().to_vec())
}

fn headers_size(map: &HeaderMap) -> u64 {
    map.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum()
}

fn uint(v: u64) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

pub(crate) fn get_property(state: &HostState, path: &[u8]) -> Option<Vec<u8>> {
    let seg = segments(path);
    if let Some(v) = builtin(state, &seg) {
        return Some(v);
    }
    let trimmed = path.strip_suffix(b"\0").unwrap_or(path);
    // Envoy keeps plugin-set properties in the filter state under `wasm.<path>`.
    let trimmed = match seg.as_slice() {
        [b"filter_state", key] => key.strip_prefix(b"wasm.").unwrap_or(key),
        _ => trimmed,
    };
    let extra = state
        .stream
        .as_ref()
        .map(|s| &s.properties.extra)
        .unwrap_or(&state.root_properties);
    extra
        .get(path)
        .or_else(|| extra.get(trimmed))
        .or_else(|| state.root_properties.get(trimmed))
        .cloned()
}

fn builtin(state: &HostState, seg: &[&[u8]]) -> Option<Vec<u8>> {
    let spec = &state.spec;
    match seg {
        [b"plugin_name"] => return Some(spec.name.as_bytes().to_vec()),
        [b"plugin_root_id"] => return Some(spec.root_id.as_bytes().to_vec()),
        [b"plugin_vm_id"] => return Some(spec.vm_id.as_bytes().to_vec()),
        _ => {}
    }
    let props = match (&state.stream, &state.network) {
        (Some(s), _) => &s.properties,
        (None, Some(n)) => &n.properties,
        (None, None) => return None,
    };
    if let Some(v) = connection_property(props, seg) {
        return v;
    }
    let stream = state.stream.as_ref()?;
    let req = &stream.request_headers;
    match seg {
        [b"request", b"path"] => header(req, ":path"),
        [b"request", b"url_path"] => req.get(":path").map(|p| {
            let end = p.iter().position(|b| *b == b'?').unwrap_or(p.len());
            p[..end].to_vec()
        }),
        [b"request", b"host"] => header(req, ":authority").or_else(|| header(req, "host")),
        [b"request", b"scheme"] => header(req, ":scheme"),
        [b"request", b"method"] => header(req, ":method"),
        [b"request", b"referer"] => header(req, "referer"),
        [b"request", b"useragent"] => header(req, "user-agent"),
        [b"request", b"id"] => props
            .request_id
            .as_ref()
            .map(|s| s.as_bytes().to_vec())
            .or_else(|| header(req, "x-request-id")),
        [b"request", b"protocol"] => non_empty(props.protocol),
        [b"request", b"time"] => props
            .start_time
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| int(d.as_nanos() as i64)),
        [b"request", b"headers", rest @ ..] => headers_or_one(req, rest),
        [b"request", b"duration"] => props
            .start_time
            .and_then(|t| t.elapsed().ok())
            .map(|d| int(d.as_nanos() as i64)),
        [b"request", b"size"] => Some(int(stream.request_body_bytes as i64)),
        [b"request", b"total_size"] => Some(int((headers_size(req)
            + stream.request_body_bytes
            + headers_size(&stream.request_trailers))
            as i64)),
        [b"response", b"code_details"] => non_empty(&props.response_code_details),
        [b"response", b"flags"] => Some(uint(props.response_flags)),
        [b"response", b"grpc_status"] => header(&stream.response_trailers, "grpc-status")
            .or_else(|| header(&stream.response_headers, "grpc-status"))
            .and_then(|v| std::str::from_utf8(&v).ok()?.parse::<i64>().ok())
            .map(int),
        [b"response", b"size"] => stream
            .response_headers
            .get(":status")
            .map(|_| int(stream.response_body_bytes as i64)),
        [b"response", b"total_size"] => stream.response_headers.get(":status").map(|_| {
            int((headers_size(&stream.response_headers)
                + stream.response_body_bytes
                + headers_size(&stream.response_trailers)) as i64)
        }),
        [b"response", b"code"] => props
            .response_code
            .map(i64::from)
            .or_else(|| {
                let status = stream.response_headers.get(":status")?;
                std::str::from_utf8(status).ok()?.parse().ok()
            })
            .map(int),
        [b"response", b"headers", rest @ ..] => headers_or_one(&stream.response_headers, rest),
        [b"response", b"trailers", rest @ ..] => headers_or_one(&stream.response_trailers, rest),
        _ => None,
    }
}

/// Properties HTTP and L4 contexts share; `Some(answer)` when `seg` names one of them.
fn connection_property(props: &StreamProperties, seg: &[&[u8]]) -> Option<Option<Vec<u8>>> {
    Some(match seg {
        [b"connection", b"id"] => Some(uint(props.connection_id)),
        // Envoy serializes booleans as one byte; plain-text connections have no mTLS.
        [b"connection", b"mtls"] => Some(vec![u8::from(props.mtls.is_some())]),
        [b"connection", b"tls_version"] => {
            props.mtls.as_ref().and_then(|m| non_empty(&m.tls_version))
        }
        [b"source", b"principal"] | [b"connection", b"uri_san_peer_certificate"] => props
            .mtls
            .as_ref()
            .and_then(|m| non_empty(&m.peer_principal)),
        [b"destination", b"principal"] | [b"connection", b"uri_san_local_certificate"] => props
            .mtls
            .as_ref()
            .and_then(|m| non_empty(&m.local_principal)),
        [b"connection", b"requested_server_name"] => {
            Some(props.requested_server_name.as_bytes().to_vec())
        }
        [b"source", what] => address(props.source, what),
        [b"destination", what] => address(props.destination, what),
        [b"upstream", what] => address(props.upstream, what),
        [b"node", b"id"] => non_empty(&props.node_id),
        [b"node", b"cluster"] => non_empty(&props.node_cluster),
        [b"cluster_name"] | [b"xds", b"cluster_name"] => non_empty(&props.cluster_name),
        [b"route_name"] | [b"xds", b"route_name"] => non_empty(&props.route_name),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::types::{AbiVersion, HttpStream, PluginSpec};

    #[test]
    fn path_forms() {
        assert_eq!(segments(b"request\0path"), vec![&b"request"[..], b"path"]);
        assert_eq!(segments(b"request\0path\0"), vec![&b"request"[..], b"path"]);
        assert_eq!(segments(b"request.path"), vec![&b"request"[..], b"path"]);
        assert_eq!(
            segments(b"request.headers.x.y"),
            vec![&b"request"[..], b"headers", b"x.y"]
        );
        assert_eq!(segments(b"plugin_name"), vec![&b"plugin_name"[..]]);
    }

    #[test]
    fn request_id_is_the_embedders_or_else_the_request_header() {
        let spec = Arc::new(PluginSpec {
            name: "p".into(),
            root_id: String::new(),
            vm_id: String::new(),
            plugin_configuration: Vec::new(),
            vm_configuration: Vec::new(),
            env: Vec::new(),
        });
        let mut state = HostState::new(spec, AbiVersion::V0_2_1, Arc::default(), 1 << 20);
        let mut stream = HttpStream::default();
        stream
            .request_headers
            .add("x-request-id", "from-the-header");
        state.stream = Some(stream);
        // The data plane leaves the property unset: the header the plugins see answers.
        assert_eq!(
            get_property(&state, b"request\0id").as_deref(),
            Some(&b"from-the-header"[..])
        );
        if let Some(s) = state.stream.as_mut() {
            s.properties.request_id = Some("set-by-embedder".into());
        }
        assert_eq!(
            get_property(&state, b"request\0id").as_deref(),
            Some(&b"set-by-embedder"[..])
        );
    }
}
